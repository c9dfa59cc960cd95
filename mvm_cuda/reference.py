"""Pure-PyTorch versions of every op: the oracle for the tests and the baseline
for the benchmarks. They follow docs/method.md literally and favour
clarity over speed (sort-based projection, bisection KKT, a Python PGD loop,
torch.multinomial + scatter for sampling). Same signatures as mvm_cuda.ops, so
either module can serve as the detector's backend."""
from __future__ import annotations

import math

import torch

# Must match csrc/math.h.
PROB_FLOOR = 1e-12


def inclusion_prob(p: torch.Tensor, c: float) -> torch.Tensor:
    """pi = 1 - (1 - p)^c, written with expm1/log1p to stay exact for small c*p;
    1 for p >= 1 (a row of p left at 1 + 1 ulp by rounding)."""
    return -torch.expm1(c * torch.log1p(-p.clamp(max=1.0)))


def grad_factor(p: torch.Tensor, c: float) -> torch.Tensor:
    """g(p) = c (1-p)^(c-1) / pi(p)^2 (so d(alpha/pi)/dp = -alpha g), with p
    clamped to PROB_FLOOR where g would be infinite and g(1) = [c == 1]."""
    p = p.clamp_min(PROB_FLOOR)
    q = torch.ones_like(p) if c == 1 else torch.exp((c - 1) * torch.log1p(-p))
    return torch.where(p >= 1, torch.full_like(p, 1.0 if c == 1 else 0.0),
                       c * q / inclusion_prob(p, c) ** 2)


def variance(p: torch.Tensor, alpha: torch.Tensor, c: float) -> torch.Tensor:
    """V(p) = sum_i alpha_i (1/pi_i - 1) along the last dim (rows with alpha = 0
    contribute 0; a row with alpha > 0 and p = 0 makes V infinite)."""
    p, alpha = p.double(), alpha.double()
    miss = torch.exp(c * torch.log1p(-p.clamp(max=1.0)))
    term = alpha * miss / inclusion_prob(p, c)
    return torch.where(alpha > 0, term, torch.zeros_like(term)).sum(-1)


def project_simplex(v: torch.Tensor, z: float = 1.0) -> torch.Tensor:
    """Euclidean projection of each vector along the last dim of v (any leading
    shape) onto {p >= 0, sum p = z}, by sorting (computed in float64)."""
    w = v.double()
    # The projection commutes with a shift: with the row's max subtracted, the
    # support lies in (-z, 0] and the sums below neither round ties at 1e30
    # away nor overflow at 1e308.
    top = w.amax(-1, keepdim=True) if w.numel() else w
    w = torch.where(top.isfinite(), w - top, w)
    u, _ = torch.sort(w, dim=-1, descending=True)
    k = torch.arange(1, w.shape[-1] + 1, dtype=w.dtype, device=w.device)
    means = torch.cumsum(u, dim=-1) / k
    # The support is the largest k with u_k > tau_k = mean_k - z / k, written
    # (u_k - mean_k) + z / k > 0 and v - tau as (v - mean) + z / rho: exact
    # when the entries are huge next to z.
    rho = ((u - means) + z / k > 0).sum(-1, keepdim=True)
    mean = means.gather(-1, rho - 1)
    return ((w - mean) + z / rho.to(w.dtype)).clamp_min(0).to(v.dtype)


def mvm_step(p: torch.Tensor, alpha: torch.Tensor, c: int, lr: float) -> torch.Tensor:
    """One raw step of the paper's Alg. 2: p + lr * alpha * g(p), then the
    projection onto the simplex. Rows with alpha = 0 do not move."""
    pd, ad = p.double(), alpha.double()
    step = torch.where(ad > 0, lr * ad * grad_factor(pd, c), torch.zeros_like(pd))
    return project_simplex(pd + step).to(p.dtype)


def _log_g(p: torch.Tensor, c: float) -> torch.Tensor:
    """log g(p) = log c + (c-1) log(1-p) - 2 log pi(p), exact over the whole of
    (0, 1] (no floor: the KKT search must resolve p far below PROB_FLOOR)."""
    log_1mp = torch.log1p(-p.clamp(max=1.0))
    pi = -torch.expm1(c * log_1mp)
    tail = (c - 1) * log_1mp if c != 1 else torch.zeros_like(p)
    return math.log(c) + tail - 2 * torch.log(pi)


