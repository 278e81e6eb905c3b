"""Bulk ingest of a catalog manifest (CSV), resumable.

The manifest format is the fashion-products one: a ``file`` column relative to the manifest's
folder (or ``image_root``), a product id column and metadata columns. Every row is registered
(bytes into the blob store, product + image rows in SQL); a row whose product id or metadata
is invalid is counted as failed with its reason (``rejected``), and the rest goes on; images
already indexed are skipped,
so re-running after an interruption redoes nothing that finished. Registration runs in a
background thread, one chunk ahead of the embedding, and progress is read from the SQL
statuses (the real completion), not from what was sent.
"""

from __future__ import annotations

import csv
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agman_milvus.core.errors import AgmanError, InvalidProductError
from agman_milvus.services.store.catalog import TRANSIENT_SQL_ERRORS, Catalog, ImageStatus
from agman_milvus.usecases.dispatch import Dispatcher, PublishError

logger = logging.getLogger(__name__)

__all__ = [
    "BulkSummary", "DEFAULT_COLUMN_MAP", "ManifestError", "ManifestItem", "bulk_ingest",
    "count_statuses", "read_manifest",
]

#: fashion-products columns renamed onto the catalog's typed product fields by default.
DEFAULT_COLUMN_MAP: dict[str, str] = {
    "productDisplayName": "title", "articleType": "category", "baseColour": "colour",
}


class ManifestError(AgmanError, ValueError):
    """The manifest cannot be read as asked (missing file, missing column)."""


@dataclass(frozen=True)
class ManifestItem:
    product_id: str
    path: Path
    metadata: dict[str, Any]
    row: int = 0  # line of the manifest it came from (0: not from a file)

    @property
    def label(self) -> str:
        """How a report names this item."""
        return f"row {self.row}" if self.row else f"{self.product_id[:60]!r} {self.path.name}"


def parse_metadata_columns(specs: Sequence[str] | None) -> dict[str, str] | None:
    """``["baseColour=colour", "gender"]`` -> ``{"baseColour": "colour", "gender": "gender"}``."""
    if not specs:
        return None
    out: dict[str, str] = {}
    for spec in specs:
        for part in spec.split(","):
            part = part.strip()
            if part:
                column, _, key = part.partition("=")
                out[column.strip()] = (key or column).strip()
    return out


def read_manifest(
    manifest: str | Path,
    *,
    image_root: str | Path | None = None,
    limit: int | None = None,
    product_column: str = "id",
    file_column: str = "file",
    metadata_columns: Mapping[str, str] | None = None,
) -> list[ManifestItem]:
    """Rows of ``manifest`` as items. ``metadata_columns`` maps CSV column -> metadata key;
    by default every other column is kept, renamed by :data:`DEFAULT_COLUMN_MAP`."""
    manifest = Path(manifest)
    if not manifest.is_file():
        raise ManifestError(f"manifest not found: {manifest}")
    root = Path(image_root) if image_root is not None else manifest.parent
    items: list[ManifestItem] = []
    with manifest.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = reader.fieldnames or []
        for needed in (product_column, file_column):
            if needed not in columns:
                raise ManifestError(
                    f"{manifest} has no column {needed!r}; its columns: {', '.join(columns)}"
                )
        if metadata_columns is None:
            mapping = {c: DEFAULT_COLUMN_MAP.get(c, c) for c in columns
                       if c not in (product_column, file_column)}
        else:
            missing = [c for c in metadata_columns if c not in columns]
            if missing:
                raise ManifestError(
                    f"{manifest} has no column(s) {', '.join(missing)}; its columns: {', '.join(columns)}"
                )
            mapping = dict(metadata_columns)
        for row in reader:
            if limit is not None and len(items) >= limit:
                break
            product = (row.get(product_column) or "").strip()
            name = (row.get(file_column) or "").strip()
            if not product or not name:
                logger.warning("skipping manifest row without %s/%s: %s", product_column, file_column, row)
                continue
            meta = {key: row[col] for col, key in mapping.items() if row.get(col) not in (None, "")}
            items.append(ManifestItem(product, root / name, meta, row=reader.line_num))
    return items


@dataclass
class BulkSummary:
    """Outcome of a bulk ingest. ``duplicate``: rows that were already registered (a repeat in
    the manifest, or an earlier run); ``already_indexed``: skipped because they were done;
    ``rejected``: rows refused before anything was stored (invalid product id or metadata),
    manifest row -> reason, counted in ``failed``."""

    total: int = 0
    new: int = 0
    duplicate: int = 0
    already_indexed: int = 0
    dispatched: int = 0
    indexed: int = 0
    failed: int = 0
    pending: int = 0
    resent: int = 0
    stalled: bool = False
    register_seconds: float = 0.0
    seconds: float = 0.0
    failures: dict[int, str] = field(default_factory=dict)  # first failures, image id -> reason
    rejected: dict[str, str] = field(default_factory=dict)  # manifest row -> reason

    def to_dict(self) -> dict[str, object]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("failures", "rejected")}
        out["images_per_second"] = round(self.dispatched / self.seconds, 2) if self.seconds else 0.0
        out["failures"] = {str(k): v for k, v in list(self.failures.items())[:20]}
        out["rejected"] = dict(list(self.rejected.items())[:20])
        return out


def count_statuses(catalog: Catalog, image_ids: Sequence[int]) -> Counter[str]:
    """How many of ``image_ids`` are in each status."""
    rows = catalog.images.get_many(image_ids)
    return Counter(r.status.value for r in rows.values())


