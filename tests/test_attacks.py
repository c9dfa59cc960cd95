"""Tests for mvm_cuda.eval.attacks on a small CNN trained on sklearn's 8x8 digits."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mvm_cuda.eval import attacks, data, models

EPS, EPS_ITER = attacks.SETTINGS["mnist"]["eps"], attacks.SETTINGS["mnist"]["eps_iter"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def trained(one_thread):
    """The digits CNN trained for a few seconds, and 64 test images it classifies right."""
    d = data.load_digits(seed=0)
    model = models.build_model("digits", seed=0)
    models.train(model, d.x_train, d.y_train, epochs=10, seed=0, progress=False)
    right = models.predict(model, d.x_test) == d.y_test
    assert right.double().mean() > 0.9
    return model, d.x_test[right][:64], d.y_test[right][:64]


def predict(model, x):
    with torch.no_grad():
        return model(x).argmax(dim=1)


def input_grad(model, x, y):
    x = x.clone().requires_grad_(True)
    return torch.autograd.grad(F.cross_entropy(model(x), y, reduction="sum"), x)[0]


def reference_bim(model, x, y, n_iter):
    """BIM written out plainly: n_iter steps, clip to the ball, then to [0, 1]."""
    x_adv = x.clone()
    for _ in range(n_iter):
        x_adv = x_adv + EPS_ITER * input_grad(model, x_adv, y).sign()
        x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
    return x_adv


class CountingModel(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


def test_fgsm_is_one_clipped_signed_step(trained):
    model, x, y = trained
    x_adv = attacks.fgsm(model, x, y, EPS)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    expected = (x + EPS * input_grad(model, x, y).sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, expected, rtol=0, atol=1e-6)
    # The clip to [0, 1] must bite somewhere (digits have many 0 and 1 pixels), or the
    # range check above proves nothing.
    assert ((x_adv - x).abs() < EPS - 1e-6).any()


def test_bim_b_takes_exactly_n_iter_steps(trained):
    model, x, y = trained
    counting = CountingModel(model).eval()
    x_adv = attacks.bim_b(counting, x, y, EPS, EPS_ITER, n_iter=7)
    assert counting.calls == 7
    assert torch.equal(x_adv, reference_bim(model, x, y, 7))
    assert not torch.equal(x_adv, reference_bim(model, x, y, 6))
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_bim_b_stays_in_ball_after_many_steps(trained):
    model, x, y = trained
    x_adv = attacks.bim_b(model, x, y, 0.05, 0.01, n_iter=20)  # 20 * 0.01 > 0.05: the ball bites
    assert (x_adv - x).abs().max() <= 0.05 + 1e-6
    assert torch.isclose((x_adv - x).abs().max(), torch.tensor(0.05), atol=1e-6)
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_bim_a_stops_each_image_at_its_first_misclassification(trained):
    model, x, y = trained
    # float64, so that running images in different batch compositions cannot flip the
    # sign of a gradient entry and the comparison with BIM-B can be exact.
    model, x = copy.deepcopy(model).double(), x.double()
    n_iter = 50
    x_adv, steps = attacks.bim_a(model, x, y, EPS, EPS_ITER, n_iter=n_iter, return_steps=True)
    assert steps.min() >= 1 and steps.max() <= n_iter
    assert (steps < n_iter).sum() >= len(y) // 2 and len(steps.unique()) > 3
    assert (x_adv - x).abs().max() <= EPS + 1e-9 and x_adv.min() >= 0 and x_adv.max() <= 1
    for k in steps.unique().tolist():
        sel = steps == k
        # Same trajectory as BIM-B, cut after k steps ...
        torch.testing.assert_close(x_adv[sel], reference_bim(model, x[sel], y[sel], k), rtol=0, atol=1e-12)
        # ... correct one step earlier, and wrong at k unless the budget ran out.
        assert (predict(model, reference_bim(model, x[sel], y[sel], k - 1)) == y[sel]).all()
        if k < n_iter:
            assert (predict(model, x_adv[sel]) != y[sel]).all()


def brute_force_jsma(model, x, y, target, theta, gamma, use_logits):
    """JSMA one image at a time, every pair scored in a Python loop (float64), on the
    derivatives of the logits or of torch's softmax."""
    out = []
    n_features = x[0].numel()
    for xi, ti in zip(x, target):
        xi = xi.reshape(-1).clone()
        domain = set(torch.nonzero(xi < 1).flatten().tolist())
        for _ in range(math.floor(n_features * gamma / 2)):
            img = xi.reshape(1, *x.shape[1:]).requires_grad_(True)
            logits = model(img)
            if logits.argmax() == ti or len(domain) < 2:
                break
            f = logits if use_logits else logits.softmax(dim=1)
            jac = torch.stack([torch.autograd.grad(f[0, k], img, retain_graph=True)[0].reshape(-1)
                               for k in range(f.shape[1])])
            a, b = jac[ti].tolist(), (jac.sum(0) - jac[ti]).tolist()
            best, pair = 0.0, None
            cand = sorted(domain)
            for i, p in enumerate(cand):
                for q in cand[i + 1:]:
                    ts, os = a[p] + a[q], b[p] + b[q]
                    if ts > 0 and os < 0 and -ts * os > best:
                        best, pair = -ts * os, (p, q)
            if pair is None:
                break
            for p in pair:
                xi[p] = min(1.0, float(xi[p]) + theta)
                domain.discard(p)
        out.append(xi.detach().reshape(x.shape[1:]))
    return torch.stack(out)


