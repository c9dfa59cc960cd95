"""benchmarks/gpu_check.sh on a machine without a GPU: its deadline, its files
and its "no GPU visible" path (the phases themselves run on a lent GPU)."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None,
                                reason="needs bash and tar")


def run_phase(phase, out, **env):
    """The phase against the installed mvm_cuda (no build), with no
    compute-sanitizer or nvcc in reach."""
    full = dict(os.environ, OUT=str(out), PYTHON=sys.executable, MVM_SKIP_BUILD="1",
                PATH=os.path.dirname(sys.executable) + ":/usr/bin:/bin", CUDA_HOME="/nonexistent", **env)
    full.pop("PYTHONPATH", None)
    return subprocess.run(["bash", str(SCRIPT), phase], env=full, capture_output=True, text=True, timeout=120)


def check_files(out):
    """At most 8 files under $OUT, at most 2 folders down; the logs archive reads."""
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    assert all(len(p.relative_to(out).parts) <= 3 for p in files), files
    with tarfile.open(out / "logs.tar.gz") as tar:
        return {pathlib.Path(m.name).name for m in tar.getmembers() if m.isfile()}


def test_a_slow_step_is_cut_at_the_deadline_and_the_rest_reported(tmp_path):
    done = run_phase("tests", tmp_path / "out", MVM_GPU_VISIBLE="yes", MVM_GPU_DEADLINE="25",
                     MVM_GPU_STEP_DELAY="test_cuda:600")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 1, done.stdout + done.stderr
    assert "- test_cuda: cut at the deadline" in summary, summary
    assert "- cuda_cases: skipped: deadline" in summary, summary
    assert "- cpu_rest: skipped: deadline" in summary, summary
    for tool in ("memcheck", "racecheck", "initcheck", "synccheck"):
        assert f"- compute-sanitizer {tool}: unavailable (compute-sanitizer not found)" in summary, summary
    assert "- total:" in summary
    assert "test_cuda.log" in check_files(tmp_path / "out")


@pytest.mark.parametrize("phase", ["tests", "bench"])
def test_without_a_gpu_every_gpu_step_says_so(tmp_path, phase):
    done = run_phase(phase, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "- no GPU visible" in summary, summary
    steps = ["test_cuda", "cuda_cases", "cpu_rest"] if phase == "tests" else ["op_table", "detector"]
    for name in steps:
        assert f"- {name}: skipped: no GPU visible" in summary, summary
    check_files(tmp_path / "out")


def test_an_unknown_phase_is_refused(tmp_path):
    done = run_phase("all", tmp_path / "out")
    assert done.returncode == 2 and "usage:" in done.stderr