def _chunks(items: Sequence[ManifestItem], size: int) -> Iterator[Sequence[ManifestItem]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def bulk_ingest(
    items: Sequence[ManifestItem],
    services: Any,
    dispatcher: Dispatcher,
    *,
    chunk_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
    poll: float = 0.5,
    timeout: float | None = None,
    resend: Callable[[Sequence[int]], int] | None = None,
    resend_every: float = 30.0,
    stall_timeout: float | None = None,
) -> BulkSummary:
    """Register ``items`` and embed the ones not yet indexed; returns the summary.

    ``progress(done, total)`` is called as SQL statuses change (done = indexed + failed among
    the dispatched images). With an asynchronous dispatcher (Celery) this waits for the workers
    until nothing is pending, or ``timeout`` seconds, or ``stall_timeout`` seconds without any
    image finishing (``stalled``; then the rest stays pending and a later run, the workers or
    ``agman reconcile`` pick it up). Meanwhile ``resend(image_ids)`` is called every
    ``resend_every`` seconds to re-send this run's stale images (see ``usecases.recovery``).

    Every item is registered even when publishing fails (:class:`PublishError`, after the
    dispatcher's retries): unsent images stay pending and sending them is retried while waiting.
    """
    from agman_milvus.usecases.ingest import register_image

    summary = BulkSummary(total=len(items))
    catalog = services.catalog
    started = time.perf_counter()
    _ = services.vectors  # load the model and create the collections before the clock matters
    todo: list[int] = []
    chunks: queue.Queue[list[int] | BaseException | None] = queue.Queue(maxsize=2)

    def register_all() -> None:
        try:
            for chunk in _chunks(items, chunk_size):
                t0 = time.perf_counter()
                ids: list[int] = []
                for item in chunk:
                    try:
                        reg = register_image(services, item.product_id, item.path, item.metadata)
                    except InvalidProductError as exc:
                        summary.rejected[item.label] = f"invalid_product: {exc}"
                        continue
                    summary.new += reg.created
                    summary.duplicate += not reg.created
                    if reg.status == ImageStatus.indexed:
                        summary.already_indexed += 1
                    elif reg.needs_embedding:
                        ids.append(reg.image_id)
                    elif reg.status == ImageStatus.failed and reg.reason:
                        summary.failures.setdefault(reg.image_id, reg.reason)
                summary.register_seconds += time.perf_counter() - t0
                chunks.put(ids)
            chunks.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consuming thread
            chunks.put(exc)

    def registered() -> Iterator[list[int]]:
        while True:
            ids = chunks.get()
            if ids is None:
                return
            if isinstance(ids, BaseException):
                raise ids
            todo.extend(ids)
            yield ids

    unsent: list[int] = []
    retry_at = [0.0]

    def publish(ids: list[int]) -> None:
        """Send ``unsent + ids``; after a failure, keep collecting and try again 30 s later."""
        unsent.extend(ids)
        if not unsent or time.monotonic() < retry_at[0]:
            return
        try:
            dispatcher.submit(list(unsent))
            unsent.clear()
        except PublishError as exc:
            logger.warning("%s; they stay pending, sending is tried again in 30 s", exc)
            unsent[:] = exc.image_ids
            retry_at[0] = time.monotonic() + 30.0

    registrar = threading.Thread(target=register_all, name="agman-register", daemon=True)
    registrar.start()
    if dispatcher.asynchronous:
        for ids in registered():
            publish(ids)
    else:  # one pipeline over the ids as they are registered: no refill between chunks
        finished = [0]

        def on_batch(part: Any) -> None:  # part: the IndexReport of a batch just written
            finished[0] += len(part.indexed) + len(part.failed)
            if progress is not None:
                progress(finished[0], max(len(todo), finished[0]))

        dispatcher.submit((i for ids in registered() for i in ids), on_batch=on_batch)  # type: ignore[call-arg]
    registrar.join()
    summary.dispatched = len(todo)

    deadline = None if timeout is None else time.monotonic() + timeout
    last_done, last_change = -1, time.monotonic()
    next_resend = time.monotonic() + resend_every
    while True:
        try:
            counts = count_statuses(catalog, todo)
        except TRANSIENT_SQL_ERRORS as exc:  # the database restarting: wait for it like the workers
            waited = time.monotonic()
            if (deadline is not None and waited >= deadline) or (
                    stall_timeout is not None and waited - last_change >= stall_timeout):
                raise
            logger.warning("reading progress failed (%s); trying again", exc)
            time.sleep(max(poll, 2.0))
            continue
        done = counts["indexed"] + counts["failed"]
        if progress is not None:
            progress(done, len(todo))
        if counts["pending"] == 0 or not dispatcher.asynchronous:
            break
        now = time.monotonic()
        if done != last_done:
            last_done, last_change = done, now
        if deadline is not None and now >= deadline:
            logger.warning("%d images still pending after %.0f s", counts["pending"], timeout)
            break
        if stall_timeout is not None and now - last_change >= stall_timeout:
            summary.stalled = True
            logger.warning("no image finished in %.0f s: are workers running? %d images stay pending",
                           stall_timeout, counts["pending"])
            break
        publish([])
        if resend is not None and now >= next_resend:
            next_resend = now + resend_every
            try:
                summary.resent += resend(todo)
            except Exception as exc:  # noqa: BLE001 - the broker or database may be restarting
                logger.warning("re-sending stale images failed (%s); trying again in %.0f s",
                               exc, resend_every)
        time.sleep(poll)
    summary.indexed = counts["indexed"]
    summary.failed = counts["failed"]
    summary.pending = counts["pending"]
    for image_id, row in catalog.images.get_many(todo).items():
        if row.status == ImageStatus.failed and len(summary.failures) < 100:
            summary.failures[image_id] = row.failure_reason or ""
    dispatched = set(todo)
    summary.failed += sum(1 for image_id in summary.failures if image_id not in dispatched)
    summary.failed += len(summary.rejected)
    summary.seconds = time.perf_counter() - started
    return summary
