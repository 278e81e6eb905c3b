"""``agman reconcile``: find and repair drift between the catalog and Milvus."""

from __future__ import annotations

import json
from collections.abc import Callable

import typer


def _reembed_pipeline(settings: object) -> Callable[[list[int]], None] | None:
    """The ingest pipeline's re-embed function, when the ingest module provides one."""
    try:
        from agman_milvus.ingest import reembed_images  # type: ignore[attr-defined]
    except ImportError:
        return None
    return lambda ids: reembed_images(ids, settings=settings)


def register(app: typer.Typer) -> None:
    @app.command("reconcile")
    def reconcile_command(
        dry_run: bool = typer.Option(False, "--dry-run", help="Only report, change nothing"),
    ) -> None:
        """Compare SQL rows with Milvus vectors of the active model version; repair drift."""
        from agman_milvus.config import get_settings
        from agman_milvus.reconcile import reconcile
        from agman_milvus.schema import AttributeSchema
        from agman_milvus.store.catalog import open_catalog
        from agman_milvus.store.vectors import VectorStore

        settings = get_settings()
        catalog = open_catalog(settings)
        model = catalog.active_model()
        if model is None:
            typer.echo("no active model version is registered in the catalog; ingest first", err=True)
            raise typer.Exit(2)
        store = VectorStore.from_settings(
            settings, AttributeSchema.from_json(model.attribute_schema), model.version,
            embed_dim=model.embed_dim, descriptor_dim=model.descriptor_dim,
        )
        reembed = None if dry_run else _reembed_pipeline(settings)
        report = reconcile(catalog, store, model.version, dry_run=dry_run, reembed=reembed)
        typer.echo(json.dumps(report.to_dict(), indent=2))
        if report.unrepaired:
            for line in report.unrepaired:
                typer.echo(line, err=True)
            raise typer.Exit(1)
