"""glibc's allocator, tuned for programs that allocate and free tensors of tens of MB in a loop."""
import ctypes
import ctypes.util

__all__ = ["keep_freed_memory"]


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory in the process instead of returning it to the OS.

    By default glibc serves every block over its mmap threshold with a fresh mmap and
    unmaps it on free, so a loop that allocates and frees activation-sized tensors pays a
    page fault per 4 KiB on every iteration (docs/performance.md gives the cost). The
    price is that the process keeps its peak heap. Process-wide, so the library never
    calls it itself: a program that scores many batches on the CPU (a script around a
    Detector, the `mvm-cuda` command, the benchmarks) calls it once at its start.

    Returns:
        Whether it applied (False where libc is not glibc).
    """
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    # Every block from glibc's heap (no mmap per large block), and the heap never
    # trimmed back to the OS. (Setting the trim threshold alone freezes glibc's dynamic
    # mmap threshold, and then every large block is a fresh mmap: slower still.)
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))
