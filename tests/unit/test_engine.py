"""The embedding engine: order, per-item failures, lazy input, writer overlap, stage timings."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch

from agman_milvus.core.engine import STAGES, Batch, Decoded, EmbeddingEngine, batched, stack


def decode_number(item: int) -> Decoded:
    """Item n -> tensor [n, n]; negative items cannot be decoded."""
    if item < 0:
        return Decoded(failure=f"bad: item {item}")
    return Decoded(torch.tensor([float(item), float(item)]))


def double(batch: torch.Tensor) -> list[float]:
    return (batch[:, 0] * 2).tolist()


@pytest.mark.parametrize("workers", [0, 3])
@pytest.mark.parametrize("write_in_thread", [False, True])
def test_batches_come_back_in_order_with_outputs_aligned_to_items(
    workers: int, write_in_thread: bool,
) -> None:
    rng = random.Random(0)

    def slow_decode(item: int) -> Decoded:
        time.sleep(rng.random() * 0.005)  # decodes finish out of order
        return decode_number(item)

    seen: list[tuple[int, list[int], list[float]]] = []
    engine = EmbeddingEngine(slow_decode, double, lambda batch, out: out,
                             decode_workers=workers, write_in_thread=write_in_thread)
    engine.run(batched(range(23), 5), lambda batch, out: seen.append((batch.number, batch.items, out)))
    assert [number for number, _, _ in seen] == [0, 1, 2, 3, 4]
    assert [item for _, items, _ in seen for item in items] == list(range(23))
    assert [x for _, _, out in seen for x in out] == [2.0 * i for i in range(23)]


def test_failed_items_skip_the_model_and_reach_the_writer() -> None:
    model_inputs: list[list[float]] = []
    written: list[tuple[list[int], list[tuple[int, str]], object]] = []

    def model(batch: torch.Tensor) -> list[float]:
        model_inputs.append(batch[:, 0].tolist())
        return double(batch)

    def write(batch: Batch[int, Decoded], out: list[float] | None) -> int:
        written.append((batch.ok_items, batch.failures, out))
        return len(batch.failures)

    failed_per_batch: list[int] = []
    EmbeddingEngine(decode_number, model, write).run(
        [[1, -2, 3], [-4, -5], [6]], lambda batch, result: failed_per_batch.append(result))
    assert model_inputs == [[1.0, 3.0], [6.0]]  # the all-failed batch never reaches the model
    assert written == [
        ([1, 3], [(-2, "bad: item -2")], [2.0, 6.0]),
        ([], [(-4, "bad: item -4"), (-5, "bad: item -5")], None),
        ([6], [], [12.0]),
    ]
    assert failed_per_batch == [1, 2, 0]


def test_tuple_inputs_are_stacked_field_by_field() -> None:
    inputs = stack([(torch.zeros(3), torch.tensor(1)), (torch.ones(3), torch.tensor(2))])
    assert isinstance(inputs, tuple) and inputs[0].shape == (2, 3) and inputs[1].tolist() == [1, 2]

    def decode(item: int) -> Decoded:
        return Decoded((torch.full((2,), float(item)), torch.tensor(item % 3)))

    out: list[list[int]] = []
    EmbeddingEngine(decode, lambda x: (x[0].sum(1) + x[1]).tolist()).run(
        batched([3, 4, 5], 2), lambda batch, result: out.append(result))
    assert out == [[6.0 + 0, 8.0 + 1], [10.0 + 2]]


@pytest.mark.parametrize("write_in_thread", [False, True])
def test_lazy_input_is_read_one_batch_ahead(write_in_thread: bool) -> None:
    pulled = 0

    def arriving():
        nonlocal pulled
        for start in range(0, 50, 5):
            pulled += 1
            yield list(range(start, start + 5))

    pulled_when_done: list[int] = []
    EmbeddingEngine(decode_number, double, decode_workers=2, write_in_thread=write_in_thread).run(
        arriving(), lambda batch, out: pulled_when_done.append(pulled))
    # batch n is handed back once batch n+1 is decoding (and, with a writer thread, n+2 is)
    ahead = 2 if write_in_thread else 1
    assert pulled_when_done[:-ahead] == list(range(1 + ahead, 11))
    assert pulled_when_done[-1] == 10


def test_the_writer_thread_writes_one_batch_while_the_model_runs_the_next() -> None:
    model_started = {n: threading.Event() for n in range(4)}
    overlapped: list[bool] = []
    writing = 0
    most_at_once = 0
    lock = threading.Lock()

    def model(batch: torch.Tensor) -> int:
        number = int(batch[0, 0]) // 10
        model_started[number].set()
        return number

    def write(batch: Batch[int, Decoded], number: int | None) -> None:
        nonlocal writing, most_at_once
        with lock:
            writing += 1
            most_at_once = max(most_at_once, writing)
        assert threading.current_thread().name.startswith("test-write")
        if batch.number + 1 in model_started:  # the next batch reaches the model meanwhile
            overlapped.append(model_started[batch.number + 1].wait(timeout=10))
        with lock:
            writing -= 1

    engine = EmbeddingEngine(decode_number, model, write, write_in_thread=True, name="test")
    engine.run(batched(range(40), 10))
    assert overlapped == [True, True, True]
    assert most_at_once == 1


def test_stage_timings_per_batch_and_in_total() -> None:
    def decode(item: int) -> Decoded:
        time.sleep(0.01)
        return decode_number(item)

    def model(batch: torch.Tensor) -> None:
        time.sleep(0.03)

    def write(batch: Batch[int, Decoded], out: None) -> None:
        time.sleep(0.02)

    per_batch: list[dict[str, float]] = []
    timings = EmbeddingEngine(decode, model, write, decode_workers=0).run(
        batched(range(6), 3), lambda batch, _: per_batch.append(dict(batch.times)))
    assert set(timings) == {*STAGES, "total"}
    for times in per_batch:
        assert set(times) == set(STAGES)
        assert times["read_decode"] >= 0.03 and times["decode_wait"] >= times["read_decode"]  # inline
        assert times["model"] >= 0.03 and times["write"] >= 0.02 and times["write_wait"] == 0.0
    for stage in STAGES:
        assert timings[stage] == pytest.approx(sum(times[stage] for times in per_batch))
    assert timings["total"] >= timings["decode_wait"] + timings["model"] + timings["write"]
    assert "model 0.0" in Batch(0, [], times=per_batch[0]).timing_text()


def test_decoding_ahead_hides_decode_time_behind_the_model() -> None:
    def decode(item: int) -> Decoded:
        time.sleep(0.01)
        return decode_number(item)

    def model(batch: torch.Tensor) -> None:
        time.sleep(0.1)  # longer than decoding a batch of 4 on 2 threads

    timings = EmbeddingEngine(decode, model, decode_workers=2).run(batched(range(16), 4))
    assert timings["read_decode"] >= 0.16
    assert timings["decode_wait"] < timings["read_decode"] / 2  # only the first batch is waited for


def test_a_decode_bug_stops_the_run() -> None:
    def decode(item: int) -> Decoded:
        if item == 7:
            raise RuntimeError("bug")
        return decode_number(item)

    done: list[int] = []
    with pytest.raises(RuntimeError, match="bug"):
        EmbeddingEngine(decode, double, decode_workers=2).run(
            batched(range(20), 4), lambda batch, _: done.append(batch.number))
    assert done == [0]


def test_a_writer_error_stops_the_run_after_the_batches_before() -> None:
    def write(batch: Batch[int, Decoded], out: list[float] | None) -> None:
        if batch.number == 2:
            raise ConnectionError("store down")

    done: list[int] = []
    with pytest.raises(ConnectionError):
        EmbeddingEngine(decode_number, double, write, write_in_thread=True).run(
            batched(range(30), 5), lambda batch, _: done.append(batch.number))
    assert done == [0, 1]


def test_batched() -> None:
    assert list(batched(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(batched([], 3)) == []
    with pytest.raises(ValueError):
        list(batched([1], 0))
