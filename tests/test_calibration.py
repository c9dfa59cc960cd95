"""DetectorSearch: choosing a detector's setting and threshold on validation images."""
import warnings

import numpy as np
import pytest
import torch

from mvm_cuda import Detector, DetectorSearch
from mvm_cuda.eval import attacks, data, models

GRID = {"c_ref": ["unit"], "c_rel": [0.05, 0.3, 2.0]}
SEEN = []  # every image batch the spied model's first layer sees


@pytest.fixture(scope="module")
def split():
    """A digits CNN, validation images (for the search) and evaluation images (never
    shown to it), from disjoint parts of the test split."""
    d = data.load_digits(seed=0)
    model = models.train(models.build_model("digits", seed=0), d.x_train, d.y_train, epochs=6, progress=False)
    return model, (d.x_test[:80], d.y_test[:80]), (d.x_test[80:], d.y_test[80:])


def fgsm(model, x, y):
    return attacks.fgsm(model, x, y, eps=0.3)


def bim_a(model, x, y):
    return attacks.bim_a(model, x, y, eps=0.3, eps_iter=0.05)


def search(model, **kw):
    kw = {"grid": GRID, "attacks": {"fgsm": fgsm, "bim-a": bim_a}, "R": 8, "fpr": 0.1, "seed": 1,
          "progress": False, **kw}
    return DetectorSearch(model, "mvm", **kw)


def test_picks_the_best_mean_auc_and_fits_the_threshold(split):
    model, (xv, yv), _ = split
    # The detector on the search's noise (detector_seed = seed): its scores of xv are the
    # ones the threshold was fitted on, so the rate below holds exactly, not by chance.
    s = search(model, detector_seed=1).fit(xv, yv)
    assert s.criterion_ == "auc" and len(s.results_) == 3
    scores = [r["score"] for r in s.results_]
    assert s.best_score_ == max(scores) and len(set(scores)) > 1  # the settings differ
    best = next(r for r in s.results_ if r["score"] == s.best_score_)
    assert s.best_params_ == best["params"]
    assert s.best_score_ == pytest.approx(np.mean(list(best["aucs"].values())))
    det = s.best_detector_
    assert isinstance(det, Detector) and det.c_rel == s.best_params_["c_rel"] and det.c_ref == "unit"
    assert det.fpr == 0.1 and (det.scores(xv) > det.threshold).double().mean() <= 0.1
    assert s.adversarial_counts_["bim-a"] > 40


def test_deterministic_under_a_seed_and_numpy_input(split):
    model, (xv, yv), _ = split
    a = search(model).fit(xv, yv)
    b = search(model).fit(xv.numpy(), yv.numpy())
    assert a.results_ == [{**r, "seconds": a.results_[i]["seconds"]} for i, r in enumerate(b.results_)]
    assert a.best_params_ == b.best_params_ and a.best_detector_.threshold == b.best_detector_.threshold


def test_never_sees_the_evaluation_images(split):
    """A hook on the model's first layer (kept by the detectors' copies) records every
    image batch: none holds an evaluation image."""
    model, (xv, yv), (xe, ye) = split
    spied = models.build_model("digits")
    spied.load_state_dict(model.state_dict())
    spied.eval()
    SEEN.clear()
    spied[0].register_forward_pre_hook(lambda module, args: SEEN.append(args[0].detach().flatten(1).cpu()))
    search(spied, attacks={"fgsm": fgsm}).fit(xv, yv)
    seen = torch.cat(SEEN)
    assert seen.shape[0] > xv.shape[0]  # the hook did fire for the search's passes
    distance = torch.cdist(xe.flatten(1).double(), seen.double())
    assert distance.min() > 0
    assert torch.cdist(xv.flatten(1).double(), seen.double()).min() == 0  # a check that can fail


