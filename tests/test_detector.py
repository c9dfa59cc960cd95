"""The detector (Alg. 3) on a small CNN trained on scikit-learn's 8x8 digits."""
import copy
import inspect
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from sklearn.metrics import roc_auc_score

from mvm_cuda import reference
from mvm_cuda._settings import SETTINGS
from mvm_cuda.detector import Detector, histogram_entropy, roc_report, threshold_for_fpr
from mvm_cuda.roc import _rank_auc
from mvm_cuda.eval import attacks, data, models
from mvm_cuda.nn import MVMUnit


@pytest.fixture(scope="module")
def digits():
    """A digits CNN trained for a few epochs, its correctly classified test images and
    their BIM-A versions (Feinman et al.'s MNIST eps; a larger step, for speed)."""
    d = data.load_digits(seed=0)
    model = models.train(models.build_model("digits", seed=0), d.x_train, d.y_train, epochs=6, progress=False)
    right = models.predict(model, d.x_test) == d.y_test
    x, y = d.x_test[right][:120], d.y_test[right][:120]
    adv = attacks.bim_a(model, x, y, eps=0.3, eps_iter=0.03)
    assert x.shape[0] == 120 and (models.predict(model, adv) != y).float().mean() > 0.9
    return model, x, adv


def test_histogram_entropy():
    votes = torch.tensor([[3, 3, 3, 3], [0, 1, 0, 1], [0, 1, 2, 3], [9, 9, 9, 2]])
    expected = torch.tensor([0.0, np.log(2), np.log(4), -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))],
                            dtype=torch.float64)
    torch.testing.assert_close(histogram_entropy(votes), expected)
    assert histogram_entropy(votes)[0].item() == 0.0


def test_identity_units_give_zero_scores(digits, device):
    """With units that change nothing (dropout with p_drop = 0) every pass predicts the
    clean class, whatever the batching and chunking of the R copies."""
    model, x, adv = digits
    model = copy.deepcopy(model).to(device)
    clean = models.predict(model, adv[:30].to(device)).cpu()
    assert len(clean.unique()) > 3  # the votes below could not come out right by chance
    for max_batch in (5, 64, 1000):  # 5 < R: the copies of one image span several forwards
        det = Detector(model, "dropout", p_drop=0.0, R=9, max_batch=max_batch, progress=False)
        votes = det.votes(adv[:30])
        assert votes.shape == (30, 9)
        assert torch.equal(votes, clean[:, None].expand(30, 9))
        assert torch.equal(det.scores(adv[:30]), torch.zeros(30, dtype=torch.float64))


@pytest.mark.parametrize("method,kwargs", [("mvm", dict(c_rel=1.0)), ("sap", dict(frac=0.5)),
                                           ("dropout", dict(p_drop=0.5))])
def test_bim_a_scores_higher_than_clean(digits, method, kwargs):
    model, x, adv = digits
    det = Detector(model, method, R=20, seed=1, progress=False, **kwargs)
    clean_scores, adv_scores = det.scores(x), det.scores(adv)
    assert mannwhitneyu(adv_scores, clean_scores, alternative="greater").pvalue < 1e-6
    report = det.evaluate(x, adv)
    assert report.auc > 0.75
    assert report.ci[0] <= report.auc <= report.ci[1]


def test_seed_makes_scores_repeatable(digits, device):
    model, x, adv = digits
    model = copy.deepcopy(model).to(device)
    det = Detector(model, "mvm", c_rel=0.5, R=10, seed=3, progress=False)
    s1, s2 = det.scores(adv[:40]), det.scores(adv[:40])
    assert torch.equal(s1, s2) and (s1 > 0).any()
    other = Detector(model, "mvm", c_rel=0.5, R=10, seed=4, progress=False).scores(adv[:40])
    assert not torch.equal(s1, other)
    gen = torch.Generator(device).manual_seed(3)
    det = Detector(model, "mvm", c_rel=0.5, R=10, generator=gen, progress=False)
    assert not torch.equal(det.scores(adv[:40]), det.scores(adv[:40]))  # a generator advances


METHODS = [("mvm", dict(c_rel=0.5)), ("mvm", dict(c_rel=0.25, c_ref="unit")), ("sap", dict(frac=0.5)),
           ("dropout", dict(p_drop=0.5))]

