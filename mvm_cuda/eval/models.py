"""The evaluated networks (Feinman et al. 2017) and their training.

Every model is an nn.Sequential of plain layers: a conv part (Conv2d, nn.ReLU without
inplace, MaxPool2d, Dropout), one nn.Flatten, then a dense part, ending in logits
(N, 10). Training gives the same bits for a given seed whatever the caller's thread count
and ATen's CPU capability (see `train`). Trained weights are kept in the on-disk cache
(`eval.cache`) by `load_or_train`.

This module knows nothing of the defense.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from .._digest import tensor_digest
from .._progress import hide_bar
from . import cache
from .exact import cross_entropy_grad

__all__ = [
    "MODELS",
    "INPUT_SHAPES",
    "DEFAULT_EPOCHS",
    "build_model",
    "train",
    "accuracy",
    "predict",
    "load_or_train",
    "TRAIN_THREADS",
]

INPUT_SHAPES = {"mnist": (1, 28, 28), "mnist-pool": (1, 28, 28), "cifar10": (3, 32, 32),
                "svhn": (3, 32, 32), "digits": (1, 8, 8)}
MODELS = tuple(INPUT_SHAPES)
DEFAULT_EPOCHS = {"mnist": 10, "mnist-pool": 10, "cifar10": 20, "svhn": 10, "digits": 30}

# The threads `train` uses, whatever the caller's: oneDNN's and MKL's weight-gradient
# reductions split by thread, so another count gives other bits.
TRAIN_THREADS = 1

# In every model cache key: bump when initialisation or training changes the trained bits.
_TRAINING = "train2"


def _mnist_conv(in_channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, 64, 3),
        nn.ReLU(),
        nn.Conv2d(64, 64, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.5),
        nn.Flatten(),
    ]


def _cifar_block(in_channels: int, channels: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
    ]


def _dense_head(*widths: int) -> list[nn.Module]:
    """Linear layers from widths[0] to widths[-1] features, each but the last followed by
    ReLU and Dropout(0.5)."""
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(widths, widths[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(0.5)]
    return layers


def _layers(name: str) -> list[nn.Module]:
    """The layers of network `name`, in order (see `build_model`)."""
    if name == "mnist":
        return _mnist_conv(1) + _dense_head(64 * 12 * 12, 128, 10)
    if name == "mnist-pool":
        return [nn.Conv2d(1, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten()] + _dense_head(64 * 4 * 4, 128, 10)
    if name == "svhn":
        return _mnist_conv(3) + _dense_head(64 * 14 * 14, 512, 128, 10)
    if name == "cifar10":
        return (_cifar_block(3, 32) + _cifar_block(32, 64) + _cifar_block(64, 128) + [nn.Flatten()]
                + _dense_head(128 * 4 * 4, 1024, 512, 10))
    return [nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Dropout(0.5), nn.Flatten()] + _dense_head(32 * 4 * 4, 64, 10)


def _init_uniform(model: nn.Module, generator: torch.Generator | None) -> None:
    """PyTorch's default initialisation of Conv2d and Linear, U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    for weight and bias, drawn so that the bits do not depend on the CPU: torch.rand in
    float64 and single-rounding ops (ATen's own uniform_ fuses its affine map into an FMA in
    its AVX2 build only)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for param in (module.weight, module.bias):
                    u = torch.rand(param.shape, generator=generator, dtype=torch.float64)
                    param.copy_(u.mul(2.0).sub(1.0).mul(bound))


