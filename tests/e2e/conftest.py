"""The process-separated tier: every command runs as its own ``agman`` process, as a user runs it.

Nothing here imports the package's internals to drive it: a step is a subprocess of the
console script (or of ``python -c`` for the Python API), with the deployment given only by
environment variables, exactly as the README tells a user to set them. Three deployments:

* ``embedded``: no variable set but ``AGMAN_DATA_DIR`` (Milvus Lite + SQLite, in-process ingest);
* ``shared_local``: the embedded data directory served by ``agman milvus-serve``, Redis on
  127.0.0.1 and ``agman worker`` processes (the default tier; needs Redis);
* ``server_stack``: PostgreSQL + Redis + Celery worker processes + a real Milvus server, all
  private to a loopback-only network namespace (``tests/server_stack_tier.sh``).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageDraw

BIN = Path(sys.executable).parent
AGMAN = BIN / "agman"
#: Variables that select a deployment; each test sets exactly the ones it means.
DEPLOYMENT_VARIABLES = (
    "AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL", "AGMAN_BROKER_URL",
    "AGMAN_RESULT_BACKEND", "AGMAN_CHECKPOINT", "AGMAN_DATA_DIR", "AGMAN_COLLECTION_PREFIX",
    "AGMAN_BROKER_KEY_PREFIX",
)

COLOURS = {"red": (200, 30, 30), "blue": (30, 40, 200), "green": (30, 160, 40), "yellow": (230, 200, 20)}
CATEGORIES = ("shirt", "dress", "shoe")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited early with code {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s")


def _photo(path: Path, category: str, colour: tuple[int, int, int], variant: int) -> None:
    """A flat product drawing: the shape says the category, the fill the colour."""
    image = Image.new("RGB", (112, 112), (242, 242, 240))
    draw = ImageDraw.Draw(image)
    x = 4 * variant
    if category == "shirt":
        draw.rectangle([34 + x, 24, 78 + x, 92], fill=colour)
        draw.rectangle([18 + x, 24, 94 + x, 42], fill=colour)
    elif category == "dress":
        draw.polygon([(56 + x, 14), (26 + x, 98), (86 + x, 98)], fill=colour)
    else:
        draw.ellipse([16 + x, 58, 96 + x, 90], fill=colour)
        draw.rectangle([20 + x, 74, 92 + x, 92], fill=(40, 40, 40))
    image.save(path, quality=93)


@dataclass(frozen=True)
class Catalogue:
    """Product photos, their manifest and two model checkpoints (two model versions)."""

    root: Path
    manifest: Path
    checkpoint: Path
    new_checkpoint: Path
    products: dict[str, dict[str, str]]  # product id -> {"file", "category", "colour", "brand"}

    def image(self, product_id: str) -> Path:
        return self.root / self.products[product_id]["file"]


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> Catalogue:
    """24 products (3 categories x 4 colours x 2 drawings) and two AG-MAN checkpoints (ImageNet
    trunk, untrained heads: enough to tell the drawings apart, not to judge quality)."""
    import torch

    from agman_milvus.model import build_model, save_checkpoint
    from agman_milvus.schema import AttributeSchema

    root = tmp_path_factory.mktemp("e2e-catalogue")
    products: dict[str, dict[str, str]] = {}
    for c, category in enumerate(CATEGORIES):
        for k, (colour, rgb) in enumerate(COLOURS.items()):
            for variant in (1, 2):
                product_id = f"sku-{category}-{colour}-{variant}"
                name = f"{category}_{colour}_{variant}.jpg"
                _photo(root / name, category, rgb, variant=(c + k + variant) % 4)
                products[product_id] = {"file": name, "category": category, "colour": colour,
                                        "brand": "acme" if (k + variant) % 2 == 0 else "zenith"}
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "id", "category", "colour", "brand"])
        writer.writeheader()
        for product_id, row in products.items():
            writer.writerow({"id": product_id, **row})
    schema = AttributeSchema.from_dict({"colour": list(COLOURS), "category": list(CATEGORIES)})
    checkpoints = []
    for seed, name in ((0, "model.safetensors"), (1, "model-v2.safetensors")):
        torch.manual_seed(seed)
        model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64,
                            pretrained="imagenet")
        save_checkpoint(model, root / name)
        checkpoints.append(root / name)
    return Catalogue(root, manifest, checkpoints[0], checkpoints[1], products)


@dataclass
class Deployment:
    """One deployment as the environment describes it, and its commands as subprocesses."""

    name: str
    env: dict[str, str]
    cwd: Path
    asynchronous: bool  # ingest and screening run on workers
    background: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: Path | None = None

    def run(self, *args: str, ok: bool = True, timeout: float = 600,
            env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        """``agman ARGS`` in a new process; fails the test (with its output) unless it exits 0."""
        proc = subprocess.run([str(AGMAN), *args], cwd=self.cwd, env={**self.env, **(env or {})},
                              capture_output=True, text=True, timeout=timeout)
        if ok and proc.returncode != 0:
            pytest.fail(f"`agman {' '.join(args)}` exited {proc.returncode} on {self.name}\n"
                        f"--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
        return proc

    def json(self, *args: str, **kwargs: Any) -> Any:
        """Run ``agman ARGS`` and parse its stdout, which must be JSON and nothing else."""
        out = self.run(*args, **kwargs).stdout
        try:
            return json.loads(out)
        except json.JSONDecodeError as exc:
            pytest.fail(f"`agman {' '.join(args)}` printed something that is not JSON ({exc}):\n{out[:2000]}")

    def python(self, code: str, *args: str, timeout: float = 300) -> str:
        """``python -c CODE ARGS`` in a new process (the Python API as a user calls it)."""
        proc = subprocess.run([sys.executable, "-c", code, *args], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            pytest.fail(f"python -c failed on {self.name} ({proc.returncode})\n{proc.stderr[-4000:]}")
        return proc.stdout

    def start(self, *args: str, name: str, env: Mapping[str, str] | None = None) -> subprocess.Popen[bytes]:
        """``agman ARGS`` in the background (a server or a worker); stopped at teardown."""
        assert self.logs is not None
        log = open(self.logs / f"{name}.log", "ab")
        proc = subprocess.Popen([str(AGMAN), *args], cwd=self.cwd, env={**self.env, **(env or {})},
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        """Stop a background process (and its children: its own session) by its PID."""
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in reversed(self.background):
            self.stop(proc)
        self.background.clear()

    def log_tail(self) -> str:
        if self.logs is None:
            return ""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(self.logs.glob("*.log")))


def base_env(data_dir: Path, checkpoint: Path, **variables: str) -> dict[str, str]:
    """The caller's environment without any deployment variable, plus exactly ``variables``."""
    env = {k: v for k, v in os.environ.items() if k not in DEPLOYMENT_VARIABLES}
    env.update(AGMAN_DATA_DIR=str(data_dir), AGMAN_CHECKPOINT=str(checkpoint), **variables)
    return env


def wait_for_worker(deployment: Deployment, timeout: float = 120) -> None:
    """Until a worker answers Celery's ping (the model loads lazily, on the first task)."""
    code = ("import sys\nfrom agman_milvus.workers.app import create_app\n"
            "sys.exit(0 if create_app().control.ping(timeout=2.0) else 1)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in deployment.background:
            if proc.poll() is not None:
                pytest.fail(f"{proc.args!r} exited with {proc.returncode}\n{deployment.log_tail()}")
        if subprocess.run([sys.executable, "-c", code], env=deployment.env,
                          capture_output=True, timeout=60).returncode == 0:
            return
        time.sleep(1)
    pytest.fail(f"no worker answered within {timeout:.0f} s\n{deployment.log_tail()}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("e2e")