@pytest.mark.parametrize("use_logits", [False, True], ids=["softmax", "logits"])
def test_jsma_matches_per_image_brute_force(trained, use_logits):
    model, x, y = trained
    model, x, y = copy.deepcopy(model).double(), x[:12].double(), y[:12]
    target = attacks.random_targets(y, 10, torch.Generator().manual_seed(1))
    for theta in (1.0, 0.4):
        got = attacks.jsma(model, x, y, theta=theta, gamma=0.3, target=target, use_logits=use_logits)
        want = brute_force_jsma(model, x, y, target, theta, 0.3, use_logits)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_jsma_changes_at_most_gamma_of_the_pixels_and_only_increases(trained):
    model, x, y = trained
    gen = torch.Generator().manual_seed(0)
    x_adv = attacks.jsma(model, x, y, theta=1.0, gamma=0.1, generator=gen)
    diff = (x_adv - x).flatten(1)
    assert (diff >= 0).all()
    changed = (diff != 0).sum(dim=1)
    assert changed.max() <= math.floor(0.1 * 64)  # gamma of the 64 pixels
    assert changed.max() == 6  # the budget is used, so the bound above means something
    # theta = 1: every changed pixel is set to the maximum.
    assert (x_adv.flatten(1)[diff != 0] == 1).all()
    # The same generator seed gives the same targets and so the same images.
    again = attacks.jsma(model, x, y, generator=torch.Generator().manual_seed(0))
    assert torch.equal(x_adv, again)


def test_jsma_stops_at_the_target(trained):
    model, x, y = trained
    target = attacks.random_targets(y, 10, torch.Generator().manual_seed(2))
    x_adv = attacks.jsma(model, x, y, gamma=0.3, target=target)
    steps = ((x_adv - x).flatten(1) != 0).sum(dim=1) // 2
    hit = predict(model, x_adv) == target
    assert hit.float().mean() > 0.5
    assert steps.max() <= math.floor(0.3 * 64 / 2) and len(steps[hit].unique()) > 2
    # Images that all reach their targets within the budget: the loop ends when the last does.
    assert torch.equal(attacks.jsma(model, x[hit], y[hit], gamma=0.3, target=target[hit]), x_adv[hit])
    for k in steps[hit].unique().tolist():
        sel = hit & (steps == k)
        # A budget of exactly k steps gives the same images; of k - 1, not yet the target.
        budget = lambda m: (2 * m + 0.5) / 64  # floor(64 * gamma / 2) == m
        same = attacks.jsma(model, x[sel], y[sel], gamma=budget(k), target=target[sel])
        assert torch.equal(same, x_adv[sel])
        short = attacks.jsma(model, x[sel], y[sel], gamma=budget(k - 1), target=target[sel])
        assert (predict(model, short) != target[sel]).all()