def test_without_attacks_most_randomness_clean_images_tolerate(split):
    model, (xv, yv), _ = split
    s = search(model, attacks=None, agreement=0.9).fit(xv)
    assert s.criterion_ == "agreement"
    agreements = {r["params"]["c_rel"]: r["agreement"] for r in s.results_}
    assert agreements[0.05] < agreements[2.0]  # fewer draws, noisier votes
    tolerated = [a for a in agreements.values() if a >= 0.9]
    assert tolerated and s.best_score_ == min(tolerated)


def test_per_unit_search(split):
    model, (xv, yv), _ = split
    s = search(model, per_unit=True, attacks={"bim-a": bim_a}).fit(xv, yv)
    tuples = [r["params"]["c_rel"] for r in s.results_ if isinstance(r["params"]["c_rel"], tuple)]
    assert tuples and all(len(t) == 2 for t in tuples)
    assert s.best_score_ == max(r["score"] for r in s.results_)
    assert len(s.best_detector_.units) == 2


def test_sap_and_dropout_grids(split):
    model, (xv, yv), _ = split
    for method, grid in (("sap", {"frac": [0.2, 1.0]}), ("dropout", {"p_drop": [0.1, 0.5]})):
        s = DetectorSearch(model, method, grid, attacks={"fgsm": fgsm}, R=6, fpr=0.1, progress=False).fit(xv, yv)
        assert s.best_detector_.method == method and len(s.results_) == 2


@pytest.mark.parametrize("kwargs,fit,match", [
    (dict(method="svm"), None, "method must be one of"),
    (dict(grid={"c_rel": []}), None, "grid must map Detector arguments to non-empty lists"),
    (dict(method="sap", per_unit=True), None, "per_unit needs method='mvm'"),
    (dict(attacks={"fgsm": 3}), None, "attacks must be None or a non-empty mapping"),
    (dict(fpr=1.5), None, r"fpr must be a number in \(0, 1\)"),
    (dict(fpr=5e-324), None, r"fpr=5e-324 is too small to resolve with any number of images"),
    (dict(seed=None), None, "seed must be an integer"),
    (dict(seed=-1), None, r"DetectorSearch: seed must be an integer in \[0, 2\*\*64\), got -1"),
    (dict(detector_seed=-1), None, r"DetectorSearch: seed must be None or an integer in \[0, 2\*\*64\), got -1"),
    (dict(grid={"seed": [1, 2]}), None, r"DetectorSearch: the grid may not vary seed \(got seed=\[1, 2\]\)"),
    (dict(R=2**40), None, r"DetectorSearch: R must be an integer in \[1, 100000\], got 1099511627776"),
    (dict(grid={"c_rel": [1.0], "max_batch": [8, 2**30]}), None,
     r"DetectorSearch: max_batch must be an integer in \[1, 2\*\*24 = 16777216\], got 1073741824"),
    (dict(), dict(y=False), "attacks need the labels y_val"),
    (dict(), dict(n=5), r"N >= 10 to resolve fpr=0.1"),
])
def test_bad_settings(split, kwargs, fit, match):
    model, (xv, yv), _ = split
    with pytest.raises(ValueError, match=match):
        s = DetectorSearch(model, **{"method": "mvm", "attacks": {"fgsm": fgsm}, "fpr": 0.1, "progress": False,
                                     **kwargs})
        fit = fit or {}
        n = fit.get("n", 40)
        s.fit(xv[:n], yv[:n] if fit.get("y", True) else None)


def test_every_detector_argument_is_checked_as_detector_checks_it(split):
    """Every grid value and keyword is checked by its setting's rule when the search is
    made, not when fit reaches that candidate."""
    model = split[0]
    with pytest.raises(ValueError, match=r"^DetectorSearch: frac must be a finite number, got nan$"):
        DetectorSearch(model, "sap", {"frac": [0.5, float("nan")]})
    with pytest.raises(ValueError, match=r"^DetectorSearch: solver must be one of \('kkt', 'pgd'\), got 'newton'$"):
        DetectorSearch(model, "mvm", solver="newton")
    with pytest.raises(TypeError, match=r"^DetectorSearch: 'Rs' is not a Detector setting"):
        DetectorSearch(model, "sap", {"frac": [0.5]}, Rs=4)


