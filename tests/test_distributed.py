"""Evaluation over several processes (mvm_cuda.distributed, `torchrun ... reproduce`): gloo
ranks on the CPU give bit for bit the single process's attacks and scores, and a rank that
fails ends the run with its error."""
import json
import shutil
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import installed_package_env
from mvm_cuda import Detector, distributed
from mvm_cuda.eval import models

# A data set scored over the ranks of a gloo group; mode "raise" makes rank 1 fail on an
# item, "hang" makes it stall, to check that the others stop with its error or a timeout.
SCORE_SCRIPT = r"""
import os, sys, time
from datetime import timedelta
import torch
from mvm_cuda import Detector, distributed
from mvm_cuda.eval import models

mode, out = sys.argv[1], sys.argv[2]
if "RANK" in os.environ:
    torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ["PG_TIMEOUT"])))
rank, world = distributed.rank_and_size()
model = models.build_model("digits", seed=0).eval()
x = torch.rand(61, 1, 8, 8, generator=torch.Generator().manual_seed(1))


class Images(torch.utils.data.Dataset):
    def __len__(self):
        return x.shape[0]

    def __getitem__(self, i):
        if rank == 1 and mode == "raise" and i == 40:
            raise ValueError(f"unreadable image {i} on rank {rank}")
        if rank == 1 and mode == "hang":
            time.sleep(600)
        return x[i], 0


results = {}
for method, kwargs in (("mvm", dict(c_rel=0.25)), ("sap", dict(frac=0.1)), ("dropout", dict(p_drop=0.5))):
    det = Detector(model, method, R=7, max_batch=40, seed=3, progress=False, **kwargs)
    results[method] = distributed.score_dataset(det, Images(), chunk_size=8)
    results[method + " votes"] = distributed.vote_dataset(det, x, chunk_size=8)
torch.save(results, f"{out}.rank{rank}")
if "RANK" in os.environ:
    torch.distributed.destroy_process_group()
"""

