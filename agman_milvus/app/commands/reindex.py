"""``agman reindex``: the model upgrade (embed everything with a new checkpoint, then switch)."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command("reindex")
    def reindex_command(
        checkpoint: Path = typer.Option(
            None, "--checkpoint", help="The new model (.safetensors); default AGMAN_CHECKPOINT"
        ),
        activate: bool = typer.Option(
            True, "--activate/--no-activate", help="Switch searches to the new version when it is complete"
        ),
        drop_old: bool = typer.Option(
            False, "--drop-old", help="After the switch, drop the old version's collections"
        ),
        batch_size: int = typer.Option(
            None, "--batch-size", min=1, help="Images per model batch (default AGMAN_BATCH_SIZE)"
        ),
        as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only"),
    ) -> None:
        """Embed every live image with CHECKPOINT into its own collections while the current
        version keeps serving, then make it the active version. Re-running resumes."""
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from agman_milvus.core.config import get_settings
        from agman_milvus.core.errors import ConfigurationError
        from agman_milvus.services.container import Services
        from agman_milvus.usecases.reindex import reindex

        settings = get_settings()
        if checkpoint is None and settings.checkpoint is None:
            raise ConfigurationError(
                "no checkpoint: pass --checkpoint NEW.safetensors or set AGMAN_CHECKPOINT"
            )
        console = Console(stderr=True)
        services = Services(settings)
        try:
            with Progress(TextColumn("[bold]reindexing"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), console=console, transient=True) as bar:
                task = bar.add_task("reindex", total=None)
                report = reindex(
                    services, checkpoint, activate=activate, drop_old=drop_old, batch_size=batch_size,
                    on_progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        finally:
            services.close()
        typer.echo(json.dumps(report.to_dict(), indent=2))
        if as_json:
            return
        for image_id, reason in list(report.failed.items())[:10]:
            console.print(f"image {image_id} cannot be embedded by the new model: {reason}")
        if report.left_for_reconcile:
            console.print(f"{len(report.left_for_reconcile)} images changed during the switch: "
                          "run `agman reconcile` with the new checkpoint")
        if report.activated and checkpoint is not None and settings.checkpoint != checkpoint:
            console.print(f"model {report.new_version} is active: set AGMAN_CHECKPOINT={checkpoint} "
                          "for every worker and search process and restart them")
        elif not report.activated:
            console.print(f"model {report.new_version} is filled but not active; run again "
                          "without --no-activate to switch")
