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


def _venv_with_torch(backend, root):
    """A fake environment at root whose site-packages (for this Python) hold a torch."""
    folder = backend.sysconfig.get_path("purelib", vars={"base": str(root), "platbase": str(root)})
    (pathlib.Path(folder) / "torch").mkdir(parents=True)
    (pathlib.Path(folder) / "torch" / "__init__.py").write_text("")
    return folder


def test_the_interpreters_own_packages_come_before_an_activated_env(backend, monkeypatch, tmp_path):
    other = _venv_with_torch(backend, tmp_path / "other")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "other"))
    monkeypatch.setenv("CONDA_PREFIX", str(tmp_path / "other"))
    monkeypatch.setattr(backend.sys, "prefix", str(tmp_path / "target"))
    folders = backend._candidate_folders()
    assert folders[: len(backend.site.getsitepackages())] == backend.site.getsitepackages()
    assert other not in folders  # the target is a real environment: another one's torch is never used


def test_an_activated_env_with_the_only_torch_is_an_error(backend, monkeypatch, tmp_path):
    other = _venv_with_torch(backend, tmp_path / "other")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "other"))
    monkeypatch.setattr(backend, "_own_folders", lambda: [str(tmp_path / "target-site")])
    monkeypatch.setattr(backend.sys, "prefix", str(tmp_path / "target"))
    message = backend._expose_installed_torch()
    assert message is not None and "another environment" in message and other in message
    assert other not in sys.path


def test_a_throwaway_build_env_falls_back_to_the_activated_venv(backend, monkeypatch, tmp_path):
    other = _venv_with_torch(backend, tmp_path / "venv")
    monkeypatch.setenv("VIRTUAL_ENV", str(tmp_path / "venv"))
    monkeypatch.delenv("CONDA_PREFIX", raising=False)
    monkeypatch.setattr(backend, "_own_folders", lambda: [str(tmp_path / "build-site")])
    monkeypatch.setattr(backend.sys, "prefix", str(tmp_path / "build-env-x1y2"))  # python -m build's venv
    assert backend._candidate_folders() == [str(tmp_path / "build-site"), other]
    assert backend._expose_installed_torch() is None and sys.path[-1] == other
