"""SQL tables (SQLAlchemy 2 typed ORM). SQL is the source of truth for what exists.

The naming convention is Alembic's, so autogenerate and SQLite batch migrations produce
deterministic constraint names. ``images.id`` is the Milvus primary key of every vector.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: 64-bit ids everywhere except SQLite, where only ``INTEGER PRIMARY KEY`` auto-increments.
Id64 = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON(),
    }


class ImageStatus(str, enum.Enum):
    """Life cycle of an image: pending -> indexed | failed(reason); deleted is terminal."""

    pending = "pending"
    indexed = "indexed"
    failed = "failed"
    deleted = "deleted"


class JobStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    done = "done"
    failed = "failed"


def _enum(cls: type[enum.Enum], name: str) -> Enum:
    # Non-native (VARCHAR + CHECK): portable, and downgrade/upgrade needs no CREATE TYPE.
    return Enum(
        cls, name=name, native_enum=False, length=16, create_constraint=True,
        validate_strings=True, values_callable=lambda e: [m.value for m in e],
    )


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(Id64, primary_key=True)
    external_id: Mapped[str] = mapped_column(String(255), unique=True)
    title: Mapped[str | None] = mapped_column(String(512))
    brand: Mapped[str | None] = mapped_column(String(255))
    category: Mapped[str | None] = mapped_column(String(255))
    gender: Mapped[str | None] = mapped_column(String(64))
    colour: Mapped[str | None] = mapped_column(String(64))
    extra: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())
    deleted: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    deleted_at: Mapped[datetime | None]

    images: Mapped[list[Image]] = relationship(back_populates="product")


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (UniqueConstraint("product_id", "sha256"),)

    id: Mapped[int] = mapped_column(Id64, primary_key=True)
    product_id: Mapped[int] = mapped_column(
        Id64, ForeignKey("products.id", ondelete="CASCADE"), index=True
    )
    source_uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    phash: Mapped[int | None] = mapped_column(BigInteger)  # signed 64-bit perceptual hash
    width: Mapped[int | None]
    height: Mapped[int | None]
    status: Mapped[ImageStatus] = mapped_column(
        _enum(ImageStatus, "image_status"), default=ImageStatus.pending, index=True
    )
    failure_reason: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), onupdate=func.now())
    indexed_at: Mapped[datetime | None]
    #: When a worker last started embedding this (pending) image; cleared when it is sent again.
    claimed_at: Mapped[datetime | None]

    product: Mapped[Product] = relationship(back_populates="images")


class ModelRecord(Base):
    """A model version known to the deployment; at most one is ``active``."""

    __tablename__ = "models"

    version: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))
    backbone: Mapped[str] = mapped_column(String(64))
    attribute_schema: Mapped[dict[str, Any]] = mapped_column("schema")
    embed_dim: Mapped[int]
    descriptor_dim: Mapped[int]
    checkpoint_path: Mapped[str | None] = mapped_column(Text)
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=False, server_default="0")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())


class ScreeningJob(Base):
    __tablename__ = "screening_jobs"

    id: Mapped[int] = mapped_column(Id64, primary_key=True)
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.queued, index=True
    )
    created_at: Mapped[datetime] = mapped_column(server_default=func.now())
    finished_at: Mapped[datetime | None]
    total: Mapped[int] = mapped_column(default=0, server_default="0")
    done: Mapped[int] = mapped_column(default=0, server_default="0")
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    error: Mapped[str | None] = mapped_column(Text)

    matches: Mapped[list[ScreeningMatch]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )
    chunks: Mapped[list[ScreeningChunk]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True
    )


class ScreeningChunk(Base):
    """A slice ``[start, stop)`` of a job's queries, run by one task; ``done`` counts its
    queries committed so far, ``worker`` names the last worker that ran it (None: in-process),
    ``claimed_at`` is that run's last sign of life (its start or its last batch; None while no
    run has it), ``sent_at`` when its message was last sent (stale-work re-sends)."""

    __tablename__ = "screening_chunks"

    job_id: Mapped[int] = mapped_column(
        Id64, ForeignKey("screening_jobs.id", ondelete="CASCADE"), primary_key=True
    )
    start: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    stop: Mapped[int]
    done: Mapped[int] = mapped_column(default=0, server_default="0")
    worker: Mapped[str | None] = mapped_column(String(255))
    claimed_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]

    job: Mapped[ScreeningJob] = relationship(back_populates="chunks")


class ScreeningMatch(Base):
    __tablename__ = "screening_matches"

    id: Mapped[int] = mapped_column(Id64, primary_key=True)
    job_id: Mapped[int] = mapped_column(
        Id64, ForeignKey("screening_jobs.id", ondelete="CASCADE"), index=True
    )
    query_ref: Mapped[str] = mapped_column(Text)
    matched_image_id: Mapped[int | None] = mapped_column(
        Id64, ForeignKey("images.id", ondelete="SET NULL")
    )
    matched_product_id: Mapped[int | None] = mapped_column(
        Id64, ForeignKey("products.id", ondelete="SET NULL")
    )
    verdict: Mapped[str] = mapped_column(String(32))
    score: Mapped[float] = mapped_column(Float)
    evidence: Mapped[dict[str, Any]] = mapped_column(default=dict)

    job: Mapped[ScreeningJob] = relationship(back_populates="matches")
