"""``agman ingest``: bulk-ingest a catalog manifest (CSV), resumable, with real progress."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest(
        manifest: Path = typer.Argument(
            ..., help="CSV with a file column (relative to its folder) and a product id column"),
        image_root: Path = typer.Option(
            None, "--image-root", help="Folder the file column is relative to (default: the manifest's)"),
        limit: int = typer.Option(None, "--limit", min=1, help="Only the first N rows"),
        product_column: str = typer.Option("id", "--product-column", help="Column holding the product id"),
        file_column: str = typer.Option("file", "--file-column", help="Column holding the image file"),
        metadata: list[str] = typer.Option(
            None, "--metadata", help="Metadata column(s) to keep, COLUMN or COLUMN=KEY "
                                     "(default: all, fashion-products names mapped)"),
        timeout: float = typer.Option(
            None, "--timeout", help="With workers: stop waiting after this many seconds"),
        stall_timeout: float = typer.Option(
            None, "--stall-timeout",
            help="With workers: stop waiting when no image finished for this many seconds "
                 "(default: 3 x AGMAN_PENDING_RESEND_AFTER, at least 300)"),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON"),
    ) -> None:
        """Register every image of MANIFEST and index it (in-process, or on workers when
        AGMAN_BROKER_URL is set). Re-running skips images that are already indexed."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from rich.table import Table

        from agman_milvus.core.config import get_settings
        from agman_milvus.services.container import Services, check_shared_deployment
        from agman_milvus.usecases.bulk_ingest import bulk_ingest, parse_metadata_columns, read_manifest
        from agman_milvus.usecases.dispatch import InProcessDispatcher

        settings = get_settings()
        check_shared_deployment(settings)
        items = read_manifest(manifest, image_root=image_root, limit=limit,
                              product_column=product_column, file_column=file_column,
                              metadata_columns=parse_metadata_columns(metadata))
        services = Services(settings)
        resend, stall = None, None
        if settings.broker_url:
            from agman_milvus.workers.app import create_app
            from agman_milvus.workers.producer import CeleryDispatcher
            from agman_milvus.workers.resender import resend_interval, resend_stale_celery

            celery = create_app(settings)
            dispatcher = CeleryDispatcher(celery)
            resend = lambda ids: resend_stale_celery(celery, services.catalog, settings, ids)  # noqa: E731
            stall = (stall_timeout if stall_timeout is not None
                     else max(300.0, 3.0 * settings.pending_resend_after))
        else:
            dispatcher = InProcessDispatcher(services)
        console = Console(stderr=True)
        with Progress(TextColumn("[bold]indexing"), BarColumn(), MofNCompleteColumn(),
                      TimeRemainingColumn(), console=console, transient=as_json) as bar:
            task = bar.add_task("ingest", total=None)
            summary = bulk_ingest(items, services, dispatcher, timeout=timeout, resend=resend,
                                  resend_every=resend_interval(settings) if resend else 30.0,
                                  stall_timeout=stall,
                                  progress=lambda done, total: bar.update(task, completed=done, total=total))
        services.close()
        if as_json:
            typer.echo(json.dumps(summary.to_dict(), indent=2))
        else:
            table = Table("rows", "new", "duplicate", "already indexed", "indexed", "failed", "pending",
                          "seconds")
            table.add_row(*(str(v) for v in (summary.total, summary.new, summary.duplicate,
                                             summary.already_indexed, summary.indexed, summary.failed,
                                             summary.pending, f"{summary.seconds:.1f}")))
            Console().print(table)
            for image_id, reason in list(summary.failures.items())[:10]:
                console.print(f"image {image_id} failed: {reason}")
            for row, reason in list(summary.rejected.items())[:10]:
                console.print(f"{row} refused: {reason}", markup=False)
        if summary.pending:
            why = (f"no image finished in {stall:.0f} s (are workers running? `agman worker`)"
                   if summary.stalled else "stopped waiting")
            console.print(f"{why}: {summary.pending} images are still pending; workers re-send them "
                          "(AGMAN_PENDING_RESEND_AFTER), `agman reconcile` does too, and re-running "
                          "this command resumes")
            raise typer.Exit(1)
