"""The SQL catalog: products, images, model versions and the queries the use cases need.

Every method runs in its own short transaction and returns detached rows (or plain values),
so a :class:`Catalog` can be shared by threads. Inserts that may race (two workers ingesting
the same product or image) use ``INSERT ... ON CONFLICT DO NOTHING`` followed by a select, on
PostgreSQL and SQLite alike.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, NamedTuple

from sqlalchemy import Engine, bindparam, create_engine, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from agman_milvus.core.config import Settings
from agman_milvus.services.store.tables import (
    Base,
    Image,
    ImageStatus,
    JobStatus,
    ModelRecord,
    Product,
    ScreeningJob,
    ScreeningMatch,
)

__all__ = [
    "Base", "Catalog", "CatalogError", "Image", "ImageFeatures", "ImageInfo", "ImageStatus",
    "JobStatus", "ModelRecord", "Product", "ScreeningJob", "ScreeningMatch", "create_catalog_engine",
    "open_catalog", "PRODUCT_FIELDS",
]

log = logging.getLogger(__name__)

#: Typed product metadata columns; any other metadata key goes to ``Product.extra``.
PRODUCT_FIELDS = ("title", "brand", "category", "gender", "colour")
#: Statuses whose rows are expected to have (or soon have) vectors.
LIVE_STATUSES = (ImageStatus.pending, ImageStatus.indexed)


class CatalogError(RuntimeError):
    """A catalog operation that cannot proceed (unknown product, database not migrated...)."""


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

    def metadata(self) -> dict[str, Any]:
        """Typed product fields plus the ``extra`` bag, as one flat dict."""
        out: dict[str, Any] = dict(self.extra)
        out.update({f: getattr(self, f) for f in PRODUCT_FIELDS})
        return out


class ImageFeatures(NamedTuple):
    """What decoding learned about an image (see :meth:`Catalog.record_features`)."""

    image_id: int
    width: int | None
    height: int | None
    phash: int | None  # signed 64-bit


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def create_catalog_engine(url: str, **kwargs: Any) -> Engine:
    """An engine for ``url``; SQLite gets foreign keys, WAL and a busy timeout."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        kwargs.setdefault("connect_args", {"timeout": 30})
        if parsed.database and parsed.database != ":memory:":
            from pathlib import Path

            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            if parsed.database and parsed.database != ":memory:":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.close()

        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