# The share of votes that must agree across batchings on CUDA, as
# docs/reliability.md states it: cuDNN picks convolution algorithms by batch
# size and TF32 is on for convolutions by default, so an activation, and with it
# alpha, a draw's row or an argmax, may move in its last bits.
CUDA_VOTE_AGREEMENT = 0.95


class UnitDraws:
    """Forward hooks on a detector's units that record, per (unit, key) of the
    sampling passes, the unit's input row, its recorded p row (MVM) and its
    output row: an image's draws in one pass of one unit. (A unit that stacks
    the copies itself reads output sample n from input row n % P.)"""

    def __init__(self, detector):
        self.seen = {}
        self.handles = [unit.register_forward_hook(self._hook(u)) for u, unit in enumerate(detector.units)]

    def _hook(self, u):
        def hook(unit, args, out):
            if unit.mode != "sample" or unit.keys is None:
                return
            p = unit.p if isinstance(unit, MVMUnit) else None
            for n, key in enumerate(unit.keys.tolist()):
                prow = None if p is None else p[n % p.shape[0]].to("cpu", copy=True)
                h = args[0][n % args[0].shape[0]]
                self.seen[(u, key)] = (h.to("cpu", copy=True), prow, out[n].to("cpu", copy=True))
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def assert_draws_alone(detector, seen, device, count=12):
    """Replays `count` recorded (unit, key) draws, each in a batch of one: the
    unit on the same input row (and p row) with the same key gives the same
    output row, as it did inside its batch."""
    items = list(seen.items())
    for (u, key), (h, p, out) in items[:: max(1, len(items) // count)]:
        unit = detector.units[u]
        unit.set_mode("sample")
        unit.keys = torch.tensor([key], device=device)
        if p is not None:
            unit.p = p[None].to(device)
        try:
            with torch.inference_mode():
                alone = unit(h[None].to(device))[0].cpu()
        finally:
            unit.set_mode("off")
            unit.keys = None
            if p is not None:
                unit.p = None
        assert torch.equal(alone, out), (u, key)


def assert_same_draws(a, b):
    """The same (unit, key) pairs, i.e. every image drew from the same keys in
    every pass; where a unit saw the same input (and p), its output is the same."""
    assert a.keys() == b.keys()
    for key, (h, p, out) in a.items():
        h2, p2, out2 = b[key]
        if torch.equal(h, h2) and (p is None or torch.equal(p, p2)):
            assert torch.equal(out, out2), key


@pytest.mark.parametrize("method,kwargs", METHODS)
def test_randomness_is_per_image(digits, device, method, kwargs):
    """With a seed, an image's draws depend on its index only: not on the batch it sits
    in, max_batch, how a set is split into calls, or its position in the call. On the
    CPU its votes and score are then the same bits; on CUDA, whose convolutions may
    round differently by batch size, its votes agree at CUDA_VOTE_AGREEMENT at least."""
    model, x, adv = digits
    model = copy.deepcopy(model).to(device)
    images = adv[:45]

    def det(max_batch=1024):
        return Detector(model, method, R=10, seed=7, max_batch=max_batch, progress=False, **kwargs)

    def votes_and_draws(detector, *args, **kw):
        hooks = UnitDraws(detector)
        try:
            return detector.votes(*args, **kw), hooks.seen
        finally:
            hooks.remove()

    def assert_agree(votes, expected):
        if device == "cpu":
            assert torch.equal(votes, expected)
        else:
            agree = (votes == expected).double().mean().item()
            assert agree >= CUDA_VOTE_AGREEMENT, f"{agree:.3f} of the votes agree"

    detector = det()
    whole, drawn = votes_and_draws(detector, images)
    assert (histogram_entropy(whole) > 0).sum() > 5  # the comparisons below see real noise
    assert_draws_alone(detector, drawn, device)
    assert_agree(det().votes(images[:10]), whole[:10])
    for max_batch in (7, 25, 333):  # 7 < R: one image's copies span two forwards
        votes, other = votes_and_draws(det(max_batch), images)
        assert_same_draws(drawn, other)
        assert_agree(votes, whole)
    split = det()
    parts = [split.votes(images[:13]), split.votes(images[13:], index=torch.arange(13, 45))]
    assert_agree(torch.cat(parts), whole)
    perm = torch.randperm(45, generator=torch.Generator().manual_seed(0))
    votes, other = votes_and_draws(det(), images[perm], index=perm.numpy())
    assert_same_draws(drawn, other)
    assert_agree(votes, whole[perm])
    # The same image at another index gets other noise.
    assert not torch.equal(det().votes(images, index=torch.arange(45) + 1000), whole)


def test_fresh_randomness_without_a_seed(digits):
    """seed=None (the default): every call draws new noise, whatever torch's seed."""
    model, x, adv = digits
    det = Detector(model, "mvm", c_rel=0.5, R=10, progress=False)
    assert det.seed is None
    torch.manual_seed(0)
    first = det.votes(adv[:40])
    torch.manual_seed(0)
    assert not torch.equal(det.votes(adv[:40]), first)
    # A generator: new noise per call, repeatable from its seed.
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    a = Detector(model, "mvm", c_rel=0.5, R=10, generator=gen(), progress=False)
    b = Detector(model, "mvm", c_rel=0.5, R=10, generator=gen(), progress=False)
    va, vb = a.votes(adv[:40]), b.votes(adv[:40])
    assert torch.equal(va, vb) and not torch.equal(a.votes(adv[:40]), va)


def test_numpy_images(digits):
    model, x, adv = digits
    det = Detector(model, "sap", R=8, seed=1, progress=False)
    assert torch.equal(det.scores(adv[:20].numpy()), det.scores(adv[:20]))
    assert torch.equal(det.scores(adv[:20].double().numpy()), det.scores(adv[:20].double()))
    odd = adv[:20].numpy().astype(">f4")[::-1]  # negative strides, big-endian, read-only
    odd.flags.writeable = False
    assert torch.equal(det.scores(odd, index=np.arange(19, -1, -1)), det.scores(adv[:20]).flip(0))
    det.fit_threshold(x[:40].numpy(), fpr=0.25)
    assert torch.equal(det.predict(adv[:20].numpy()), det.predict(adv[:20]))
    with pytest.raises(ValueError, match=r"Detector\.scores: x must be .* numpy array of dtype uint8 .*astype"):
        det.scores((adv[:2].numpy() * 255).astype(np.uint8))


def test_errors_name_the_method_called(digits):
    model, x, adv = digits
    det = Detector(model, "dropout", R=2, seed=0, progress=False)
    det.threshold = 0.5
    for method in ("scores", "votes", "predict", "fit_threshold"):
        with pytest.raises(ValueError, match=rf"^Detector\.{method}: pixel values"):
            getattr(det, method)(adv[:30] + 2, **({"fpr": 0.5} if method == "fit_threshold" else {}))
    with pytest.raises(ValueError, match=r"^Detector\.scores: index must hold one integer per image, shape \(3,\)"):
        det.scores(adv[:3], index=[0, 1])
    with pytest.raises(ValueError, match=r"^Detector\.votes: index must lie in \[0, 2\*\*63\)"):
        det.votes(adv[:2], index=[0, -1])


def test_c_relative_to_each_unit(digits):
    """c_ref="unit": c = c_rel times the unit's own rows; per-unit values; saved and loaded."""
    model, x, adv = digits
    det = Detector(model, "mvm", c_rel=0.25, c_ref="unit", R=4, seed=0, progress=False)
    det.scores(adv[:3])
    assert det.name == "MVM c=0.25M"
    assert [u.draws(64) for u in det.units] == [16, 16]  # two 8x8 maps: round(0.25 * 64)
    paper = Detector(model, "mvm", c_rel=0.25, R=4, seed=0, progress=False)
    paper.set_ref_pixels(28 * 28)
    assert [u.draws(64) for u in paper.units] == [196, 196]  # the input's pixels, not the unit's rows
    per_unit = Detector(model, "mvm", c_rel=[0.5, 0.125], c_ref="unit", R=4, seed=0, progress=False)
    assert [u.draws(64) for u in per_unit.units] == [32, 8] and per_unit.name == "MVM c=(0.5,0.125)M"
    with pytest.raises(ValueError, match="c_rel gives 3 values, but the model has 2 units"):
        Detector(model, "mvm", c_rel=[0.5, 0.5, 0.5], progress=False)
    with pytest.raises(ValueError, match="c_ref must be one of"):
        Detector(model, "mvm", c_ref="image", progress=False)


def test_per_unit_settings_save_and_load(digits, tmp_path):
    model, x, adv = digits
    det = Detector(model, "mvm", c_rel=(0.5, 0.125), c_ref="unit", R=6, seed=3, progress=False)
    det.save(tmp_path / "d.json")
    loaded = Detector.load(tmp_path / "d.json", model, progress=False)
    assert loaded.c_rel == (0.5, 0.125) and loaded.c_ref == "unit"
    assert torch.equal(loaded.scores(adv[:20]), det.scores(adv[:20]))


def test_model_is_left_alone(digits):
    model, x, adv = digits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    det = Detector(model, "dropout", R=5, progress=False)
    det.scores(adv[:10])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training and not any(m.training for m in det.net.modules())
    assert torch.equal(models.predict(model, x), models.predict(model, x))


def test_reference_backend_agrees(digits):
    """Same recorded p (checked in test_nn) and, since the draws differ, scores that
    agree in distribution."""
    model, x, adv = digits
    # The reference's KKT solver is slow (nested bisection in Python): few images, many passes.
    s_ops = Detector(model, "mvm", c_rel=1.0, R=60, seed=0, progress=False).scores(adv[:16])
    s_ref = Detector(model, "mvm", c_rel=1.0, R=60, seed=0, backend=reference, progress=False).scores(adv[:16])
    assert s_ops.mean() > 0.2  # far from the trivial all-zero agreement
    assert mannwhitneyu(s_ops, s_ref).pvalue > 1e-3
    assert abs(s_ops.mean() - s_ref.mean()) < 0.1


def test_threshold_for_fpr():
    assert threshold_for_fpr(torch.arange(100.0), 0.05) == 94.0  # 95..99 lie above: 5 of 100
    assert threshold_for_fpr(np.arange(100.0), 0.29) == 70.0  # 71..99: 29 (no rounding slip)
    ties = torch.tensor([0.0] * 90 + [1.0] * 10)
    assert threshold_for_fpr(ties, 0.05) == 1.0  # flagging the ties at 1 would give 10%
    assert threshold_for_fpr(ties, 0.10) == 0.0
    with pytest.raises(ValueError, match="need at least 20"):
        threshold_for_fpr(torch.zeros(19), 0.05)
    with pytest.raises(ValueError, match=r"fpr must be a number in \(0, 1\)"):
        threshold_for_fpr(torch.zeros(19), 0.0)


def test_fit_threshold_predict_and_save_load(digits, tmp_path):
    model, x, adv = digits
    det = Detector(model, "mvm", c_rel=0.5, R=15, seed=2, progress=False)
    det.fit_threshold(x[:100], fpr=0.1)
    flagged_clean = det.predict(x[:100])
    assert flagged_clean.double().mean() <= 0.1
    assert det.predict(adv).double().mean() > 0.5

    path = tmp_path / "det.json"
    det.save(path)
    cfg = json.loads(path.read_text())
    assert cfg["threshold"] == det.threshold and cfg["method"] == "mvm" and cfg["input_shape"] == [1, 8, 8]
    loaded = Detector.load(path, model, progress=False)
    assert loaded.config() == det.config()
    assert torch.equal(loaded.scores(adv[:30]), det.scores(adv[:30]))
    assert torch.equal(loaded.predict(adv[:30]), det.predict(adv[:30]))


def test_roc_report():
    rng = np.random.default_rng(0)
    neg = rng.integers(0, 5, 300).astype(float)  # heavy ties, like entropies of votes
    pos = rng.integers(1, 7, 200).astype(float)
    y = np.r_[np.zeros(300), np.ones(200)]
    assert _rank_auc(neg[None], pos[None])[0] == pytest.approx(roc_auc_score(y, np.r_[neg, pos]), abs=1e-12)
    report = roc_report(neg, pos, n_boot=500, seed=0)
    assert report.auc == pytest.approx(roc_auc_score(y, np.r_[neg, pos]))
    assert report.ci[0] < report.auc < report.ci[1] and report.ci[1] - report.ci[0] < 0.15
    assert roc_report(neg, pos, n_boot=500, seed=0).ci == report.ci
    assert report.fpr[0] == 0.0 and report.tpr[-1] == 1.0
    json.dumps(report.to_dict())
    assert np.isnan(roc_report(neg, [], n_boot=10).auc)


@pytest.mark.parametrize("method,kwargs", [("mvm", {"c_rel": 0.5}), ("sap", {"frac": 0.5}),
                                           ("dropout", {"p_drop": 0.5})])
def test_layers_before_the_first_unit_run_once_per_image(digits, method, kwargs):
    """The digits CNN's first unit sees the input alone, so the detector runs its first
    conv on the P images once and the unit stacks the R copies: the same votes as
    running the conv on the R stacked copies (float64, whose CPU convs round alike at
    every batch size)."""
    model, x, _ = digits
    model = copy.deepcopy(model).double()
    x = x[:24].double()
    stacked = Detector(model, method, **kwargs, R=10, max_batch=120, seed=3, progress=False)
    repeated = Detector(model, method, **kwargs, R=10, max_batch=120, seed=3, progress=False)
    assert stacked.stack_at_first_unit
    repeated.stack_at_first_unit = False
    calls = []
    first = next(m for m in stacked.net.modules() if isinstance(m, torch.nn.Conv2d))
    first.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    assert torch.equal(stacked.votes(x), repeated.votes(x))
    # After the one-image check of the input shape: P = 120 // 10 images, never R * P.
    assert calls[0] == 1 and len(calls) > 2 and all(n == 12 for n in calls[1:])


def _kept_model():
    # Weights set from linspace, not the RNG, so the fingerprint is the same on every torch.
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 6 * 6, 3))
    with torch.no_grad():
        for i, p in enumerate(net.parameters()):
            p.copy_(torch.linspace(-1, 1, p.numel()).reshape(p.shape) * (i + 1) / 7)
    return net.eval()