TINY = ["--dataset", "digits", "--n-test", "70", "--R", "5", "--epochs", "2", "--n-boot", "50", "--no-progress",
        "--attacks", "fgsm,jsma"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(ranks: int, args: list[str], cwd, cache=None, timeout: float = 300, **env):
    """Run `args` (a script and its arguments, or -m module ...) under torchrun with `ranks`
    gloo processes on localhost, or as one plain process for ranks=None."""
    env = {**installed_package_env(), "OMP_NUM_THREADS": "1", **env}
    if cache is not None:
        env["MVM_CUDA_CACHE"] = str(cache)
    cmd = [sys.executable]
    if ranks is not None:
        cmd += ["-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                "--master-port", str(_free_port())]
    start = time.monotonic()
    done = subprocess.run(cmd + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return done, time.monotonic() - start


def test_chunk_ranges_share_whole_chunks_in_index_order():
    for n in (0, 1, 7, 61, 64, 150):
        for chunk in (1, 8, 32, 200):
            every = [(lo, min(lo + chunk, n)) for lo in range(0, n, chunk)]
            for world in (1, 2, 3, 4, 7):
                shares = [distributed.chunk_ranges(n, chunk, rank, world) for rank in range(world)]
                assert [c for share in shares for c in share] == every  # whole chunks, rank order = index order
                sizes = [sum(hi - lo for lo, hi in share) for share in shares]
                assert all(abs(size - n / world) <= chunk for size in sizes)  # balanced to a chunk
    assert distributed.chunk_ranges(10, 4) == [(0, 4), (4, 8), (8, 10)]  # no group: rank 0 of 1
    with pytest.raises(ValueError, match="chunk_ranges: need .* got n=5, chunk_size=0"):
        distributed.chunk_ranges(5, 0)


def test_single_process_scores_chunk_by_chunk_with_global_indices():
    model = models.build_model("digits", seed=0).eval()
    x = torch.rand(21, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    det = Detector(model, "dropout", p_drop=0.5, R=9, seed=4, progress=False)
    expected = torch.cat([det.scores(x[lo:hi], index=torch.arange(lo, hi)) for lo, hi in ((0, 8), (8, 16), (16, 21))])
    assert (expected > 0).any()  # the comparisons below could not pass on all-zero scores
    assert torch.equal(distributed.score_dataset(det, x, chunk_size=8), expected)
    pairs = [(x[i], i % 10) for i in range(21)]  # a list of (image, label) works like a Dataset
    assert torch.equal(distributed.score_dataset(det, pairs, chunk_size=8), expected)
    assert torch.equal(distributed.vote_dataset(det, x.numpy(), chunk_size=8),
                       torch.cat([det.votes(x[lo:hi], index=torch.arange(lo, hi))
                                  for lo, hi in ((0, 8), (8, 16), (16, 21))]))
    assert distributed.score_dataset(det, x[:0]).shape == (0,)
    assert distributed.vote_dataset(det, x[:0]).shape == (0, 9)


def test_numpy_input_of_any_byte_order_and_stride_scores_as_the_tensor():
    """score_dataset reads numpy through detector.from_numpy, as Detector.scores does:
    big-endian, read-only and negative-stride arrays, whole or as items, give the
    tensor's scores bit for bit."""
    model = models.build_model("digits", seed=0).eval()
    x = torch.rand(19, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    det = Detector(model, "mvm", c_rel=0.25, R=7, seed=2, progress=False)
    expected = distributed.score_dataset(det, x, chunk_size=8)
    assert (expected > 0).any()
    big_endian = x.numpy().astype(">f4")
    read_only = x.numpy().copy()
    read_only.flags.writeable = False
    reversed_copy = x.numpy()[::-1].copy()[::-1]  # the same images, every stride of dim 0 negative
    for array in (big_endian, read_only, reversed_copy, big_endian[::-1].copy()[::-1]):
        assert torch.equal(distributed.score_dataset(det, array, chunk_size=8), expected)
        assert torch.equal(distributed.score_dataset(det, [(a, 0) for a in array], chunk_size=8), expected)
    flipped_rows = [(a[:, ::-1].copy()[:, ::-1], 0) for a in big_endian]  # each image's H stride negative
    assert torch.equal(distributed.score_dataset(det, flipped_rows, chunk_size=8), expected)
    assert torch.equal(det.scores(big_endian[::-1].copy()[::-1], index=torch.arange(19)), expected)


# Few draws: on this untrained network MVM c = N and SAP 50% keep almost every vote.
@pytest.mark.parametrize("method,kwargs", [("mvm", dict(c_rel=0.25)), ("sap", dict(frac=0.1)),
                                           ("dropout", dict(p_drop=0.5))])
def test_seeded_scores_do_not_depend_on_max_batch_nor_chunk_size(method, kwargs):
    model = models.build_model("digits", seed=0).eval()
    x = torch.rand(45, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    votes = [distributed.vote_dataset(Detector(model, method, R=6, max_batch=max_batch, seed=7, progress=False,
                                               **kwargs), x, chunk_size=chunk)
             for max_batch, chunk in ((4, 8), (7, 8), (40, 16), (1024, 64))]  # 4 < R: an image's passes split
    assert (votes[0] != votes[0][:, :1]).any(1).sum() >= 5  # passes disagree: equality below is not trivial
    assert all(torch.equal(v, votes[0]) for v in votes[1:])


def test_agree_without_a_group_passes_errors_through():
    with pytest.raises(KeyError, match="mine"):
        with distributed.agree("a step"):
            raise KeyError("mine")
    assert distributed.broadcast({"a": 1}) == {"a": 1}
    assert torch.equal(distributed.all_gather_chunks([torch.ones(2), torch.zeros(1)]), torch.tensor([1.0, 1, 0]))


def test_one_two_and_four_ranks_give_the_same_scores_bit_for_bit(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    results = {}
    for ranks in (None, 2, 4):
        done, _ = _launch(ranks, [str(script), "ok", str(tmp_path / f"k{ranks}")], tmp_path, PG_TIMEOUT="120")
        assert done.returncode == 0, done.stdout + done.stderr
        results[ranks] = torch.load(tmp_path / f"k{ranks}.rank0")
        for rank in range(1, ranks or 1):  # every rank gets every score
            other = torch.load(tmp_path / f"k{ranks}.rank{rank}")
            assert all(torch.equal(other[k], results[ranks][k]) for k in other)
    one = results[None]
    assert set(one) == {"mvm", "sap", "dropout", "mvm votes", "sap votes", "dropout votes"}
    for name, scores in one.items():
        assert scores.shape[0] == 61
        if "votes" not in name:
            assert (scores > 0).sum() > 10  # the draws matter, so equality below is not trivial
        for ranks in (2, 4):
            assert torch.equal(results[ranks][name], scores), (name, ranks)


def test_a_failing_rank_ends_the_run_with_its_error(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    # The process group's timeout is far longer than the run may take: the others learn
    # of the error at the end of the step, not by waiting for a timeout.
    done, seconds = _launch(2, [str(script), "raise", str(tmp_path / "r")], tmp_path, timeout=120,
                            PG_TIMEOUT="100")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert seconds < 100, output
    assert "ValueError: unreadable image 40 on rank 1" in output
    assert "RankFailed: score_dataset: rank 1: ValueError: unreadable image 40 on rank 1" in output  # rank 0's
    assert not list(tmp_path.glob("r.rank*"))


def test_a_hanging_rank_ends_the_run_at_the_timeout(tmp_path):
    script = tmp_path / "score.py"
    script.write_text(SCORE_SCRIPT)
    done, seconds = _launch(2, [str(script), "hang", str(tmp_path / "h")], tmp_path, timeout=120, PG_TIMEOUT="5")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert seconds < 60, output  # rank 1 sleeps 600 s; the 5 s timeout stops rank 0, torchrun the rest
    assert "RankFailed: score_dataset: rank 0 lost the other ranks" in output
    assert not list(tmp_path.glob("h.rank*"))


def _cached_tensors(cache):
    return {path.name: torch.load(path, weights_only=True)["tensors"] for path in (cache / "tensors").iterdir()}


def _without_timings(record):
    if isinstance(record, dict):
        return {k: _without_timings(v) for k, v in record.items() if k != "seconds"}
    if isinstance(record, list):
        return [_without_timings(v) for v in record]
    return record


def test_reproduce_on_two_ranks_writes_the_single_process_json(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    done, _ = _launch(None, ["-m", "mvm_cuda", "reproduce", *TINY, "--out", "out"], one, cache=one / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    # The same trained model (training is not what is shared); attacks and scores afresh.
    shutil.copytree(one / "cache" / "models", two / "cache" / "models")
    done, _ = _launch(2, ["-m", "mvm_cuda", "reproduce", *TINY, "--out", "out"], two, cache=two / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "; 2 processes" in done.stdout and done.stdout.count("Table 3 (digits)") == 2  # printed by rank 0 only

    first = json.loads((one / "out" / "results_digits.json").read_text())
    second = json.loads((two / "out" / "results_digits.json").read_text())
    assert _without_timings(second) == _without_timings(first)
    assert set(second["seconds"]) == set(first["seconds"])
    assert all(row["cached"] == [] for row in second["table3"].values())
    assert sorted(p.name for p in (two / "out").iterdir()) == sorted(p.name for p in (one / "out").iterdir())
    # Every cache file (2 attacks, 7 detectors x 3 sets of scores), written once, holds the
    # same tensors bit for bit.
    a, b = _cached_tensors(one / "cache"), _cached_tensors(two / "cache")
    assert sorted(a) == sorted(b) and len(a) == 2 + 7 * 3
    assert not [p for p in (two / "cache").rglob("*.tmp")]
    for name in a:
        assert a[name].keys() == b[name].keys() and all(torch.equal(a[name][k], b[name][k]) for k in a[name]), name

    # A second 2-rank run finds everything in the cache that rank 0 wrote.
    done, _ = _launch(2, ["-m", "mvm_cuda", "reproduce", *TINY, "--out", "again"], two, cache=two / "cache")
    assert done.returncode == 0, done.stdout + done.stderr
    again = json.loads((two / "again" / "results_digits.json").read_text())
    assert all(row["cached"] == ["clean", "fgsm", "jsma"] for row in again["table3"].values())
    assert [row["fgsm"]["all"]["auc"] for row in again["table3"].values()] == \
        [row["fgsm"]["all"]["auc"] for row in first["table3"].values()]
