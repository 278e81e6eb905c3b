"""``agman search``: attribute-specific search from the command line."""

from __future__ import annotations

from pathlib import Path

import typer


def parse_filters(items: list[str]) -> dict[str, object]:
    """``["brand=Nike", "colour=Red,Blue"]`` -> ``{"brand": "Nike", "colour": ["Red", "Blue"]}``."""
    filters: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"filter {item!r} is not KEY=VALUE")
        values = [v for v in value.split(",")]
        filters[key.strip()] = values if len(values) > 1 else value
    return filters


def register(app: typer.Typer) -> None:
    @app.command("search")
    def search_command(
        image: str = typer.Argument(..., help="Query image: path or http(s):// URI"),
        attribute: str = typer.Option(..., "--attribute", "-a", help="Attribute to search by"),
        top_k: int = typer.Option(10, "--top-k", "-k", min=1, help="Number of products"),
        filters: list[str] = typer.Option([], "--filter", "-f", help="KEY=VALUE (VALUE may be a,b,c)"),
        html: Path | None = typer.Option(None, "--html", help="Also write an HTML page here"),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    ) -> None:
        """Products most similar to IMAGE with respect to one attribute."""
        import json

        from rich.console import Console
        from rich.table import Table

        from agman_milvus.app.client import Client

        with Client() as client:
            hits = client.search(image, attribute, top_k=top_k, filters=parse_filters(filters))
            if as_json:
                typer.echo(json.dumps([h.to_dict() for h in hits], indent=2, default=str))
            else:
                table = Table(title=f"{image} by {attribute}")
                for col in ("#", "product", "score", "image", "metadata"):
                    table.add_column(col)
                for rank, h in enumerate(hits, 1):
                    meta = ", ".join(f"{k}={v}" for k, v in h.metadata.items() if v not in (None, ""))
                    table.add_row(str(rank), h.product_id, f"{h.score:.4f}", str(h.image_id), meta)
                Console().print(table)
            if html is not None:
                from agman_milvus.usecases.reports import search_page_html

                page = search_page_html(client.load_image(image), attribute, hits, client.load_image)
                html.write_text(page, encoding="utf-8")
                typer.echo(f"wrote {html}")