def build_model(name: str, seed: int | None = None) -> nn.Sequential:
    """One of Feinman et al.'s CNNs, or a small one for 8x8 digits, as an nn.Sequential.

    Input (N, C, H, W) as in INPUT_SHAPES, output logits (N, 10). The ReLUs of the conv
    part output (C, H, W):
    - "mnist" (1x28x28): 64x26x26, 64x24x24; then MaxPool2-Dropout(0.5)-Flatten (9216)-
      Dense128-ReLU-Dropout(0.5)-Dense10.
    - "mnist-pool" (1x28x28), a second MNIST network with pooling between its convolutions:
      Conv5 32x24x24, MaxPool2, Conv5 64x8x8, MaxPool2-Flatten (1024)-Dense128-ReLU-
      Dropout(0.5)-Dense10.
    - "cifar10" (3x32x32): 32x32x32 twice, 64x16x16 twice, 128x8x8 twice (MaxPool2 after
      each pair); then Flatten (2048)-Dense1024-ReLU-Dropout-Dense512-ReLU-Dropout-Dense10.
    - "svhn" (3x32x32): the MNIST conv part, 64x30x30, 64x28x28; then MaxPool2-Dropout-
      Flatten (12544)-Dense512-ReLU-Dropout-Dense128-ReLU-Dropout-Dense10.
    - "digits" (1x8x8): 32x8x8 twice (padding 1); then MaxPool2-Dropout(0.5)-Flatten
      (512)-Dense64-ReLU-Dropout(0.5)-Dense10. Trains in seconds on a CPU; for tests.
    Every Conv2d and Linear starts from PyTorch's default distribution, U(+-1/sqrt(fan_in)),
    drawn with the same bits on every CPU: with a seed, from a torch.Generator seeded with
    it (the caller's random state is left alone); without, from the global RNG.
    """
    if name not in INPUT_SHAPES:
        raise ValueError(f"build_model: unknown model {name!r}; expected one of {MODELS}")
    # The layers' own initialisation is overwritten below: it runs in a forked RNG so that
    # it does not move the caller's.
    with torch.random.fork_rng(devices=[]):
        layers = _layers(name)
    model = nn.Sequential(*layers)
    _init_uniform(model, torch.Generator().manual_seed(seed) if seed is not None else None)
    return model