def test_random_targets_differ_from_labels():
    y = torch.arange(10).repeat(100)
    t = attacks.random_targets(y, 10, torch.Generator().manual_seed(0))
    assert (t != y).all() and t.min() >= 0 and t.max() <= 9
    assert len(t[y == 3].unique()) == 9  # every other class is drawn
    assert torch.equal(t, attacks.random_targets(y, 10, torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("name", attacks.ATTACKS)
def test_attacks_fool_an_undefended_cnn(trained, name):
    model, x, y = trained
    # 8x8 digits have only 64 pixels: gamma = 0.1 would allow 6 changes (78 on MNIST),
    # so JSMA gets 0.3 here.
    params = {"gamma": 0.3} if name == "jsma" else {}
    x_adv = attacks.craft(name, model, x, y, "mnist", generator=torch.Generator().manual_seed(0),
                          progress=False, **params)
    stats = attacks.attack_stats(model, x, x_adv, y)
    assert stats["success_rate"] > 0.5, stats
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_attacks_leave_the_model_alone(trained):
    model, x, y = trained
    before = copy.deepcopy(model.state_dict())
    with torch.no_grad():  # the attacks turn gradients on for themselves
        attacks.fgsm(model, x, y, EPS)
        attacks.bim_a(model, x, y, EPS, EPS_ITER, n_iter=3)
        attacks.bim_b(model, x, y, EPS, EPS_ITER, n_iter=3)
        attacks.jsma(model, x[:4], y[:4], generator=torch.Generator().manual_seed(0))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_attacks_refuse_a_model_in_training_mode(trained):
    model, x, y = trained
    train_copy = copy.deepcopy(model).train()
    with pytest.raises(ValueError, match="eval"):
        attacks.fgsm(train_copy, x, y, EPS)


def test_empty_batch(trained):
    model, x, y = trained
    for name in attacks.ATTACKS:
        out = attacks.craft(name, model, x[:0], y[:0], "mnist", progress=False)
        assert out.shape == (0, 1, 8, 8)


def test_attack_stats_on_a_known_case():
    # Predicts class 1 exactly when pixel 0 is brighter than pixel 1.
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[-1.0, 1.0, 0, 0], [1.0, -1.0, 0, 0]]))
    x = torch.tensor([[0.2, 0.5, 0.0, 0.0], [0.1, 0.9, 0.3, 0.3], [0.0, 0.0, 0.5, 0.5]]).reshape(3, 1, 2, 2)
    y = torch.tensor([0, 0, 1])
    x_adv = x.clone().reshape(3, 4)
    x_adv[0, 0] = 0.8  # success: 0.8 > 0.5, L2 = Linf = 0.6, L0 = 1
    x_adv[1, 2:] = 0.0  # failure: L2 = 0.3 * sqrt 2, Linf 0.3, L0 = 2
    x_adv = x_adv.reshape(3, 1, 2, 2)  # image 2 unchanged, misclassified already: a success
    s = attacks.attack_stats(model, x, x_adv, y)
    assert s["n"] == 3 and s["n_success"] == 2 and s["success_rate"] == pytest.approx(2 / 3)
    assert s["l2"] == pytest.approx(0.3) and s["linf"] == pytest.approx(0.3)
    assert s["l0"] == pytest.approx(0.5) and s["l0_frac"] == pytest.approx(0.125)
    assert s["l2_all"] == pytest.approx((0.6 + 0.3 * math.sqrt(2)) / 3)
    assert s["linf_all"] == pytest.approx(0.3) and s["l0_all"] == pytest.approx(1.0)
    none = attacks.attack_stats(model, x[:2], x[:2], y[:2])
    assert none["success_rate"] == 0 and math.isnan(none["l2"]) and none["l2_all"] == 0


def test_craft_batches_and_settings(trained):
    model, x, y = trained
    x, y = x[:20], y[:20]
    torch.testing.assert_close(attacks.craft("FGSM", model, x, y, "mnist", batch_size=7, progress=False),
                               attacks.fgsm(model, x, y, 0.3), rtol=0, atol=1e-6)
    torch.testing.assert_close(attacks.craft("bim_b", model, x, y, "cifar10", n_iter=3, progress=False),
                               attacks.bim_b(model, x, y, 0.05, 0.005, n_iter=3), rtol=0, atol=1e-6)
    own = attacks.craft("fgsm", model, x, y, dict(eps=0.1), progress=False)
    assert (own - x).abs().max() <= 0.1 + 1e-6
    # JSMA's targets are drawn up front, so the batch size does not change them.
    a = attacks.craft("jsma", model, x, y, "mnist", generator=torch.Generator().manual_seed(3),
                      batch_size=6, progress=False)
    b = attacks.craft("jsma", model, x, y, "mnist", generator=torch.Generator().manual_seed(3),
                      batch_size=20, progress=False)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # jsma_targets draws them as craft does, so a shard crafted with target= matches.
    target = attacks.jsma_targets(model, x, y, torch.Generator().manual_seed(3))
    assert torch.equal(target, attacks.random_targets(y, 10, torch.Generator().manual_seed(3))) and (target != y).all()
    shard = attacks.craft("jsma", model, x[5:], y[5:], "mnist", target=target[5:], progress=False)
    torch.testing.assert_close(shard, a[5:], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="unknown attack"):
        attacks.craft("pgd", model, x, y, "mnist")
    with pytest.raises(ValueError, match="no attack settings"):
        attacks.craft("fgsm", model, x, y, "imagenet")
    with pytest.raises(ValueError, match="takes no parameter"):
        attacks.craft("fgsm", model, x, y, "mnist", gamma=0.1)


def test_best_pairs_matches_exhaustive_search():
    gen = torch.Generator().manual_seed(0)
    g_t = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    g_o = torch.randn(5, 9, generator=gen, dtype=torch.float64)
    domain = torch.rand(5, 9, generator=gen) < 0.7
    domain[4] = False
    domain[4, :2] = True
    g_t[4, :2], g_o[4, :2] = -1.0, 1.0  # image 4: no admissible pair
    p, q, found = attacks._best_pairs(g_t, g_o, domain)
    for n in range(5):
        pairs = [(-(g_t[n, i] + g_t[n, j]) * (g_o[n, i] + g_o[n, j]), i, j)
                 for i in range(9) for j in range(i + 1, 9)
                 if domain[n, i] and domain[n, j] and g_t[n, i] + g_t[n, j] > 0 and g_o[n, i] + g_o[n, j] < 0]
        assert bool(found[n]) == bool(pairs)
        if pairs:
            _, i, j = max(pairs)
            assert {int(p[n]), int(q[n])} == {i, j}
