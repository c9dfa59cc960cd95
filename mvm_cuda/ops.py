"""Typed wrappers of torch.ops.mvm.*, each with its fake kernel (for
torch.compile and meta tensors) and its autograd registration right beside it.

The ops are inference-only: backward through any of them raises. Value checks
(NaN/inf, negative or unnormalised p) always run on the CPU; on CUDA they need
a device-to-host sync and run only after set_value_checks(True) (or with
MVM_CHECK_VALUES=1 in the environment)."""
from __future__ import annotations

import math
import numbers

import torch

from ._args import real

_lib = torch.ops.mvm


def _inference_only(name: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"mvm::{name} is inference-only and has no gradient. For an attack that "
            "differentiates through sampling, draw the mask with the op and multiply in torch."
        )

    def setup_context(ctx, inputs, output, **kwargs):
        pass

    torch.library.register_autograd(f"mvm::{name}", backward, setup_context=setup_context)


_INT64 = (-2**63, 2**63 - 1)


def _int_arg(op: str, name: str, value):
    """An integer argument (a numpy or 0-d tensor integer included) as a Python int that
    the schema's int (int64) holds; other values go to the op, which names them."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        value = int(value)
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"mvm::{op}: {name} must be an integer that fits in int64, got {value}")
    return value


def project_simplex(v: torch.Tensor, z: float = 1.0) -> torch.Tensor:
    """Euclidean projection of every vector along v's last dimension onto {p >= 0, sum p = z}.

    Computed in float64, exact to rounding.

    Args:
        v: (..., n) float32 or float64 tensor.
        z: The sum of every projected vector: a normal number of v's dtype (between
            finfo.tiny and finfo.max).

    Returns:
        A new contiguous tensor of v's shape and dtype.

    Raises:
        ValueError: z is finite and > 0 but outside v's dtype's normal range.
        RuntimeError: v is not float32/float64 or has an empty last dimension, z is not
            finite and > 0, or (where value checks run) v holds a NaN or inf.
    """
    z = real(z, z)
    if isinstance(z, float) and isinstance(v, torch.Tensor) and v.dtype in (torch.float32, torch.float64) \
            and math.isfinite(z) and z > 0:
        # The op checks finite and > 0; outside the dtype's normal range the result
        # would round to a sum of 0 (or inf) instead of z.
        info = torch.finfo(v.dtype)
        if not info.tiny <= z <= info.max:
            raise ValueError(f"mvm::project_simplex: z must lie in [{info.tiny:.4g}, {info.max:.4g}], the normal "
                             f"range of v's dtype {v.dtype}, got {z:g}: the result could not sum to z")
    return _lib.project_simplex(v, z)


@torch.library.register_fake("mvm::project_simplex")
def _(v, z=1.0):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def mvm_step(p: torch.Tensor, alpha: torch.Tensor, c: int, lr: float) -> torch.Tensor:
    """One raw step of the paper's Alg. 2 for every row: p + lr alpha c (1-p)^(c-1) / pi(p)^2, projected.

    pi(p) = 1 - (1-p)^c. Rows with alpha = 0 contribute nothing; where p = 0 and
    alpha > 0 (an infinite gradient) the gradient is taken at p = 1e-12.

    Args:
        p: (..., M) float32 or float64 probabilities, each row on the simplex.
        alpha: (..., M) weights >= 0, p's shape, dtype and device.
        c: Number of draws, >= 1.
        lr: Step size, finite and >= 0.

    Returns:
        The projected step, a new contiguous tensor of p's shape and dtype.

    Raises:
        ValueError: c does not fit in int64.
        RuntimeError: a dtype, shape or device mismatch, c < 1, lr < 0 or not finite, or
            (where value checks run) a NaN, inf or negative entry in p or alpha.
    """
    return _lib.mvm_step(p, alpha, _int_arg("mvm_step", "c", c), real(lr, lr))


def _same_device(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    # The fake kernel also runs when one argument is a meta tensor and the
    # other is not (the Meta key wins dispatch): check what the real kernels do.
    torch._check(a.device == b.device, lambda: f"mvm::{op}: {name_a} and {name_b} must be on the "
                 f"same device, got {a.device} and {b.device}")


@torch.library.register_fake("mvm::mvm_step")
def _(p, alpha, c, lr):
    _same_device("mvm_step", "p", p, "alpha", alpha)
    return torch.empty_like(p, memory_format=torch.contiguous_format)


def solve_mvm(alpha: torch.Tensor, c: int, method: str = "kkt", max_iter: int = 1000,
              tol: float = 1e-6) -> torch.Tensor:
    """MVM sampling probabilities: for every row, the p on the simplex minimising sum_i alpha_i / pi_i.

    pi_i = 1 - (1-p_i)^c. Rows with alpha = 0 get p = 0; an all-zero row gets uniform p.

    Args:
        alpha: (..., M) float32 or float64 weights >= 0 (the squared row norms).
        c: Number of draws, >= 1.
        method: "kkt" solves the KKT conditions exactly; "pgd" is the paper's Alg. 2
            with a backtracking step.
        max_iter: >= 1. For "pgd", the most steps; for "kkt", a bound on its search for
            the multiplier lambda.
        tol: For "pgd": stop once no row moves by more than tol of its own p
            (max_i |dp_i| / p_i <= tol); not used by "kkt". Finite and >= 0.

    Returns:
        p, a new contiguous tensor of alpha's shape and dtype.

    Raises:
        ValueError: c or max_iter does not fit in int64.
        RuntimeError: a bad dtype or shape, c < 1, an unknown method, max_iter < 1, a
            bad tol, or (where value checks run) a NaN, inf or negative alpha.
    """
    return _lib.solve_mvm(alpha, _int_arg("solve_mvm", "c", c), method,
                          _int_arg("solve_mvm", "max_iter", max_iter), real(tol, tol))


@torch.library.register_fake("mvm::solve_mvm")
def _(alpha, c, method="kkt", max_iter=1000, tol=1e-6):
    return torch.empty_like(alpha, memory_format=torch.contiguous_format)


def sample_rows(x: torch.Tensor, p: torch.Tensor, c: int, *,
                generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
                relu: bool = False, copies: int = 1) -> torch.Tensor:
    """The paper's Alg. 1, fused: each sample keeps the rows that c draws from p hit, scaled by 1/pi.

    Sample n draws c rows with replacement from p[n % P]; a drawn row i becomes
    x_i / pi_i with pi_i = 1 - (1 - p_i)^c, the others 0.

    Args:
        x: (N, H, W, C) or (N, M, C), float32/64/16 or bfloat16, any strides (the NHWC
            view of an NCHW tensor is read in place); rows are the M = H*W pixels.
        p: (P, M) float32 or float64 probabilities on x's device, N % P == 0, each row
            summing to 1.
        c: Number of draws per sample, >= 1.
        generator: The source of the draws (None: the default generator of x's device,
            seeded by torch.manual_seed; pass None under torch.compile).
        keys: Optional (copies * N,) int64 tensor on x's device, any strides: sample n's
            draws are then a function of (keys[n], p[n % P], c, M) alone, whatever the
            batch, and no generator is read or advanced.
        relu: Sample max(x, 0) instead of x (x is a pre-activation: one pass for both).
        copies: >= 1; the output holds copies * N samples, sample n drawn from x[n % N]
            and p[n % P] (R passes over one read of a batch).

    Returns:
        (copies * N, ...) tensor of x's dtype, with x's strides for a dense x.

    Raises:
        ValueError: c or copies does not fit in int64.
        RuntimeError: a bad shape, dtype or device, N % P != 0, c < 1, copies < 1, both
            keys and generator, keys of the wrong shape or dtype, or (where value checks
            run) a row of p with a NaN, inf, negative entry or a sum off 1.
    """
    return _lib.sample_rows(x, p, _int_arg("sample_rows", "c", c), generator=generator, keys=keys,
                            relu=relu, copies=_int_arg("sample_rows", "copies", copies))


def _empty_copies(t: torch.Tensor, copies: int) -> torch.Tensor:
    """csrc/checks.h's empty_copies: like empty_like(t) with copies * N samples, in
    empty_like(t)'s memory order."""
    like = torch.empty_like(t)
    if copies == 1:
        return like
    order = sorted(range(t.dim()), key=lambda d: -like.stride(d))
    sizes = [copies * t.shape[0] if d == 0 else t.shape[d] for d in order]
    return t.new_empty(sizes).permute([order.index(d) for d in range(t.dim())])


