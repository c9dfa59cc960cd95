"""Sampling units (mvm_cuda.nn) and their insertion after the conv part's ReLUs."""
import copy
import math
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvm_cuda import ops, reference
from mvm_cuda.nn import (DropoutUnit, MVMUnit, SAPUnit, first_unit_dominates, insert_units, sampling_units,
                         set_mode)


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.5),
        nn.Flatten(), nn.Linear(6 * 2 * 2, 8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3),
    ).eval()


class Block(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Nested(nn.Module):
    """ReLUs inside submodules, a shared ReLU module called twice, torch.flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(Block(1, 4), Block(4, 4))
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        x = self.relu(self.conv(self.features(x)))
        return self.fc(self.relu(torch.flatten(x, 1)))  # the same ReLU, after the flatten


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.fc(F.relu(x.view(x.shape[0], -1)))


class Recorder(nn.Module):
    """A unit that notes that it ran and passes its input through."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, h):
        self.log.append(tuple(h.shape))
        return h


def check_insertion(model, x, expected_shapes):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = model(x)
    log = []
    new = insert_units(model, lambda: Recorder(log))
    out = new(x)
    assert log == expected_shapes  # one unit per conv-part ReLU call, in execution order
    assert torch.equal(out, ref)  # identity units: the same network
    assert new is not model
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert new.state_dict().keys() == before.keys()
    assert all(torch.equal(new.state_dict()[k], before[k]) for k in before)
    assert torch.equal(model(x), ref)  # the original is untouched and deterministic
    assert not any(isinstance(m, Recorder) for m in model.modules())
    return new


def test_insert_sequential():
    x = torch.rand(2, 1, 8, 8)
    new = check_insertion(small_cnn(), x, [(2, 4, 6, 6), (2, 6, 4, 4)])
    # Changing the copy's weights must not reach the original.
    model = small_cnn()
    new = insert_units(model, lambda: DropoutUnit(0.5))
    with torch.no_grad():
        next(new.parameters()).add_(1.0)
    assert torch.equal(model.state_dict()["0.weight"], small_cnn().state_dict()["0.weight"])


def test_insert_nested_and_shared_relu():
    model = Nested().eval()
    # Three conv-part ReLU calls (two nested, one shared module); not the one after the flatten.
    check_insertion(model, torch.rand(3, 1, 6, 6), [(3, 4, 6, 6)] * 3)


def test_insert_functional_relu_and_view():
    check_insertion(Functional().eval(), torch.rand(2, 1, 8, 8), [(2, 4, 6, 6), (2, 4, 4, 4)])


class Spy(types.SimpleNamespace):
    """A backend that records what the ops were called with, then runs mvm_cuda.ops."""

    def __init__(self):
        super().__init__(calls=[])

    def _note(self, name, x):
        self.calls.append((name, x.data_ptr(), tuple(x.shape), x.stride()))

    def row_alpha(self, x):
        self._note("row_alpha", x)
        return ops.row_alpha(x)

    def solve_mvm(self, alpha, c, method="kkt", max_iter=1000, tol=1e-6):
        return ops.solve_mvm(alpha, c, method, max_iter, tol)

    def sample_rows(self, x, p, c, *, generator=None, **fused):
        self._note("sample_rows", x)
        return ops.sample_rows(x, p, c, generator=generator, **fused)

    def sap_sample(self, h, frac, generator=None, **fused):
        self._note("sap_sample", h)
        return ops.sap_sample(h, frac, generator, **fused)


@pytest.mark.parametrize("channels_last", [False, True])
def test_mvm_unit_reads_nhwc_view_in_place(channels_last):
    spy = Spy()
    unit = MVMUnit(20, backend=spy, generator=torch.Generator().manual_seed(0))
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    h = torch.rand(3, 5, 6, 7).contiguous(memory_format=fmt)
    unit.set_mode("record")
    assert unit(h) is h
    assert unit.p.shape == (3, 42)
    torch.testing.assert_close(unit.p.sum(1), torch.ones(3, dtype=torch.float64))
    big = h.repeat(4, 1, 1, 1).contiguous(memory_format=fmt)
    unit.set_mode("sample")
    out = unit(big)
    view = big.permute(0, 2, 3, 1)
    assert spy.calls[0] == ("row_alpha", h.data_ptr(), (3, 6, 7, 5), h.permute(0, 2, 3, 1).stride())
    assert spy.calls[1] == ("sample_rows", big.data_ptr(), (12, 6, 7, 5), view.stride())
    assert out.shape == big.shape and out.stride() == big.stride()
    # Each pixel is either dropped (all channels 0) or kept and scaled by 1/pi of its image's p.
    pi = reference.inclusion_prob(unit.p.double(), 20).repeat(4, 1).view(12, 6, 7)
    kept = (out != 0).any(1)
    expected = torch.where(kept[:, None], big / pi[:, None].float(), torch.zeros(()))
    torch.testing.assert_close(out, expected)


def test_sap_unit_flat_view_in_place():
    spy = Spy()
    unit = SAPUnit(0.5, backend=spy, generator=torch.Generator().manual_seed(0))
    for fmt in (torch.contiguous_format, torch.channels_last):
        h = torch.relu(torch.randn(4, 3, 5, 5)).contiguous(memory_format=fmt)
        assert unit(h) is h  # mode "off"
        unit.set_mode("sample")
        out = unit(h)
        unit.set_mode("off")
        assert spy.calls[-1][1] == h.data_ptr()
        assert out.shape == h.shape and out.stride() == h.stride()
        assert ((out == 0) | (h != 0)).all()  # zeros stay zero
        assert (out != 0).any() and (out != h).any()


def test_dropout_unit():
    gen = torch.Generator().manual_seed(0)
    unit = DropoutUnit(0.5, generator=gen)
    h = torch.rand(64, 8, 10, 10) + 0.1
    unit.set_mode("record")
    assert unit(h) is h
    unit.set_mode("sample")
    unit.eval()  # the training flag does not matter: it samples at inference
    out = unit(h)
    assert set(torch.unique(out / h).tolist()) == {0.0, 2.0}
    assert abs((out == 0).double().mean().item() - 0.5) < 0.01
    assert torch.equal(DropoutUnit(0.0).sample(h), h)
    with pytest.raises(ValueError, match="p_drop"):
        DropoutUnit(1.0)


def test_units_are_reproducible_with_a_generator():
    h = torch.rand(2, 4, 5, 5)
    outs = []
    for _ in range(2):
        unit = MVMUnit(10, generator=torch.Generator().manual_seed(7))
        unit.set_mode("record")
        unit(h)
        unit.set_mode("sample")
        outs.append((unit(h), unit(h)))
    assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    assert not torch.equal(outs[0][0], outs[0][1])  # successive calls draw afresh


def test_mvm_unit_c_rel_and_errors():
    assert MVMUnit(c_rel=0.5, ref_pixels=784).draws(36) == 392
    assert MVMUnit(c_rel=0.5).draws(36) == 18
    assert MVMUnit(c_rel=1e-6).draws(36) == 1
    with pytest.raises(ValueError, match="exactly one of c and c_rel"):
        MVMUnit(10, c_rel=1.0)
    unit = MVMUnit(10)
    with pytest.raises(ValueError, match="mode must be one of"):
        unit.set_mode("train")
    unit.set_mode("sample")
    with pytest.raises(RuntimeError, match="no recorded p"):
        unit(torch.rand(2, 3, 4, 4))
    unit.set_mode("record")
    unit(torch.rand(2, 3, 4, 4))
    unit.set_mode("sample")
    with pytest.raises(ValueError, match="not a stack of copies"):
        unit(torch.rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match="NCHW"):
        unit(torch.rand(4, 16))


def test_reference_backend_records_the_same_p():
    h = torch.relu(torch.randn(3, 8, 6, 6, dtype=torch.float64))
    h[0, :, :2] = 0  # some dead pixels
    units = [MVMUnit(c_rel=1.0, backend=b) for b in (ops, reference)]
    for u in units:
        u.set_mode("record")
        u(h)
    torch.testing.assert_close(units[0].alpha, units[1].alpha)
    torch.testing.assert_close(units[0].p, units[1].p, rtol=1e-6, atol=1e-9)
    assert (units[0].p[0].view(6, 6)[:2] == 0).all()


def test_mvm_unit_keeps_p_float64_from_solve_to_sample():
    # A float32 activation: alpha and p stay float64 (P x M, small), so p's rows sum
    # to 1 to float64 rounding and 1/pi is computed from the solver's own values.
    h = torch.relu(torch.randn(2, 4, 8, 8)) * 1e20  # squares past float32's range
    unit = MVMUnit(c_rel=1.0, generator=torch.Generator().manual_seed(1))
    unit.set_mode("record")
    unit(h)
    assert unit.alpha.dtype == torch.float64 and unit.p.dtype == torch.float64
    assert torch.isfinite(unit.alpha).all()
    assert (unit.p.sum(1) - 1).abs().max() < 1e-13
    unit.set_mode("sample")
    out = unit(h.repeat(3, 1, 1, 1)).permute(0, 2, 3, 1).reshape(6, 64, 4)
    scale = (1 / reference.inclusion_prob(unit.p, 64)).repeat(3, 1).float()
    rows = h.repeat(3, 1, 1, 1).permute(0, 2, 3, 1).reshape(6, 64, 4)
    kept = (out != 0).any(-1)
    torch.testing.assert_close(out[kept], (rows * scale[..., None])[kept], rtol=1e-6, atol=0)


def test_set_mode_and_sampling_units():
    model = insert_units(small_cnn(), lambda: SAPUnit(1.0))
    units = sampling_units(model)
    assert len(units) == 2
    set_mode(model, "sample")
    assert all(u.mode == "sample" for u in units)
    x = torch.rand(4, 1, 8, 8)
    with torch.inference_mode():
        assert not torch.equal(model(x), model(x))
        set_mode(model, "off")
        assert torch.equal(model(x), small_cnn()(x))


def test_model_with_units_deep_copies_and_saves(tmp_path):
    model = insert_units(small_cnn(), lambda: MVMUnit(c_rel=1.0, backend=reference))
    for copied in (copy.deepcopy(model), torch.load(_saved(model, tmp_path), weights_only=False)):
        units = sampling_units(copied)
        assert len(units) == 2 and all(u.backend is reference for u in units)
        x = torch.rand(2, 1, 8, 8)
        assert torch.equal(copied(x), model(x))


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dropout_keep_rate_is_exact_in_every_dtype(dtype):
    # p_drop = 0.3 is not representable in bfloat16 (0.30078125): drawing the
    # uniforms in h's dtype would drop 0.00078 too many. n = 1.6e7 entries give a
    # binomial standard error of 1.15e-4 on the drop rate: that error is z = 6.8.
    n = 16_000_000
    unit = DropoutUnit(0.3, generator=torch.Generator().manual_seed(1))
    unit.set_mode("sample")
    out = unit(torch.ones(n // 100, 1, 10, 10, dtype=dtype))
    assert out.dtype == dtype
    dropped = (out == 0).double().mean().item()
    z = (dropped - 0.3) / math.sqrt(0.3 * 0.7 / n)
    assert abs(z) < 4.5, f"drop rate {dropped:.5f}, z = {z:.1f}"


def _half_unit(kind):
    """A unit whose scale 1/pi is 2**17 (above float16's 65504) on a float16 activation
    of equal entries 0.01, whose sampled values 0.01 * 2**17 = 1310.72 are finite."""
    g = torch.Generator().manual_seed(0)
    h = torch.full((2, 1, 256, 512), 0.01, dtype=torch.float16)
    if kind == "mvm":
        unit = MVMUnit(1, generator=g)
        unit.p = torch.full((1, 256 * 512), 2.0**-17, dtype=torch.float64)  # uniform, c = 1
    else:
        unit = SAPUnit(2.0**-17, generator=g)  # one draw among 2**17 equal entries
    unit.set_mode("sample")
    return unit, h


@pytest.mark.parametrize("kind", ["mvm", "sap"])
def test_differentiable_half_is_finite_where_sampling_is(kind):
    """Issue 16, point 10: the scale is computed in float32, so a float16 activation gets
    finite forward values equal to plain sampling's (to float16 rounding) and a finite
    gradient where plain sampling is finite."""
    unit, h = _half_unit(kind)
    plain = unit.sample(h)
    unit.generator.manual_seed(0)
    unit.differentiable = True
    x = h.clone().requires_grad_()
    out = unit(x)
    assert out.dtype == torch.float16 and torch.isfinite(out).all() and (out != 0).any()
    assert torch.allclose(out.float(), plain.float(), rtol=2e-3)
    (out.float() * 0.01).sum().backward()
    drawn = out != 0
    assert torch.isfinite(x.grad).all()
    assert torch.allclose(x.grad[drawn].float(), torch.tensor(0.01 * 2**17), rtol=2e-3)
    assert (x.grad[~drawn] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_differentiable_scale_keeps_exact_values(dtype):
    """The float32-or-wider scale leaves float32 and float64 bit for bit equal to sampling."""
    for unit in (SAPUnit(0.5, generator=torch.Generator().manual_seed(1)),
                 DropoutUnit(0.3, generator=torch.Generator().manual_seed(1))):
        h = torch.rand(3, 4, 5, 6, dtype=dtype, generator=torch.Generator().manual_seed(2))
        unit.set_mode("sample")
        unit.differentiable = False
        plain = unit.sample(h)
        unit.generator.manual_seed(1)
        unit.differentiable = True
        assert torch.equal(unit(h), plain) and unit.sample_scale(h).dtype == dtype


@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_sap_scale_half_draws_what_sap_sample_draws(device, half):
    """sap_scale of a half h is float32 and has the support and values of sap_sample(h)
    under the same seed (the scale is drawn from h in float32: the same p, the same
    draws), on every device."""
    h = torch.rand(6, 3, 7, 5, generator=torch.Generator().manual_seed(4)).to(device, half)
    h[0, 0, :3] = 0
    sample = ops.sap_sample(h, 0.3, torch.Generator(device).manual_seed(5))
    scale = ops.sap_scale(h, 0.3, torch.Generator(device).manual_seed(5))
    assert scale.dtype == torch.float32 and scale.shape == h.shape
    assert torch.equal(scale != 0, sample != 0)
    assert torch.equal((h.float() * scale).to(half), sample)


class SkipFromInput(nn.Module):
    """A ReLU whose input is read again (the residual add), and a path from the input
    that passes the first unit by."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        a = self.conv1(x)
        h = F.relu(a) + a  # a is read after its ReLU: that unit cannot take the ReLU's place
        return self.fc(torch.flatten(h + F.relu(self.conv2(x)), 1))


@pytest.mark.parametrize("unit", [lambda: MVMUnit(5), lambda: SAPUnit(0.5), lambda: DropoutUnit(0.5)],
                         ids=["mvm", "sap", "dropout"])
def test_units_take_the_relus_place_where_they_can(unit):
    # In Sequential, nested and functional models every unit replaces its ReLU and
    # applies it: with the units off, the network is the original, bit for bit.
    for model, x in ((small_cnn(), torch.randn(2, 1, 8, 8)), (Nested().eval(), torch.randn(2, 1, 6, 6)),
                     (Functional().eval(), torch.randn(2, 1, 8, 8))):
        new = insert_units(model, unit)
        assert all(u.relu for u in sampling_units(new))
        assert torch.equal(new(x), model(x))
        assert first_unit_dominates(new)
    model = SkipFromInput().eval()
    new = insert_units(model, unit)
    assert [u.relu for u in sampling_units(new)] == [False, True]
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(new(x), model(x))
    assert not first_unit_dominates(new)  # conv2 reads the input around the first unit


def test_copies_stack_the_batch_in_sample_mode():
    # A unit with copies = k turns P images into k * P samples, sample n from image n % P,
    # as if its input had been repeated; only in "sample" mode.
    h = torch.randn(3, 4, 5, 5)
    keys = torch.arange(6)
    for make in (lambda: MVMUnit(7), lambda: SAPUnit(0.5), lambda: DropoutUnit(0.5)):
        unit, stacked = make(), make()
        unit.relu = stacked.relu = True
        for u in (unit, stacked):
            u.set_mode("record")
            u(h)
            u.set_mode("sample")
        unit.copies, unit.keys, stacked.keys = 2, keys, keys
        assert torch.equal(unit(h), stacked(h.repeat(2, 1, 1, 1)))
        unit.differentiable = stacked.differentiable = True
        assert torch.equal(unit(h), stacked(h.repeat(2, 1, 1, 1)))
        unit.set_mode("off")
        assert torch.equal(unit(h), h.relu())
