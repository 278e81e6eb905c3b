"""``Client``: the facade over ingest (and, later, search and copy checks).

With no configuration everything runs in this process: a Milvus Lite directory and a SQLite
file in the data directory, and ingest embeds right away. With ``AGMAN_BROKER_URL`` set, the
Client records the rows and enqueues the work for Celery workers; ``IngestHandle.wait`` then
follows the image's SQL status, which is the result of the work.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from agman_milvus.core.config import Settings, get_settings
from agman_milvus.core.errors import InvalidProductError
from agman_milvus.core.images import ImageSource
from agman_milvus.services.container import Services, check_shared_deployment
from agman_milvus.services.store.catalog import ImageStatus
from agman_milvus.services.store.validation import validate_product
from agman_milvus.usecases.dispatch import Dispatcher, InProcessDispatcher
from agman_milvus.usecases.ingest import Registration, delete_product, register_image, update_product

logger = logging.getLogger(__name__)

__all__ = ["Client", "IngestHandle", "IngestItem"]

_FINAL = (ImageStatus.indexed, ImageStatus.failed, ImageStatus.deleted)

#: Images per embedding task sent by :meth:`Client.ingest_many` (as ``agman ingest`` does).
INGEST_BATCH = 32

IngestItem = tuple[str, ImageSource] | tuple[str, ImageSource, Mapping[str, Any] | None]
"""One event of :meth:`Client.ingest_many`: ``(product_id, image)`` or
``(product_id, image, metadata)``."""


class IngestHandle:
    """Where one ingested image stands. ``status`` is ``"pending"``, ``"indexed"``,
    ``"failed"`` (see ``reason``) or ``"deleted"``; ``duplicate`` is True when the product
    already had this image (the event was a repeat)."""

    def __init__(self, client: Client, image_id: int, product_id: str, status: ImageStatus,
                 reason: str | None, duplicate: bool) -> None:
        self._client = client
        self.image_id = image_id
        self.product_id = product_id
        self.status = status.value
        self.reason = reason
        self.duplicate = duplicate
        self.model_version: str | None = None

    def __repr__(self) -> str:
        extra = f", reason={self.reason!r}" if self.reason else ""
        return (f"IngestHandle(image_id={self.image_id}, product_id={self.product_id!r}, "
                f"status={self.status!r}, duplicate={self.duplicate}{extra})")

    @property
    def done(self) -> bool:
        """True once the image is indexed, failed or deleted."""
        return self.status != ImageStatus.pending.value

    def refresh(self) -> IngestHandle:
        """Re-read the status from the catalog."""
        row = self._client.services.catalog.images.get_many([self.image_id]).get(self.image_id)
        if row is None:
            raise LookupError(f"image {self.image_id} is no longer in the catalog")
        self.status, self.reason, self.model_version = row.status.value, row.failure_reason, row.model_version
        return self

    def wait(self, timeout: float = 60.0, poll: float = 0.2) -> IngestHandle:
        """Block until the image is done; raises TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.refresh().done:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"image {self.image_id} of product {self.product_id!r} is still pending after "
                    f"{timeout:g} s; are workers running for the agman.gpu queue?"
                )
            time.sleep(poll)
        return self


