"""The four attacks of Feinman et al. (2017): FGSM, BIM-A, BIM-B and JSMA.

All attacks work on batches of images x of shape (N, C, H, W), float, with pixel values
in [0, 1], and integer labels y of shape (N,), on whatever device x and the model share.
They return a new tensor of x's shape, dtype and device, detached, with values in
[0, 1]. The model must be in eval mode (its own Dropout layers off); the attacks take
gradients with `torch.autograd.grad` with respect to the input only, so no parameter
`.grad` is ever touched, and they work under an outer `torch.no_grad()` too.

This module knows nothing of the defense: it is the plain adversarial setting.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._progress import hide_bar
from . import exact

__all__ = [
    "SETTINGS",
    "ATTACKS",
    "fgsm",
    "bim_a",
    "bim_b",
    "jsma",
    "random_targets",
    "jsma_targets",
    "attack_stats",
    "craft",
]

# Feinman et al.'s attack parameters per dataset (pixel values in [0, 1]). JSMA's are its
# defaults (theta 1, gamma 0.1, derivatives of the softmax), the same for every dataset.
SETTINGS = {
    "mnist": dict(eps=0.3, eps_iter=0.01),
    "cifar10": dict(eps=0.05, eps_iter=0.005),
    "svhn": dict(eps=0.13, eps_iter=0.01),
}

ATTACKS = ("fgsm", "bim-a", "bim-b", "jsma")

# Upper bound on the elements of one (images, F, F) pair-score temporary in JSMA: two
# live at once, so JSMA's extra memory stays near 8 MB (cache-sized) whatever F is.
_JSMA_PAIR_ELEMENTS = 1 << 20


def _check_inputs(fn: str, model: nn.Module, x: Tensor, y: Tensor) -> None:
    if model.training:
        raise ValueError(
            f"{fn}: the model is in training mode; call model.eval() first "
            "(its Dropout layers would make every gradient and prediction random)"
        )
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{fn}: x must be a float NCHW tensor, got {tuple(x.shape)} {x.dtype}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"{fn}: y must have shape ({x.shape[0]},), got {tuple(y.shape)}")


def _loss_grad(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Gradient of the summed cross-entropy w.r.t. x, (N, C, H, W), and the logits, (N, K).

    A sum, not a mean, so each image's gradient does not depend on the batch size; its
    gradient w.r.t. the logits comes from `exact`, so the bits do not depend on the CPU."""
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        logits = model(x)
        dlogits = exact.cross_entropy_grad(logits.detach(), y).to(logits.dtype)
        (grad,) = torch.autograd.grad(logits, x, dlogits)
    return grad, logits.detach()


def _project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    # Ball first, then [0, 1]: since x is in [0, 1], the result is in both.
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def fgsm(model: nn.Module, x: Tensor, y: Tensor, eps: float) -> Tensor:
    """Fast gradient sign method (Goodfellow et al. 2015): one step of size eps.

    Returns clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1), shape (N, C, H, W) like
    x, so every pixel moves by at most eps (less where the clip to [0, 1] bites).
    """
    _check_inputs("fgsm", model, x, y)
    if x.shape[0] == 0:
        return x.detach().clone()
    grad, _ = _loss_grad(model, x, y)
    return _project(x.detach() + eps * grad.sign(), x.detach(), eps)


def bim_b(
    model: nn.Module, x: Tensor, y: Tensor, eps: float, eps_iter: float, n_iter: int = 50
) -> Tensor:
    """Basic iterative method, variant B: exactly n_iter signed-gradient steps.

    Each step adds eps_iter * sign(grad) and clips to the L-inf ball of radius eps
    around x and to [0, 1] (Kurakin et al. 2017; Feinman et al.'s BIM-B). Every image
    takes all n_iter steps whether or not it is already misclassified. x: (N, C, H, W),
    y: (N,); returns (N, C, H, W).
    """
    _check_inputs("bim_b", model, x, y)
    x = x.detach()
    x_adv = x.clone()
    if x.shape[0] == 0:
        return x_adv
    for _ in range(n_iter):
        grad, _ = _loss_grad(model, x_adv, y)
        x_adv = _project(x_adv + eps_iter * grad.sign(), x, eps)
    return x_adv