def _row_p(target: torch.Tensor, c: float, iters: int = 64) -> torch.Tensor:
    """The p in (0, 1] with log g(p) = target, by bisection on log p over
    [-745, 0], the whole range of a positive double."""
    lo = torch.full_like(target, -745.0)
    hi = torch.zeros_like(target)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        too_small = _log_g(torch.exp(mid), c) > target
        lo = torch.where(too_small, mid, lo)
        hi = torch.where(too_small, hi, mid)
    p = torch.exp(0.5 * (lo + hi))
    if c == 1:  # g(1) = 1: every target <= 0 maps to p = 1
        p = torch.where(target <= 0, torch.ones_like(p), p)
    return p


def _solve_kkt(alpha: torch.Tensor, c: int, iters: int = 64) -> torch.Tensor:
    """KKT solver for a (B, M) float64 batch: nested bisection, on log(lambda)
    for sum p = 1, and per row on p for alpha_i g(p_i) = lambda."""
    support = alpha > 0
    log_alpha = torch.where(support, alpha, torch.ones_like(alpha)).log()

    def total(s):
        p = _row_p(s[:, None] - log_alpha, c)
        return torch.where(support, p, torch.zeros_like(p)).sum(-1)

    s0 = 2 * torch.where(support, alpha.sqrt(), torch.zeros_like(alpha)).sum(-1).log() - math.log(c)
    lo, hi, width = s0.clone(), s0.clone(), 1.0
    for _ in range(64):  # grow the bracket until sum p(lo) >= 1 >= sum p(hi)
        low_bad, high_bad = total(lo) < 1, total(hi) > 1
        if not (low_bad.any() or high_bad.any()):
            break
        lo, hi, width = lo - width * low_bad, hi + width * high_bad, 2 * width
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        big = total(mid) > 1
        lo, hi = torch.where(big, mid, lo), torch.where(big, hi, mid)
    p = _row_p(0.5 * (lo + hi)[:, None] - log_alpha, c)
    p = torch.where(support, p, torch.zeros_like(p))
    return p / p.sum(-1, keepdim=True)


def _pgd_scale(p: torch.Tensor, c: float) -> torch.Tensor:
    """PGD's per-row metric 1 / (-d log g / dp): (c-1)/(1-p) + 2 c (1-p)^(c-1) / pi."""
    log_1mp = torch.log1p(-p)
    q = torch.ones_like(p) if c == 1 else torch.exp((c - 1) * log_1mp)
    tail = torch.zeros_like(p) if c == 1 else (c - 1) / (1 - p)
    return 1.0 / (tail + 2 * c * q / inclusion_prob(p, c))


def _scaled_move(p: torch.Tensor, u: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The move x - p of the projection of p + d u onto {x >= PROB_FLOOR, sum x = 1}
    in the metric sum (x - y)^2 / d: x - p = max(d (u - tau), PROB_FLOOR - p) with
    tau found by sorting the rows' breakpoints (a row is free while tau < its
    breakpoint u - (PROB_FLOOR - p) / d)."""
    least = PROB_FLOOR - p
    excess = 1.0 - p.sum()
    order = torch.argsort(u - least / d, descending=True)
    du, dd, lo = (d * u)[order], d[order], least[order]
    # With the first j rows (by breakpoint) free and the rest at their bound:
    fixed = lo.flip(0).cumsum(0).flip(0)  # sum of least over rows j.. (the fixed ones)
    fixed = torch.cat([fixed[1:], fixed.new_zeros(1)])
    tau = (du.cumsum(0) + fixed - excess) / dd.cumsum(0)
    breaks = (u - least / d)[order]
    j = int((breaks > tau).nonzero().max()) if (breaks > tau).any() else 0
    return torch.maximum(d * (u - tau[j]), least)


def _solve_pgd(alpha: torch.Tensor, c: int, max_iter: int, tol: float) -> torch.Tensor:
    """The paper's Alg. 2 for one float64 problem (M,) with the kernel's scaled
    step (see pgd_solve in csrc/math.h): projected steps p + mu D gbar in the
    metric of D = _pgd_scale(p), mu by Barzilai-Borwein and halved until
    Armijo's decrease, p >= PROB_FLOOR on the support."""
    a = alpha[alpha > 0]
    k = a.numel()
    p = torch.full_like(a, 1.0 / k)
    v = variance(p, a, c)
    gbar = a * grad_factor(p, c)  # minus the gradient of f
    d = _pgd_scale(p, c)
    # The larger of two first steps: 1 / lambda at the small-c*p asymptote, and
    # 1 / (mean gbar) at the start.
    mu_small = c / a.sqrt().sum().item() ** 2
    mu = max(mu_small, (k / gbar.sum()).item())
    if not 0 < mu < math.inf:
        mu = mu_small if 0 < mu_small < math.inf else 1.0
    for _ in range(max_iter):
        accepted = False
        for _ in range(100):
            step = _scaled_move(p, mu * gbar, d)
            moved = (step * step / d).sum()
            if moved == 0:
                break
            v_next = variance(p + step, a, c)
            if v_next <= v - 1e-4 * moved / mu and v_next < v:
                accepted = True
                break
            mu *= 0.5
        if not accepted:
            break
        nxt = p + step
        g_next = a * grad_factor(nxt, c)
        sy = -(step * (g_next - gbar)).sum()
        rel = (step.abs() / p).max().item()
        stalled = v_next >= (1 - 1e-15) * v
        p, v, gbar, d = nxt, v_next, g_next, _pgd_scale(nxt, c)
        if rel <= tol or stalled:
            break
        mu = (moved / sy).item() if sy > 0 else 2.0 * mu
    out = torch.zeros_like(alpha)
    out[alpha > 0] = p / p.sum()  # the moves of large rows cancel: the sum back to 1
    return out


