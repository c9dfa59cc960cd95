"""The ops called from 8 Python threads at once (they release the GIL inside
the kernels) give valid results: the default generator is shared under its
lock, not raced; a thread with its own seeded generator reproduces its
single-threaded draws exactly; the deterministic ops reproduce their
single-threaded results bit for bit. On CUDA (skipped without a GPU), two
streams at once, each with its own generator, reproduce the single-stream
results."""
from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import mvm_cuda
from mvm_cuda import reference as ref

THREADS = 8
CALLS = 12  # per thread
F64 = torch.float64


def _inputs(seed=0, n=32, h=8, w=8, ch=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, h, w, ch, generator=g) + 0.5
    p = torch.rand(2, h * w, generator=g, dtype=F64) + 0.01
    p[:, :5] = 0  # rows that must never be drawn
    return x, p / p.sum(-1, keepdim=True)


def _in_threads(fn):
    """fn(thread_index) run by THREADS threads released together; results in thread order."""
    barrier = threading.Barrier(THREADS)

    def run(i):
        barrier.wait()
        return fn(i)

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(run, range(THREADS)))


def _check_valid(out, x, p, c):
    """Every row is 0 or x_i / pi_i (float32 rounding), p = 0 rows are 0, at most c kept."""
    n, m, ch = x.shape[0], p.shape[1], x.shape[-1]
    o = out.reshape(n, m, ch).double()
    probs = p.repeat(n // p.shape[0], 1)
    exact = x.reshape(n, m, ch).double() / ref.inclusion_prob(probs, c)[..., None]
    zero = (o == 0).all(-1)
    scaled = ((o - exact).abs() <= 2 * torch.finfo(x.dtype).eps * exact.abs()).all(-1)
    assert (zero | scaled).all()
    assert zero[probs == 0].all()
    kept = (~zero).sum(-1)
    assert ((kept >= 1) & (kept <= c)).all()


def _key(t):
    return t.numpy().tobytes()


def test_default_generator_is_locked_not_raced():
    x, p = _inputs()
    c = 40
    torch.manual_seed(1234)
    sequential = [mvm_cuda.sample_rows(x, p, c) for _ in range(THREADS * CALLS)]
    torch.manual_seed(1234)
    threaded = _in_threads(lambda i: [mvm_cuda.sample_rows(x, p, c) for _ in range(CALLS)])
    flat = [out for outs in threaded for out in outs]
    for out in flat:
        _check_valid(out, x, p, c)
    keys = [_key(out) for out in flat]
    assert len(set(keys)) == len(keys), "two calls drew the same rows: the default generator was raced"
    # Each call takes the next state of the default generator under its lock,
    # so the threaded calls drew exactly the sequential calls' draws, in some order.
    assert sorted(keys) == sorted(_key(out) for out in sequential)
    # And the generator moved on by exactly THREADS * CALLS calls.
    after_threads = mvm_cuda.sample_rows(x, p, c)
    torch.manual_seed(1234)
    for _ in range(THREADS * CALLS):
        mvm_cuda.sample_rows(x, p, c)
    assert torch.equal(mvm_cuda.sample_rows(x, p, c), after_threads)


def test_own_generator_per_thread_reproduces_single_thread():
    x, p = _inputs(seed=1)
    c = 25

    def draws(i):
        g = torch.Generator().manual_seed(100 + i)
        return [mvm_cuda.sample_rows(x, p, c, generator=g) for _ in range(CALLS)]

    single = [draws(i) for i in range(THREADS)]
    threaded = _in_threads(draws)
    for i in range(THREADS):
        for a, b in zip(single[i], threaded[i]):
            assert torch.equal(a, b)
            _check_valid(b, x, p, c)
    assert not torch.equal(single[0][0], single[1][0])  # the seeds matter


def _deterministic_calls(i):
    """A different problem per thread, every op."""
    g = torch.Generator().manual_seed(200 + i)
    alpha = 10.0 ** (-6 * torch.rand(4, 300, generator=g, dtype=F64))
    alpha[:, ::7] = 0
    v = torch.randn(4, 300, generator=g, dtype=F64) * 3
    p = mvm_cuda.project_simplex(v)
    return [
        mvm_cuda.project_simplex(v),
        mvm_cuda.project_simplex(v.float(), 2.5),
        mvm_cuda.mvm_step(p, alpha, 50, 1e-4),
        mvm_cuda.solve_mvm(alpha, 300, "kkt"),
        mvm_cuda.solve_mvm(alpha.float(), 7, "kkt"),
        mvm_cuda.solve_mvm(alpha, 300, "pgd", 200, 1e-9),
    ]


def test_deterministic_ops_from_threads_equal_single_thread():
    single = [_deterministic_calls(i) for i in range(THREADS)]
    threaded = _in_threads(_deterministic_calls)
    for i in range(THREADS):
        for a, b in zip(single[i], threaded[i]):
            assert torch.equal(a, b)


def test_same_problem_from_all_threads_at_once():
    # All threads on the same inputs at once (shared read-only buffers).
    alpha = 10.0 ** (-8 * torch.rand(16, 500, generator=torch.Generator().manual_seed(5), dtype=F64))
    expected = mvm_cuda.solve_mvm(alpha, 1000, "pgd")
    expected_kkt = mvm_cuda.solve_mvm(alpha, 1000, "kkt")
    results = _in_threads(lambda i: (mvm_cuda.solve_mvm(alpha, 1000, "pgd"), mvm_cuda.solve_mvm(alpha, 1000, "kkt")))
    for pgd, kkt in results:
        assert torch.equal(pgd, expected) and torch.equal(kkt, expected_kkt)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_two_streams_with_own_generators():
    x, p = _inputs(seed=2, n=256)
    x, p = x.cuda(), p.cuda()
    c = 30
    alpha = mvm_cuda.row_alpha(x).double()

    def work(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return [mvm_cuda.sample_rows(x, p, c, generator=g) for _ in range(4)] + [mvm_cuda.solve_mvm(alpha, c, "kkt")]

    torch.cuda.synchronize()
    single = [work(s) for s in (7, 8)]
    torch.cuda.synchronize()
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for s in streams:
        s.wait_stream(torch.cuda.current_stream())
    results = [None, None]
    for k, seed in enumerate((7, 8)):  # queued on both streams before either finishes
        with torch.cuda.stream(streams[k]):
            results[k] = work(seed)
    for s in streams:
        torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    for k in range(2):
        for a, b in zip(single[k], results[k]):
            assert torch.equal(a, b)
        for out in results[k][:4]:
            _check_valid(out.cpu(), x.cpu(), p.cpu(), c)
    assert not torch.equal(results[0][0], results[1][0])


@pytest.mark.parametrize("method", ["mvm", "sap"])
def test_detector_shared_by_threads_gives_each_call_its_own_scores(method):
    """Issue 16, point 6: one seeded Detector used by 4 threads at once, 5 calls each on
    different images, gives every call exactly the votes that call gives alone (the
    units' mode and recorded p live on the shared network; calls take the detector's
    lock), and never the "no recorded p" error."""
    from mvm_cuda.detector import Detector
    from mvm_cuda.eval import models

    threads, calls = 4, 5
    model = models.build_model("digits", seed=0).eval()
    det = Detector(model, method, R=8, max_batch=16, seed=3, progress=False)  # 2 images per forward
    images = torch.rand(threads * calls, 6, 1, 8, 8, generator=torch.Generator().manual_seed(9))
    alone = [det.votes(x) for x in images]
    barrier = threading.Barrier(threads)

    def run(i):
        barrier.wait()
        return [det.votes(images[i * calls + k]) for k in range(calls)]

    with ThreadPoolExecutor(threads) as pool:
        together = [v for votes in pool.map(run, range(threads)) for v in votes]
    assert all(torch.equal(a, b) for a, b in zip(alone, together))
    assert len({a.numpy().tobytes() for a in alone}) > 1  # the calls differ, so a mix-up would show
