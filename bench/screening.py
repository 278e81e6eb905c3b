"""A screening job end to end on the embedded default, as a user runs it: speed and verdicts.

1. ``agman ingest`` of ``--refs`` catalogue photos in its own process (Milvus Lite builds its
   index graphs before that process exits, so the next process finds them built).
2. Queries as bench/copydetect.py draws them (same seed, same edits): ``--positives`` edited
   copies of references and ``--negatives`` edited photos that are not references, written as
   PNG files.
3. In a new process: one warm-up ``check_copy`` (model and collections loaded), then a
   screening job over every query (``Client.screen``, the background thread of the embedded
   default, held to that thread with ``AGMAN_SCREEN_PROCESSES=1``) timed from submit to done,
   its stages timed by wrapping the checker's methods; then ``--single`` queries (half with an
   original, half without) checked alone, one ``check_copy`` each, as a user waits for one
   (``single_check_ms``: median and 90th percentile). With ``--local 2`` (say), the same job
   again as the embedded default runs it on that many cores: its chunks shared among that many
   child processes of the job's thread (``AGMAN_SCREEN_PROCESSES``), their CPU time counted.
4. With ``--milvus-server URI``, the references ingested again into that Milvus server (a
   fresh collection prefix, dropped at the end; the catalog in SQLite) and the job run against
   it: in the thread and on each ``--local`` count of children, each beside the thread on
   Milvus Lite.
5. With ``--workers 1,2`` (say), the same job again on that many ``agman worker`` processes
   (queue ``agman.default``, Redis at 127.0.0.1:6379, the data directory's Milvus Lite served
   by ``agman milvus-serve``), each worker count side by side with the thread: a job's chunks
   are separate tasks, so the workers share it. With ``--prefork 2`` (say), also on one
   ``agman worker -P prefork -c 2``, whose processes get a share of the cores each
   (``AGMAN_THREADS``). Warmed up by a small job first (one chunk per query); the cores kept
   busy are the workers' CPU time (their pool processes' included) over the job's wall time.

The model is AG-MAN on MobileNetV2 with the ImageNet trunk (the copy descriptor and local
features do not depend on the attribute heads). Reports checks/s, ms per query by stage, the
cores the job kept busy (its process's CPU time over wall time), the ingest's images/s, and
the job's verdicts: per query with an original, whether its best match is that original as
``copy``, as ``near_duplicate``, or another product; per query without one, whether anything
was flagged. Prints JSON.

    AGMAN_SHARED_DIR=../shared .venv/bin/python bench/screening.py --refs 1000 --positives 360 --negatives 240
    AGMAN_SHARED_DIR=../shared .venv/bin/python bench/screening.py ... --workers 1,2   # and on workers
    AGMAN_SHARED_DIR=../shared .venv/bin/python bench/screening.py ... --workers 1 --prefork 2
    AGMAN_SHARED_DIR=../shared .venv/bin/python bench/screening.py ... --local 2   # the default on 2 cores
    AGMAN_SHARED_DIR=../shared .venv/bin/python bench/screening.py ... --local 2 \
        --milvus-server http://127.0.0.1:19530   # and against a Milvus server
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

# bench/ is on sys.path when this runs as a script
from copydetect import content_key, load, print_report, shared_dir

from agman_milvus.core.copy_edits import random_edit
from agman_milvus.core.model import build_model
from agman_milvus.core.model.checkpoint import save_checkpoint
from agman_milvus.core.schema import AttributeSchema


def screen_job(queries_file: Path, worker_pids: list[int], single: list[str]) -> dict:
    """The screening process: a warm-up, then the timed job over the queries in
    ``queries_file`` (JSON list of paths); returns the job's status, seconds, CPU seconds,
    per-stage seconds and each query's rank-1 match. In process (no ``worker_pids``) the
    stages are timed by wrapping the checker's methods (of this process: not of the job's
    child processes) and the CPU time is this process's and its children's; on workers, the
    CPU time is theirs. Then each of ``single`` checked alone (``check_copy``), as a user waits
    for one: its seconds, by query."""
    from agman_milvus import Client
    from agman_milvus.services.embedding import Embedder
    from agman_milvus.services.store.vectors import VectorStore
    from agman_milvus.usecases.copyright import CopyChecker

    queries = json.loads(queries_file.read_text(encoding="utf-8"))
    spent: dict[str, float] = defaultdict(float)

    def timed(owner: type, name: str, label: str) -> None:
        inner = getattr(owner, name)

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t0

        setattr(owner, name, wrapper)

    def cpu() -> float:
        if worker_pids:
            return sum(_cpu_seconds(pid) for pid in worker_pids)
        ended = resource.getrusage(resource.RUSAGE_CHILDREN)  # the job's child processes, reaped
        running = sum(_cpu_seconds(c) for c in _children(os.getpid()))  # and those still exiting
        return time.process_time() + ended.ru_utime + ended.ru_stime + running

    timed(CopyChecker, "score_candidates", "stage1")
    timed(Embedder, "encode", "stage1_embed")
    timed(CopyChecker, "_verify_first", "stage1_first_candidate_verified")
    timed(CopyChecker, "_voted", "stage1_voting")
    timed(VectorStore, "search_keypoints", "stage1_voting_search")
    timed(CopyChecker, "verify_scored", "stage2_verify")
    timed(CopyChecker, "_decide", "decide")
    with Client() as client:
        if worker_pids:  # every worker process (a prefork pool's each) loads its model on its first chunk
            processes = sum(max(1, len(_children(pid))) for pid in worker_pids)
            client.screen(queries[:2 * processes], chunk_size=1).wait(timeout=600)
        else:
            client.check_copy(queries[0])
        spent.clear()
        t0, cpu0 = time.perf_counter(), cpu()
        job = client.screen(queries).wait(timeout=7200)
        seconds, cpu_seconds = time.perf_counter() - t0, cpu() - cpu0
        stages = dict(spent)  # the job's alone
        best = {m.query_ref: {"verdict": m.verdict, "product_id": (m.evidence or {}).get("product_id")}
                for m in job.matches() if (m.evidence or {}).get("rank") == 1}
        alone = {}
        for query in single:
            t0 = time.perf_counter()
            client.check_copy(query)
            alone[query] = time.perf_counter() - t0
    return {"status": job.status, "seconds": seconds, "cpu_seconds": cpu_seconds, "stages": stages,
            "best": best, "single_check_seconds": alone}


def single_check_ms(seconds: dict[str, float], truth: dict[str, set[str]]) -> dict[str, Any]:
    """Median and 90th percentile of a check alone, in ms: every query, those with an original
    and those without."""
    def summary(values: list[float]) -> dict[str, Any]:
        if not values:
            return {"checks": 0}
        ms = 1000 * np.asarray(values)
        return {"checks": len(ms), "median": round(float(np.median(ms)), 1),
                "p90": round(float(np.percentile(ms, 90)), 1)}

    return {"all": summary(list(seconds.values())),
            "with_original": summary([s for q, s in seconds.items() if truth[q]]),
            "without_original": summary([s for q, s in seconds.items() if not truth[q]])}


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads) and of its running child
    processes (a prefork worker's pool), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return own + sum(_cpu_seconds(c) for c in _children(pid))


def _children(pid: int) -> set[int]:
    """The running child processes of ``pid``, from /proc."""
    return {int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _wait(ready: Any, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:g} s")
        time.sleep(0.2)


@contextmanager
def worker_stack(env: dict[str, str], workers: int, logs: Path,
                 prefork: int = 0) -> Iterator[tuple[dict[str, str], list[int]]]:
    """``agman milvus-serve`` over the data directory and ``workers`` ``agman worker``
    processes on queue ``agman.default`` (Redis at 127.0.0.1:6379, keys under a fresh prefix),
    each with ``-P prefork -c prefork`` when ``prefork`` is given; yields the environment that
    reaches them and the workers' PIDs; stops them by PID and deletes the Redis keys they made."""
    import redis

    agman = str(Path(sys.executable).with_name("agman"))
    port, broker, prefix = _free_port(), "redis://127.0.0.1:6379/0", f"agman-bench-{uuid.uuid4().hex[:8]}:"
    env = {**env, "AGMAN_MILVUS_URI": f"http://127.0.0.1:{port}", "AGMAN_BROKER_URL": broker,
           "AGMAN_BROKER_KEY_PREFIX": prefix}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        procs.append(subprocess.Popen([agman, "milvus-serve", "--port", str(port)], env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait(lambda: _port_open(port), "milvus-serve")
        for n in range(workers):
            log = logs / f"worker-{workers}-{prefork}-{n}.log"
            pool = ["-P", "prefork", "-c", str(prefork)] if prefork else []
            with open(log, "wb") as fh:
                procs.append(subprocess.Popen(
                    [agman, "worker", "-Q", "agman.default", "-n", f"bench{n}@%h", "--no-compile", *pool],
                    env=env, stdout=fh, stderr=subprocess.STDOUT))
            _wait(lambda log=log: " ready." in log.read_text(errors="replace"), f"worker {n}")
        yield env, [p.pid for p in procs[1:]]
    finally:
        for proc in reversed(procs):
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        keys = redis.Redis.from_url(broker)
        for key in keys.scan_iter(match=f"{prefix}*"):
            keys.delete(key)


def _drop_prefixed(uri: str, prefix: str) -> None:
    """Drop the aliases and collections a run left under ``prefix`` in the Milvus at ``uri``."""
    from pymilvus import MilvusClient

    client = MilvusClient(uri=uri)
    for alias in client.list_aliases().get("aliases", []):
        if alias.startswith(prefix + "_"):
            client.drop_alias(alias)
    for name in client.list_collections():
        if name.startswith(prefix + "_"):
            client.drop_collection(name)
    client.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--refs", type=int, default=1000)
    ap.add_argument("--positives", type=int, default=360)
    ap.add_argument("--negatives", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--workers", default="",
                    help="also run the job on this many agman worker processes, e.g. 1,2")
    ap.add_argument("--prefork", default="",
                    help="also run the job on one agman worker -P prefork -c N for each N, e.g. 2")
    ap.add_argument("--local", default="",
                    help="also run the job without workers on N child processes for each N, e.g. 2")
    ap.add_argument("--milvus-server", default="",
                    help="also ingest the references into this Milvus server (collections under a fresh "
                         "prefix, dropped at the end) and run the job against it, in the thread and on "
                         "each --local count, e.g. http://127.0.0.1:19530")
    ap.add_argument("--single", type=int, default=40,
                    help="after the thread's job, check this many queries alone (half with an original, "
                         "half without) and report the latency a user waits for one check")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--screen-job", type=Path, help=argparse.SUPPRESS)  # the screening process
    ap.add_argument("--worker-pids", default="", help=argparse.SUPPRESS)
    ap.add_argument("--single-queries", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.screen_job:
        pids = [int(p) for p in args.worker_pids.split(",") if p]
        single = json.loads(args.single_queries.read_text(encoding="utf-8")) if args.single_queries else []
        print(json.dumps(screen_job(args.screen_job, pids, single)))
        return 0
    #: (label, worker processes, prefork pool size or 0)
    stacks = [(str(int(n)), int(n), 0) for n in args.workers.split(",") if n]
    stacks += [(f"prefork {int(n)}", 1, int(n)) for n in args.prefork.split(",") if n]
    local = [int(n) for n in args.local.split(",") if n]
    shared = shared_dir()
    if shared is None:
        print("no shared data (set AGMAN_SHARED_DIR)", file=sys.stderr)
        return 2
    root = shared / "data" / "fashion-products"
    rows = list(csv.DictReader(open(root / "manifest.csv", encoding="utf-8")))
    rng = random.Random(args.seed)
    rng.shuffle(rows)
    refs, outside = rows[:args.refs], rows[args.refs:args.refs + args.negatives]
    backdrops = rows[args.refs + args.negatives:]

    with tempfile.TemporaryDirectory(prefix="screening-bench-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "AGMAN_DATA_DIR": str(work / "data"),
               "AGMAN_CHECKPOINT": str(work / "model.safetensors")}
        for name in ("AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL", "AGMAN_BROKER_URL"):
            env.pop(name, None)
        schema = AttributeSchema.from_dict({"articleType": 2, "baseColour": 2})
        save_checkpoint(build_model("agman", schema=schema, backbone="mobilenet_v2",
                                    pretrained="imagenet", image_size=args.image_size),
                        work / "model.safetensors")
        manifest = work / "refs.csv"
        with open(manifest, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["file", "id"])
            writer.writeheader()
            writer.writerows({"file": str(root / r["file"]), "id": r["id"]} for r in refs)

        agman = str(Path(sys.executable).with_name("agman"))
        t0 = time.perf_counter()
        subprocess.run([agman, "ingest", str(manifest)], env=env, check=True, stdout=subprocess.DEVNULL)
        ingest_s = time.perf_counter() - t0

        ids_by_key: dict[str, set[str]] = {}
        for r in refs:
            ids_by_key.setdefault(content_key(load(root, r)), set()).add(r["id"])
        queries, truth, edits = [], {}, {}
        for n, src_row in enumerate(refs[:args.positives] + outside):
            src = load(root, src_row)
            edited, names = random_edit(src, rng, background=load(root, rng.choice(backdrops)))
            path = work / "queries" / f"q{n:04d}.png"
            path.parent.mkdir(exist_ok=True)
            edited.save(path)
            queries.append(str(path))
            truth[str(path)], edits[str(path)] = ids_by_key.get(content_key(src), set()), names
        (work / "queries.json").write_text(json.dumps(queries), encoding="utf-8")
        half = args.single // 2  # the first queries have an original, the last ones none
        single = queries[1:1 + args.single - half] + queries[len(queries) - half:]
        (work / "single.json").write_text(json.dumps(single), encoding="utf-8")

        def run_job(job_env: dict[str, str], pids: list[int], *extra: str) -> dict:
            done = subprocess.run([sys.executable, __file__, "--screen-job", str(work / "queries.json"),
                                   "--worker-pids", ",".join(map(str, pids)), *extra],
                                  env=job_env, check=True, capture_output=True, text=True)
            return json.loads(done.stdout.strip().splitlines()[-1])

        job = run_job({**env, "AGMAN_SCREEN_PROCESSES": "1"}, [],
                      "--single-queries", str(work / "single.json"))
        on_local = {str(n): run_job({**env, "AGMAN_SCREEN_PROCESSES": str(n)}, []) for n in local}
        on_workers = {}
        for label, count, prefork in stacks:
            with worker_stack(env, count, work, prefork) as (stack_env, pids):
                on_workers[label] = run_job(stack_env, pids)
        on_server = {}
        if args.milvus_server:
            prefix = f"bench{uuid.uuid4().hex[:10]}"
            server_env = {**env, "AGMAN_DATA_DIR": str(work / "server-data"),
                          "AGMAN_MILVUS_URI": args.milvus_server, "AGMAN_COLLECTION_PREFIX": prefix}
            try:
                subprocess.run([agman, "ingest", str(manifest)], env=server_env, check=True,
                               stdout=subprocess.DEVNULL)
                on_server["thread"] = run_job({**server_env, "AGMAN_SCREEN_PROCESSES": "1"}, [])
                for n in local:
                    on_server[f"local {n}"] = run_job({**server_env, "AGMAN_SCREEN_PROCESSES": str(n)}, [])
            finally:
                _drop_prefixed(args.milvus_server, prefix)

    with_original = [q for q in queries if truth[q]]
    without = [q for q in queries if not truth[q]]

    def verdicts(best: dict[str, dict]) -> dict[str, Any]:
        """``best``: query -> its rank-1 match, when flagged."""
        def is_found(q: str, kinds: tuple[str, ...]) -> bool:
            return q in best and best[q]["verdict"] in kinds and best[q]["product_id"] in truth[q]

        def found(qs: list[str], kinds: tuple[str, ...] = ("copy", "near_duplicate")) -> float:
            return round(sum(is_found(q, kinds) for q in qs) / max(1, len(qs)), 3)

        def flagged(qs: list[str], kinds: tuple[str, ...] = ("copy", "near_duplicate")) -> float:
            return round(sum(q in best and best[q]["verdict"] in kinds for q in qs) / max(1, len(qs)), 3)

        copies = [q for q in queries if q in best and best[q]["verdict"] == "copy"]
        per_edit = {}
        for kind in sorted({k for names in edits.values() for k in names}):
            qs = [q for q in with_original if kind in edits[q]]
            per_edit[kind] = {"queries_with_original": len(qs), "copy_recall": found(qs, ("copy",)),
                              "flagged_recall": found(qs)}
        return {
            "copy_precision": round(sum(is_found(q, ("copy",)) for q in copies) / max(1, len(copies)), 3),
            "copy_recall": found(with_original, ("copy",)),
            "flagged_recall": found(with_original),
            "with_original_wrong_product_flagged": round(flagged(with_original) - found(with_original), 3),
            "without_original_called_copy": flagged(without, ("copy",)),
            "without_original_flagged": flagged(without),
        }, per_edit

    n = len(queries)
    job_verdicts, per_edit = verdicts(job["best"])

    def beside_thread(run: dict) -> dict[str, Any]:
        """A run of the job elsewhere (child processes, workers) beside the thread's."""
        return {"job_status": run["status"], "checks_per_s": round(n / run["seconds"], 2),
                "checks_per_s_vs_thread": round(job["seconds"] / run["seconds"], 2),
                "job_seconds": round(run["seconds"], 1),
                "cores_busy": round(run["cpu_seconds"] / run["seconds"], 2),
                "verdicts": verdicts(run["best"])[0]}

    report = {
        "refs": len(refs), "queries": n, "queries_with_original": len(with_original),
        "image_size": args.image_size, "seed": args.seed, "job_status": job["status"],
        "checks_per_s": round(n / job["seconds"], 2),
        "ms_per_query": {k: round(1000 * v / n, 1) for k, v in sorted(job["stages"].items())},
        "job_seconds": round(job["seconds"], 1),
        "job_cores_busy": round(job["cpu_seconds"] / job["seconds"], 2),
        "ingest_images_per_s": round(len(refs) / ingest_s, 2),
        "verdicts": job_verdicts,
        "per_edit": per_edit,
        "single_check_ms": single_check_ms(job["single_check_seconds"], truth),
        "local_processes": {label: beside_thread(w) for label, w in on_local.items()},
        "on_workers": {label: beside_thread(w) for label, w in on_workers.items()},
        "milvus_server": {label: beside_thread(w) for label, w in on_server.items()},
        "command": "python bench/screening.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