def _check_copies(op: str, copies: int) -> None:
    torch._check(copies >= 1, lambda: f"mvm::{op}: copies must be >= 1, got {copies}")


def _check_keys(op: str, keys, name: str, t: torch.Tensor, generator, copies: int = 1) -> None:
    # The kernels' check_keys (csrc/checks.h), for the fake kernels.
    if keys is None:
        return
    torch._check(generator is None, lambda: f"mvm::{op}: pass keys or generator, not both")
    _same_device(op, name, t, "keys", keys)
    torch._check(keys.dtype == torch.int64, lambda: f"mvm::{op}: keys must be int64, got {_scalar_name(keys.dtype)}")
    n = copies * t.shape[0]
    name = name if copies == 1 else "the output"
    torch._check(keys.dim() == 1 and keys.shape[0] == n, lambda: f"mvm::{op}: keys must have shape (N,) = ({n},), "
                 f"one key per sample of {name}, got {_shape_str(keys.shape)}")


def _scalar_name(dtype: torch.dtype) -> str:
    """A dtype as c10 prints it (torch.int32 -> Int), for messages that match the kernels'."""
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half", torch.bfloat16: "BFloat16",
            torch.int64: "Long", torch.int32: "Int", torch.int16: "Short", torch.int8: "Char", torch.uint8: "Byte",
            torch.bool: "Bool"}.get(dtype, str(dtype).removeprefix("torch."))