def solve_mvm(alpha: torch.Tensor, c: int, method: str = "kkt", max_iter: int = 1000,
              tol: float = 1e-6) -> torch.Tensor:
    """MVM probabilities for every row of alpha (..., M): the minimiser of
    sum_i alpha_i / pi_i over the simplex. Rows with alpha = 0 get p = 0; an
    all-zero row gets uniform p; a row with one nonzero alpha gets one-hot p."""
    a = alpha.double().reshape(-1, alpha.shape[-1])
    out = torch.empty_like(a)
    nnz = (a > 0).sum(-1)
    out[nnz == 0] = 1.0 / a.shape[-1]
    one = nnz == 1
    out[one] = (a[one] > 0).double()
    many = nnz > 1
    if many.any():
        if method == "kkt":
            out[many] = _solve_kkt(a[many], c)
        elif method == "pgd":
            out[many] = torch.stack([_solve_pgd(row, c, max_iter, tol) for row in a[many]])
        else:
            raise ValueError(f"solve_mvm: method must be 'kkt' or 'pgd', got {method!r}")
    return out.reshape(alpha.shape).to(alpha.dtype)


def _key_generator(key: int, device: torch.device) -> torch.Generator:
    """A generator of its own for one sample, seeded by its key (mod 2^64)."""
    return torch.Generator(device=device).manual_seed(int(key) % 2**64)


def _relu_copies(x: torch.Tensor, relu: bool, copies: int) -> torch.Tensor:
    """max(x, 0) when relu, stacked copies times along the batch."""
    x = x.relu() if relu else x
    return x.repeat(copies, *[1] * (x.dim() - 1)) if copies != 1 else x