def test_the_search_uses_the_same_noise_for_every_candidate(split):
    """Candidates differ only by their setting: their detectors share the search's seed."""
    model, (xv, yv), _ = split
    s = search(model, attacks=None)
    made = [s._detector(p) for p in s._candidates()]
    assert [(d.seed, d.R, d.c_rel) for d in made] == [(1, 8, c) for c in GRID["c_rel"]]


def test_the_detector_handed_out_draws_fresh_noise_unless_given_a_seed(split):
    """The search is seeded; its best_detector_ follows Detector's default (seed None:
    fresh noise on every call) unless detector_seed is passed."""
    model, (xv, yv), _ = split

    def best(**kw):  # dropout at 0.5: votes that vary from draw to draw
        return DetectorSearch(model, "dropout", {"p_drop": [0.5]}, R=16, fpr=0.1, seed=1, progress=False,
                              **kw).fit(xv, yv).best_detector_

    fresh = best()
    assert fresh.seed is None and fresh.config()["seed"] is None
    assert not torch.equal(fresh.votes(xv), fresh.votes(xv))
    fixed = best(detector_seed=7)
    assert fixed.seed == 7 and torch.equal(fixed.votes(xv), fixed.votes(xv))
    assert fixed.threshold == fresh.threshold  # fitted on the search's seeded scores either way


@pytest.mark.parametrize("fpr", [np.float32(0.1), np.float64(0.1), torch.tensor(0.1)], ids=["np32", "np64", "tensor"])
def test_numpy_or_tensor_fpr_becomes_a_float_that_save_writes(split, fpr, tmp_path):
    model, (xv, yv), _ = split
    s = search(model, attacks=None, fpr=fpr).fit(xv, yv)
    assert type(s.fpr) is float and type(s.best_detector_.fpr) is float
    s.best_detector_.save(tmp_path / "det.json")
    det = Detector(model, "dropout", R=2, progress=False).fit_threshold(xv, fpr=fpr)
    assert type(det.fpr) is float
    det.save(tmp_path / "det2.json")
    assert Detector.load(tmp_path / "det2.json", model).fpr == pytest.approx(0.1)


def _returns(value):
    return lambda model, x, y: value(x)


@pytest.mark.parametrize("attack,error,match", [
    (_returns(lambda x: x.numpy()), TypeError, r"attack 'odd' must return a tensor of x's shape .* got ndarray"),
    (_returns(lambda x: x.tolist()), TypeError, r"attack 'odd' must return a tensor .* got list"),
    (_returns(lambda x: x[1:]), ValueError, r"attack 'odd' must return images of x's shape \((\d+), 1, 8, 8\).*"
                                            r"got shape \(\d+, 1, 8, 8\)"),
    (_returns(lambda x: x * 3 - 1), ValueError, r"attack 'odd' must return pixels in \[0, 1\] \(clamp its output\), "
                                                r"got values in \[-1.0, 2.0\]"),
])
def test_an_attack_that_returns_the_wrong_thing_is_named(split, attack, error, match):
    model, (xv, yv), _ = split
    with pytest.raises(error, match=match):
        search(model, attacks={"odd": attack}).fit(xv, yv)


def test_a_best_value_on_the_edge_of_its_grid_warns(split):
    model, (xv, yv), _ = split
    with pytest.warns(UserWarning, match=r"the best c_rel=0.05 is the smallest value of its grid \[0.05, 0.3, 2.0\]; "
                                         r"the best setting may lie beyond it: extend the grid below 0.05"):
        s = search(model, attacks=None, agreement=0.01).fit(xv, yv)  # the most randomness: the fewest draws
    assert s.best_params_["c_rel"] == 0.05
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inside = search(model, attacks=None, grid={"c_ref": ["unit"], "c_rel": [0.05, 2.0, 0.3]})
        inside.fit(xv, yv)  # not an ordered grid: no warning
