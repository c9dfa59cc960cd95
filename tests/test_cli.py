"""The `mvm-cuda reproduce` command line, end to end with tiny settings on 8x8 digits."""
import json
import platform
import subprocess
import sys

import pytest

from mvm_cuda.eval import reproduce

TINY = ["--dataset", "digits", "--n-test", "20", "--R", "10", "--epochs", "2", "--n-boot", "100", "--no-progress"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVM_CUDA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_reproduce_end_to_end(tmp_path, cache, capsys):
    out = tmp_path / "out"
    assert reproduce.main(["reproduce", *TINY, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 2 (digits)" in printed and "Table 3 (digits)" in printed

    record = json.loads((out / "results_digits.json").read_text())
    assert record["config"]["R"] == 10 and record["config"]["n_test"] == 20
    assert record["config"]["attacks"] == ["fgsm", "bim-a", "jsma"]
    assert 0 < record["config"]["n_attacked"] <= 20
    assert set(record["table2"]) >= {"clean_accuracy", "fgsm", "bim-a", "jsma"}
    rows = record["table3"]
    assert list(rows) == ["MVM c=0.5N", "MVM c=1N", "MVM c=2N", "SAP 50%", "SAP 80%", "SAP 100%", "dropout 0.5"]
    assert rows["MVM c=1N"]["config"]["c_rel"] == 1.0
    for per_attack in rows.values():
        for attack in ("fgsm", "bim-a", "jsma"):
            for which in ("successful", "all"):
                rep = per_attack[attack][which]
                assert rep["auc"] is None or 0 <= rep["ci"][0] <= rep["auc"] <= rep["ci"][1] <= 1
            assert per_attack[attack]["all"]["n_adv"] == record["config"]["n_attacked"]
    for attack in ("fgsm", "bim-a", "jsma"):
        png = out / f"roc_digits_{attack}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (cache / "models").is_dir() and (cache / "tensors").is_dir()
    assert all(per_attack["cached"] == [] for per_attack in rows.values())

    # A second run finds the model, the attacks and the scores in the cache (a long
    # run that stopped resumes), and gives the same numbers. (That scores with the
    # same seed are equal when computed afresh: test_detector.)
    again = reproduce.main(["reproduce", *TINY, "--attacks", "fgsm", "--out", str(tmp_path / "again")])
    assert again == 0
    assert "scores of clean, fgsm from the cache" in capsys.readouterr().out
    second = json.loads((tmp_path / "again" / "results_digits.json").read_text())
    assert second["table2"]["fgsm"] == record["table2"]["fgsm"]
    for name, per_attack in second["table3"].items():
        assert per_attack["cached"] == ["clean", "fgsm"]
        assert per_attack["fgsm"]["all"]["auc"] == rows[name]["fgsm"]["all"]["auc"]
    # Other settings are other keys: R = 5 scores afresh.
    reproduce.main(["reproduce", *TINY, "--attacks", "fgsm", "--R", "5", "--out", str(tmp_path / "r5")])
    third = json.loads((tmp_path / "r5" / "results_digits.json").read_text())
    assert all(per_attack["cached"] == [] for per_attack in third["table3"].values())


def test_reproduce_is_the_default_command():
    assert reproduce._with_default_command([]) == ["reproduce"]
    assert reproduce._with_default_command(["--dataset", "digits"]) == ["reproduce", "--dataset", "digits"]
    assert reproduce._with_default_command(["--help"]) == ["--help"]
    args = reproduce.build_parser().parse_args(reproduce._with_default_command(["--full"]))
    assert args.command == "reproduce" and args.full and args.dataset == "mnist"


def test_python_dash_m_help(tmp_path):
    # Run outside the repository: `python -m` puts the working folder first on
    # sys.path, and the source folder has no compiled _C.
    done = subprocess.run([sys.executable, "-m", "mvm_cuda", "reproduce", "--help"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for option in ("--dataset", "--data-root", "--device", "--R", "--n-test", "--seed", "--out", "--full"):
        assert option in done.stdout


def test_unknown_attack_is_refused(tmp_path, cache):
    with pytest.raises(SystemExit, match="unknown attack"):
        reproduce.main([*TINY, "--attacks", "cw", "--out", str(tmp_path)])


def test_program_keeps_freed_memory_but_a_call_from_python_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(reproduce, "keep_freed_memory", lambda: calls.append(1) or True)
    with pytest.raises(SystemExit):
        reproduce.main(["--version"])  # called from Python: the process's allocator is left alone
    assert calls == []
    monkeypatch.setattr(sys, "argv", ["mvm-cuda", "--version"])
    with pytest.raises(SystemExit):
        reproduce.main()  # as the program
    assert calls == [1]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")
def test_keep_freed_memory_applies_on_glibc(tmp_path):
    # In a child process (the setting is process-wide), outside the repository
    # (whose source folder has no compiled _C).
    code = "from mvm_cuda.eval.malloc import keep_freed_memory; assert keep_freed_memory() is True"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)
