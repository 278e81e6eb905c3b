"""``agman db``: catalog migrations; ``agman milvus-serve``: a shared local Milvus Lite."""

from __future__ import annotations

import logging
import os
import sys

import typer


def _quiet_alembic_plugins() -> None:
    # Alembic logs one INFO line per autogenerate plugin it loads; that is noise here.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)


def register(app: typer.Typer) -> None:
    db_app = typer.Typer(
        help="The SQL catalog (migrations).", no_args_is_help=True,
        callback=_quiet_alembic_plugins,
    )

    @db_app.command("upgrade")
    def upgrade(revision: str = typer.Argument("head", help="Target revision")) -> None:
        """Upgrade the catalog database (AGMAN_DATABASE_URL, else SQLite in the data dir)."""
        from agman_milvus.core.config import get_settings
        from agman_milvus.services.store.migrate import upgrade as run_upgrade

        url = get_settings().resolved_database_url
        run_upgrade(url, revision)
        typer.echo(f"catalog upgraded to {revision}")

    @db_app.command("downgrade")
    def downgrade(revision: str = typer.Argument(..., help="Target revision, e.g. base or -1")) -> None:
        """Downgrade the catalog database (destroys data in dropped tables)."""
        from agman_milvus.core.config import get_settings
        from agman_milvus.services.store.migrate import downgrade as run_downgrade

        run_downgrade(get_settings().resolved_database_url, revision)
        typer.echo(f"catalog downgraded to {revision}")

    @db_app.command("current")
    def current() -> None:
        """Print the catalog's revision and the newest one; exit 1 when not at head."""
        from agman_milvus.core.config import get_settings
        from agman_milvus.services.store.engine import create_catalog_engine
        from agman_milvus.services.store.migrate import current_revision, head_revision

        engine = create_catalog_engine(get_settings().resolved_database_url)
        try:
            now, head = current_revision(engine), head_revision()
        finally:
            engine.dispose()
        typer.echo(f"current: {now or '(empty)'}\nhead:    {head}")
        if now != head:
            typer.echo("the catalog is not at head; run `agman db upgrade`", err=True)
            raise typer.Exit(1)

    app.add_typer(db_app, name="db")

    @app.command("milvus-serve")
    def milvus_serve(
        port: int = typer.Option(19540, help="Port on 127.0.0.1"),
    ) -> None:
        """Serve the data dir's Milvus Lite to several processes (gRPC on 127.0.0.1).

        Processes with the same data dir find it by themselves; others (another data dir, a
        container) set AGMAN_MILVUS_URI=http://127.0.0.1:PORT.
        """
        from agman_milvus.core.config import get_settings
        from agman_milvus.services.store import lite_sharing

        data = get_settings().data_dir / "milvus.db"
        data.parent.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(data),
                "--host", "127.0.0.1", "--port", str(port)]
        if lite_sharing.locked(data):
            from agman_milvus.services.store import MilvusLiteLockedError

            serving = lite_sharing.served_uri(data)
            where = f": process {serving.pid} serves it at {serving.uri}" if serving else ""
            raise MilvusLiteLockedError(f"{data} is open in another process{where}")
        uri = f"http://127.0.0.1:{port}"
        lite_sharing.publish(data, uri, server=True)  # the server keeps this process's id (exec)
        typer.echo(f"serving {data} at {uri} (Ctrl+C to stop)", err=True)
        sys.stdout.flush()
        os.execv(sys.executable, argv)
