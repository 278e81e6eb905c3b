"""CPU-bound work of a batch spread over a thread pool, one item a thread.

Copy checks spend most of their time in OpenCV (SIFT, RANSAC, ECC) and NumPy matrix products,
which release the GIL, so a screening batch's queries run side by side on the machine's cores.
NumPy's BLAS is held to one thread meanwhile: its own threads would compete with the pool's (on
2 cores, 40 queries' verification took 215 ms a query one after another, 167 ms on two threads
with BLAS threaded, 124 ms with BLAS on one thread). A single item (one copy check) runs in the
calling thread with BLAS held to one thread too: one query's verification against 20 candidates
took 330-360 ms with BLAS threaded and 190-240 ms on one thread, beside other jobs.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from threadpoolctl import threadpool_limits

__all__ = ["cpu_count", "set_limit", "thread_map", "thread_pool"]

T = TypeVar("T")
R = TypeVar("R")


_limit: int | None = None


def set_limit(threads: int | None) -> None:
    """Hold :func:`cpu_count` to ``threads`` (None: no limit). Applied to PyTorch and OpenCV
    too by :func:`agman_milvus.core.runtime.limit_threads`, which is what callers use."""
    global _limit
    _limit = threads


def cpu_count() -> int:
    """Threads this process gives CPU work: the cores it may run on, or fewer when limited
    (:func:`set_limit`)."""
    cores = max(1, len(os.sched_getaffinity(0)))
    return cores if _limit is None else max(1, min(cores, _limit))


def thread_map(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> list[R]:
    """``[fn(x) for x in items]``, in order, on up to ``workers`` threads (default: one a core);
    the first exception raised by ``fn`` is raised here."""
    items = list(items)
    workers = min(workers or cpu_count(), len(items))
    if workers <= 1:  # one item (a single copy check) or one core: BLAS' threads only contend
        with threadpool_limits(limits=1, user_api="blas"):
            return _map_here(fn, items)
    with thread_pool(workers) as map_items:
        return map_items(fn, items)


@contextmanager
def thread_pool(workers: int) -> Iterator[Callable[[Callable[[T], R], Iterable[T]], list[R]]]:
    """A ``map(fn, items)`` (a list, in order) over one pool of ``workers`` threads, kept for
    several calls, with BLAS held to one thread as in :func:`thread_map`. One worker maps in the
    calling thread as it is, under whatever BLAS limit its caller holds."""
    if workers <= 1:
        yield _map_here
        return
    with (threadpool_limits(limits=1, user_api="blas"),
          ThreadPoolExecutor(workers, initializer=_one_blas_thread) as pool):
        yield lambda fn, items: list(pool.map(fn, items))


def _map_here(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    return [fn(x) for x in items]


def _one_blas_thread() -> None:
    """Hold BLAS to one thread in a pool thread too. The caller's limit covers BLAS libraries
    that count threads per process; one threaded by OpenMP (faiss' OpenBLAS, in Milvus Lite)
    counts them per thread, and a new thread starts at the default. Not restored: the setting
    ends with the thread, and the caller's limit restores the per-process ones."""
    threadpool_limits(limits=1, user_api="blas")
