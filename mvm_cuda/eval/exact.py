"""A softmax and a cross-entropy gradient whose bits do not depend on the CPU.

ATen's exp is libm's in its plain build and SLEEF's in its AVX2 and AVX-512 builds, and its
sums split a row by the vector width, so F.softmax and F.cross_entropy give other bits under
another ATEN_CPU_CAPABILITY. The functions here use additions, multiplications, divisions
and bit shifts only, each rounded once, in a fixed order: the same bits everywhere. Training
(`models.train`) and the attacks (`attacks`) take their loss gradients from here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["softmax", "cross_entropy_grad"]

# exp(r) for |r| <= ln(2)/2 as a degree-13 Taylor polynomial (error below 1e-17), and ln 2
# split so that k * _LN2_HI is exact (fdlibm's constants).
_EXP_COEFFS = tuple(1.0 / math.factorial(i) for i in range(13, -1, -1))
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10


def _exp_nonpositive(z: Tensor) -> Tensor:
    """exp(z) for float64 z <= 0 from additions, multiplications and bit shifts only, each
    rounded once, so the bits are the same on every CPU (ATen's exp is libm's in its plain
    build and SLEEF's in its AVX2 and AVX-512 builds)."""
    z = z.clamp(min=-700.0)  # exp(-700) ~ 1e-304: 2**k stays a normal float64
    k = torch.round(z * (1.0 / math.log(2.0)))
    r = (z - k * _LN2_HI) - k * _LN2_LO
    poly = torch.full_like(r, _EXP_COEFFS[0])
    for coeff in _EXP_COEFFS[1:]:
        poly = poly * r + coeff
    two_k = ((k.to(torch.int64) + 1023) << 52).view(torch.float64)
    return poly * two_k


def softmax(logits: Tensor) -> Tensor:
    """Softmax over the last dimension of logits (N, K), computed in float64 with the same
    bits on every CPU and thread count; returned as float64 (N, K).

    The maximum is subtracted first, the exponentials come from `_exp_nonpositive` and each
    row's sum is taken column by column, in order (ATen's sum splits a row by its vector
    width). For training and attacks whose results must not depend on the CPU.
    """
    z = logits.double()
    z = z - z.amax(dim=-1, keepdim=True).detach()  # a shift the softmax does not see
    e = _exp_nonpositive(z)
    total = e[..., 0].clone()
    for j in range(1, e.shape[-1]):
        total = total + e[..., j]
    return e / total.unsqueeze(-1)


def cross_entropy_grad(logits: Tensor, y: Tensor) -> Tensor:
    """The gradient of the summed cross-entropy w.r.t. the logits, softmax(logits) - onehot(y):
    logits (N, K), y (N,) int64 -> float64 (N, K), the same bits on every CPU."""
    grad = softmax(logits)
    grad[torch.arange(y.shape[0], device=y.device), y] -= 1.0
    return grad
