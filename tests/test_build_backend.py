"""The in-tree build backend (backend/torch_aware_backend.py): how it finds the
target environment's torch under pip's build isolation, and its message when
there is none. The real installs (pip install ., an sdist, no torch) run in CI's
.ci/pip_install.sh."""
import importlib.util
import pathlib
import sys

import pytest

BACKEND = pathlib.Path(__file__).resolve().parent.parent / "backend" / "torch_aware_backend.py"


@pytest.fixture
def backend(monkeypatch):
    spec = importlib.util.spec_from_file_location("torch_aware_backend_under_test", BACKEND)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "_torch_visible", lambda: False)  # as under pip's isolation
    monkeypatch.setattr(sys, "path", list(sys.path))
    return module


def test_the_folder_with_torch_is_appended(backend, monkeypatch, tmp_path):
    empty, site = tmp_path / "empty", tmp_path / "site"
    (site / "torch").mkdir(parents=True)
    (site / "torch" / "__init__.py").write_text("")
    empty.mkdir()
    monkeypatch.setattr(backend, "_candidate_folders", lambda: [str(empty), str(site)])
    assert backend._expose_installed_torch() is None
    assert sys.path[-1] == str(site) and str(empty) not in sys.path


def test_no_torch_gives_a_clear_message_from_every_hook(backend, monkeypatch, tmp_path):
    monkeypatch.setattr(backend, "_candidate_folders", lambda: [str(tmp_path)])
    message = backend._expose_installed_torch()
    assert "none was found" in message and str(tmp_path) in message and "pip install torch" in message
    monkeypatch.setattr(backend, "_ERROR", message)
    for hook in ("get_requires_for_build_wheel", "build_wheel", "build_editable", "build_sdist"):
        with pytest.raises(SystemExit, match="none was found"):
            getattr(backend, hook)("unused")


def test_the_active_virtual_env_is_searched_first(backend, monkeypatch, tmp_path):
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    folders = backend._candidate_folders()
    assert folders[0].startswith(str(tmp_path)) and "site-packages" in folders[0]
