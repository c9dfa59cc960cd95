"""Tests for mvm_cuda.eval.models: architectures, deterministic training, the cache."""

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from mvm_cuda.eval import cache as tensor_cache, data, models
from conftest import installed_package_env

# (C, H, W) after every ReLU of the conv part, as documented in build_model.
CONV_RELU_SHAPES = {
    "mnist": [(64, 26, 26), (64, 24, 24)],
    "mnist-pool": [(32, 24, 24), (64, 8, 8)],
    "svhn": [(64, 30, 30), (64, 28, 28)],
    "cifar10": [(32, 32, 32), (32, 32, 32), (64, 16, 16), (64, 16, 16), (128, 8, 8), (128, 8, 8)],
    "digits": [(32, 8, 8), (32, 8, 8)],
}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return data.load_digits(seed=0)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MVM_CUDA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k].to(sa[k].device)) for k in sa)


@pytest.mark.parametrize("name", models.MODELS)
def test_documented_shapes(name):
    model = models.build_model(name, seed=0).eval()
    layers = list(model)
    flatten = [i for i, m in enumerate(layers) if isinstance(m, nn.Flatten)]
    assert len(flatten) == 1
    relus = [m for m in layers[: flatten[0]] if isinstance(m, nn.ReLU)]
    assert all(not m.inplace for m in model.modules() if isinstance(m, nn.ReLU))
    seen = []
    for m in relus:
        m.register_forward_hook(lambda mod, inp, out: seen.append(tuple(out.shape[1:])))
    with torch.no_grad():
        out = model(torch.rand(2, *models.INPUT_SHAPES[name]))
    assert out.shape == (2, 10)
    assert seen == CONV_RELU_SHAPES[name]


def test_build_model_seed():
    assert same_weights(models.build_model("digits", seed=3), models.build_model("digits", seed=3))
    assert not same_weights(models.build_model("digits", seed=3), models.build_model("digits", seed=4))
    with pytest.raises(ValueError, match="unknown model"):
        models.build_model("resnet")


def test_training_is_deterministic_and_leaves_the_rng_alone(digits):
    x, y = digits.x_train[:300], digits.y_train[:300]
    state = torch.get_rng_state()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    runs = [models.train(models.build_model("digits", seed=0), x, y, epochs=2, batch_size=32, seed=s,
                         progress=False) for s in (0, 0, 1)]
    assert torch.equal(state, torch.get_rng_state())
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == (threads, deterministic)
    assert same_weights(runs[0], runs[1])
    assert not same_weights(runs[0], runs[2])
    assert not runs[0].training and all(p.grad is None for p in runs[0].parameters())


# Trains digits in a fresh process and prints the SHA-256 of the trained weights and the
# thread count after training (the caller's, restored).
_TRAIN_AND_HASH = """
import torch
from mvm_cuda.eval import cache as tensor_cache, data, models
torch.set_num_threads({threads})
d = data.load_digits(seed=0)
model = models.train(models.build_model("digits", seed=0), d.x_train[:300], d.y_train[:300], epochs=2,
                     batch_size=32, progress=False)
print(tensor_cache._checksum(model.state_dict()), torch.get_num_threads())
"""


def test_training_bits_do_not_depend_on_threads_or_cpu_capability(tmp_path):
    got = {}
    for threads, capability in ((1, "default"), (2, "avx2")):
        env = {**installed_package_env(), "ATEN_CPU_CAPABILITY": capability}
        done = subprocess.run([sys.executable, "-c", _TRAIN_AND_HASH.format(threads=threads)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        weights, after = done.stdout.split()
        assert int(after) == threads
        got[(threads, capability)] = weights
    assert len(set(got.values())) == 1, got


def test_digits_reach_a_sensible_accuracy(digits):
    model = models.train(models.build_model("digits", seed=0), digits.x_train, digits.y_train,
                         epochs=10, seed=0, progress=False)
    assert models.accuracy(model, digits.x_test, digits.y_test) > 0.9
    assert models.predict(model, digits.x_test[:5]).shape == (5,)


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MVM_CUDA_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert tensor_cache.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MVM_CUDA_CACHE")
    assert tensor_cache.cache_dir() == tmp_path / "b" / "mvm_cuda"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tensor_cache.cache_dir() == tmp_path / "home" / ".cache" / "mvm_cuda"
    assert not (tmp_path / "a").exists()  # naming the folder does not create it


def test_load_or_train_round_trip_and_rebuild(cache, digits, monkeypatch):
    small = (digits.x_train[:200], digits.y_train[:200])
    kwargs = dict(epochs=2, seed=0, batch_size=32, progress=False)
    first = models.load_or_train("digits", small, **kwargs)
    files = list((cache / "models").iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"  # no temp file left behind
    assert not first.training

    real_train = models.train

    def no_training(*args, **kw):
        raise AssertionError("trained although a valid cache file exists")

    monkeypatch.setattr(models, "train", no_training)
    assert same_weights(first, models.load_or_train("digits", small, **kwargs))

    # A truncated file (an interrupted copy, a full disk) is reported and rebuilt.
    files[0].write_bytes(files[0].read_bytes()[: files[0].stat().st_size // 2])
    monkeypatch.setattr(models, "train", real_train)
    with pytest.warns(UserWarning, match="rebuilding"):
        rebuilt = models.load_or_train("digits", small, **kwargs)
    assert same_weights(first, rebuilt)
    monkeypatch.setattr(models, "train", no_training)
    assert same_weights(first, models.load_or_train("digits", small, **kwargs))

    # A file that loads but whose tensors changed fails the checksum.
    record = torch.load(files[0], weights_only=True)
    record["tensors"]["0.weight"] = record["tensors"]["0.weight"] + 1
    torch.save(record, files[0])
    monkeypatch.setattr(models, "train", real_train)
    with pytest.warns(UserWarning, match="checksum"):
        assert same_weights(first, models.load_or_train("digits", small, **kwargs))

    # Other epochs or other data are another key, another file.
    models.load_or_train("digits", small, **{**kwargs, "epochs": 1})
    models.load_or_train("digits", (small[0][:100], small[1][:100]), **kwargs)
    assert len(list((cache / "models").iterdir())) == 3


def test_cached_tensors(cache):
    calls = []

    def craft():
        calls.append(1)
        return {"x": torch.arange(6.0).reshape(2, 3), "y": torch.tensor([1, 2])}

    key = "mnist/fgsm eps=0.3 seed=0"
    first = tensor_cache.cached_tensors(key, craft)
    second = tensor_cache.cached_tensors(key, craft)
    assert len(calls) == 1
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    (path,) = (cache / "tensors").iterdir()
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.warns(UserWarning, match="rebuilding"):
        third = tensor_cache.cached_tensors(key, craft)
    assert len(calls) == 2 and torch.equal(third["x"], first["x"])
    assert len(tensor_cache.cached_tensors("another key", craft)) == 2 and len(calls) == 3
    with pytest.raises(TypeError, match="dict of tensors"):
        tensor_cache.cached_tensors("bad", lambda: torch.zeros(2))