def bim_a(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    eps: float,
    eps_iter: float,
    n_iter: int = 50,
    return_steps: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Basic iterative method, variant A: each image stops at its first misclassification.

    The same steps as `bim_b`, but an image whose prediction differs from y after step
    k is frozen at that iterate (Feinman et al.'s BIM-A); images never misclassified
    keep the iterate after n_iter steps. As in Feinman et al., predictions are checked
    after each step, so every image takes at least one step (an input that is already
    misclassified is still moved once; the evaluation protocol only attacks correctly
    classified images). Only the still-running images are fed to the model, so the
    cost falls as images succeed. x: (N, C, H, W), y: (N,); returns the adversarial
    images (N, C, H, W) and, if return_steps, the int64 number of steps each took, (N,),
    in 1..n_iter.
    """
    _check_inputs("bim_a", model, x, y)
    x = x.detach()
    x_adv = x.clone()
    steps = torch.zeros(x.shape[0], dtype=torch.int64, device=x.device)
    running = torch.arange(x.shape[0], device=x.device)
    for i in range(n_iter):
        if running.numel() == 0:
            break
        x_run = x_adv[running]
        grad, logits = _loss_grad(model, x_run, y[running])
        if i > 0:
            # The forward pass for this step's gradient doubles as the check of the
            # previous step's result, so stopping costs no extra forward pass.
            still_right = logits.argmax(dim=1) == y[running]
            running, x_run, grad = running[still_right], x_run[still_right], grad[still_right]
        x_adv[running] = _project(x_run + eps_iter * grad.sign(), x[running], eps)
        steps[running] += 1
    return (x_adv, steps) if return_steps else x_adv


def random_targets(y: Tensor, num_classes: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random target class different from each label.

    y: (N,) int64 labels in [0, num_classes); returns (N,) int64 on y's device, drawn
    from `generator` (default: the global CPU generator) so a seeded generator gives
    the same targets on every device.
    """
    gen_device = generator.device if generator is not None else torch.device("cpu")
    offset = torch.randint(1, num_classes, y.shape, generator=generator, device=gen_device)
    return (y.to(gen_device) + offset).remainder(num_classes).to(y.device)


def jsma_targets(model: nn.Module, x: Tensor, y: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """JSMA's random targets for a whole set: `random_targets` over the model's classes
    (the width of its output on x[:1]), drawn from `generator`.

    x: (N, C, H, W) with N >= 1, on any device (x[:1] moves to the model's); y: (N,) int64.
    Returns (N,) int64 on y's device, each != y[i].
    """
    with torch.no_grad():
        num_classes = model(x[:1].to(_model_device(model, x.device))).shape[1]
    return random_targets(y, num_classes, generator)


def _best_pairs(g_target: Tensor, g_other: Tensor, domain: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """JSMA's saliency map over pairs: the best pair (p, q) per image, and whether one exists.

    g_target, g_other: (B, F) derivatives of the target output and of the sum of the
    other outputs; domain: (B, F) bool, the features still allowed. A pair of distinct
    features is admissible when both are in the domain, their target derivatives sum to
    > 0 and the others' to < 0; its score is target_sum * |other_sum| (Papernot et al.
    2016). Returns p, q: (B,) int64 feature indices, and found: (B,) bool.
    """
    n, f = g_target.shape
    # Scaling an image's derivatives by a positive number changes neither the signs nor
    # the argmax, and keeps products of tiny (softmax) derivatives from underflowing.
    tiny = torch.finfo(g_target.dtype).tiny
    a = g_target / g_target.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    b = g_other / g_other.abs().amax(dim=1, keepdim=True).clamp_min(tiny)
    # A feature outside the domain makes every sum it is part of inadmissible.
    a = a.masked_fill(~domain, -math.inf)
    b = b.masked_fill(~domain, math.inf)
    chunk = max(1, _JSMA_PAIR_ELEMENTS // (f * f))
    best, found = [], []
    for s in range(0, n, chunk):
        ac, bc = a[s : s + chunk], b[s : s + chunk]
        # -score, fused in place: < 0 exactly for admissible pairs, 0 (or -0.0) otherwise.
        neg_score = (ac[:, :, None] + ac[:, None, :]).clamp_(min=0)
        neg_score.mul_((bc[:, :, None] + bc[:, None, :]).clamp_(max=0))
        neg_score.diagonal(dim1=1, dim2=2).zero_()
        neg_score = neg_score.flatten(1)
        idx = neg_score.argmin(dim=1)
        best.append(idx)
        found.append(neg_score.gather(1, idx[:, None]).squeeze(1) < 0)
    best = torch.cat(best)
    return best // f, best % f, torch.cat(found)


def jsma(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    theta: float = 1.0,
    gamma: float = 0.1,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    use_logits: bool = False,
) -> Tensor:
    """Jacobian-based saliency map attack (Papernot et al. 2016), pairs of pixels per step.

    Targeted: each image is pushed towards target[i] (default: a random class != y[i]
    from `random_targets` with `generator`). Each iteration computes the derivatives of
    the target output and of the sum of the other outputs w.r.t. every input feature,
    picks the admissible pair of features with the largest saliency (see `_best_pairs`),
    adds theta to both (clipped to [0, 1]) and removes them from the search domain, as
    cleverhans' `jsma_symbolic` does. An image stops once it is classified as its target,
    when no admissible pair is left, or after floor(gamma * F / 2) iterations, so at most
    a fraction gamma of its F = C*H*W features change (channels count separately), each
    only in the direction of theta (up for theta > 0). Unlike cleverhans, an image with
    no admissible pair stops instead of modifying feature 0. Derivatives are of the
    softmax probabilities, as cleverhans 1 took them for Feinman et al. (the default);
    use_logits=True takes them of the logits (cleverhans >= 2). The loop runs over iterations, batched over
    images; only running images go through the model. x: (N, C, H, W), y: (N,), target:
    (N,) or None; returns (N, C, H, W).
    """
    _check_inputs("jsma", model, x, y)
    x = x.detach()
    n, shape = x.shape[0], x.shape[1:]
    if n == 0:
        return x.clone()
    if target is None:
        target = jsma_targets(model, x, y, generator)
    elif target.shape != y.shape:
        raise ValueError(f"jsma: target must have shape {tuple(y.shape)}, got {tuple(target.shape)}")
    target = target.to(x.device)

    x_adv = x.reshape(n, -1).clone()
    n_features = x_adv.shape[1]
    increase = theta > 0
    domain = x_adv < 1.0 if increase else x_adv > 0.0
    running = torch.arange(n, device=x.device)
    for _ in range(int(math.floor(n_features * gamma / 2))):
        if running.numel() == 0:
            break
        with torch.enable_grad():
            x_run = x_adv[running].reshape(-1, *shape).requires_grad_(True)
            logits = model(x_run)
            out = logits if use_logits else exact.softmax(logits)
            t_run = target[running]
            keep = (logits.argmax(dim=1) != t_run) & (domain[running].sum(dim=1) >= 2)
            # Two backward passes instead of one per class: the others' derivative is
            # the derivative of the sum of all outputs minus the target's.
            w_target = F.one_hot(t_run, out.shape[1]).to(out.dtype) * keep[:, None]
            (g_target,) = torch.autograd.grad(out, x_run, w_target, retain_graph=True)
            (g_all,) = torch.autograd.grad(out, x_run, keep[:, None].to(out.dtype).expand_as(out))
        g_target, g_all = g_target.reshape(-1, n_features)[keep], g_all.reshape(-1, n_features)[keep]
        g_other = g_all - g_target
        if not increase:
            # Decreasing a feature flips the sign of its effect: same search, mirrored.
            g_target, g_other = -g_target, -g_other
        running = running[keep]
        if running.numel() == 0:  # the last ones reached their targets
            break
        p, q, found = _best_pairs(g_target, g_other, domain[running])
        running, p, q = running[found], p[found], q[found]
        for feature in (p, q):
            x_adv[running, feature] = (x_adv[running, feature] + theta).clamp(0.0, 1.0)
            domain[running, feature] = False
    return x_adv.reshape(x.shape)


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else default


@torch.no_grad()
def _predict(model: nn.Module, x: Tensor, batch_size: int) -> Tensor:
    device = _model_device(model, x.device)
    preds = [
        model(x[s : s + batch_size].to(device)).argmax(dim=1).to(x.device)
        for s in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(preds) if preds else torch.zeros(0, dtype=torch.int64, device=x.device)


def attack_stats(
    model: nn.Module, x_clean: Tensor, x_adv: Tensor, y: Tensor, batch_size: int = 256
) -> dict[str, float]:
    """Success rate and distortion of a crafted adversarial set.

    x_clean, x_adv: (N, C, H, W) on the same device; y: (N,) true labels. An image is a
    success when the model's prediction on x_adv differs from y (also for JSMA, whose
    target is not consulted). Distortions per image over the F = C*H*W entries of
    x_adv - x_clean: L2 norm, L-inf norm, L0 = number of changed entries, and L0 as a
    fraction of F. Returns a dict of floats: n, n_success, success_rate, and the mean
    distortions l2, linf, l0, l0_frac over the successful images (NaN if none), and the
    same over all N images as l2_all, linf_all, l0_all, l0_frac_all.
    """
    if x_clean.shape != x_adv.shape or y.shape != (x_clean.shape[0],):
        raise ValueError(
            f"attack_stats: shapes differ: x_clean {tuple(x_clean.shape)}, "
            f"x_adv {tuple(x_adv.shape)}, y {tuple(y.shape)}"
        )
    success = _predict(model, x_adv, batch_size) != y.to(x_adv.device)
    diff = (x_adv - x_clean).flatten(1).double()
    per_image = {
        "l2": diff.norm(dim=1),
        "linf": diff.abs().amax(dim=1),
        "l0": (diff != 0).sum(dim=1).double(),
    }
    per_image["l0_frac"] = per_image["l0"] / max(diff.shape[1], 1)
    stats = {
        "n": float(x_adv.shape[0]),
        "n_success": float(success.sum()),
        "success_rate": float(success.double().mean()) if success.numel() else math.nan,
    }
    for name, values in per_image.items():
        stats[name] = float(values[success].mean()) if success.any() else math.nan
        stats[f"{name}_all"] = float(values.mean()) if values.numel() else math.nan
    return stats


_PARAMS = {
    "fgsm": ("eps",),
    "bim-a": ("eps", "eps_iter", "n_iter"),
    "bim-b": ("eps", "eps_iter", "n_iter"),
    "jsma": ("theta", "gamma", "use_logits"),
}


def craft(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    dataset: str | dict,
    generator: torch.Generator | None = None,
    batch_size: int = 128,
    progress: bool | None = None,
    target: Tensor | None = None,
    **params,
) -> Tensor:
    """Craft adversarial examples for a whole set, batch by batch, with a progress bar.

    name: "fgsm", "bim-a", "bim-b" or "jsma" (case and "_" vs "-" do not matter).
    dataset: a key of SETTINGS ("mnist", "cifar10", "svhn") giving eps and eps_iter, or
    a dict of its own; keyword params override either (eps, eps_iter, n_iter for the
    BIMs; theta, gamma, use_logits for JSMA). x: (N, C, H, W) and y: (N,) may live on the
    CPU: each batch moves to the model's device and the result comes back to x's.
    JSMA's random targets are drawn for the whole set up front from `generator`, so they
    do not depend on batch_size; target (N,) gives them instead (a shard of a set whose
    targets were drawn whole). Returns the adversarial images, (N, C, H, W).
    """
    key = name.lower().replace("_", "-")
    if key not in _PARAMS:
        raise ValueError(f"craft: unknown attack {name!r}; expected one of {ATTACKS}")
    if isinstance(dataset, str):
        if dataset not in SETTINGS:
            raise ValueError(
                f"craft: no attack settings for dataset {dataset!r}; expected one of "
                f"{tuple(SETTINGS)} or a dict such as dict(eps=0.3, eps_iter=0.01)"
            )
        settings = dict(SETTINGS[dataset])
        label = dataset
    else:
        settings, label = dict(dataset), "custom"
    settings.update(params)
    unknown = set(params) - set(_PARAMS[key])
    if unknown:
        raise ValueError(f"craft: {key} takes no parameter(s) {sorted(unknown)}; it takes {_PARAMS[key]}")
    kwargs = {k: settings[k] for k in _PARAMS[key] if k in settings}

    if x.shape[0] == 0:
        return x.detach().clone()
    device = _model_device(model, x.device)
    targets = None
    if target is not None:
        if key != "jsma" or target.shape != y.shape:
            raise ValueError(f"craft: target (N,) is for jsma only, got {key} with target {tuple(target.shape)}")
        targets = target
    elif key == "jsma":
        targets = jsma_targets(model, x, y, generator)
    attack = {"fgsm": fgsm, "bim-a": bim_a, "bim-b": bim_b, "jsma": jsma}[key]
    out = []
    for s in tqdm(range(0, x.shape[0], batch_size), desc=f"{key} ({label})", disable=hide_bar(progress)):
        xb, yb = x[s : s + batch_size].to(device), y[s : s + batch_size].to(device)
        if targets is not None:
            kwargs["target"] = targets[s : s + batch_size].to(device)
        out.append(attack(model, xb, yb, **kwargs).to(x.device))
    return torch.cat(out)
