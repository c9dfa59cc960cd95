"""The differentiable mode of the sampling units and the adaptive (EOT) attack."""
import json

import pytest
import torch

from mvm_cuda import ops
from mvm_cuda.detector import Detector
from mvm_cuda.eval import adaptive, attacks, data, models, reproduce
from mvm_cuda.nn import DropoutUnit, MVMUnit, SAPUnit, sampling_units, set_differentiable

UNITS = {
    "mvm": lambda: MVMUnit(c=40),
    "sap": lambda: SAPUnit(0.5),
    "dropout": lambda: DropoutUnit(0.3),
}


def _ready_unit(kind: str, h: torch.Tensor):
    """A unit in "sample" mode, with p recorded on h for MVM."""
    unit = UNITS[kind]()
    unit.set_mode("record")
    unit(h)
    unit.set_mode("sample")
    return unit


def _activation(channels_last: bool, dtype=torch.float32, copies: int = 2) -> torch.Tensor:
    h = torch.relu(torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(0), dtype=dtype))
    h = h.repeat(copies, 1, 1, 1)
    return h.contiguous(memory_format=torch.channels_last) if channels_last else h


@pytest.mark.parametrize("kind", list(UNITS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_differentiable_forward_equals_sample_mode(kind, channels_last, dtype):
    h = _activation(channels_last, dtype)
    unit = _ready_unit(kind, h[:3])
    unit.generator = torch.Generator().manual_seed(7)
    plain = unit(h)
    unit.differentiable = True
    unit.generator = torch.Generator().manual_seed(7)
    diff = unit(h.clone().requires_grad_(True))
    assert diff.requires_grad
    assert torch.equal(diff.detach(), plain)
    assert diff.stride() == plain.stride()
    # Both modes really are random: a second draw differs.
    assert not torch.equal(unit(h).detach(), plain)


@pytest.mark.parametrize("kind", list(UNITS))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradient_is_the_fixed_mask(kind, channels_last):
    h = _activation(channels_last)
    unit = _ready_unit(kind, h[:3])
    unit.generator = torch.Generator().manual_seed(3)
    scale = unit.sample_scale(h).expand_as(h)
    unit.differentiable = True
    unit.generator = torch.Generator().manual_seed(3)
    x = h.clone().requires_grad_(True)
    weights = torch.rand(h.shape, generator=torch.Generator().manual_seed(1))
    (unit(x) * weights).sum().backward()
    torch.testing.assert_close(x.grad, scale * weights, rtol=1e-6, atol=0)  # dropout rounds (h*keep)/q
    dropped = scale == 0
    assert dropped.any() and (~dropped).any()
    assert bool((x.grad[dropped] == 0).all()) and bool((x.grad[~dropped] != 0).all())


def test_gradient_through_a_model_reaches_the_input():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(144, 3))
    det = Detector(net, "mvm", c=20, R=4, progress=False)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    with adaptive._AttackMode(det, torch.Generator().manual_seed(0), 64):
        xv = x.clone().requires_grad_(True)
        loss = adaptive._target_loss(adaptive._eot_logits(det, xv, 3), target, 3).sum()
        (grad,) = torch.autograd.grad(loss, xv)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()
    unit = det.units[0]
    assert unit.mode == "off" and not unit.differentiable and unit.p is None and unit.generator is None


@pytest.mark.parametrize("kind", list(UNITS))
def test_default_mode_is_the_op_and_has_no_gradient(kind):
    h = _activation(False)
    unit = _ready_unit(kind, h[:3])
    assert unit.differentiable is False and "differentiable" not in repr(unit)
    unit.generator = torch.Generator().manual_seed(5)
    got = unit(h)
    gen = torch.Generator().manual_seed(5)
    if kind == "mvm":
        want = ops.sample_rows(h.permute(0, 2, 3, 1), unit.p, 40, generator=gen).permute(0, 3, 1, 2)
    elif kind == "sap":
        want = ops.sap_sample(h, 0.5, gen)
    else:
        want = torch.rand(h.shape, generator=gen).ge_(0.3).mul_(h).div_(0.7)
    assert torch.equal(got, want)
    if kind != "dropout":  # the ops are inference-only; dropout is plain torch
        out = unit(h.clone().requires_grad_(True))
        with pytest.raises(RuntimeError, match="inference-only"):
            out.sum().backward()
    # The flag changes nothing outside "sample" mode.
    unit.differentiable = True
    for mode in ("off", "record"):
        unit.set_mode(mode)
        assert torch.equal(unit(h[:3]), h[:3])


def test_set_differentiable():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.Conv2d(2, 2, 3), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(32, 3))
    det = Detector(net, "sap", R=2, progress=False)
    units = sampling_units(det.net)
    assert len(units) == 2 and not any(u.differentiable for u in units)
    set_differentiable(det.net, True)
    assert all(u.differentiable for u in units)
    set_differentiable(det.net, False)
    assert not any(u.differentiable for u in units)
    with pytest.raises(TypeError, match="differentiable"):
        set_differentiable(det.net, "yes")


