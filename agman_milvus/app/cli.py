"""The ``agman`` command line: one Typer app, one module per command group in ``commands/``.

Output: results on stdout (``--json`` prints JSON only), everything else on stderr; agman's
logs at WARNING (INFO with ``--verbose``), other libraries' at WARNING. A known error (any
:class:`~agman_milvus.core.errors.AgmanError`, or a service that cannot be reached) prints one
line, ``error: ...``, and exits 2; ``--debug`` shows its traceback instead.
"""

from __future__ import annotations

import logging
from typing import Any

import click
import typer
from typer.core import TyperGroup

_show_tracebacks = False


class _AgmanGroup(TyperGroup):
    """Runs a command; a known error becomes one ``error: ...`` line and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except Exception as exc:
            line = error_line(exc)
            if line is None or _show_tracebacks:
                raise
            typer.echo(f"error: {line}", err=True)
            raise typer.Exit(2) from None


# Markdown help: a docstring's wrapped first paragraph reads as one sentence in the command list
# (Rich markup mode keeps its line breaks there); no help text uses <tags> or Rich markup.
app = typer.Typer(cls=_AgmanGroup, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode="markdown", help="Attribute-specific fashion image retrieval on Milvus.")


@app.callback()
def _configure(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log progress (INFO)"),
    debug: bool = typer.Option(False, "--debug", help="Debug logs, and tracebacks of errors"),
) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    global _show_tracebacks
    _show_tracebacks = debug
    logging.basicConfig(
        level=logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=False)],
    )
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.getLogger("agman_milvus").setLevel(level)


def _register() -> None:
    """Attach every command group. Each module exposes ``register(app)``."""
    from agman_milvus.app.commands import copyright as copyright_commands
    from agman_milvus.app.commands import (
        db,
        demo,
        ingest,
        model_check,
        reconcile,
        reindex,
        train,
        weights,
        worker,
    )
    from agman_milvus.app.commands import search as search_commands

    for module in (demo, db, model_check, reconcile, reindex, train, weights, ingest, worker,
                   search_commands, copyright_commands):
        module.register(app)


def error_line(exc: BaseException) -> str | None:
    """The one line a person needs for a known error, or None for a bug (shown in full)."""
    from agman_milvus.core.errors import AgmanError

    if isinstance(exc, AgmanError):
        return str(exc)
    from kombu.exceptions import OperationalError as BrokerError
    from sqlalchemy.exc import InterfaceError, OperationalError

    if isinstance(exc, (OperationalError, InterfaceError)):
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return f"cannot reach the catalog database: {cause[0] if cause else type(exc).__name__}"
    if isinstance(exc, BrokerError):
        return f"cannot reach the message broker (AGMAN_BROKER_URL): {exc}"
    return None


_register()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
