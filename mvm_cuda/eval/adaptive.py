"""An adaptive attack that knows the detector: BIM with expectation over transformation.

The randomized detectors are broken in the literature by attacks that model their
randomness (Athalye et al. 2018 for SAP, Carlini & Wagner 2017 for the dropout
detector). `eot_bim` is that attack for every detector of this project:

- Gradient: each step averages the gradient over K stochastic passes of the model with
  the detector's units in "sample" mode and differentiable (`mvm_cuda.nn`): the random
  masks come from the same ops as in scoring and are held fixed, autograd flows through
  the activations. MVM's p is recorded again on every step from a clean pass of the
  current adversarial image (the detector records p on the image it scores), and
  treated as a constant: its dependence on the image through alpha is not
  differentiated.
- Loss: the cross-entropy toward one wrong target class, summed over the K passes,
  sum_k -log softmax(f_k(x))[t], minimized. It rewards every pass for predicting t
  with high probability, so it asks for misclassification and for the R passes of the
  detector to agree (a histogram concentrated on t has entropy near 0) in one smooth
  objective; an untargeted loss would be satisfied by passes that disagree among the
  wrong classes, which is exactly what the detector flags. The target is the runner-up
  class of the undefended network on the clean image (its easiest wrong class).
- Steps: L-inf BIM as in `attacks.bim_b` (steps of eps_iter along the sign of the
  gradient, projected on the eps-ball and [0, 1]), a fixed number n_iter of them with
  no early stop: stopping at the first misclassification (BIM-A) leaves low-confidence
  images, the very ones the entropy score detects.

`evaluate_adaptive` fits each detector's threshold at a false-positive rate on clean
images, runs the attack against it, and reports ROC-AUC and the attack's success at
that rate (misclassified and not flagged) next to a non-adaptive attack's numbers on
the same images.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..detector import Detector, roc_report, threshold_for_fpr
from .._progress import hide_bar
from ..nn import MVMUnit, set_differentiable, set_mode
from .attacks import _project

__all__ = ["ADAPTIVE", "DETECTORS", "runner_up", "eot_loss", "eot_bim", "evaluate_adaptive"]

# The settings of `mvm-cuda reproduce --adaptive` (the README's numbers): images attacked
# (the first of the correctly classified ones), BIM steps, EOT passes per step. Sized so
# that the three attacks take minutes on a 2-core CPU; 20 steps of 0.01 reach at most
# 0.2 of the 0.3 ball.
ADAPTIVE = dict(n_images=100, n_iter=20, K=5)

# The detectors attacked: the headline MVM setting and the paper's SAP and dropout rows.
DETECTORS = (
    ("mvm", dict(c_rel=0.5)),
    ("sap", dict(frac=0.5)),
    ("dropout", dict(p_drop=0.5)),
)


def _check(fn: str, det: Detector, x: Tensor, y: Tensor) -> None:
    if not isinstance(det, Detector):
        raise TypeError(f"{fn}: det must be a mvm_cuda.Detector, got {type(det).__name__}")
    if not isinstance(x, Tensor) or x.dim() != 4 or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{fn}: x must be a float tensor of images (N, C, H, W), got {shape}")
    if not isinstance(y, Tensor) or y.shape != (x.shape[0],):
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{fn}: y (or target) must have shape ({x.shape[0]},), got {shape}")


def _check_int(fn: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or int(value) != value or value < low:
        raise ValueError(f"{fn}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)


@torch.no_grad()
def runner_up(det: Detector, x: Tensor, y: Tensor) -> Tensor:
    """The highest-scoring class other than y under the undefended network (units off).

    x: (N, C, H, W) in [0, 1], y: (N,) labels; returns (N,) int64 on y's device."""
    _check("runner_up", det, x, y)
    out = []
    with det.lock:  # the units' mode is shared with the detector's other callers
        set_mode(det.net, "off")
        for s in range(0, x.shape[0], det.max_batch):
            logits = det.net(x[s:s + det.max_batch].to(det.device, det.dtype)).float()
            logits.scatter_(1, y[s:s + det.max_batch].to(logits.device)[:, None], -math.inf)
            out.append(logits.argmax(1).to(y.device))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=y.device)


class _AttackMode:
    """Puts the detector's units into the attack's state and always restores the
    detector's own (units off, not differentiable, no generator, no recorded p); holds
    the detector's lock meanwhile, so no other thread scores with the attack's state."""

    def __init__(self, det: Detector, generator: torch.Generator | None, pixels: int):
        self.det, self.generator, self.pixels = det, generator, pixels

    def __enter__(self):
        self.det.lock.acquire()
        for unit in self.det.units:
            unit.generator = self.generator
        self.det.set_ref_pixels(self.pixels)  # c as the detector's c_ref gives it
        set_differentiable(self.det.net, True)
        return self

    def __exit__(self, *exc):
        try:
            set_mode(self.det.net, "off")
            set_differentiable(self.det.net, False)
            for unit in self.det.units:
                unit.generator = None
                if isinstance(unit, MVMUnit):
                    unit.alpha = unit.p = None
        finally:
            self.det.lock.release()
        return False


