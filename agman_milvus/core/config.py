"""Settings, read from ``AGMAN_*`` environment variables (pydantic-settings).

With nothing set, everything lives in one data directory: a Milvus Lite database and a SQLite
file, and ingest runs in-process. Setting the URIs switches to a Milvus server or cluster,
PostgreSQL and Celery workers behind Redis.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "agman"


#: Inference arithmetic (:func:`agman_milvus.core.runtime.inference_autocast`).
Precision = Literal["auto", "float32", "bfloat16"]


class Settings(BaseSettings):
    """Every setting of agman_milvus. Environment variable = ``AGMAN_`` + upper-case name."""

    model_config = SettingsConfigDict(
        env_prefix="AGMAN_", env_file=".env", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(default_factory=_default_data_dir, description="Embedded-mode data directory")
    milvus_uri: str | None = Field(
        default=None,
        validation_alias=AliasChoices("AGMAN_MILVUS_URI", "MILVUS_URI", "milvus_uri"),
        description="Milvus server/cluster URI; unset = Milvus Lite in data_dir",
    )
    milvus_token: str = Field(default="", description="Milvus token (user:password or API key)")
    milvus_db_name: str = Field(default="", description="Milvus database name")
    collection_prefix: str = Field(default="agman", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
                                   description="Prefix of every Milvus collection")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; unset = SQLite in data_dir")
    broker_url: str | None = Field(default=None, description="Celery broker URL; unset = in-process ingest")
    result_backend: str | None = Field(default=None,
                                       description="Celery result backend; default = broker_url")
    checkpoint: Path | None = Field(
        default=None,
        description="Model checkpoint (.safetensors); unset = the one `agman demo` built, if any",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Inference device")
    compile: bool = Field(
        default=False,
        description="torch.compile the model (~1.5x on CPU after a 20-60 s warm-up; eager's vectors, "
        "within bfloat16's rounding in bfloat16); "
        "`agman worker` turns it on",
    )
    precision: Precision = Field(
        default="auto",
        description="Inference arithmetic: auto = bfloat16 on CUDA and on CPUs that compute it natively "
        "(AVX512-BF16 or AMX: about twice as fast), float32 elsewhere",
    )
    threads: int | None = Field(
        default=None, ge=1,
        description="Threads one process gives its CPU work (PyTorch, OpenCV, a screening batch's "
        "checks); unset = every core it may run on. `agman worker -P prefork -c N` sets it to "
        "cores / N for its processes, so they share the cores instead of each taking all of them",
    )
    screen_processes: int | None = Field(
        default=None, ge=1, le=256,
        description="Child processes a screening job without workers (no broker) shares its chunks "
        "among; unset = one a core (see `threads`), at most 8 and one per 2 GB of available memory; "
        "1 = the job runs in a thread of the caller",
    )
    batch_size: int = Field(default=32, ge=1, le=1024, description="Images per embedding batch")
    decode_workers: int = Field(default=2, ge=0, le=64,
                                description="Threads decoding images ahead of the model")
    max_image_bytes: int = Field(default=50 * 1024 * 1024, ge=1, description="Largest accepted image file")
    max_image_pixels: int = Field(default=64_000_000, ge=1, description="Largest accepted width x height")
    max_aspect_ratio: float = Field(
        default=20.0, ge=1.0,
        description="Largest accepted long side / short side; a more extreme image is refused before "
        "decoding (the model's centre crop would keep under 1/ratio of it)",
    )
    allowed_roots: list[Path] | None = Field(
        default=None,
        description="Folders that local image paths and file:// URIs must resolve into (symlinks "
        "followed); unset = any regular file except under /proc, /sys and /dev",
    )
    copy_keypoints: bool = Field(
        default=True,
        description="Extract each image's SIFT keypoints at ingest for copy checks (their second "
        "candidate source and the verification's cache; 30-50 ms an image on CPU); off = faster "
        "ingest, copy candidates from the descriptor only",
    )
    fetch_timeout: float = Field(default=10.0, gt=0, description="Seconds to fetch an http(s) image")
    filter_fields: list[str] = Field(
        default_factory=lambda: ["category", "brand", "gender", "colour"],
        description="Product metadata keys stored in Milvus for filtering",
    )
    task_time_limit: int = Field(default=1800, ge=10,
                                 description="Seconds a worker task, or a screening chunk in a child "
                                 "process of the job without workers, may run")
    visibility_timeout: int | None = Field(
        default=None, ge=1,
        description="Seconds before Redis redelivers an unacknowledged task; default task_time_limit + 300",
    )
    pending_resend_after: int = Field(
        default=120, ge=0,
        description="Seconds a pending image or screening chunk may wait (unclaimed, or claimed by a "
                    "worker that went silent) before workers send it again (`agman reconcile` too, "
                    "for images); 0 = never",
    )
    max_attempts: int = Field(
        default=3, ge=3, le=100,
        description="Embedding attempts of an image whose worker died or crashed before it is marked "
                    "failed (at least 3: twice in its batch, then alone)",
    )
    broker_key_prefix: str = Field(
        default="", description="Prefix of every Redis key Celery uses (isolates deployments)"
    )

    @field_validator("data_dir", "checkpoint")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """``~`` expanded and the path made absolute once: a process that changes directory later,
        or hands the path to another process (workers, a screening job's children), means the
        same place (``AGMAN_DATA_DIR=~/agman`` was a folder named ``~``)."""
        return None if path is None else path.expanduser().absolute()

    @property
    def embedded(self) -> bool:
        """True when no Milvus server is configured (Milvus Lite in data_dir)."""
        return not self.milvus_uri

    @property
    def resolved_milvus_uri(self) -> str:
        return self.milvus_uri or str(self.data_dir / "milvus.db")

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'catalog.sqlite'}"

    @property
    def demo_checkpoint(self) -> Path:
        """Where `agman demo` leaves its trained model for later use."""
        return self.data_dir / "demo" / "model.safetensors"

    @property
    def resolved_checkpoint(self) -> Path | None:
        """``checkpoint``, else the demo model when `agman demo` has built one."""
        if self.checkpoint is not None:
            return self.checkpoint
        return self.demo_checkpoint if self.demo_checkpoint.is_file() else None

    @property
    def blob_dir(self) -> Path:
        return self.data_dir / "blobs"


def get_settings(**overrides: object) -> Settings:
    """Settings from the environment, with keyword overrides taking precedence."""
    return Settings(**overrides)  # type: ignore[arg-type]