def _shape_str(shape) -> str:
    """A shape as csrc/checks.h's shape_str prints it: (4,) or (4, 1)."""
    sizes = [str(s) for s in shape]
    return "(" + ", ".join(sizes) + ("," if len(sizes) == 1 else "") + ")"


@torch.library.register_fake("mvm::sample_rows")
def _(x, p, c, keys=None, *, relu=False, copies=1, generator=None):
    _same_device("sample_rows", "x", x, "p", p)
    _check_copies("sample_rows", copies)
    _check_keys("sample_rows", keys, "x", x, generator, copies)
    return _empty_copies(x, copies)


def sap_sample(h: torch.Tensor, frac: float, generator: torch.Generator | None = None, *,
               keys: torch.Tensor | None = None, relu: bool = False, copies: int = 1) -> torch.Tensor:
    """Stochastic activation pruning: each sample keeps the entries that r draws from |h| / sum |h| hit.

    Each sample's K entries are rows of width 1 with p = |h| / sum |h| (recomputed
    from h), drawn r = max(1, round(frac * K)) times (`sap_draws`); kept entries are
    scaled by 1/pi, the others (zeros included) are 0. On the CPU and CUDA one fused
    op, which reads a contiguous or channels_last h in place and copies other layouts;
    on other devices `sample_rows` on (N, K, 1).

    Args:
        h: (N, ...) float32/64/16 or bfloat16 activations.
        frac: Draws per entry, finite and > 0.
        generator: The source of the draws, as in `sample_rows`.
        keys: Optional (copies * N,) int64 tensor on h's device: sample n's draws from
            keys[n] alone, no generator used (as in `sample_rows`).
        relu: Prune max(h, 0) instead of h.
        copies: >= 1; the output holds copies * N samples, sample n from h[n % N].

    Returns:
        (copies * N, ...) tensor of h's dtype.

    Raises:
        ValueError: frac is not finite and > 0, or copies does not fit in int64.
        RuntimeError: a bad dtype, copies < 1, both keys and generator, bad keys, or (on
            the CPU, or on CUDA where value checks run) a sample with a NaN or inf, or
            whose sum |h| overflows float64.
    """
    return _sap(h, frac, generator, keys, scale_only=False, relu=relu, copies=copies)


