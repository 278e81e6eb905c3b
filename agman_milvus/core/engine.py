"""The embedding engine: batches of work items -> decode ahead -> one model pass -> write.

Every loop that embeds many images runs on :class:`EmbeddingEngine`: ingest, reindex,
evaluation, the feature cache and the demo's measurements. For each batch:

1. **decode**: a thread pool turns every item into model inputs (read, decode, preprocess)
   while the model runs the previous batch. An item that cannot be decoded comes back as a
   failed :class:`Decoded`; the rest of the batch goes on.
2. **model**: the inputs of the decoded items, stacked, go through the model function in one
   call, in the calling thread.
3. **write**: the writer gets the batch (every item, failed ones included) and the model's
   outputs. With ``write_in_thread`` it runs in a writer thread while the model runs the next
   batch; at most one batch is being written at a time.

Batches are handed back in order, with the writer's result, to ``on_batch`` in the calling
thread. Threads, not processes: decoding (PIL, numpy) releases the GIL, items need no
pickling, and a lazy iterable of batches (ids still being registered) is simply iterated.

Each batch records its stage timings in seconds (:data:`STAGES`): ``read_decode`` (summed over
decode threads), ``decode_wait`` (the model waiting for decoded items), ``model``, ``write``
and ``write_wait`` (the model waiting for the writer).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, TypeVar

import torch

__all__ = ["STAGES", "Batch", "Decoded", "EmbeddingEngine", "Inputs", "batched", "stack"]

STAGES = ("read_decode", "decode_wait", "model", "write", "write_wait")

#: One item's model inputs: a tensor, or a tuple of tensors (e.g. image and attribute id).
Inputs = torch.Tensor | tuple[torch.Tensor, ...]

Item = TypeVar("Item")  # a work item
Dec = TypeVar("Dec", bound="Decoded")  # what decoding one item gives
Out = TypeVar("Out")  # the model's outputs for one batch
Res = TypeVar("Res")  # the writer's result for one batch


@dataclass
class Decoded:
    """One item after decoding: its model ``inputs``, or a ``failure`` saying why not.

    Decode functions may return a subclass carrying more (e.g. an image's size and hash).
    """

    inputs: Inputs | None = None
    failure: str | None = None
    seconds: float = 0.0  # time spent decoding (set by the engine)

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class Batch(Generic[Item, Dec]):
    """One batch moving through the stages: its items and, once decoded, one result each."""

    number: int  # 0-based, in the order the batches arrived
    items: list[Item]
    decoded: list[Dec] = field(default_factory=list)  # decoded[i] belongs to items[i]
    times: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def ok(self) -> list[Dec]:
        """The decoded items that went through the model, in the order of its outputs."""
        return [d for d in self.decoded if d.ok]

    @property
    def ok_items(self) -> list[Item]:
        """The items of :attr:`ok`."""
        return [item for item, d in zip(self.items, self.decoded, strict=True) if d.ok]

    @property
    def failures(self) -> list[tuple[Item, str]]:
        """``(item, reason)`` for every item that could not be decoded."""
        return [(item, d.failure) for item, d in zip(self.items, self.decoded, strict=True)
                if d.failure is not None]

    def timing_text(self) -> str:
        """The stage timings, for a log line."""
        t = self.times
        return (f"read/decode {t['read_decode']:.3f}s (model waited {t['decode_wait']:.3f}s) "
                f"model {t['model']:.3f}s write {t['write']:.3f}s (waited {t['write_wait']:.3f}s)")


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    """Lists of ``size`` items (the last may be shorter), formed as the items arrive."""
    if size < 1:
        raise ValueError(f"batch size must be at least 1, not {size}")
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def stack(inputs: Sequence[Inputs]) -> Inputs:
    """One batch from per-item inputs: tensors are stacked, tuples stacked field by field."""
    if isinstance(inputs[0], torch.Tensor):
        return torch.stack(inputs)  # type: ignore[arg-type]
    return tuple(torch.stack(list(column)) for column in zip(*inputs, strict=True))


class EmbeddingEngine(Generic[Item, Dec, Out, Res]):
    """Runs batches through decode -> model -> write with the stages overlapped.

    ``decode(item)`` returns a :class:`Decoded` and must not raise for a bad item (an
    exception is a bug: it stops the run). ``model(inputs)`` gets the stacked inputs of a
    batch's decoded items; it is not called for a batch where none decoded. ``write(batch,
    outputs)`` gets every batch, ``outputs`` being None when the model was not called; without
    a writer the result of a batch is the model's outputs.

    ``decode_workers`` threads decode ahead (0: each batch is decoded in the calling thread
    when the model needs it).
    """

    def __init__(
        self,
        decode: Callable[[Item], Dec],
        model: Callable[[Inputs], Out],
        write: Callable[[Batch[Item, Dec], Out | None], Res] | None = None,
        *,
        decode_workers: int = 2,
        write_in_thread: bool = False,
        name: str = "agman",
    ) -> None:
        self.decode = decode
        self.model = model
        self.write = write
        self.decode_workers = decode_workers
        self.write_in_thread = write_in_thread
        self.name = name  # thread name prefix

    def run(
        self,
        batches: Iterable[Sequence[Item]],
        on_batch: Callable[[Batch[Item, Dec], Res], None] | None = None,
    ) -> dict[str, float]:
        """Process ``batches`` (possibly lazy); ``on_batch(batch, result)`` is called for each
        written batch, in order. Returns the run's timings: every stage summed over batches,
        and ``total`` (wall clock)."""
        started = time.perf_counter()
        timings = dict.fromkeys((*STAGES, "total"), 0.0)

        def done(batch: Batch[Item, Dec], result: Res) -> None:
            for key, value in batch.times.items():
                timings[key] += value
            if on_batch is not None:
                on_batch(batch, result)

        pool = writer = None
        if self.decode_workers > 0:
            pool = ThreadPoolExecutor(self.decode_workers, thread_name_prefix=f"{self.name}-decode")
        if self.write_in_thread:
            writer = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-write")
        numbered = (Batch(number, list(items)) for number, items in enumerate(batches))
        in_flight: tuple[Batch[Item, Dec], Future[Res]] | None = None
        try:
            upcoming = self._start(next(numbered, None), pool)
            while upcoming is not None:
                batch, pending = upcoming
                upcoming = self._start(next(numbered, None), pool)  # decodes while the model runs
                self._collect(batch, pending)
                outputs = self._model_pass(batch)
                if writer is None:
                    done(batch, self._write(batch, outputs))
                    continue
                if in_flight is not None:  # at most one batch being written while the next embeds
                    t0 = time.perf_counter()
                    previous, future = in_flight
                    result = future.result()
                    previous.times["write_wait"] = time.perf_counter() - t0
                    done(previous, result)
                in_flight = (batch, writer.submit(self._write, batch, outputs))
            if in_flight is not None:
                previous, future = in_flight
                in_flight = None
                done(previous, future.result())
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if writer is not None:
                writer.shutdown(wait=True)
        timings["total"] = time.perf_counter() - started
        return timings

    # -- the stages ------------------------------------------------------------------------------
    def _decode(self, item: Item) -> Dec:
        t0 = time.perf_counter()
        decoded = self.decode(item)
        decoded.seconds = time.perf_counter() - t0
        return decoded

    def _start(
        self, batch: Batch[Item, Dec] | None, pool: ThreadPoolExecutor | None,
    ) -> tuple[Batch[Item, Dec], list[Future[Dec]] | None] | None:
        """Submit a batch's items to the decode threads (None: decode later, in this thread)."""
        if batch is None:
            return None
        return batch, ([pool.submit(self._decode, item) for item in batch.items] if pool else None)

    def _collect(self, batch: Batch[Item, Dec], pending: list[Future[Dec]] | None) -> None:
        t0 = time.perf_counter()
        if pending is None:
            batch.decoded = [self._decode(item) for item in batch.items]
        else:
            batch.decoded = [future.result() for future in pending]
        batch.times["decode_wait"] = time.perf_counter() - t0
        batch.times["read_decode"] = sum(d.seconds for d in batch.decoded)

    def _model_pass(self, batch: Batch[Item, Dec]) -> Out | None:
        t0 = time.perf_counter()
        ok = batch.ok
        outputs = self.model(stack([d.inputs for d in ok])) if ok else None  # type: ignore[misc]
        for d in ok:
            d.inputs = None  # free memory early
        batch.times["model"] = time.perf_counter() - t0
        return outputs

    def _write(self, batch: Batch[Item, Dec], outputs: Out | None) -> Res:
        t0 = time.perf_counter()
        result = self.write(batch, outputs) if self.write is not None else outputs
        batch.times["write"] = time.perf_counter() - t0
        return result  # type: ignore[return-value]