class Client:
    """Ingest products and images into the catalog and Milvus.

    ``Client()`` reads ``AGMAN_*`` settings; keyword overrides win (``Client(data_dir=...)``).
    Services (database, Milvus, model) are built on first use.
    """

    def __init__(self, settings: Settings | None = None, *, services: Services | None = None,
                 **overrides: Any) -> None:
        if services is not None:
            settings = services.settings
        elif settings is None:
            settings = get_settings(**overrides)
        elif overrides:
            settings = settings.model_copy(update=overrides)
        check_shared_deployment(settings)
        self.settings = settings
        self._services = services
        self._dispatcher: Dispatcher | None = None
        self._checker: Any = None  # the CopyChecker, built on the first copy check

    # -- plumbing -----------------------------------------------------------------------------
    @property
    def services(self) -> Services:
        if self._services is None:
            self._services = Services(self.settings)
        return self._services

    @property
    def dispatcher(self) -> Dispatcher:
        """Celery when a broker is configured, otherwise this process."""
        if self._dispatcher is None:
            if self.settings.broker_url:
                from agman_milvus.workers.app import create_app
                from agman_milvus.workers.producer import CeleryDispatcher

                self._dispatcher = CeleryDispatcher(create_app(self.settings))
            else:
                self._dispatcher = InProcessDispatcher(self.services)
        return self._dispatcher

    def close(self) -> None:
        """Give back the database and Milvus connections: once the last client of this process
        closes (and any screening job it started has ended), the embedded Milvus Lite directory
        is free for other processes (``agman search`` in a terminal). Using the client again
        reconnects."""
        self._checker = None
        if self._services is not None:
            self._services.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- ingest events ------------------------------------------------------------------------
    def ingest(
        self,
        product_id: str,
        image: ImageSource,
        metadata: Mapping[str, Any] | None = None,
        wait: bool = False,
        timeout: float = 300.0,
    ) -> IngestHandle:
        """Record ``image`` of product ``product_id`` and embed it (now, or on a worker).

        ``image``: a path, ``file://`` or ``http(s)://`` URI, bytes or a PIL image. The same
        image sent twice (or the same event delivered twice) yields one row and one vector.
        In-process ingest is finished when this returns; with workers, ``wait=True`` blocks
        until the image is indexed or failed. An invalid product id or metadata (see the
        README's rules) raises :class:`InvalidProductError` and records nothing.
        """
        reg: Registration = register_image(self.services, product_id, image, metadata)  # validates
        if reg.needs_embedding:
            self.dispatcher.submit([reg.image_id])
        handle = IngestHandle(self, reg.image_id, product_id, reg.status, reg.reason,
                              duplicate=not reg.created)
        if reg.needs_embedding and (wait or not self.dispatcher.asynchronous):
            if self.dispatcher.asynchronous:
                handle.wait(timeout)
            else:
                handle.refresh()
        return handle

    def ingest_many(
        self,
        items: Iterable[IngestItem | Mapping[str, Any]],
        wait: bool = False,
        timeout: float = 600.0,
    ) -> list[IngestHandle]:
        """Record many images and embed them in batches of 32 per task, as ``agman ingest``
        does (one task per image with :meth:`ingest` costs a round trip each).

        ``items``: ``(product_id, image)`` or ``(product_id, image, metadata)`` tuples, or
        mappings with those keys. Every item is validated before anything is stored: one
        invalid product id or metadata raises :class:`InvalidProductError` (naming the item)
        and nothing is recorded. Returns one handle per item, in order; a bad image is a
        handle with status ``failed`` and its reason. ``wait=True`` blocks until every image
        is indexed or failed.
        """
        events = [_event(n, item) for n, item in enumerate(items)]
        fields = self.settings.filter_fields
        for n, (product_id, _, metadata) in enumerate(events):
            try:
                validate_product(product_id, metadata, filter_fields=fields)
            except InvalidProductError as exc:
                raise InvalidProductError(f"item {n}: {exc}", field=exc.field) from None
        handles: list[IngestHandle] = []
        for start in range(0, len(events), INGEST_BATCH):
            todo: list[int] = []
            for product_id, image, metadata in events[start:start + INGEST_BATCH]:
                reg = register_image(self.services, product_id, image, metadata)
                handles.append(IngestHandle(self, reg.image_id, product_id, reg.status, reg.reason,
                                            duplicate=not reg.created))
                if reg.needs_embedding and reg.image_id not in todo:
                    todo.append(reg.image_id)
            if todo:
                self.dispatcher.submit(todo)
        if not self.dispatcher.asynchronous:
            for handle in handles:
                handle.refresh()
        elif wait:
            deadline = time.monotonic() + timeout
            for handle in handles:
                handle.wait(max(0.0, deadline - time.monotonic()))
        return handles

    def status(self, image_id: int) -> IngestHandle:
        """The current state of image ``image_id``."""
        row = self.services.catalog.images.get_many([image_id]).get(image_id)
        if row is None:
            raise LookupError(f"no image with id {image_id}")
        info = self.services.catalog.images.info([image_id])[image_id]
        handle = IngestHandle(self, image_id, info.external_id, row.status, row.failure_reason,
                              duplicate=False)
        handle.model_version = row.model_version
        return handle

    def update_product(self, product_id: str, metadata: Mapping[str, Any]) -> int:
        """Change a product's metadata; its Milvus filter fields follow. Returns the number of
        indexed images rewritten. (A new image is just another :meth:`ingest`.)"""
        return update_product(product_id, metadata, self.services)

    def delete_product(self, product_id: str) -> list[int]:
        """Delete a product: vectors from every collection first, then its SQL rows.
        Returns its image ids. Deleting twice is harmless."""
        return delete_product(product_id, self.services)

    # -- search, copy checks and screening (agman_milvus.usecases.search / copyright / screening) -------
    # Thin delegations to the use-case modules; imported lazily so ingest-only code stays light.
    def _searcher(self) -> Any:
        from agman_milvus.usecases.search import SearchService

        return SearchService.from_services(self.services)

    def load_image(self, source: ImageSource) -> Any:
        """A query or catalogue image (path, URI, ``blob://`` id, bytes or PIL image) as the
        service reads it: under this deployment's allowed roots and size limits, from its blob
        store; without loading the model (a report's pictures need no checker)."""
        from agman_milvus.usecases.base import load_query_image

        return load_query_image(source, settings=self.services.settings, blobs=self.services.blobs)

    def _copy_checker(self) -> Any:
        checker = self._checker
        if checker is None:
            from agman_milvus.usecases.copyright import CopyChecker

            checker = self._checker = CopyChecker.from_services(self.services)
        return checker

    def search(self, image: ImageSource, attribute: str, top_k: int = 10,
               filters: Mapping[str, Any] | None = None) -> list[Any]:
        """Products most similar to ``image`` in ``attribute`` (list of ``SearchHit``), with
        ``filters`` (e.g. ``{"brand": "Nike"}``) applied inside Milvus, one hit per product."""
        return self._searcher().search(image, attribute, top_k, filters)

    def search_similar(self, product_id: str, attribute: str, top_k: int = 10,
                       filters: Mapping[str, Any] | None = None) -> list[Any]:
        """"More like this" from the stored vectors of ``product_id`` (itself excluded)."""
        return self._searcher().search_similar(product_id, attribute, top_k, filters)

    def search_multi(self, image: ImageSource, weights: Mapping[str, float], top_k: int = 10,
                     filters: Mapping[str, Any] | None = None, fusion: str = "weighted") -> list[Any]:
        """Several attributes at once, ``{attribute: weight}``; ``fusion`` "weighted" (exact
        weighted cosine) or "rrf" (reciprocal-rank fusion)."""
        return self._searcher().search_multi(image, weights, top_k, filters, fusion)  # type: ignore[arg-type]

    def check_copy(self, image: ImageSource, top_k: int = 5) -> Any:
        """Is ``image`` a copy of a catalogue image? A ``CopyCheck`` with verdict and evidence."""
        return self._copy_checker().check(image, top_k)

    def write_copy_check_html(self, image: str, check: Any, path: str | Path) -> Path:
        """Write ``check`` (the copy check of ``image``) as an HTML page: query and each match side
        by side with the matched region and inlier lines drawn."""
        from agman_milvus.usecases.reports import copy_check_report, write_html

        return write_html(copy_check_report(str(image), check), Path(path),
                          self.load_image, title=f"Copy check: {image}")

    def calibrate_copy(self, precision: float = 0.99, sample: int = 300, seed: int = 0) -> Any:
        """Recalibrate the copy thresholds on edited copies of this catalogue's images."""
        from agman_milvus.usecases.copy_calibration import calibrate

        return calibrate(self._copy_checker(), precision=precision, sample=sample, seed=seed)

    def screen(self, images: Any, top_k: int = 5, chunk_size: int | None = None) -> Any:
        """Start a background screening job over ``images``; returns a ``ScreeningJobHandle``.

        Celery (queue ``agman.default``) when a broker is configured, one task per chunk of
        ``chunk_size`` queries (default :data:`~agman_milvus.usecases.screening.CHUNK_SIZE`)
        so the workers share the job, else a thread here that shares the chunks among child
        processes, one a core (``AGMAN_SCREEN_PROCESSES``).
        """
        from agman_milvus.usecases.local_screening import start_thread
        from agman_milvus.usecases.screening import (
            CHUNK_SIZE,
            ScreeningJobHandle,
            create_job,
            query_references,
        )

        refs = query_references(list(images), self.services.blobs)
        job_id = create_job(self.services.catalog, refs, top_k=top_k, chunk_size=chunk_size or CHUNK_SIZE)
        thread = None
        if self.settings.broker_url:
            from agman_milvus.workers.app import create_app
            from agman_milvus.workers.producer import send_screening_job

            chunks = self.services.catalog.screening_jobs.chunks(job_id)
            send_screening_job(create_app(self.settings), job_id, [c.start for c in chunks])
        else:
            thread = start_thread(job_id, self._copy_checker())
        return ScreeningJobHandle(self.services.catalog, job_id, thread=thread, loader=self.load_image)

    def resume_screening(self, job_id: int) -> Any:
        """Go on with screening job ``job_id`` from where it stopped; returns its handle.

        Without a broker the job runs in a thread here, as :meth:`screen` started it: for a job
        whose process ended before it was done (Ctrl-C, a crash) or that failed. With one, a
        failed job's unfinished chunks are sent to the workers again; a queued or running job
        is theirs already (their re-send timer covers a chunk whose worker went silent). A
        done job is left as it is. ``JobNotFoundError`` when there is no such job.
        """
        from agman_milvus.usecases.local_screening import resume_in_thread
        from agman_milvus.usecases.screening import ScreeningJobHandle, restart_failed

        job = self.services.catalog.screening_jobs.get(job_id)  # JobNotFoundError before the model loads
        thread = None
        if self.settings.broker_url:
            from agman_milvus.workers.app import create_app
            from agman_milvus.workers.producer import send_screening_job

            starts = restart_failed(self.services.catalog, job)
            if starts:
                send_screening_job(create_app(self.settings), job_id, starts)
        else:
            thread = resume_in_thread(job, self._copy_checker())
        return ScreeningJobHandle(self.services.catalog, job_id, thread=thread, loader=self.load_image)

    def screening_jobs(self, limit: int = 20) -> list[Any]:
        """The ``limit`` newest screening jobs (``JobSummary``: id, status, done/total, times,
        error), newest first."""
        return self.services.catalog.screening_jobs.recent(limit)

    def screening_job(self, job_id: int) -> Any:
        """A handle on an existing screening job."""
        from agman_milvus.usecases.screening import ScreeningJobHandle

        return ScreeningJobHandle(self.services.catalog, job_id, loader=self.load_image)


def _event(n: int, item: Any) -> tuple[Any, Any, Mapping[str, Any] | None]:
    """``(product_id, image, metadata)`` of one :meth:`Client.ingest_many` item."""
    if isinstance(item, Mapping):
        if "product_id" not in item or "image" not in item:
            raise InvalidProductError(f"item {n}: a mapping needs the keys 'product_id' and 'image'",
                                      field="item")
        return item["product_id"], item["image"], item.get("metadata")
    if isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) in (2, 3):
        return item[0], item[1], (item[2] if len(item) == 3 else None)
    raise InvalidProductError(
        f"item {n}: expected (product_id, image[, metadata]) or a mapping, got {type(item).__name__}",
        field="item",
    )
