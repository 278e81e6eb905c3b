"""thread_map and thread_pool: order, errors, threads used, BLAS held to one thread inside; the
process-wide thread limit and how `agman worker` shares the cores among its processes."""

from __future__ import annotations

import os
import threading

import faiss  # noqa: F401 - loads an OpenBLAS threaded by OpenMP (one count per thread)
import numpy as np  # noqa: F401 - loads the BLAS whose threads are checked
import pytest
from threadpoolctl import threadpool_info

from agman_milvus.core.threads import thread_map, thread_pool


def test_results_keep_the_items_order():
    assert thread_map(lambda x: x * x, range(50), workers=4) == [x * x for x in range(50)]


def test_items_run_on_several_threads():
    barrier = threading.Barrier(2, timeout=10)

    def meet(_: int) -> str:
        barrier.wait()  # both items must be running at once, or this times out
        return threading.current_thread().name

    names = thread_map(meet, [0, 1], workers=2)
    assert len(set(names)) == 2


def test_one_worker_runs_in_the_calling_thread():
    caller = threading.current_thread().name
    assert thread_map(lambda _: threading.current_thread().name, [0, 1, 2], workers=1) == [caller] * 3


def test_a_pool_serves_several_maps_on_the_same_threads():
    barrier = threading.Barrier(2, timeout=10)

    def meet(_: int) -> str:
        barrier.wait()  # each map runs its two items on two threads at once
        return threading.current_thread().name

    with thread_pool(2) as map_items:
        first, second = map_items(meet, [0, 1]), map_items(meet, [0, 1])
    assert len(set(first)) == 2 and set(second) == set(first)  # a new pool would name new threads
    assert threading.current_thread().name not in first
    caller = threading.current_thread().name
    with thread_pool(1) as map_items:
        assert map_items(lambda _: threading.current_thread().name, [0, 1]) == [caller] * 2


def test_the_first_error_is_raised():
    def fail_on_three(x: int) -> int:
        if x == 3:
            raise ValueError("three")
        return x

    with pytest.raises(ValueError, match="three"):
        thread_map(fail_on_three, range(6), workers=2)


def test_blas_runs_on_one_thread_inside_and_is_restored_after():
    def blas_threads(_: int) -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads(0)
    assert before, "NumPy's BLAS is loaded"
    inside = thread_map(blas_threads, [0, 1], workers=2)
    assert all(n == 1 for threads in inside for n in threads)
    assert blas_threads(0) == before


def test_a_single_item_runs_with_blas_on_one_thread_too():
    def blas_threads(_: int) -> list[int]:
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"]

    before = blas_threads(0)
    assert all(n == 1 for n in thread_map(blas_threads, [0], workers=4)[0])
    assert blas_threads(0) == before


def test_a_limit_holds_cpu_count_and_the_default_pool_to_it():
    from agman_milvus.core.threads import cpu_count, set_limit

    cores = cpu_count()
    try:
        set_limit(1)
        assert cpu_count() == 1
        caller = threading.current_thread().name
        assert thread_map(lambda _: threading.current_thread().name, [0, 1, 2]) == [caller] * 3
        set_limit(cores + 8)
        assert cpu_count() == cores  # never more than the cores the process may run on
    finally:
        set_limit(None)
    assert cpu_count() == cores


def test_limit_threads_applies_to_pytorch_and_opencv_too():
    import cv2
    import torch

    from agman_milvus.core.runtime import limit_threads
    from agman_milvus.core.threads import set_limit

    before = torch.get_num_threads(), cv2.getNumThreads()
    try:
        limit_threads(1)
        assert (torch.get_num_threads(), cv2.getNumThreads()) == (1, 1)
    finally:
        set_limit(None)
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


def test_worker_processes_share_the_cores():
    from agman_milvus.app.commands.worker import threads_per_process

    cores = len(os.sched_getaffinity(0))
    assert threads_per_process("prefork", 2, {}) == max(1, cores // 2)
    assert threads_per_process("threads", 4 * cores, {}) == 1  # never under one thread
    assert threads_per_process("solo", 2, {}) is None  # one process takes every core
    assert threads_per_process("prefork", 1, {}) is None
    assert threads_per_process("prefork", 2, {"AGMAN_THREADS": "3"}) is None  # the user's setting stays
