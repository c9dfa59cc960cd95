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


def run_phase(phase, out, script=SCRIPT, **env):
    """The phase against the installed mvm_cuda (no build), with no
    compute-sanitizer or nvcc in reach, and no GPU unless env says
    MVM_GPU_VISIBLE=yes (on a GPU machine the probe would find one, and the
    nested phase would run for real). out=None leaves $OUT unset."""
    full = {**os.environ, "PYTHON": sys.executable, "MVM_SKIP_BUILD": "1", "MVM_GPU_VISIBLE": "no",
            "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin", "CUDA_HOME": "/nonexistent", **env}
    full.pop("PYTHONPATH", None)
    full.pop("OUT", None)
    if out is not None:
        full["OUT"] = str(out)
    return subprocess.run(["bash", str(script), phase], env=full, capture_output=True, text=True, timeout=120)


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


STEPS = {
    "all": ["test_cuda", "cuda_cases", "op_table", "detector", "detector_cost", "compute-sanitizer memcheck",
            "compute-sanitizer racecheck", "compute-sanitizer initcheck", "compute-sanitizer synccheck"],
    "tests": ["test_cuda", "cuda_cases", "compute-sanitizer memcheck", "compute-sanitizer racecheck",
              "compute-sanitizer initcheck", "compute-sanitizer synccheck", "cpu_rest"],
    "bench": ["op_table", "detector", "detector_cost"],
}


@pytest.mark.parametrize("phase", STEPS)
def test_without_a_gpu_every_gpu_step_says_so(tmp_path, phase):
    done = run_phase(phase, tmp_path / "out")
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "- no GPU visible" in summary, summary
    lines = summary.splitlines()
    at = [lines.index(f"- {name}: skipped: no GPU visible") for name in STEPS[phase]]
    assert at == sorted(at), summary  # in this order: tests, tables, sanitizers
    assert "deadline 570s" in summary and "- total:" in summary
    check_files(tmp_path / "out")


def test_the_deadline_is_passed_in_seconds(tmp_path):
    done = run_phase("all", tmp_path / "out", MVM_GPU_DEADLINE="900")
    assert done.returncode == 0 and "deadline 900s" in (tmp_path / "out" / "summary.md").read_text()
    done = run_phase("all", tmp_path / "out", MVM_GPU_DEADLINE="ten")
    assert done.returncode == 2 and "MVM_GPU_DEADLINE must be a whole number of seconds, got 'ten'" in done.stderr


def test_without_out_the_files_go_to_out_gpu_check(tmp_path):
    # A copy of the script in a tree of its own: its default folder is that
    # tree's out/gpu_check.
    (tmp_path / "benchmarks").mkdir()
    script = tmp_path / "benchmarks" / "gpu_check.sh"
    shutil.copy(SCRIPT, script)
    done = run_phase("all", None, script=script)
    out = tmp_path / "out" / "gpu_check"
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"gpu_check: results in {out}" in done.stdout
    assert "- op_table: skipped: no GPU visible" in (out / "summary.md").read_text()
    check_files(out)


def test_an_unknown_phase_is_refused(tmp_path):
    done = run_phase("everything", tmp_path / "out")
    assert done.returncode == 2 and "usage:" in done.stderr and "all|tests|bench" in done.stderr
