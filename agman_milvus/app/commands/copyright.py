"""``agman check-copy``, ``agman screen`` and ``agman calibrate``: copyright near-duplicates."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import typer

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".avif"}


def written(path: Path) -> str:
    """``path`` as the CLI reports it: a paged HTML report (``report.html``, ``report-2.html``,
    ...) with the number of pages beside the first."""
    from agman_milvus.usecases.reports import html_pages

    pages = html_pages(path)
    if len(pages) < 2:
        return str(path)
    more = pages[1].name if len(pages) == 2 else f"{pages[1].name} ... {pages[-1].name}"
    return f"{path} and {len(pages) - 1} linked page{'s' if len(pages) > 2 else ''} ({more})"


def screening_inputs(source: Path) -> list[str]:
    """Images of a directory (recursively, sorted), or of a manifest: a CSV with a ``file``,
    ``path``, ``uri`` or ``image`` column (relative paths resolved against the manifest), or a
    text file with one path/URI per line."""
    if source.is_dir():
        return [str(p) for p in sorted(source.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not source.is_file():
        raise typer.BadParameter(f"{source} is neither a directory nor a manifest file")
    base = source.parent

    def resolve(ref: str) -> str:
        ref = ref.strip()
        return ref if "://" in ref else str((base / ref).resolve())

    if source.suffix.lower() == ".csv":
        with open(source, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            names = reader.fieldnames or []
            column = next((c for c in ("file", "path", "uri", "image") if c in names), None)
            if column is None:
                raise typer.BadParameter(f"{source} needs a file, path, uri or image column")
            return [resolve(row[column]) for row in reader if row.get(column)]
    lines = source.read_text(encoding="utf-8").splitlines()
    return [resolve(line) for line in lines if line.strip() and not line.startswith("#")]


def register(app: typer.Typer) -> None:
    @app.command("check-copy")
    def check_copy_command(
        image: str = typer.Argument(..., help="Image to check: path or http(s):// URI"),
        top_k: int = typer.Option(5, "--top-k", "-k", min=1),
        as_json: bool = typer.Option(False, "--json", help="Print JSON"),
        html: Path | None = typer.Option(None, "--html", help="Also write an HTML page with the evidence "
                                         "(query and match side by side, matched region, inlier lines)"),
    ) -> None:
        """Is IMAGE a copy of a catalogue image? Verdict, score and evidence."""
        from rich.console import Console
        from rich.table import Table

        from agman_milvus.app.client import Client

        with Client() as client:
            check = client.check_copy(image, top_k=top_k)
            if html is not None:
                typer.echo(f"wrote {client.write_copy_check_html(image, check, html)}", err=as_json)
        if as_json:
            typer.echo(json.dumps(check.to_dict(), indent=2, default=str))
            return
        note = "" if check.calibrated else " (uncalibrated defaults: run `agman calibrate`)"
        table = Table(title=f"{image}: {check.verdict} ({check.score:.3f}){note}")
        for col in ("product", "verdict", "score", "inliers", "residual", "descriptor", "pHash dist",
                    "attributes agreeing"):
            table.add_column(col)
        for m in check.matches:
            v = m.verification
            table.add_row(m.product_id, m.verdict, f"{m.score:.3f}",
                          "-" if v is None else (v.method if v.method == "dense" else str(v.inliers)),
                          "-" if v is None else f"{v.residual:.2f}", f"{m.descriptor_similarity:.3f}",
                          "-" if m.phash_distance is None else str(m.phash_distance),
                          f"{m.attributes_agreeing}/{len(m.attributes)}")
        Console().print(table)

    @app.command("calibrate")
    def calibrate_command(
        precision: float = typer.Option(0.99, "--precision", min=0.5, max=1.0,
                                        help="Precision the copy threshold must reach"),
        sample: int = typer.Option(300, "--sample", min=20, help="Catalogue images to edit"),
        seed: int = typer.Option(0, "--seed"),
    ) -> None:
        """Calibrate the copy thresholds on edited copies of this catalogue's images."""
        from agman_milvus.app.client import Client

        with Client() as client:
            result = client.calibrate_copy(precision=precision, sample=sample, seed=seed)
        typer.echo(json.dumps(result.to_dict(), indent=2, default=str))
        t = result.thresholds
        typer.echo(f"copy if score >= {t.copy:.3f}: precision {result.copy_precision:.3f}, "
                   f"recall {result.copy_recall:.3f} on {result.queries} edited catalogue images", err=True)

    @app.command("screen")
    def screen_command(
        source: Path | None = typer.Argument(None, help="A directory of images or a manifest (CSV/text)"),
        top_k: int = typer.Option(5, "--top-k", "-k", min=1),
        report: list[Path] = typer.Option([], "--report", "-o",
                                          help="Write the report (.csv, .json or .html); repeatable"),
        wait: bool = typer.Option(True, "--wait/--no-wait",
                                  help="Follow the job until it ends (--no-wait needs workers)"),
        timeout: float = typer.Option(3600, "--timeout"),
        chunk_size: int | None = typer.Option(None, "--chunk-size", min=1,
                                              help="Images per worker task (default 64): the workers "
                                              "share the job in chunks"),
        job_id: int | None = typer.Option(None, "--job", min=1,
                                          help="Follow job N instead of starting one, going on from "
                                          "where it stopped (its process ended, or it failed)"),
        list_jobs: bool = typer.Option(False, "--list", help="List the 20 newest jobs (JSON lines)"),
    ) -> None:
        """Screen many images for copies of catalogue images, in the background."""
        from agman_milvus.app.client import Client
        from agman_milvus.core.errors import ConfigurationError

        if (source is not None) + (job_id is not None) + list_jobs != 1:
            raise typer.BadParameter("give one of SOURCE (a new job), --job N (an existing one) or --list")
        if list_jobs:
            with Client() as client:
                for summary in client.screening_jobs():
                    typer.echo(json.dumps(summary.to_dict()))
            return
        refs = screening_inputs(source) if source is not None else []
        if job_id is None and not refs:
            raise ConfigurationError(f"no images found in {source}")
        with Client() as client:
            if not wait and not client.settings.broker_url:
                raise ConfigurationError(
                    "--no-wait needs workers (AGMAN_BROKER_URL): without them the job runs inside "
                    "this command and would stop when it returns")
            if job_id is None:
                job = client.screen(refs, top_k=top_k, chunk_size=chunk_size)
                typer.echo(f"screening job {job.id}: {job.total} images")
            else:
                job = client.resume_screening(job_id)
                typer.echo(f"screening job {job.id}: {job.status}, {job.done}/{job.total} images")
            if not wait:
                return
            try:
                job.wait(timeout=timeout)
            except KeyboardInterrupt:
                job.refresh()
                where = ("goes on on the workers" if client.settings.broker_url
                         else "stopped with this command")
                typer.echo(f"job {job.id} {where} at {job.done}/{job.total}; "
                           f"`agman screen --job {job.id}` follows it from there", err=True)
                raise typer.Exit(130) from None
            typer.echo(f"job {job.id} {job.status}: {job.done}/{job.total}"
                       + (f" ({job.error})" if job.error else ""))
            for path in report:
                typer.echo(f"wrote {written(job.export(path))}")
            if job.status != "done":
                raise typer.Exit(1)
