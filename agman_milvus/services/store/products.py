"""Products: get or create by external id (race-safe), read, soft-delete with their images."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select, update

from agman_milvus.services.store.repository import CatalogError, Repository, dialect_insert, utcnow
from agman_milvus.services.store.tables import Image, ImageStatus, Product

__all__ = ["PRODUCT_FIELDS", "ProductRepository"]

#: Typed product metadata columns; any other metadata key goes to ``Product.extra``.
PRODUCT_FIELDS = ("title", "brand", "category", "gender", "colour")


class ProductRepository(Repository):
    """The ``products`` table, addressed by external id."""

    def upsert(self, external_id: str, metadata: Mapping[str, Any] | None = None) -> Product:
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
                dialect_insert(s, Product)
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

    def get(self, external_id: str) -> Product | None:
        with self.sessions() as s:
            return s.scalars(select(Product).where(Product.external_id == external_id)).first()

    def external_ids(self) -> set[str]:
        """Every product's external id (deleted ones included)."""
        with self.sessions() as s:
            return set(s.scalars(select(Product.external_id)))

    def soft_delete(self, external_id: str) -> list[int]:
        """Mark a product and all its images deleted; returns the image ids (for Milvus)."""
        now = utcnow()
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


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else str(value)
