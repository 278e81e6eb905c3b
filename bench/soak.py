"""Soak: an ``agman ingest`` of thousands of small images through two worker processes that are
SIGKILLed at random and restarted; counts at the end (lost, duplicated, failed) and how long the
work in progress at each kill took to finish. Not a CI test: it takes minutes. Prints JSON.

The deployment is real and local: PostgreSQL (a throwaway database), Redis (a throwaway key
prefix), a ``milvus-lite server`` on a free port, ``agman worker`` processes (solo pool, one
OpenMP thread each) and a small random-weight AG-MAN model (MobileNetV2, 64 px).

    .venv/bin/python bench/soak.py --images 1500 --kills 6 --out soak.json

Recovery time of a kill: from the SIGKILL until every image that was claimed and pending at that
moment (the killed worker's batch and the other worker's) is indexed or failed. With the default
``AGMAN_PENDING_RESEND_AFTER`` (120 s) a killed batch is re-sent 120-150 s after its claim.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"nothing listens on {port}")


def make_catalogue(root: Path, n: int, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True)
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["file", "id", "colour"])
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (56, 56, 3), dtype=np.uint8)).save(
                root / "img" / f"{i}.jpg", quality=90)
            writer.writerow([f"img/{i}.jpg", f"soak-{i}", ("red", "green", "blue")[i % 3]])
    return manifest


def make_checkpoint(path: Path) -> Path:
    from agman_milvus.core.model import build_model, save_checkpoint
    from agman_milvus.core.schema import AttributeSchema

    schema = AttributeSchema.from_dict({"colour": ["red", "green", "blue"], "sleeve": ["short", "long"]})
    save_checkpoint(build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64), path)
    return path


class Soak:
    def __init__(self, args: argparse.Namespace, root: Path) -> None:
        import psycopg

        self.args, self.root = args, root
        self.db = f"agman_soak_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(args.pg_admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db}"')
        self.db_url = args.pg_admin.rsplit("/", 1)[0] + f"/{self.db}"
        self.port = free_port()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.milvus = self.spawn([str(BIN / "milvus-lite"), "server", "--data-dir", str(root / "milvus"),
                                  "--host", "127.0.0.1", "--port", str(self.port)], "milvus")
        wait_port(self.port)
        self.prefix = f"soak{uuid.uuid4().hex[:6]}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("AGMAN_", "MILVUS_URI"))}
        self.env.update(
            AGMAN_DATA_DIR=str(root / "data"), AGMAN_MILVUS_URI=f"http://127.0.0.1:{self.port}",
            AGMAN_DATABASE_URL=self.db_url.replace("postgresql://", "postgresql+psycopg://", 1),
            AGMAN_BROKER_URL=args.redis, AGMAN_BROKER_KEY_PREFIX=f"{self.prefix}:",
            AGMAN_CHECKPOINT=str(make_checkpoint(root / "model.safetensors")),
            AGMAN_COLLECTION_PREFIX=self.prefix, AGMAN_DEVICE="cpu", AGMAN_BATCH_SIZE="32",
            OMP_NUM_THREADS="1",
        )
        if args.resend_after is not None:
            self.env["AGMAN_PENDING_RESEND_AFTER"] = str(args.resend_after)
        subprocess.run([str(BIN / "agman"), "db", "upgrade"], env=self.env, check=True,
                       capture_output=True)

    def spawn(self, argv: list[str], name: str) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=getattr(self, "env", None))
        log.close()
        self.procs.append(proc)
        return proc

    def worker(self, n: int) -> subprocess.Popen[bytes]:
        return self.spawn([str(BIN / "agman"), "worker", "-Q", "agman.gpu", "--no-compile",
                           "-n", f"soak{n}-{uuid.uuid4().hex[:4]}@%h"], f"worker{n}")

    def sql(self, query: str) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.db_url) as conn:
            return list(conn.execute(query).fetchall())

    def statuses(self) -> dict[str, int]:
        return {str(s): n for s, n in self.sql("SELECT status, count(*) FROM images GROUP BY status")}

    def close(self) -> None:
        import psycopg

        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        with psycopg.connect(self.args.pg_admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{self.db}"')
        import redis

        client = redis.Redis.from_url(self.args.redis)
        keys = list(client.scan_iter(f"{self.prefix}:*"))
        if keys:
            client.delete(*keys)

    def run(self) -> dict[str, object]:
        args = self.args
        rng = random.Random(args.seed)
        manifest = make_catalogue(self.root / "catalogue", args.images, args.seed)
        workers = {n: self.worker(n) for n in range(2)}
        started = time.monotonic()
        ingest = subprocess.Popen([str(BIN / "agman"), "ingest", str(manifest), "--json"], env=self.env,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        kills: list[dict[str, object]] = []
        open_kills: list[tuple[dict[str, object], float, list[int]]] = []
        next_kill = time.monotonic() + rng.uniform(args.kill_min, args.kill_max)
        while ingest.poll() is None:
            now = time.monotonic()
            if len(kills) < args.kills and now >= next_kill:
                n = rng.randrange(2)
                in_progress = [r[0] for r in self.sql(
                    "SELECT id FROM images WHERE status = 'pending' AND claimed_at IS NOT NULL")]
                os.killpg(workers[n].pid, signal.SIGKILL)
                workers[n].wait()
                record: dict[str, object] = {"at_s": round(now - started, 1), "worker": n,
                                             "in_progress": len(in_progress)}
                kills.append(record)
                open_kills.append((record, now, in_progress))
                workers[n] = self.worker(n)
                next_kill = now + rng.uniform(args.kill_min, args.kill_max)
            for item in list(open_kills):
                record, at, ids = item
                id_list = ",".join(map(str, ids))
                if not ids or not self.sql(
                        f"SELECT 1 FROM images WHERE status = 'pending' AND id IN ({id_list}) LIMIT 1"):
                    record["recovered_s"] = round(time.monotonic() - at, 1)
                    open_kills.remove(item)
            time.sleep(1.0)
        out, _ = ingest.communicate()
        seconds = time.monotonic() - started
        summary = json.loads(out[out.index("{"):]) if "{" in out else {}
        for record, at, _ids in open_kills:
            record["recovered_s"] = round(time.monotonic() - at, 1)
        return self.count(summary, kills, seconds, ingest.returncode)

    def count(self, summary: dict, kills: list, seconds: float, code: int) -> dict[str, object]:
        from agman_milvus.core.config import Settings
        from agman_milvus.services.container import Services

        statuses = self.statuses()
        reasonless = self.sql("SELECT count(*) FROM images WHERE status = 'failed' "
                              "AND coalesce(failure_reason, '') = ''")[0][0]
        settings = Settings(**{k[len("AGMAN_"):].lower(): v for k, v in self.env.items()
                               if k.startswith("AGMAN_")})
        services = Services(settings)
        try:
            store = services.vectors
            entities = {label: store.count(label) for label in [*store.schema.names, "copy"]}
        finally:
            services.close()
        indexed = statuses.get("indexed", 0)
        recovered = sorted(float(k["recovered_s"]) for k in kills if "recovered_s" in k)
        return {
            "images": self.args.images, "workers": 2, "kills": len(kills),
            "pending_resend_after_s": int(self.env.get("AGMAN_PENDING_RESEND_AFTER", 120)),
            "ingest_exit_code": code, "seconds": round(seconds, 1),
            "statuses": statuses, "failed_without_reason": reasonless,
            "lost": self.args.images - indexed - statuses.get("failed", 0),
            "entities_per_collection": entities,
            "duplicated": max(entities.values()) - indexed,
            "missing_vectors": indexed - min(entities.values()),
            "recovery_s": {"median": recovered[len(recovered) // 2] if recovered else None,
                           "max": recovered[-1] if recovered else None, "all": recovered},
            "kill_log": kills, "ingest_summary": {k: summary.get(k) for k in
                                                  ("indexed", "failed", "pending", "resent", "seconds")},
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--kills", type=int, default=6, help="SIGKILLs in all")
    parser.add_argument("--kill-min", type=float, default=20.0, help="seconds between kills, at least")
    parser.add_argument("--kill-max", type=float, default=45.0, help="seconds between kills, at most")
    parser.add_argument("--resend-after", type=int, default=None, help="AGMAN_PENDING_RESEND_AFTER")
    parser.add_argument("--pg-admin", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="agman-soak-") as tmp:
        soak = Soak(args, Path(tmp))
        try:
            result = soak.run()
        finally:
            soak.close()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
