"""Model versions: register (idempotent), read, and make one active (alone or with its images)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from agman_milvus.services.store.images import LIVE_STATUSES
from agman_milvus.services.store.repository import (
    CatalogError,
    Repository,
    chunks,
    dialect_insert,
    utcnow,
)
from agman_milvus.services.store.tables import Image, ImageStatus, ModelRecord

__all__ = ["ModelVersionRepository"]


class ModelVersionRepository(Repository):
    """The ``models`` table: every model version the deployment knows; at most one is active."""

    def register(
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
                dialect_insert(s, ModelRecord.__table__)
                .values(version=version, name=name, backbone=backbone,
                        schema=dict(attribute_schema), embed_dim=embed_dim,
                        descriptor_dim=descriptor_dim, checkpoint_path=checkpoint_path,
                        checkpoint_sha256=checkpoint_sha256, active=False)
                .on_conflict_do_nothing(index_elements=["version"])
            )
            return s.get_one(ModelRecord, version)

    def set_active(self, version: str) -> None:
        """Make ``version`` the only active model version."""
        with self.sessions.begin() as s:
            _activate(s, version)

    def switch(self, version: str, image_ids: Sequence[int]) -> int:
        """Make ``version`` the active model and, in the same transaction, mark ``image_ids``
        (live images whose vectors of ``version`` are stored) indexed by it; returns how many."""
        changed = 0
        now = utcnow()
        with self.sessions.begin() as s:
            _activate(s, version)
            for chunk in chunks(list(image_ids)):
                changed += s.execute(
                    update(Image)
                    .where(Image.id.in_(chunk), Image.status.in_(LIVE_STATUSES))
                    .values(status=ImageStatus.indexed, model_version=version, indexed_at=now,
                            failure_reason=None, updated_at=now)
                ).rowcount
        return changed

    def active(self) -> ModelRecord | None:
        with self.sessions() as s:
            return s.scalars(select(ModelRecord).where(ModelRecord.active.is_(True))).first()

    def get(self, version: str) -> ModelRecord | None:
        with self.sessions() as s:
            return s.get(ModelRecord, version)


def _activate(s: Session, version: str) -> None:
    """Within the caller's transaction, make ``version`` the only active one."""
    if s.get(ModelRecord, version) is None:
        raise CatalogError(f"model version {version!r} is not registered")
    s.execute(update(ModelRecord).where(ModelRecord.version != version).values(active=False))
    s.execute(update(ModelRecord).where(ModelRecord.version == version).values(active=True))