def sample_rows(x: torch.Tensor, p: torch.Tensor, c: int, *,
                generator: torch.Generator | None = None, keys: torch.Tensor | None = None,
                relu: bool = False, copies: int = 1) -> torch.Tensor:
    """The paper's Alg. 1: x (N, H, W, C) or (N, M, C), p (P, M) with N % P == 0;
    sample n draws c rows with replacement from p[n % P] and keeps them scaled
    by 1/pi_i, the other rows are set to 0. With keys (N,) int64, sample n
    draws from a generator of its own seeded by keys[n] (one sample at a time).
    relu: sample max(x, 0); copies: sample x stacked that many times."""
    if keys is not None and generator is not None:
        raise ValueError("sample_rows: pass keys or generator, not both")
    x = _relu_copies(x, relu, copies)
    n = x.shape[0]
    rows = x.reshape(n, -1, x.shape[-1])  # a copy for non-viewable strides: fine here
    m = rows.shape[1]
    if n == 0:
        return torch.zeros_like(x)
    probs = p.double().repeat(n // p.shape[0], 1)
    if keys is not None:
        keep = torch.cat([_drawn_rows(probs[i:i + 1], c, _key_generator(k, x.device))
                          for i, k in enumerate(keys.tolist())])
    else:
        keep = _drawn_rows(probs, c, generator)
    scale = (1.0 / inclusion_prob(probs, c)).to(torch.promote_types(x.dtype, torch.float32))
    out = torch.where(keep[..., None], rows * scale[..., None], torch.zeros((), dtype=rows.dtype, device=x.device))
    return out.to(x.dtype).reshape(x.shape)


# The draws per row above which the samplers take the exact set path, as
# csrc/multinomial.h's kExactDrawsPerRow.
EXACT_DRAWS_PER_ROW = 64


def _drawn_rows(probs: torch.Tensor, c: int, generator: torch.Generator | None) -> torch.Tensor:
    """(N, M) bool: the rows that c draws with replacement from each row of probs hit."""
    n, m = probs.shape
    if c > EXACT_DRAWS_PER_ROW * m:  # c large against M: the drawn set in work independent of c
        return drawn_rows_exact(probs, c, generator)
    idx = torch.multinomial(probs, c, replacement=True, generator=generator)
    return torch.zeros(n, m, dtype=torch.bool, device=probs.device).scatter_(1, idx, True)


def drawn_rows_exact(probs: torch.Tensor, c: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which rows c draws with replacement hit, for each row of weights probs
    (N, M) (>= 0, not all 0), as (N, M) bool, in work independent of c: the
    scheme of csrc/multinomial.h. The rows in order of first hit are the
    order of the keys E_i / w_i (E_i ~ Exp(1)); the wait from one first hit to
    the next is geometric with success probability the weight not yet hit over
    the total; a row is hit iff its time, the sum of the waits up to it, is at
    most c."""
    n, m = probs.shape
    w = probs.double()
    u = 1 - torch.rand(n, m, dtype=torch.float64, device=w.device, generator=generator)  # (0, 1]
    keys = torch.where(w > 0, (-u.log()).log() - w.log(), math.inf)
    order = keys.argsort(dim=1)
    ws = w.gather(1, order)
    hit = torch.nn.functional.pad(ws.cumsum(1)[:, :-1], (1, 0))  # weight before each rank
    rest = ws.flip(1).cumsum(1).flip(1)  # weight from each rank on
    total = hit + rest
    # log(1 - s) from the smaller of the two sums (no cancellation).
    log_miss = torch.where(rest <= hit, torch.log1p(-rest / total), torch.log(hit / total))
    v = 1 - torch.rand(n, m, dtype=torch.float64, device=w.device, generator=generator)
    wait = torch.where((rest > 0) & (log_miss < 0), 1 + torch.floor(v.log() / log_miss), math.inf)
    wait[:, :1] = 1.0  # the first draw hits the first row
    hits = (wait.cumsum(1) <= c) & (ws > 0)
    return torch.zeros(n, m, dtype=torch.bool, device=w.device).scatter_(1, order, hits)


def sap_draws(h: torch.Tensor, frac: float) -> int:
    """SAP's number of draws for activation h (N, ...) of K entries a sample:
    r = max(1, round(frac * K))."""
    if not (frac > 0 and math.isfinite(frac)):
        raise ValueError(f"sap_sample: frac must be finite and > 0, got {frac}")
    return max(1, round(frac * math.prod(h.shape[1:])))


def sap_inputs(h: torch.Tensor, frac: float):
    """What SAP hands the row sampler for activation h (N, ...): the view
    (N, K, 1), p_j = |h_j| / sum |h| per sample (uniform for an all-zero
    sample, whose output is zero anyway), and r = sap_draws(h, frac)."""
    r = sap_draws(h, frac)
    n = h.shape[0]
    k = math.prod(h.shape[1:])
    flat = h.reshape(n, k, 1)
    mag = flat[..., 0].abs().to(torch.promote_types(h.dtype, torch.float32))
    # The sum and the division in float64 (float32's sum overflows for
    # activations near 3e38), written in place into mag: no extra pass or copy.
    total = mag.sum(-1, keepdim=True, dtype=torch.float64)
    p = mag.div_(total).masked_fill_(total == 0, 1.0 / max(k, 1))
    return flat, p, r


def sap_sample(h: torch.Tensor, frac: float, generator: torch.Generator | None = None, *,
               keys: torch.Tensor | None = None, relu: bool = False, copies: int = 1) -> torch.Tensor:
    """Stochastic activation pruning (Dhillon et al. 2018) on h (N, ...): each
    sample's entries are rows of width 1, drawn r = max(1, round(frac * K))
    times with p proportional to |h|, kept entries scaled by 1/pi; with keys
    (N,), sample n's draws from keys[n] alone (as sample_rows). relu and
    copies as in sample_rows."""
    return sap_by_rows(sample_rows, _relu_copies(h, relu, copies), frac, generator, scale_only=False, keys=keys)


def sap_scale(h: torch.Tensor, frac: float, generator: torch.Generator | None = None, *,
              keys: torch.Tensor | None = None) -> torch.Tensor:
    """The random scale of sap_sample(h, frac) with the same generator state
    (or keys): 1/pi_j on the drawn entries, 0 elsewhere, shaped like h (in h's dtype)."""
    return sap_by_rows(sample_rows, h, frac, generator, scale_only=True, keys=keys)


def sap_by_rows(rows_op, h, frac, generator, scale_only, keys=None):
    """SAP through a row sampler `rows_op` (this module's sample_rows, or the
    kernel's): on the (N, K, 1) view of h, or of ones for the scale alone."""
    flat, p, r = sap_inputs(h, frac)
    if h.numel() == 0:  # nothing to prune
        return torch.empty_like(h)
    x = torch.ones_like(flat) if scale_only else flat
    return rows_op(x, p, r, generator=generator, keys=keys).reshape(h.shape)


# Philox4x32-10 (Salmon et al. 2011) as ATen's at::Philox4_32 computes it.
_PHILOX_MUL = (0xD2511F53, 0xCD9E8D57)
_PHILOX_WEYL = (0x9E3779B9, 0xBB67AE85)
_MASK32 = 0xFFFFFFFF


def _mulhilo32(a: int, b: torch.Tensor):
    """(high, low) 32-bit halves of a * b for a < 2^32 and an int64 tensor b of
    values < 2^32, in 16-bit pieces (no int64 product overflows)."""
    al, ah = a & 0xFFFF, a >> 16
    bl, bh = b & 0xFFFF, b >> 16
    mid = ah * bl + al * bh
    low = al * bl + ((mid & 0xFFFF) << 16)
    return ah * bh + (mid >> 16) + (low >> 32), low & _MASK32


def philox4x32(key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The four 32-bit outputs (..., 4), as int64, of Philox4x32-10 for 64-bit
    keys `key` (int64, read mod 2^64) and 128-bit counters given as their
    four 32-bit words counter (..., 4) (low word first), broadcast together."""
    k0, k1 = key & _MASK32, (key >> 32) & _MASK32
    c0, c1, c2, c3 = counter.unbind(-1)
    for r in range(10):
        if r:
            k0, k1 = (k0 + _PHILOX_WEYL[0]) & _MASK32, (k1 + _PHILOX_WEYL[1]) & _MASK32
        hi0, lo0 = _mulhilo32(_PHILOX_MUL[0], c0)
        hi1, lo1 = _mulhilo32(_PHILOX_MUL[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return torch.stack(torch.broadcast_tensors(c0, c1, c2, c3), -1)


def keyed_uniform(keys: torch.Tensor, K: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(N, K) uniforms in [0, 1) for keys (N,) int64: entry j of row n from
    Philox block j // U of key keys[n] (subsequence 0), U = 4 float32 uniforms
    of 24 bits (an output each) or 2 float64 ones of 53 bits (two outputs)."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"keyed_uniform: dtype must be float32 or float64, got {dtype}")
    per = 4 if dtype == torch.float32 else 2
    blocks = torch.arange(-(-K // per), dtype=torch.int64, device=keys.device)
    zero = torch.zeros_like(blocks)
    counter = torch.stack([blocks & _MASK32, blocks >> 32, zero, zero], -1)  # (B, 4)
    out = philox4x32(keys.to(torch.int64)[:, None], counter[None])  # (N, B, 4)
    if dtype == torch.float32:
        u = (out >> 8).double() * 2.0**-24
    else:
        u = ((out[..., 0::2] >> 5).double() * 2.0**26 + (out[..., 1::2] >> 6).double()) * 2.0**-53
    return u.reshape(keys.shape[0], -1)[:, :K].to(dtype)


def keyed_dropout(x: torch.Tensor, keys: torch.Tensor, p_drop: float, *, relu: bool = False,
                  copies: int = 1) -> torch.Tensor:
    """Test-time inverted dropout: (keep * x) / (1 - p_drop) with keep = keyed_uniform(keys,
    K) >= p_drop over the entries of each sample in logical order (uniforms in float64 for
    a float64 x, else float32); relu and copies as in sample_rows."""
    x = _relu_copies(x, relu, copies)
    u = keyed_uniform(keys, math.prod(x.shape[1:]), torch.promote_types(x.dtype, torch.float32))
    keep = (u >= p_drop).to(x.dtype).view(x.shape)
    return (keep * x) / (1.0 - p_drop)


def row_alpha(x: torch.Tensor) -> torch.Tensor:
    """alpha: the squared norm of every row (pixel) of x (N, H, W, C) or
    (N, M, C), as (N, M) float64, squared and summed in float64 (a float32
    square overflows for entries above about 1.8e19)."""
    return x.double().square().sum(-1).reshape(x.shape[0], -1)  # not square_: x may be float64 already
