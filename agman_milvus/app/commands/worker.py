"""``agman worker``: start a Celery worker with the right options for embedding.

The GPU queue wants one process per GPU with the ``solo`` pool (no fork after CUDA, one
model per GPU); CPU workers use ``solo`` too by default (PyTorch already uses every core). With
``-c N`` (``prefork`` or ``threads``) each process or thread gets cores / N CPU threads
(``AGMAN_THREADS``), so they share the cores instead of each taking all of them. The
worker process gets tcmalloc preloaded when it is installed (CPU inference is 1.5-4x faster).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import typer

APP = "agman_milvus.workers.app"


def visible_gpus() -> list[str]:
    """GPU indices this process may use, found without initialising CUDA (no torch import)."""
    configured = os.environ.get("CUDA_VISIBLE_DEVICES")
    if configured is not None:
        return [d.strip() for d in configured.split(",") if d.strip() and d.strip() != "-1"]
    gpus = Path("/proc/driver/nvidia/gpus")
    return [str(i) for i in range(len(list(gpus.iterdir())))] if gpus.is_dir() else []


def worker_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for the worker process: tcmalloc preloaded when available."""
    from agman_milvus.core.runtime import tcmalloc_path

    env = dict(os.environ if base is None else base)
    lib = tcmalloc_path()
    if lib and "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    return env


def threads_per_process(pool: str, concurrency: int, env: dict[str, str]) -> int | None:
    """The CPU threads each of a pool's ``concurrency`` processes (or threads) should use: the
    cores this process may run on, shared out, unless ``AGMAN_THREADS`` is set already; None
    when the worker runs one task at a time (``solo``, or ``-c 1``): it takes every core."""
    from agman_milvus.core.threads import cpu_count

    if pool == "solo" or concurrency <= 1 or env.get("AGMAN_THREADS"):
        return None
    return max(1, cpu_count() // concurrency)


def celery_argv(queues: list[str], pool: str, concurrency: int, name: str, loglevel: str) -> list[str]:
    return [
        sys.executable, "-m", "celery", "-A", APP, "worker", "-Q", ",".join(queues), "-P", pool,
        "-c", str(concurrency), "-n", name, "--prefetch-multiplier=1", "--without-gossip",
        "--without-mingle", "--without-heartbeat", "--loglevel", loglevel,
    ]


def _run_per_gpu(gpus: list[str], argv_for: dict[str, list[str]], env: dict[str, str]) -> int:
    """One worker process per GPU; forwards SIGINT/SIGTERM and waits for all of them."""
    procs = [subprocess.Popen(argv_for[g], env={**env, "CUDA_VISIBLE_DEVICES": g}) for g in gpus]

    def forward(signum: int, _frame: object) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGINT, forward)
    signal.signal(signal.SIGTERM, forward)
    return max(proc.wait() for proc in procs)


def register(app: typer.Typer) -> None:
    @app.command("worker")
    def worker(
        queue: list[str] = typer.Option(
            ["agman.gpu", "agman.default"], "--queue", "-Q",
            help="Queue(s) to consume: agman.gpu (embedding), agman.default (screening jobs)",
        ),
        concurrency: int = typer.Option(1, "--concurrency", "-c", min=1, help="Worker processes/threads"),
        pool: str = typer.Option("solo", "--pool", "-P", help="solo | prefork | threads"),
        name: str = typer.Option("", "--name", "-n", help="Worker node name (default agman@%h, gpuN@%h)"),
        loglevel: str = typer.Option("info", "--loglevel", "-l", help="Celery log level"),
        compile_model: bool = typer.Option(
            True, "--compile/--no-compile", help="torch.compile the model (faster after warm-up)"
        ),
    ) -> None:
        """Start a Celery worker (Redis broker from AGMAN_BROKER_URL)."""
        from agman_milvus.core.config import get_settings
        from agman_milvus.core.errors import ConfigurationError
        from agman_milvus.services.container import check_shared_deployment

        if pool not in ("solo", "prefork", "threads"):
            raise typer.BadParameter(f"--pool must be solo, prefork or threads, not {pool!r}")
        queues = [q for spec in queue for q in spec.split(",") if q.strip()]
        settings = get_settings()
        if not settings.broker_url:
            raise ConfigurationError("AGMAN_BROKER_URL is not set: workers need a broker (e.g. "
                                     "redis://127.0.0.1:6379/0). Without one, ingest runs in-process.")
        check_shared_deployment(settings)
        if "agman.gpu" in queues:
            checkpoint = settings.resolved_checkpoint
            if checkpoint is None:
                raise ConfigurationError(
                    "no model: the embedding worker uses AGMAN_CHECKPOINT (a .safetensors file), "
                    "or the demo model once `agman demo` has built it")
            if not Path(checkpoint).is_file():
                raise ConfigurationError(f"model checkpoint not found: {checkpoint}")
        if pool == "prefork" and "agman.gpu" in queues and visible_gpus():
            typer.echo("warning: prefork with CUDA loads one model per child on the same GPU; "
                       "prefer --pool solo (one worker per GPU)", err=True)
        env = worker_env()
        env["AGMAN_COMPILE"] = "1" if compile_model else "0"
        threads = threads_per_process(pool, concurrency, env)
        if threads is not None:
            env["AGMAN_THREADS"] = str(threads)
            typer.echo(f"{pool} pool of {concurrency}, {threads} CPU thread(s) each (AGMAN_THREADS)",
                       err=True)
        gpus = visible_gpus() if "agman.gpu" in queues and pool == "solo" else []
        if len(gpus) > 1 and not name:
            argv_for = {g: celery_argv(queues, pool, concurrency, f"gpu{g}@%h", loglevel) for g in gpus}
            raise typer.Exit(_run_per_gpu(gpus, argv_for, env))
        argv = celery_argv(queues, pool, concurrency, name or ("gpu0@%h" if gpus else "agman@%h"), loglevel)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
