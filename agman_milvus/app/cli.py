"""The ``agman`` command line: one Typer app, one module per command group in ``commands/``.

Logs go to stderr (stdout carries results, e.g. ``--json``): agman's own at INFO (DEBUG with
``--verbose``), other libraries' at WARNING.
"""

from __future__ import annotations

import logging

import typer

app = typer.Typer(no_args_is_help=True, help="Attribute-specific fashion image retrieval on Milvus.")


@app.callback()
def _configure(verbose: bool = typer.Option(False, "--verbose", "-v", help="Debug logging")) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )
    logging.getLogger("agman_milvus").setLevel(logging.DEBUG if verbose else logging.INFO)


def _register() -> None:
    """Attach every command group. Each module exposes ``register(app)``."""
    from agman_milvus.app.commands import db, demo, model_check, reconcile, reindex, train, weights
    from agman_milvus.app.commands import ingest, worker
    from agman_milvus.app.commands import copyright as copyright_commands
    from agman_milvus.app.commands import search as search_commands

    for module in (demo, db, model_check, reconcile, reindex, train, weights, ingest, worker, search_commands,
                   copyright_commands):
        module.register(app)


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