def _device_of(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _adam_step(params, grads, exp_avgs, exp_avg_sqs, step: int, lr: float, betas=(0.9, 0.999),
               eps: float = 1e-8) -> None:
    """One step of Adam (torch.optim.Adam's defaults) from single-rounding tensor ops:
    torch.optim.Adam's lerp_, addcmul_ and addcdiv_ fuse into FMAs in ATen's AVX2 build
    only, so its bits depend on the CPU capability."""
    beta1, beta2 = betas
    step_size = lr / (1 - beta1**step)
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
        m.mul_(beta1).add_(g * (1 - beta1))
        v.mul_(beta2).add_((g * g) * (1 - beta2))
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        p.sub_((m / denom) * step_size)


def train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool | None = None,
) -> nn.Module:
    """Train with Adam on the cross-entropy; the same bits for a given seed on a given CPU,
    whatever the caller's thread count and ATen's CPU capability.

    x: (N, C, H, W) float, y: (N,) int64, both may stay on the CPU (each batch moves to
    `device`, default the model's). The shuffling comes from a torch.Generator seeded
    with `seed` and the Dropout masks from torch.manual_seed(seed) inside a forked RNG,
    so the caller's random state is untouched. Training runs on TRAIN_THREADS CPU threads
    with torch.use_deterministic_algorithms(True) (both restored afterwards; on CUDA only
    where CUBLAS_WORKSPACE_CONFIG is set, which cuBLAS needs for it), and the parts whose
    ATen kernels differ between CPU capabilities (the softmax in the loss's gradient,
    Adam's fused updates) use single-rounding ops instead: see `exact.cross_entropy_grad`
    and `_adam_step`. The convolutions and matrix products are oneDNN's and MKL's, which
    pick their kernels by the CPU itself (docs/reliability.md, Reproducibility). Shows a
    tqdm bar over epochs. Returns the model, on `device`, in eval mode.
    """
    device = torch.device(device) if device is not None else _device_of(model)
    model.to(device)
    gen = torch.Generator().manual_seed(seed)
    cuda = []
    if device.type == "cuda":
        cuda = [device.index if device.index is not None else torch.cuda.current_device()]
    params = [p for p in model.parameters() if p.requires_grad]
    exp_avgs = [torch.zeros_like(p) for p in params]
    exp_avg_sqs = [torch.zeros_like(p) for p in params]
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    step = 0
    try:
        torch.set_num_threads(TRAIN_THREADS)
        if device.type == "cpu" or os.environ.get("CUBLAS_WORKSPACE_CONFIG"):
            torch.use_deterministic_algorithms(True)
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            model.train()
            bar = tqdm(range(epochs), desc="train", disable=hide_bar(progress))
            for _ in bar:
                total = torch.zeros((), device=device)
                for idx in torch.randperm(x.shape[0], generator=gen).split(batch_size):
                    xb, yb = x[idx].to(device), y[idx].to(device)
                    logits = model(xb)
                    # The mean cross-entropy's gradient w.r.t. the logits.
                    grad = cross_entropy_grad(logits.detach(), yb) / yb.shape[0]
                    grads = torch.autograd.grad(logits, params, grad.to(logits.dtype))
                    step += 1
                    with torch.no_grad():
                        _adam_step(params, grads, exp_avgs, exp_avg_sqs, step, lr)
                        # Shown only: its bits may differ between CPUs, the weights' do not.
                        total += F.cross_entropy(logits.detach(), yb, reduction="sum")  # no per-batch host sync
                bar.set_postfix(loss=f"{total.item() / max(x.shape[0], 1):.4f}")
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    for p in model.parameters():
        p.grad = None  # a trained model carries no stale gradients
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    """Predicted classes, argmax of the logits: x (N, C, H, W) -> int64 (N,) on x's device.

    Batches move to the model's device; the model should be in eval mode.
    """
    device = _device_of(model)
    out = [
        model(x[s : s + batch_size].to(device)).argmax(dim=1).to(x.device)
        for s in range(0, x.shape[0], batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.int64, device=x.device)


def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    """Fraction of the N images x (N, C, H, W) whose predicted class equals y (N,)."""
    if x.shape[0] == 0:
        return float("nan")
    return (predict(model, x, batch_size) == y.to(x.device)).double().mean().item()


def _fingerprint(x: Tensor, y: Tensor) -> str:
    return tensor_digest([("x", x), ("y", y)])[:12]


def load_or_train(
    name: str,
    data,
    epochs: int | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    batch_size: int = 128,
    lr: float = 1e-3,
    progress: bool | None = None,
) -> nn.Module:
    """The model `name` trained on data's training set, from the cache if possible.

    data: a `data.Dataset` or a tuple whose first two items are x_train (N, C, H, W) and
    y_train (N,). epochs defaults to DEFAULT_EPOCHS[name]. The cache key names the
    model, epochs, seed, batch size, learning rate, N, a hash of the training data and a
    tag of the training code's version;
    a valid cache file (see `cached_tensors`) is loaded into build_model(name), else
    the model is built with `seed`, trained with `train` and saved atomically; a corrupt
    file is reported with a warning and rebuilt. Returns the model on `device` (default
    CPU) in eval mode.
    """
    x, y = (data.x_train, data.y_train) if hasattr(data, "x_train") else (data[0], data[1])
    epochs = DEFAULT_EPOCHS[name] if epochs is None else epochs
    device = torch.device(device) if device is not None else torch.device("cpu")
    key = f"{name}-e{epochs}-s{seed}-b{batch_size}-lr{lr:g}-n{x.shape[0]}-{_fingerprint(x, y)}-{_TRAINING}"
    path = cache.file_for("models", key)
    model = build_model(name, seed=seed)
    state = cache.load_file(path, key)
    if state is not None:
        try:
            model.load_state_dict(state)
            return model.to(device).eval()
        except RuntimeError as e:
            warnings.warn(
                f"mvm_cuda cache: {path} does not fit model {name!r}, retraining: {e}", stacklevel=2
            )
            model = build_model(name, seed=seed)
    train(model, x, y, epochs, batch_size=batch_size, lr=lr, seed=seed, device=device, progress=progress)
    cache.save_file(path, key, model.state_dict())
    return model
