"""``agman demo``: the end-to-end demo on the embedded default, with progress and a printed summary.

The work is :func:`agman_milvus.app.demo.run.run_demo`; this module only adds the progress bars
and the tables.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

_STAGES = {
    "catalog": "catalog", "maps": "demo model: frozen maps", "model": "demo model (train or cache)",
    "ingest": "ingest",
    "search": "attribute searches", "multi": "multi-attribute search", "calibrate": "copy calibration",
    "copy": "copy checks",
}


def register(app: typer.Typer) -> None:
    @app.command("demo")
    def demo(
        catalog: Path = typer.Option(
            None,
            "--catalog",
            help="Run on this manifest CSV (file,id[,product_id],attribute columns) "
            "instead of the generated catalog",
        ),
        attributes: str = typer.Option(
            None,
            "--attributes",
            help="Comma-separated attribute columns "
            "(default: the demo's, or articleType,baseColour,gender,usage)",
        ),
        data_dir: Path = typer.Option(
            None,
            "--data-dir",
            help="Data directory; the demo works in DATA_DIR/demo (default: AGMAN_DATA_DIR)",
        ),
        images: int = typer.Option(
            None,
            "--images",
            min=1,
            help="Generated catalog size (default 600), or the first N rows of --catalog",
        ),
        image_size: int = typer.Option(
            None,
            "--image-size",
            min=32,
            help="Model input size (default 160); also the generated photos' size (default 224)",
        ),
        epochs: int = typer.Option(
            None, "--epochs", min=1, help="Training epochs of the demo model (default 15)"
        ),
        batch_size: int = typer.Option(
            None, "--batch-size", min=2, help="Images per training step of the demo model (default 32)"
        ),
        copies: int = typer.Option(
            40, "--copies", min=1, help="Edited copies to check, and as many unrelated images"
        ),
        queries_per_attribute: int = typer.Option(
            3, "--queries-per-attribute", min=0, help="Searches shown on the page per attribute"
        ),
        calibration_sample: int = typer.Option(
            200, "--calibration-sample", min=10, help="Images used to calibrate the copy thresholds"
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the generated catalog and of the copy edits"),
    ) -> None:
        """Generate a catalog (or read --catalog), train the demo model (cached), ingest, search,
        check copies; writes DATA_DIR/demo/demo.html and summary.json and prints the figures."""
        from dataclasses import replace

        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskID,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.table import Table

        from agman_milvus.app.demo.demo_model import DemoModelConfig
        from agman_milvus.app.demo.run import DemoError, DemoOptions, run_demo
        from agman_milvus.core.config import get_settings
        from agman_milvus.training.readers import FormatError

        model = DemoModelConfig()
        if epochs is not None:
            model = replace(model, epochs=epochs)
        if batch_size is not None:
            model = replace(model, batch_size=batch_size)
        options = DemoOptions(
            data_dir=data_dir if data_dir is not None else get_settings().data_dir, catalog=catalog,
            attributes=tuple(a.strip() for a in attributes.split(",") if a.strip()) if attributes else None,
            images=images, image_size=image_size, model=model, copies=copies,
            queries_per_attribute=queries_per_attribute, calibration_sample=calibration_sample, seed=seed,
        )
        if logging.getLogger().level > logging.DEBUG:  # the bars are the display; -v shows every log line
            logging.getLogger().setLevel(logging.WARNING)
        console = Console(stderr=True)
        tasks: dict[str, TaskID] = {}
        with Progress(TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), console=console) as bar:

            def progress(stage: str, done: int, total: int | None) -> None:
                if stage not in tasks:
                    tasks[stage] = bar.add_task(_STAGES.get(stage, stage), total=total)
                bar.update(tasks[stage], completed=done, total=total)

            try:
                summary = run_demo(options, progress)
            except (DemoError, FormatError, FileExistsError) as error:
                console.print(f"[red]agman demo: {error}")
                raise typer.Exit(2) from None

        out = Console()
        k = summary.top_k
        table = Table(title=f"Attribute search on {summary.held_out_queries} held-out images "
                            f"({summary.ingested} ingested)")
        for column in ("attribute", f"P@{k} %", f"chance P@{k} %", "queries", "offline MAP",
                       "ImageNet floor MAP"):
            table.add_column(column, justify="left" if column == "attribute" else "right")
        for a in summary.per_attribute:
            table.add_row(
                a.attribute,
                f"{a.precision_at_k:.1f}",
                f"{a.chance_precision_at_k:.1f}",
                str(a.queries),
                "–" if a.offline_map is None else f"{a.offline_map:.1f}",
                "–" if a.imagenet_floor_map is None else f"{a.imagenet_floor_map:.1f}",
            )
        out.print(table)
        copy, multi = summary.copy, summary.multi
        figures = Table(show_header=False, title="Summary")
        figures.add_column(justify="left")
        figures.add_column(justify="right")
        if multi.get("precision_at_k") is not None:
            figures.add_row(f"multi-attribute P@{k} ({' + '.join(multi['weights'])}, both match)",
                            f"{multi['precision_at_k']:.1f}% of {multi['queries']} queries")
        figures.add_row("copy-check accuracy", f"{copy.accuracy:.1f}% of {copy.copies + copy.unrelated}")
        figures.add_row(f"  {copy.copies} edited copies",
                        ", ".join(f"{v} {key}" for key, v in copy.copies_confusion.items()))
        figures.add_row(f"  {copy.unrelated} unrelated images",
                        ", ".join(f"{v} {key}" for key, v in copy.unrelated_confusion.items()))
        figures.add_row("ingest (decode → indexed)", f"{summary.ingest['images_per_second']:.1f} images/s")
        figures.add_row("demo model", "trained now" if summary.model["trained_now"] else "from cache")
        figures.add_row("total time", f"{summary.seconds['total']:.0f} s")
        out.print(figures)
        typer.echo(f"HTML page:    {summary.html}")  # plain lines: a path must never be cut short
        typer.echo(f"summary JSON: {summary.summary_json}")
        if summary.default_deployment:
            typer.echo("The demo catalogue is in your default deployment: try "
                       f"`agman search IMAGE -a {summary.attributes[0]}` or `Client().search(...)`.")
        else:
            typer.echo(f"Your default deployment holds other data, so the demo catalogue is in "
                       f"{summary.deployment}: set AGMAN_DATA_DIR={summary.deployment} to explore it.")