@pytest.fixture(scope="module")
def digits(one_thread):
    """A small digits CNN, 40 correctly classified test images and their BIM-A versions."""
    d = data.load_digits(seed=0)
    model = models.train(models.build_model("digits", seed=0), d.x_train, d.y_train, epochs=3, progress=False)
    right = models.predict(model, d.x_test) == d.y_test
    x, y = d.x_test[right][:40], d.y_test[right][:40]
    return model, x, y, attacks.bim_a(model, x, y, eps=0.3, eps_iter=0.03)


@pytest.mark.parametrize("method,kwargs", adaptive.DETECTORS)
def test_eot_bim_lowers_its_loss_and_the_score(digits, method, kwargs):
    model, x, y, bim = digits
    det = Detector(model, method, R=20, seed=0, progress=False, **kwargs)
    target = adaptive.runner_up(det, x, y)
    assert not bool((target == y).any())
    torch.manual_seed(0)
    adv = adaptive.eot_bim(det, x, y, 0.3, 0.03, n_iter=8, K=4, target=target, progress=False)
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert (adv - x).abs().max() <= 0.3 + 1e-6 and adv.min() >= 0 and adv.max() <= 1

    gen = torch.Generator()
    before = adaptive.eot_loss(det, x, target, K=8, generator=gen.manual_seed(1))
    after = adaptive.eot_loss(det, adv, target, K=8, generator=gen.manual_seed(1))
    assert after.mean() < 0.75 * before.mean()
    # The passes agree more on the adaptive images than on BIM-A's, which stop at the
    # first misclassification.
    assert det.scores(adv).mean() < det.scores(bim).mean()
    assert (models.predict(model, adv) != y).float().mean() > 0.5
    # The detector is left as it was.
    assert all(u.mode == "off" and not u.differentiable and u.generator is None for u in det.units)


def test_eot_bim_is_repeatable_and_checks_arguments(digits):
    model, x, y, _ = digits
    det = Detector(model, "mvm", c_rel=0.5, R=4, progress=False)
    runs = []
    for _ in range(2):
        torch.manual_seed(4)
        runs.append(adaptive.eot_bim(det, x[:6], y[:6], 0.3, 0.03, n_iter=2, K=2, progress=False))
    assert torch.equal(runs[0], runs[1])
    with pytest.raises(ValueError, match="K must be"):
        adaptive.eot_bim(det, x[:2], y[:2], 0.3, 0.03, K=0)
    with pytest.raises(ValueError, match="n_iter must be"):
        adaptive.eot_bim(det, x[:2], y[:2], 0.3, 0.03, n_iter=1.5)
    with pytest.raises(ValueError, match="eps_iter"):
        adaptive.eot_bim(det, x[:2], y[:2], 0.3, 0.0)
    with pytest.raises(ValueError, match="target must differ"):
        adaptive.eot_bim(det, x[:2], y[:2], 0.3, 0.03, target=y[:2])
    with pytest.raises(ValueError, match=r"y \(or target\) must have shape"):
        adaptive.eot_bim(det, x[:2], y[:3], 0.3, 0.03)
    with pytest.raises(TypeError, match="det must be"):
        adaptive.eot_bim(model, x[:2], y[:2], 0.3, 0.03)


def test_evaluate_adaptive(digits):
    model, x, y, bim = digits
    res = adaptive.evaluate_adaptive(model, x, y, {"bim-a": bim}, 0.3, 0.03, R=10, n_images=12, n_iter=3, K=2,
                                     detectors=adaptive.DETECTORS[:1], n_boot=50, progress=False)
    assert res["settings"]["n_images"] == 12 and res["settings"]["n_clean"] == 40
    entry = res["detectors"]["MVM c=0.5N"]
    assert entry["clean_fpr"] <= 0.05
    for which in ("adaptive", "bim-a"):
        rec = entry[which]
        assert rec["n"] == 12
        assert 0 <= rec["success_at_fpr"] <= rec["misclassified"] <= 1
        assert rec["auc_all"]["n_clean"] == 40 and rec["auc_all"]["n_adv"] == 12
    json.dumps(res)  # JSON-ready


def test_cli_adaptive_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MVM_CUDA_CACHE", str(tmp_path / "cache"))
    args = reproduce.build_parser().parse_args(["reproduce"])
    assert not args.adaptive and (args.adaptive_images, args.adaptive_steps, args.adaptive_eot) == (
        adaptive.ADAPTIVE["n_images"], adaptive.ADAPTIVE["n_iter"], adaptive.ADAPTIVE["K"])
    out = tmp_path / "out"
    argv = ["--dataset", "digits", "--n-test", "40", "--R", "6", "--epochs", "2", "--n-boot", "20",
            "--attacks", "fgsm", "--no-progress", "--adaptive", "--adaptive-images", "6",
            "--adaptive-steps", "2", "--adaptive-eot", "2", "--out", str(out)]
    assert reproduce.main(argv) == 0
    assert "Adaptive attack (digits)" in capsys.readouterr().out
    record = json.loads((out / "results_digits.json").read_text())
    assert record["adaptive"]["settings"]["n_iter"] == 2 and record["adaptive"]["settings"]["K"] == 2
    assert list(record["adaptive"]["detectors"]) == ["MVM c=0.5N", "SAP 50%", "dropout 0.5"]
    assert "fgsm" in record["table3"]["MVM c=0.5N"] and "bim-a" not in record["table3"]["MVM c=0.5N"]
