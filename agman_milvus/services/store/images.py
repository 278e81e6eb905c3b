"""Images: add (race-safe), read, status transitions, decoded features, product metadata joins."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import and_, bindparam, func, or_, select, update

from agman_milvus.services.store.products import PRODUCT_FIELDS
from agman_milvus.services.store.repository import Repository, chunks, dialect_insert, utcnow
from agman_milvus.services.store.tables import Image, ImageStatus, Product

__all__ = ["LIVE_STATUSES", "ImageFeatures", "ImageInfo", "ImageRepository", "IndexedSource"]

#: Statuses whose rows are expected to have (or soon have) vectors.
LIVE_STATUSES = (ImageStatus.pending, ImageStatus.indexed)


@dataclass(frozen=True)
class ImageInfo:
    """An image joined with its product's metadata (what a search result shows)."""

    image_id: int
    product_id: int
    external_id: str
    source_uri: str | None
    status: ImageStatus
    title: str | None
    brand: str | None
    category: str | None
    gender: str | None
    colour: str | None
    extra: dict[str, Any]
    product_deleted: bool
    sha256: str
    phash: int | None  # signed 64-bit, as stored

    def metadata(self) -> dict[str, Any]:
        """Typed product fields plus the ``extra`` bag, as one flat dict."""
        out: dict[str, Any] = dict(self.extra)
        out.update({f: getattr(self, f) for f in PRODUCT_FIELDS})
        return out


class ImageFeatures(NamedTuple):
    """What decoding learned about an image (see :meth:`ImageRepository.record_features`)."""

    image_id: int
    width: int | None
    height: int | None
    phash: int | None  # signed 64-bit


class IndexedSource(NamedTuple):
    """An indexed image whose source can be read again (see :meth:`ImageRepository.indexed_sources`)."""

    image_id: int
    product_id: int
    source_uri: str


