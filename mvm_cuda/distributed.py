"""Scoring a data set over the processes of a torch.distributed group (e.g. under torchrun).

The images 0..N-1 are cut into fixed chunks of global indices [k*chunk, (k+1)*chunk); each
rank takes a contiguous run of whole chunks (about N/K images) and scores them chunk by chunk
with `Detector.scores(x[chunk], index=chunk's indices)`. A chunk is computed the same way
whatever the number of ranks K, and a seeded detector keys every image's draws by its index,
so with a seed the scores are bit for bit those of one process for every K (on the same
device type). A detector with seed=None draws fresh noise on every call, on every rank:
its scores are as random as ever, and differ from run to run.

After each step the ranks exchange an ok or an error: a rank that raised makes every
other rank raise `RankFailed` with its message instead of waiting for it; a rank that
hangs or dies is caught by the process group's timeout (`init_process_group(...,
timeout=)`), which gloo and NCCL (with its default async error handling) honour.

Without an initialised process group everything here runs as a single process (rank 0 of
1). With NCCL, set the rank's device first (`torch.cuda.set_device(local_rank)`): the
object collectives used here stage through it.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .detector import from_numpy

__all__ = ["RankFailed", "rank_and_size", "chunk_ranges", "agree", "all_gather_chunks", "broadcast",
           "score_dataset", "vote_dataset"]


class RankFailed(RuntimeError):
    """Another rank of the group raised during a step that this rank completed (or also failed)."""


def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def rank_and_size(group=None) -> tuple[int, int]:
    """This process's rank and the group's size.

    Args:
        group: A torch.distributed process group (None: the whole world).

    Returns:
        (rank, world size); (0, 1) without an initialised process group.
    """
    dist = _dist()
    if dist is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def chunk_ranges(n: int, chunk_size: int, rank: int | None = None, world_size: int | None = None,
                 group=None) -> list[tuple[int, int]]:
    """The chunks [lo, hi) of the indices 0..n-1 that `rank` handles, in index order.

    Chunk k is [k*chunk_size, min((k+1)*chunk_size, n)); it belongs to the rank r whose
    share [r*n/K, (r+1)*n/K) holds its middle, so every rank gets a contiguous run of whole
    chunks, n/K indices give or take half a chunk at each end, and rank order is index order.

    Args:
        n: The number of indices, >= 0.
        chunk_size: Indices per chunk, >= 1.
        rank: The rank whose chunks are wanted (None: this process's in `group`).
        world_size: The number of ranks K (None: the size of `group`).
        group: A torch.distributed process group (None: the whole world).

    Returns:
        The (lo, hi) pairs of that rank's chunks.

    Raises:
        ValueError: n < 0, chunk_size < 1, or rank outside [0, world_size).
    """
    if rank is None or world_size is None:
        here, size = rank_and_size(group)
        rank = here if rank is None else rank
        world_size = size if world_size is None else world_size
    if n < 0 or chunk_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"chunk_ranges: need n >= 0, chunk_size >= 1 and 0 <= rank < world_size, got n={n}, "
                         f"chunk_size={chunk_size}, rank={rank}, world_size={world_size}")
    chunks = [(lo, min(lo + chunk_size, n)) for lo in range(0, n, chunk_size)]
    return [(lo, hi) for lo, hi in chunks if (lo + hi) * world_size // (2 * n) == rank]


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


@contextlib.contextmanager
def agree(step: str, group=None) -> Iterator[None]:
    """Run the with-block on every rank, then exchange each rank's ok or error.

    A rank whose block raised re-raises its own exception once every rank has reported; a
    rank whose block succeeded raises RankFailed naming `step`, the failing rank(s) and
    their errors. So one rank's error ends the run everywhere with that message, never
    a hang. A single process (no group) runs the block as it is. The exchange is a
    collective: every rank must enter the same steps in the same order.

    Args:
        step: A name for the block, used in RankFailed's message.
        group: A torch.distributed process group (None: the whole world).

    Yields:
        Nothing: the with-block runs once.

    Raises:
        RankFailed: another rank's block raised, or the exchange with the other ranks failed.
    """
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        yield
        return
    error = None
    try:
        yield
    except Exception as e:  # KeyboardInterrupt and the like end the process; torchrun stops the rest
        error = e
    statuses: list[Any] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(statuses, None if error is None else _describe(error), group=group)
    except Exception as e:
        if error is not None:
            raise error from e
        raise RankFailed(f"{step}: rank {dist.get_rank(group)} lost the other ranks ({_describe(e)})") from e
    if error is not None:
        raise error
    failed = [f"rank {r}: {s}" for r, s in enumerate(statuses) if s is not None]
    if failed:
        raise RankFailed(f"{step}: {'; '.join(failed)}")


def broadcast(value: Any, src: int = 0, group=None) -> Any:
    """Rank src's value, on every rank.

    Args:
        value: Any picklable object (read on rank src only).
        src: The group rank whose value is sent.
        group: A torch.distributed process group (None: the whole world).

    Returns:
        src's value; the value itself for a single process.
    """
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        return value
    box = [value if dist.get_rank(group) == src else None]
    src = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_chunks(parts: Sequence[Tensor], group=None) -> Tensor:
    """Every rank's chunk results, concatenated in rank order along dim 0, on every rank.

    Args:
        parts: This rank's results, in index order, each (n_i, ...); [] for a rank
            without chunks.
        group: A torch.distributed process group (None: the whole world).

    Returns:
        The concatenation, on the CPU.

    Raises:
        ValueError: no rank has any part.
    """
    local = [p.detach().cpu() for p in parts]
    local = torch.cat(local) if local else None
    dist = _dist()
    if dist is None or dist.get_world_size(group) == 1:
        gathered = [local]
    else:
        gathered = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
    pieces = [g for g in gathered if g is not None]
    if not pieces:
        raise ValueError("all_gather_chunks: no rank has any result")
    return torch.cat(pieces)


def _as_images(fn: str, what: str, value) -> Tensor:
    """value (a tensor or numpy array) as a tensor; a numpy array's negative strides or
    foreign byte order are copied away (torch cannot view them)."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "fiub" or value.dtype.itemsize > 8:
            raise ValueError(f"{fn}: {what} must be a float array, got a numpy array of dtype {value.dtype}")
        return from_numpy(value)
    if isinstance(value, Tensor):
        return value
    raise TypeError(f"{fn}: {what} must be a tensor or numpy array (or a tuple/list whose first entry is one), "
                    f"got {type(value).__name__}")


def _image(fn: str, item, i: int) -> Tensor:
    """The image (C, H, W) of data set item i: the item itself, or the first entry of a
    tuple or list (as in (image, label))."""
    if isinstance(item, (tuple, list)) and item:
        item = item[0]
    image = _as_images(fn, f"item {i}", item)
    if image.dim() != 3:
        hint = "; for a one-channel image of shape (H, W) add the channel dimension, image[None]" \
            if image.dim() == 2 else ""
        raise ValueError(f"{fn}: item {i} must be an image (C, H, W), got shape {tuple(image.shape)}{hint}")
    return image


def _images(fn: str, dataset, lo: int, hi: int) -> Tensor:
    if isinstance(dataset, (Tensor, np.ndarray)):
        return _as_images(fn, "the data set", dataset[lo:hi])
    images = [_image(fn, dataset[i], i) for i in range(lo, hi)]
    for i, image in zip(range(lo, hi), images):
        if image.shape != images[0].shape:
            raise ValueError(f"{fn}: item {i} has shape {tuple(image.shape)}, item {lo} {tuple(images[0].shape)}; "
                             "every image of a data set must have the same shape")
    return torch.stack(images)


def _over_ranks(fn: str, detector, dataset, chunk_size: int, group, call, empty: Tensor) -> Tensor:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be an integer >= 1, got {chunk_size!r}")
    chunk_size = int(chunk_size)
    dist = _dist()
    n = len(dataset)
    if dist is not None and dist.get_world_size(group) > 1:
        sizes = [None] * dist.get_world_size(group)
        dist.all_gather_object(sizes, n, group=group)
        if len(set(sizes)) > 1:
            raise ValueError(f"{fn}: the data set has a different length on each rank: {sizes}")
    parts = []
    with agree(fn, group):
        for lo, hi in chunk_ranges(n, chunk_size, group=group):
            parts.append(call(_images(fn, dataset, lo, hi), torch.arange(lo, hi)))
    return all_gather_chunks(parts, group) if n else empty


def score_dataset(detector, dataset, *, chunk_size: int = 64, group=None) -> Tensor:
    """Alg. 3's scores of every image of `dataset`, computed over the ranks of `group`.

    dataset: a tensor (N, C, H, W) or anything with len() and [i] giving an image (C, H, W)
    or a tuple/list whose first entry is one (a torch Dataset of (image, label)), with
    pixel values in [0, 1]; every rank must see the same N items. Each rank reads and
    scores only its chunks of chunk_size images (`chunk_ranges`) with
    detector.scores(images, index=their global indices), on the detector's device.
    Without a process group it scores the whole set in the same chunks. Scores do not
    depend on the number of ranks; with a seeded detector they are bit for bit the same
    for every K.

    Args:
        detector: A `mvm_cuda.detector.Detector`.
        dataset: The images, as above.
        chunk_size: Images per chunk, an integer >= 1.
        group: A torch.distributed process group (None: the whole world).

    Returns:
        The (N,) float64 scores, on the CPU, on every rank.

    Raises:
        ValueError: a bad chunk_size, a bad item or image shape, or a data set whose
            length differs between ranks.
        TypeError: an item is neither a tensor nor a numpy array.
        RankFailed: another rank raised (see `agree`); a rank that raised itself
            re-raises its own error.
    """
    return _over_ranks("score_dataset", detector, dataset, chunk_size, group,
                       lambda x, index: detector.scores(x, index=index), torch.zeros(0, dtype=torch.float64))


def vote_dataset(detector, dataset, *, chunk_size: int = 64, group=None) -> Tensor:
    """The R predicted classes of every image of a data set, computed over the ranks as in `score_dataset`.

    Args:
        detector: A `mvm_cuda.detector.Detector`.
        dataset: The images, as in `score_dataset`.
        chunk_size: Images per chunk, an integer >= 1.
        group: A torch.distributed process group (None: the whole world).

    Returns:
        (N, R) int64 classes, on the CPU, on every rank.

    Raises:
        ValueError: as in `score_dataset`.
        TypeError: as in `score_dataset`.
        RankFailed: as in `score_dataset`.
    """
    return _over_ranks("vote_dataset", detector, dataset, chunk_size, group,
                       lambda x, index: detector.votes(x, index=index),
                       torch.zeros(0, detector.R, dtype=torch.int64))