class Catalog:
    """Queries over the SQL catalog. Construct with an engine (see :func:`open_catalog`)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sessions = sessionmaker(engine, expire_on_commit=False)

    # -- plumbing ----------------------------------------------------------------------------
    def _insert(self, table: Any) -> Any:
        """A dialect ``insert`` that supports ``on_conflict_do_nothing``."""
        name = self.engine.dialect.name
        if name == "postgresql":
            return postgresql.insert(table)
        if name == "sqlite":
            return sqlite.insert(table)
        raise CatalogError(f"unsupported database dialect {name!r}; use PostgreSQL or SQLite")

    def session(self) -> Session:
        return self.sessions()

    def dispose(self) -> None:
        self.engine.dispose()

    # -- products ----------------------------------------------------------------------------
    def upsert_product(self, external_id: str, metadata: Mapping[str, Any] | None = None) -> Product:
        """Get or create the product ``external_id``, updating its metadata.

        Keys in :data:`PRODUCT_FIELDS` go to their columns, others are merged into ``extra``;
        ``None`` values leave the stored value as it is. A soft-deleted product is revived.
        """
        if not external_id:
            raise ValueError("a product needs a non-empty external id")
        metadata = dict(metadata or {})
        typed = {k: _as_text(v) for k, v in metadata.items() if k in PRODUCT_FIELDS and v is not None}
        extra = {k: v for k, v in metadata.items() if k not in PRODUCT_FIELDS and v is not None}
        with self.sessions.begin() as s:
            s.execute(
                self._insert(Product)
                .values(external_id=external_id, extra=extra, **typed)
                .on_conflict_do_nothing(index_elements=["external_id"])
            )
            product = s.scalars(
                select(Product).where(Product.external_id == external_id).with_for_update()
            ).one()
            for key, value in typed.items():
                if getattr(product, key) != value:
                    setattr(product, key, value)
            if extra and any(product.extra.get(k) != v for k, v in extra.items()):
                product.extra = {**product.extra, **extra}
            if product.deleted:
                product.deleted, product.deleted_at = False, None
        return product

    def get_product(self, external_id: str) -> Product | None:
        with self.sessions() as s:
            return s.scalars(select(Product).where(Product.external_id == external_id)).first()

    def soft_delete_product(self, external_id: str) -> list[int]:
        """Mark a product and all its images deleted; returns the image ids (for Milvus)."""
        now = _utcnow()
        with self.sessions.begin() as s:
            product = s.scalars(
                select(Product).where(Product.external_id == external_id).with_for_update()
            ).first()
            if product is None:
                raise CatalogError(f"no product with external id {external_id!r}")
            product.deleted, product.deleted_at = True, now
            ids = list(s.scalars(select(Image.id).where(Image.product_id == product.id)))
            s.execute(
                update(Image).where(Image.product_id == product.id)
                .values(status=ImageStatus.deleted, updated_at=now)
            )
        return ids

    # -- images ------------------------------------------------------------------------------
    def add_image(
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
                self._insert(Image)
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

    def get_images(self, image_ids: Iterable[int]) -> dict[int, Image]:
        ids = list(image_ids)
        out: dict[int, Image] = {}
        with self.sessions() as s:
            for chunk in _chunks(ids, 1000):
                out.update((i.id, i) for i in s.scalars(select(Image).where(Image.id.in_(chunk))))
        return out

    def mark_indexed(self, image_ids: Sequence[int], model_version: str) -> int:
        """Mark images indexed by ``model_version`` (deleted images stay deleted)."""
        return self._set_status(
            image_ids, ImageStatus.indexed, model_version=model_version, indexed_at=_utcnow(),
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
                        attempts=Image.attempts + 1, updated_at=_utcnow())
            )

    def mark_pending(self, image_ids: Sequence[int]) -> int:
        """Queue images for (re-)embedding."""
        return self._set_status(image_ids, ImageStatus.pending, failure_reason=None)

    def _set_status(self, image_ids: Sequence[int], status: ImageStatus, **values: Any) -> int:
        changed = 0
        with self.sessions.begin() as s:
            for chunk in _chunks(list(image_ids), 1000):
                result = s.execute(
                    update(Image)
                    .where(Image.id.in_(chunk), Image.status != ImageStatus.deleted)
                    .values(status=status, updated_at=_utcnow(), **values)
                )
                changed += result.rowcount
        return changed

    def list_pending(self, limit: int = 1000) -> list[Image]:
        """Oldest pending images first."""
        with self.sessions() as s:
            return list(s.scalars(
                select(Image).where(Image.status == ImageStatus.pending)
                .order_by(Image.id).limit(limit)
            ))

    def iter_image_ids(
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

    def count_images(self, status: ImageStatus | None = None) -> int:
        with self.sessions() as s:
            stmt = select(func.count()).select_from(Image)
            if status is not None:
                stmt = stmt.where(Image.status == status)
            return int(s.scalar(stmt) or 0)

    def image_info(self, image_ids: Sequence[int]) -> dict[int, ImageInfo]:
        """Product metadata for a list of image ids (missing ids are simply absent)."""
        out: dict[int, ImageInfo] = {}
        with self.sessions() as s:
            for chunk in _chunks(list(image_ids), 1000):
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
                        product_deleted=product.deleted,
                    )
        return out

    # -- model versions ----------------------------------------------------------------------
    def register_model(
        self,
        version: str,
        *,
        name: str,
        backbone: str,
        attribute_schema: Mapping[str, Any],
        embed_dim: int,
        descriptor_dim: int,
        checkpoint_path: str | None = None,
        checkpoint_sha256: str | None = None,
    ) -> ModelRecord:
        """Record a model version (idempotent; an existing row is returned unchanged)."""
        with self.sessions.begin() as s:
            s.execute(
                self._insert(ModelRecord.__table__)
                .values(version=version, name=name, backbone=backbone,
                        schema=dict(attribute_schema), embed_dim=embed_dim,
                        descriptor_dim=descriptor_dim, checkpoint_path=checkpoint_path,
                        checkpoint_sha256=checkpoint_sha256, active=False)
                .on_conflict_do_nothing(index_elements=["version"])
            )
            return s.get_one(ModelRecord, version)

    def set_active_model(self, version: str) -> None:
        """Make ``version`` the only active model version."""
        with self.sessions.begin() as s:
            if s.get(ModelRecord, version) is None:
                raise CatalogError(f"model version {version!r} is not registered")
            s.execute(update(ModelRecord).where(ModelRecord.version != version).values(active=False))
            s.execute(update(ModelRecord).where(ModelRecord.version == version).values(active=True))

    def switch_model(self, version: str, image_ids: Sequence[int]) -> int:
        """Make ``version`` the active model and, in the same transaction, mark ``image_ids``
        (live images whose vectors of ``version`` are stored) indexed by it; returns how many."""
        changed = 0
        now = _utcnow()
        with self.sessions.begin() as s:
            if s.get(ModelRecord, version) is None:
                raise CatalogError(f"model version {version!r} is not registered")
            s.execute(update(ModelRecord).where(ModelRecord.version != version).values(active=False))
            s.execute(update(ModelRecord).where(ModelRecord.version == version).values(active=True))
            for chunk in _chunks(list(image_ids), 1000):
                changed += s.execute(
                    update(Image)
                    .where(Image.id.in_(chunk), Image.status.in_(LIVE_STATUSES))
                    .values(status=ImageStatus.indexed, model_version=version, indexed_at=now,
                            failure_reason=None, updated_at=now)
                ).rowcount
        return changed

    def active_model(self) -> ModelRecord | None:
        with self.sessions() as s:
            return s.scalars(select(ModelRecord).where(ModelRecord.active.is_(True))).first()

    def get_model(self, version: str) -> ModelRecord | None:
        with self.sessions() as s:
            return s.get(ModelRecord, version)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _chunks(items: Sequence[int], size: int) -> Iterator[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def open_catalog(settings: Settings, *, migrate: bool | None = None) -> Catalog:
    """Open the catalog named by ``settings``.

    ``migrate=None`` (default) upgrades the embedded SQLite file to the newest schema
    automatically and only *checks* a configured database, which is upgraded explicitly
    with ``agman db upgrade``.
    """
    from agman_milvus.services.store.migrate import ensure_at_head, upgrade

    url = settings.resolved_database_url
    engine = create_catalog_engine(url)
    if migrate is None:
        migrate = settings.database_url is None
    if migrate:
        upgrade(url, engine=engine)
    else:
        ensure_at_head(engine)
    return Catalog(engine)