def test_a_detector_saved_by_an_earlier_version_loads():
    """tests/data/detector-mvm.json was written by Detector.save before the settings were
    declared once: its fingerprint and every setting must still be read the same."""
    path = Path(__file__).parent / "data" / "detector-mvm.json"
    saved = json.loads(path.read_text())
    det = Detector.load(path, _kept_model(), progress=False)
    assert det.config() == saved
    scores = det.scores(torch.linspace(0, 1, 3 * 64).reshape(3, 1, 8, 8))
    assert scores.shape == (3,) and bool(torch.isfinite(scores).all())


def test_the_settings_are_declared_once():
    """config(), the constructor's signature and its docs follow from the one table."""
    det = Detector(_kept_model(), "sap", R=3, seed=1, progress=False)
    saved = [s.name for s in SETTINGS.values() if s.saved]
    assert list(det.config()) == ["format", *saved, "model_fingerprint"]
    arguments = {s.name: s.default for s in SETTINGS.values() if s.argument}
    signature = inspect.signature(Detector).parameters
    assert {n: p.default for n, p in signature.items() if n != "model"} == arguments
    undocumented = [n for n in arguments if not re.search(rf"^ {{8}}{n}: ", Detector.__doc__, re.M)]
    assert not undocumented, f"settings missing from Detector's Args: {undocumented}"
    with pytest.raises(TypeError, match=r"Detector: 'Rs' is not a Detector setting; the settings are method, c, "):
        Detector(_kept_model(), Rs=3)


@pytest.mark.parametrize("name", [s.name for s in SETTINGS.values() if s.saved])
def test_load_names_the_key_of_any_bad_saved_setting(name, tmp_path):
    cfg = Detector(_kept_model(), "sap", R=3, progress=False).config()
    cfg[name] = [[]]  # no setting's rule takes it
    (tmp_path / "det.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"^Detector.load: .*det.json: {name} must be .*, got \[\[\]\]$"):
        Detector.load(tmp_path / "det.json", _kept_model())


def test_a_file_without_an_optional_setting_loads_its_default(tmp_path):
    """c_ref came after the first saved files: without it a file loads with c_ref "input"."""
    det = Detector(_kept_model(), "mvm", c_rel=0.5, c_ref="unit", R=3, seed=1, progress=False)
    cfg = det.config()
    del cfg["c_ref"]
    (tmp_path / "det.json").write_text(json.dumps(cfg))
    assert Detector.load(tmp_path / "det.json", _kept_model()).c_ref == "input"
    del cfg["R"]
    (tmp_path / "det.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"det.json lacks the settings R$"):
        Detector.load(tmp_path / "det.json", _kept_model())
