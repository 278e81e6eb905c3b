"""``agman reconcile``: find and repair drift between the catalog and Milvus."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import typer


def _check_checkpoint_is_active(checkpoint: object, active_version: str) -> None:
    """Repairs re-embed with AGMAN_CHECKPOINT: it must be the active model version."""
    from agman_milvus.core.errors import ConfigurationError
    from agman_milvus.core.model import read_checkpoint_config

    if checkpoint is None:
        raise ConfigurationError("AGMAN_CHECKPOINT is not set: repairs need the active model's checkpoint")
    version = read_checkpoint_config(checkpoint)["version"]
    if version != active_version:
        raise ConfigurationError(
            f"AGMAN_CHECKPOINT is model {version}, but the active model is {active_version}; "
            "point it at the active model's checkpoint (or run `agman reindex`) before repairing"
        )


def _pending_resender(settings: Any, catalog: Any, reembed: Any) -> Callable[[bool], int]:
    """Counts (dry run) or re-sends stale pending images: to the workers when there is a
    broker, else embedded here (nothing else would embed them)."""
    from agman_milvus.usecases.recovery import count_stale, resend_stale

    after = settings.pending_resend_after

    def resend(dry_run: bool) -> int:
        if after <= 0:
            return 0
        if settings.broker_url:
            from agman_milvus.workers.app import create_app
            from agman_milvus.workers.resender import queue_depth, resend_stale_celery

            celery = create_app(settings)
            if dry_run:
                return count_stale(catalog, after, unclaimed=queue_depth(celery) == 0)
            return resend_stale_celery(celery, catalog, settings)
        if dry_run:
            return count_stale(catalog, after, unclaimed=True)
        return resend_stale(catalog, reembed, after, unclaimed=True)

    return resend


def register(app: typer.Typer) -> None:
    @app.command("reconcile")
    def reconcile_command(
        dry_run: bool = typer.Option(False, "--dry-run", help="Only report, change nothing"),
    ) -> None:
        """Compare SQL rows with Milvus vectors of the active model version; repair drift."""
        from agman_milvus.core.config import get_settings
        from agman_milvus.core.errors import ConfigurationError
        from agman_milvus.core.schema import AttributeSchema
        from agman_milvus.services.blobs import BlobStore
        from agman_milvus.services.store.catalog import open_catalog
        from agman_milvus.services.store.vectors import VectorStore
        from agman_milvus.usecases.reconcile import reconcile

        settings = get_settings()
        catalog = open_catalog(settings)
        model = catalog.model_versions.active()
        if model is None:
            raise ConfigurationError("no active model version is registered in the catalog; ingest first")
        store = VectorStore.from_settings(
            settings, AttributeSchema.from_json(model.attribute_schema), model.version,
            embed_dim=model.embed_dim, descriptor_dim=model.descriptor_dim,
        )
        reembed = None
        if not dry_run:
            from agman_milvus.usecases.ingest import reembed_images

            _check_checkpoint_is_active(settings.resolved_checkpoint, model.version)
            reembed = lambda ids: reembed_images(ids, settings=settings)  # noqa: E731
        report = reconcile(catalog, store, model.version, dry_run=dry_run, reembed=reembed,
                           blobs=BlobStore(settings.blob_dir),
                           resend_pending=_pending_resender(settings, catalog, reembed))
        typer.echo(json.dumps(report.to_dict(), indent=2))
        if report.unrepaired:
            for line in report.unrepaired:
                typer.echo(line, err=True)
            raise typer.Exit(1)