def sap_scale(h: torch.Tensor, frac: float, generator: torch.Generator | None = None, *,
              keys: torch.Tensor | None = None) -> torch.Tensor:
    """The random scale of `sap_sample` with the same generator state or keys: 1/pi_j where drawn, else 0.

    sap_sample(h) == h * sap_scale(h) for float32 and float64 h.

    Args:
        h: (N, ...) float activations.
        frac: Draws per entry, finite and > 0.
        generator: The source of the draws, as in `sample_rows`.
        keys: Optional (N,) int64 per-sample keys, as in `sap_sample`.

    Returns:
        A tensor shaped like h, in float32 or h's dtype if wider (1/pi overflows float16
        where h/pi does not).

    Raises:
        ValueError: frac is not finite and > 0.
        RuntimeError: as `sap_sample`.
    """
    return _sap(h, frac, generator, keys, scale_only=True)


def sap_draws(h: torch.Tensor, frac: float) -> int:
    """SAP's number of draws for an activation of K entries a sample: r = max(1, round(frac * K)).

    Args:
        h: (N, ...) activation; only its shape is read.
        frac: Draws per entry, finite and > 0.

    Returns:
        r, an int >= 1.

    Raises:
        ValueError: frac is not finite and > 0.
    """
    if not (frac > 0 and math.isfinite(frac)):
        raise ValueError(f"sap_sample: frac must be finite and > 0, got {frac}")
    return max(1, round(frac * math.prod(h.shape[1:])))


def _sap(h, frac, generator, keys, scale_only, relu=False, copies=1):
    frac = real(frac, frac)
    copies = _int_arg("sap_sample", "copies", copies)
    if scale_only and h.dtype in (torch.float16, torch.bfloat16):
        # The same p and draws (the kernels read |h| in float32 or wider), a float32 scale.
        h = h.float()
    r = sap_draws(h, frac)
    if h.device.type in ("cpu", "cuda"):
        return _lib.sap_sample(h, r, scale_only=scale_only, relu=relu, copies=copies, generator=generator,
                               keys=keys)
    if relu:
        h = h.relu()
    if copies != 1:
        h = h.repeat(copies, *[1] * (h.dim() - 1))
    return _sap_by_rows(h, r, generator, scale_only, keys)


def _sap_by_rows(h, r, generator, scale_only, keys=None):
    # Devices without the fused op: sample_rows on the (N, K, 1) view, with
    # p_j = |h_j| / sum |h| per sample (uniform for an all-zero sample, whose
    # output is zero anyway).
    if h.numel() == 0:
        if keys is not None:
            _check_keys("sap_sample", keys, "h", h, generator)
        return torch.empty_like(h)
    n, k = h.shape[0], math.prod(h.shape[1:])
    flat = h.reshape(n, k, 1)
    mag = flat[..., 0].abs().to(torch.promote_types(h.dtype, torch.float32))
    # The normaliser in float64: float32's sum overflows for activations near 3e38.
    total = mag.sum(-1, keepdim=True, dtype=torch.float64)
    p = mag.div_(total).masked_fill_(total == 0, 1.0 / k)
    x = torch.ones_like(flat) if scale_only else flat
    return sample_rows(x, p, r, generator=generator, keys=keys).reshape(h.shape)


def _dense_or_contiguous(t: torch.Tensor) -> torch.Tensor:
    """What the kernels that read a contiguous or channels_last tensor in place read:
    t itself, or (any other layout) a contiguous copy."""
    in_place = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
    return t if in_place else t.contiguous()


@torch.library.register_fake("mvm::sap_sample")
def _(h, r, keys=None, *, scale_only=False, relu=False, copies=1, generator=None):
    torch._check(h.dim() >= 1, lambda: "mvm::sap_sample: h must have a batch dimension (N, ...), got a 0-d tensor")
    _check_copies("sap_sample", copies)
    _check_keys("sap_sample", keys, "h", h, generator, copies)
    return _empty_copies(_dense_or_contiguous(h), copies)


