"""keyed_dropout: the dropout unit's fused op. Its mask is keyed_uniform's, compared
as integers, so it equals the reference bit for bit (which is keyed_uniform(keys, K)
>= p_drop and torch's (keep * x) / (1 - p_drop)) on every layout, dtype, relu and copies;
and the op has its fake kernel (opcheck)."""
import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

from conftest import ALL_DTYPES


def _keys(n, device, seed=0):
    return torch.randint(-2**63, 2**63 - 1, (n,), generator=torch.Generator().manual_seed(seed)).to(device)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=["f32", "f64", "f16", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("copies", [1, 3])
def test_matches_reference_exactly(device, dtype, channels_last, relu, copies):
    x = torch.randn(4, 5, 3, 7, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    keys = _keys(copies * 4, device)
    for p_drop in (0.0, 0.3, 0.5, 0.9):
        out = mvm_cuda.keyed_dropout(x, keys, p_drop, relu=relu, copies=copies)
        want = ref.keyed_dropout(x, keys, p_drop, relu=relu, copies=copies)
        assert out.shape == want.shape and out.dtype == dtype
        assert torch.equal(out.cpu(), want.cpu()), (p_drop, (out != want).sum())
        # The output keeps x's layout.
        assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_mask_is_a_function_of_each_key(device):
    x = torch.ones(6, 1000, device=device)
    keys = _keys(6, device, seed=3)
    full = mvm_cuda.keyed_dropout(x, keys, 0.5)
    assert torch.equal(mvm_cuda.keyed_dropout(x[:2], keys[4:], 0.5), full[4:])
    stacked = mvm_cuda.keyed_dropout(x[:2], keys, 0.5, copies=3)  # sample n from x[n % 2]
    assert torch.equal(stacked, full)
    rate = (full == 0).double().mean().item()
    # 6000 Bernoulli(0.5): a 5-sigma band that a wrong threshold (e.g. 0.25 or 0.75) cannot meet.
    assert abs(rate - 0.5) < 5 * (0.25 / 6000) ** 0.5


def test_strided_input_is_copied_and_correct(device):
    base = torch.randn(3, 4, 6, 10, device=device)
    x = base[..., ::2]  # neither contiguous nor channels_last
    keys = _keys(3, device)
    assert torch.equal(mvm_cuda.keyed_dropout(x, keys, 0.4, relu=True).cpu(),
                       ref.keyed_dropout(x, keys, 0.4, relu=True).cpu())


def test_bad_arguments(device):
    x = torch.ones(2, 3, device=device)
    keys = _keys(2, device)
    with pytest.raises(RuntimeError, match=r"mvm::keyed_dropout: p_drop must lie in \[0, 1\), got 1"):
        mvm_cuda.keyed_dropout(x, keys, 1.0)
    with pytest.raises(RuntimeError, match=r"mvm::keyed_dropout: keys must have shape \(N,\) = \(4,\), one key "
                       r"per sample of the output, got \(2,\)"):
        mvm_cuda.keyed_dropout(x, keys, 0.5, copies=2)
    with pytest.raises(RuntimeError, match="mvm::keyed_dropout: copies must be >= 1, got 0"):
        mvm_cuda.keyed_dropout(x, keys, 0.5, copies=0)
    with pytest.raises(RuntimeError, match="mvm::keyed_dropout: x must be float32, float64, float16 or bfloat16"):
        mvm_cuda.keyed_dropout(x.long(), keys, 0.5)
    with pytest.raises(RuntimeError, match="mvm::keyed_dropout: keys must be int64, got Int"):
        mvm_cuda.keyed_dropout(x, keys.int(), 0.5)


def test_empty(device):
    x = torch.ones(0, 3, device=device)
    out = mvm_cuda.keyed_dropout(x, _keys(0, device), 0.5, copies=4)
    assert out.shape == (0, 3)


def test_opcheck(device):
    x = torch.randn(2, 3, 4, 5, device=device).contiguous(memory_format=torch.channels_last)
    keys = _keys(6, device)
    torch.library.opcheck(torch.ops.mvm.keyed_dropout.default, (x, keys, 0.5), {"relu": True, "copies": 3})
    torch.library.opcheck(torch.ops.mvm.keyed_dropout.default, (x.double(), keys[:2], 0.25), {})