def _eot_logits(det: Detector, x: Tensor, K: int) -> Tensor:
    """Logits (K * P, classes) of K stochastic passes over the P images x, stacked
    copy-major like the detector's; differentiable w.r.t. x. MVM's p is recorded from
    a clean pass of x, detached."""
    if det.method == "mvm":
        with torch.no_grad():
            set_mode(det.net, "record")
            det.net(x.detach())
    set_mode(det.net, "sample")
    return det.net(x.repeat(K, 1, 1, 1))


def _target_loss(logits: Tensor, target: Tensor, K: int) -> Tensor:
    """(P,) per-image sum over the K passes of the cross-entropy toward target."""
    ce = F.cross_entropy(logits.float(), target.repeat(K), reduction="none")
    return ce.view(K, -1).sum(0)


def _batches(n: int, det: Detector, K: int):
    size = max(1, det.max_batch // K)  # K copies of each image share one forward
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def eot_loss(det: Detector, x: Tensor, target: Tensor, K: int = 10,
             generator: torch.Generator | None = None) -> Tensor:
    """The attack's loss per image: the cross-entropy toward target, averaged over K
    stochastic passes of the detector's network (lower is a stronger attack).

    x: (N, C, H, W) in [0, 1], target: (N,) classes; returns (N,) float on the CPU.
    Draws from `generator` (on the detector's device), else the device's default one."""
    _check("eot_loss", det, x, target)
    K = _check_int("eot_loss", "K", K, 1)
    out = []
    with torch.no_grad(), _AttackMode(det, generator, x.shape[2] * x.shape[3]):
        for s, e in _batches(x.shape[0], det, K):
            xb = x[s:e].to(det.device, det.dtype)
            out.append(_target_loss(_eot_logits(det, xb, K), target[s:e].to(det.device), K).cpu() / K)
    return torch.cat(out) if out else torch.zeros(0)


def eot_bim(
    det: Detector,
    x: Tensor,
    y: Tensor,
    eps: float,
    eps_iter: float,
    n_iter: int = ADAPTIVE["n_iter"],
    K: int = ADAPTIVE["K"],
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = None,
) -> Tensor:
    """Adaptive L-inf BIM against a detector: n_iter steps of eps_iter * sign of the
    EOT gradient of the target cross-entropy (see the module docstring), each projected
    on the eps-ball around x and on [0, 1], as in `attacks.bim_b`.

    det: the Detector attacked (its network with units; its own generators, threshold
    and state are left as they were). x: (N, C, H, W) in [0, 1], y: (N,) true labels;
    target: (N,) wrong classes to aim at (default: `runner_up`). K: stochastic passes
    per step, batched with the images so that one forward holds at most det.max_batch
    images. Randomness: `generator` (on det's device) or the device's default
    generator, so torch.manual_seed makes the attack repeatable. Returns the
    adversarial images, (N, C, H, W) on x's device and dtype, detached.
    """
    _check("eot_bim", det, x, y)
    n_iter = _check_int("eot_bim", "n_iter", n_iter, 0)
    K = _check_int("eot_bim", "K", K, 1)
    if not eps >= 0 or not eps_iter > 0:
        raise ValueError(f"eot_bim: need eps >= 0 and eps_iter > 0, got eps={eps}, eps_iter={eps_iter}")
    if det.net.training:
        raise ValueError("eot_bim: the detector's network is in training mode; call det.net.eval()")
    if target is None:
        target = runner_up(det, x, y)
    else:
        _check("eot_bim", det, x, target)
        if bool((target.cpu() == y.cpu()).any()):
            raise ValueError("eot_bim: target must differ from y for every image")
    x0 = x.detach()
    out = x0.clone()
    batches = _batches(x.shape[0], det, K)
    with _AttackMode(det, generator, x.shape[2] * x.shape[3]), \
            tqdm(total=n_iter * len(batches), desc=f"EOT-BIM vs {det.name} (K={K})", unit="step",
                 disable=hide_bar(progress), leave=False) as bar:
        for s, e in batches:
            xb = x0[s:e].to(det.device, det.dtype)
            tb = target[s:e].to(det.device)
            x_adv = xb.clone()
            for _ in range(n_iter):
                with torch.enable_grad():
                    x_var = x_adv.detach().requires_grad_(True)
                    loss = _target_loss(_eot_logits(det, x_var, K), tb, K).sum()
                    (grad,) = torch.autograd.grad(loss, x_var)
                # Descend: the loss is the distance to the target class.
                x_adv = x_adv - eps_iter * grad.sign()
                x_adv = _project(x_adv, xb, eps)
                bar.update(1)
            out[s:e] = x_adv.to(out.device, out.dtype)
    return out


def _attack_record(det: Detector, model: nn.Module, clean_scores: Tensor, x_adv: Tensor, y: Tensor,
                   n_boot: int, seed: int) -> dict:
    """Scores, ROC and success at the detector's threshold for one adversarial set."""
    from .models import predict

    adv_scores = det.scores(x_adv)
    misclassified = predict(model, x_adv.to(det.device)).cpu() != y.cpu()
    flagged = adv_scores > det.threshold
    evaded = misclassified & ~flagged
    n = max(1, x_adv.shape[0])
    return {
        "n": int(x_adv.shape[0]),
        "misclassified": float(misclassified.sum()) / n,
        "flagged": float(flagged.sum()) / n,
        "flagged_of_misclassified": float((flagged & misclassified).sum()) / max(1, int(misclassified.sum())),
        "success_at_fpr": float(evaded.sum()) / n,
        "mean_score": float(adv_scores.mean()) if adv_scores.numel() else math.nan,
        "auc_successful": roc_report(clean_scores, adv_scores[misclassified], n_boot=n_boot, seed=seed).to_dict(),
        "auc_all": roc_report(clean_scores, adv_scores, n_boot=n_boot, seed=seed).to_dict(),
    }


def evaluate_adaptive(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    baselines: dict[str, Tensor],
    eps: float,
    eps_iter: float,
    *,
    R: int = 20,
    n_images: int = ADAPTIVE["n_images"],
    n_iter: int = ADAPTIVE["n_iter"],
    K: int = ADAPTIVE["K"],
    fpr: float = 0.05,
    detectors=DETECTORS,
    max_batch: int = 1024,
    seed: int = 0,
    n_boot: int = 1000,
    progress: bool | None = None,
) -> dict:
    """The adaptive evaluation: for every detector in `detectors` ((method, kwargs) pairs),
    fit the threshold at `fpr` on the clean images x, attack the first n_images of them
    with `eot_bim` (n_iter steps, K EOT passes, eps / eps_iter), and report the detection
    ROC-AUC (clean x as negatives) and the success rate at that threshold, i.e. the
    fraction of attacked images that the undefended network misclassifies and the
    detector does not flag; the same for every non-adaptive set in `baselines` (name ->
    adversarial versions of x, (N, C, H, W)), restricted to the same images.

    x: (N, C, H, W) clean images in [0, 1] that the model classifies correctly, y: (N,).
    Every detector scores with R passes and `seed`; the attack against detector i runs
    after torch.manual_seed(seed + i), so the whole evaluation is repeatable. Returns a
    JSON-ready dict: {"settings": ..., "detectors": {name: {"threshold", "clean_fpr",
    "adaptive": record, "<baseline>": record}}} with the records of `_attack_record`.
    """
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"evaluate_adaptive: x has {x.shape[0]} images but y has {y.shape[0]} labels")
    for name, adv in baselines.items():
        if adv.shape != x.shape:
            raise ValueError(f"evaluate_adaptive: baseline {name!r} has shape {tuple(adv.shape)}, x {tuple(x.shape)}")
    n_images = _check_int("evaluate_adaptive", "n_images", n_images, 1)
    xs, ys = x[:n_images], y[:n_images]
    settings = {"n_clean": int(x.shape[0]), "n_images": int(xs.shape[0]), "n_iter": n_iter, "K": K, "R": R,
                "eps": eps, "eps_iter": eps_iter, "fpr": fpr, "seed": seed,
                "loss": "sum over K passes of CE toward the runner-up class, minimized"}
    results = {}
    for i, (method, kwargs) in enumerate(detectors):
        det = Detector(model, method, R=R, max_batch=max_batch, seed=seed, progress=progress, **kwargs)
        clean_scores = det.scores(x)
        det.threshold, det.fpr = threshold_for_fpr(clean_scores, fpr), fpr
        torch.manual_seed(seed + i)
        adv = eot_bim(det, xs, ys, eps, eps_iter, n_iter=n_iter, K=K, progress=progress)
        entry = {
            "threshold": det.threshold,
            "clean_fpr": float((clean_scores > det.threshold).double().mean()),
            "mean_score_clean": float(clean_scores.mean()),
            "adaptive": _attack_record(det, model, clean_scores, adv, ys, n_boot, seed),
        }
        for name, base in baselines.items():
            entry[name] = _attack_record(det, model, clean_scores, base[:n_images], ys, n_boot, seed)
        entry["config"] = det.config()
        results[det.name] = entry
    return {"settings": settings, "detectors": results}