class ImageRepository(Repository):
    """The ``images`` table; ``images.id`` is the Milvus primary key of every vector."""

    def add(
        self,
        product_id: int,
        sha256: str,
        *,
        source_uri: str | None = None,
        width: int | None = None,
        height: int | None = None,
        phash: int | None = None,
    ) -> tuple[Image, bool]:
        """Add an image of a product; returns ``(row, created)``.

        Adding the same bytes (``sha256``) to the same product again returns the existing row
        (``created`` False). A previously deleted duplicate is revived as pending.
        """
        if phash is not None and not -(2**63) <= phash < 2**63:
            raise ValueError(f"phash {phash} does not fit a signed 64-bit integer")
        with self.sessions.begin() as s:
            result = s.execute(
                dialect_insert(s, Image)
                .values(
                    product_id=product_id, sha256=sha256, source_uri=source_uri, width=width,
                    height=height, phash=phash, status=ImageStatus.pending, attempts=0,
                )
                .on_conflict_do_nothing(index_elements=["product_id", "sha256"])
                .returning(Image.id)
            )
            created = result.scalar_one_or_none() is not None
            image = s.scalars(
                select(Image).where(Image.product_id == product_id, Image.sha256 == sha256)
            ).one()
            if not created and image.status == ImageStatus.deleted:
                image.status, image.failure_reason = ImageStatus.pending, None
        return image, created

    def get_many(self, image_ids: Iterable[int]) -> dict[int, Image]:
        """The rows of ``image_ids`` by id (missing ids are simply absent)."""
        ids = list(image_ids)
        out: dict[int, Image] = {}
        if not ids:
            return out
        with self.sessions() as s:
            for chunk in chunks(ids):
                out.update((i.id, i) for i in s.scalars(select(Image).where(Image.id.in_(chunk))))
        return out

    def mark_indexed(self, image_ids: Sequence[int], model_version: str) -> int:
        """Mark images indexed by ``model_version`` (deleted images stay deleted)."""
        return self._set_status(
            image_ids, ImageStatus.indexed, model_version=model_version, indexed_at=utcnow(),
            failure_reason=None,
        )

    def record_features(self, features: Iterable[ImageFeatures]) -> int:
        """Store width, height and perceptual hash of decoded images (one executemany)."""
        params = [{"b_id": f.image_id, "b_w": f.width, "b_h": f.height, "b_p": f.phash}
                  for f in features]
        if not params:
            return 0
        stmt = (
            update(Image)
            .where(Image.id == bindparam("b_id"))
            .values(width=bindparam("b_w"), height=bindparam("b_h"), phash=bindparam("b_p"))
        )
        with self.sessions.begin() as s:
            s.connection().execute(stmt, params)
        return len(params)

    def mark_failed(self, image_id: int, reason: str) -> None:
        """Record a failure with a human-readable reason; counts an attempt."""
        with self.sessions.begin() as s:
            s.execute(
                update(Image)
                .where(Image.id == image_id, Image.status != ImageStatus.deleted)
                .values(status=ImageStatus.failed, failure_reason=reason[:4000],
                        attempts=Image.attempts + 1, updated_at=utcnow())
            )

    def mark_pending(self, image_ids: Sequence[int]) -> int:
        """Queue images for (re-)embedding, afresh: no attempt counted, not claimed."""
        return self._set_status(image_ids, ImageStatus.pending, failure_reason=None, claimed_at=None,
                                attempts=0)

    def claim(self, image_ids: Sequence[int], *, count: bool = True) -> dict[int, int]:
        """A worker starts embedding these images: count an attempt on the pending ones and
        stamp ``claimed_at``; returns their attempt counts including this one, by id.
        ``count=False`` only stamps (a worker still busy with them says so)."""
        now = utcnow()
        attempts = Image.attempts + 1 if count else Image.attempts
        out: dict[int, int] = {}
        with self.sessions.begin() as s:
            for chunk in chunks(list(image_ids)):
                rows = s.execute(
                    update(Image).where(Image.id.in_(chunk), Image.status == ImageStatus.pending)
                    .values(attempts=attempts, claimed_at=now, updated_at=now)
                    .returning(Image.id, Image.attempts)
                )
                out.update((row[0], row[1]) for row in rows)
        return out

    def unclaim(self, image_ids: Sequence[int]) -> None:
        """Take back a counted attempt that did not run: infrastructure trouble cut it short (it
        is retried), or its batch is split (each image then counts on its own); still stamped."""
        with self.sessions.begin() as s:
            for chunk in chunks(list(image_ids)):
                s.execute(update(Image).where(Image.id.in_(chunk), Image.status == ImageStatus.pending,
                                              Image.attempts > 0)
                          .values(attempts=Image.attempts - 1, claimed_at=utcnow()))

    @staticmethod
    def _stale(cutoff: datetime, unclaimed: bool) -> Any:
        claimed = and_(Image.claimed_at.is_not(None), Image.claimed_at < cutoff)
        never = and_(Image.claimed_at.is_(None), Image.updated_at < cutoff)
        return and_(Image.status == ImageStatus.pending, or_(claimed, never) if unclaimed else claimed)

    def stale_pending(
        self, cutoff: datetime, *, unclaimed: bool, image_ids: Sequence[int] | None = None,
        limit: int = 1000, take: bool = False,
    ) -> list[int]:
        """Pending images whose worker went silent (claimed before ``cutoff``) and, with
        ``unclaimed``, those waiting unclaimed since before ``cutoff``; oldest ids first.

        With ``take`` they are stamped as sent now (``claimed_at`` cleared, ``updated_at`` now) in
        the same statement, so two callers never take the same rows."""
        where = self._stale(cutoff, unclaimed)
        if image_ids is not None:
            where = and_(where, Image.id.in_(list(image_ids)))
        chosen = select(Image.id).where(where).order_by(Image.id).limit(limit)
        if not take:
            with self.sessions() as s:
                return list(s.scalars(chosen))
        with self.sessions.begin() as s:
            ids = s.scalars(update(Image).where(Image.id.in_(chosen), where)
                            .values(claimed_at=None, updated_at=utcnow()).returning(Image.id))
            return sorted(ids)

    def count_stale(self, cutoff: datetime, *, unclaimed: bool) -> int:
        """How many images :meth:`stale_pending` would return without a limit (counted in SQL)."""
        with self.sessions() as s:
            return int(s.scalar(select(func.count()).select_from(Image)
                                .where(self._stale(cutoff, unclaimed))) or 0)

    def _set_status(self, image_ids: Sequence[int], status: ImageStatus, **values: Any) -> int:
        changed = 0
        with self.sessions.begin() as s:
            for chunk in chunks(list(image_ids)):
                result = s.execute(
                    update(Image)
                    .where(Image.id.in_(chunk), Image.status != ImageStatus.deleted)
                    .values(status=status, updated_at=utcnow(), **values)
                )
                changed += result.rowcount
        return changed

    def iter_ids(
        self, statuses: ImageStatus | Iterable[ImageStatus], batch_size: int = 5000
    ) -> Iterator[tuple[int, str | None]]:
        """Stream ``(image_id, model_version)`` of images in ``statuses``, by ascending id."""
        wanted = [statuses] if isinstance(statuses, ImageStatus) else list(statuses)
        last = 0
        while True:
            with self.sessions() as s:
                rows = s.execute(
                    select(Image.id, Image.model_version)
                    .where(Image.status.in_(wanted), Image.id > last)
                    .order_by(Image.id).limit(batch_size)
                ).all()
            if not rows:
                return
            yield from ((r[0], r[1]) for r in rows)
            last = rows[-1][0]

    def referenced_sha256(self, shas: Iterable[str]) -> set[str]:
        """Which of ``shas`` some image row (any status) still names: the blobs to keep."""
        wanted = list(shas)
        if not wanted:
            return set()
        with self.sessions() as s:
            return set(s.scalars(select(Image.sha256).where(Image.sha256.in_(wanted)).distinct()))

    def indexed_ids(self, product_id: int) -> list[int]:
        """Ids of the indexed images of product ``product_id`` (the SQL id), ascending."""
        with self.sessions() as s:
            return list(s.scalars(
                select(Image.id).where(Image.product_id == product_id,
                                       Image.status == ImageStatus.indexed).order_by(Image.id)
            ))

    def indexed_sources(self) -> list[IndexedSource]:
        """Every indexed image that has a stored ``source_uri``."""
        with self.sessions() as s:
            rows = s.execute(select(Image.id, Image.product_id, Image.source_uri)
                             .where(Image.status == ImageStatus.indexed,
                                    Image.source_uri.is_not(None))).all()
        return [IndexedSource(*row) for row in rows]

    def count(self, status: ImageStatus | None = None) -> int:
        """How many images there are (in ``status``, or in all)."""
        with self.sessions() as s:
            stmt = select(func.count()).select_from(Image)
            if status is not None:
                stmt = stmt.where(Image.status == status)
            return int(s.scalar(stmt) or 0)

    def info(self, image_ids: Sequence[int]) -> dict[int, ImageInfo]:
        """Images with their product metadata, by id (missing ids are simply absent)."""
        out: dict[int, ImageInfo] = {}
        with self.sessions() as s:
            for chunk in chunks(list(image_ids)):
                rows = s.execute(
                    select(Image, Product).join(Product, Image.product_id == Product.id)
                    .where(Image.id.in_(chunk))
                ).all()
                for image, product in rows:
                    out[image.id] = ImageInfo(
                        image_id=image.id, product_id=product.id, external_id=product.external_id,
                        source_uri=image.source_uri, status=image.status, title=product.title,
                        brand=product.brand, category=product.category, gender=product.gender,
                        colour=product.colour, extra=dict(product.extra or {}),
                        product_deleted=product.deleted, sha256=image.sha256, phash=image.phash,
                    )
        return out