def keyed_dropout(x: torch.Tensor, keys: torch.Tensor, p_drop: float, *, relu: bool = False,
                  copies: int = 1) -> torch.Tensor:
    """Test-time inverted dropout, fused, with a mask that is a function of each sample's key alone.

    Output sample n is (keep * x[n % N]) / (1 - p_drop), with keep =
    keyed_uniform(keys[n:n+1], K, dtype) >= p_drop over x's K entries in their logical
    (C-contiguous) order, dtype float64 for a float64 x and float32 otherwise.

    Args:
        x: (N, ...) float32/64/16 or bfloat16; contiguous or channels_last is read in
            place, other layouts are copied.
        keys: (copies * N,) int64 tensor on x's device, one key per output sample.
        p_drop: Drop probability in [0, 1).
        relu: Drop from max(x, 0) instead of x.
        copies: >= 1; the output holds copies * N samples.

    Returns:
        (copies * N, ...) tensor of x's dtype and layout.

    Raises:
        ValueError: copies does not fit in int64.
        RuntimeError: a bad dtype, p_drop outside [0, 1), copies < 1, or keys of the
            wrong shape, dtype or device.
    """
    return _lib.keyed_dropout(x, keys, real(p_drop, p_drop), relu=relu,
                              copies=_int_arg("keyed_dropout", "copies", copies))


@torch.library.register_fake("mvm::keyed_dropout")
def _(x, keys, p_drop, *, relu=False, copies=1):
    torch._check(x.dim() >= 1, lambda: "mvm::keyed_dropout: x must have a batch dimension (N, ...), got a 0-d tensor")
    _check_copies("keyed_dropout", copies)
    _check_keys("keyed_dropout", keys, "x", x, None, copies)
    return _empty_copies(_dense_or_contiguous(x), copies)


def keyed_uniform(keys: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Uniforms in [0, 1), row n a function of keys[n] alone: the same on the CPU and CUDA, prefix-stable in K.

    Philox4x32-10 seeded by the key; the first j entries of a row do not depend on K.
    For masks that must not depend on the batch a sample is in (the dropout unit's).

    Args:
        keys: (N,) int64 tensor.
        K: Uniforms per key, >= 0.
        dtype: torch.float32 (24 random bits each) or torch.float64 (53 bits).

    Returns:
        (N, K) tensor of `dtype` on keys' device.

    Raises:
        ValueError: K does not fit in int64.
        RuntimeError: keys is not a 1-d int64 tensor, K < 0, or dtype is not float32 or
            float64.
    """
    return _lib.keyed_uniform(keys, _int_arg("keyed_uniform", "K", K), dtype=dtype)


@torch.library.register_fake("mvm::keyed_uniform")
def _(keys, K, *, dtype=None):
    dtype = torch.float32 if dtype is None else dtype
    torch._check(keys.dtype == torch.int64, lambda: f"mvm::keyed_uniform: keys must be int64, got "
                 f"{_scalar_name(keys.dtype)}")
    torch._check(keys.dim() == 1,
                 lambda: f"mvm::keyed_uniform: keys must have shape (N,), got {_shape_str(keys.shape)}")
    torch._check(K >= 0, lambda: f"mvm::keyed_uniform: K (uniforms per key) must be >= 0, got {K}")
    torch._check(dtype in (torch.float32, torch.float64),
                 lambda: f"mvm::keyed_uniform: dtype must be float32 or float64, got {_scalar_name(dtype)}")
    return keys.new_empty((keys.shape[0], K), dtype=dtype)


def row_alpha(x: torch.Tensor) -> torch.Tensor:
    """alpha for MVM: the squared norm of every row (pixel), squared and summed in float64.

    float64 because a float32 square overflows for finite entries above about 1.8e19.

    Args:
        x: (N, H, W, C) or (N, M, C) tensor.

    Returns:
        (N, M) float64 tensor, M = H*W.
    """
    return x.to(torch.float64).square().sum(-1).reshape(x.shape[0], -1)  # to() may return x itself: no square_


def set_value_checks(enabled: bool) -> bool:
    """Switch the value checks of non-CPU kernels on or off, for the whole process.

    They cost a device-to-host sync per call; the CPU kernels always check. The
    setting starts from MVM_CHECK_VALUES, read when the library loads
    (docs/reliability.md).

    Args:
        enabled: Whether the CUDA kernels check values (NaN/inf, negative entries, rows
            of p that do not sum to 1).

    Returns:
        The previous setting, so that a caller can restore it.
    """
    return _lib.set_value_checks(enabled)


for _name in ("project_simplex", "mvm_step", "solve_mvm", "sample_rows", "sap_sample", "keyed_uniform",
              "keyed_dropout"):
    _inference_only(_name)
