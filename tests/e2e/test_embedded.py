"""The embedded default (Milvus Lite + SQLite, in-process ingest): every step its own process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e import journeys
from tests.e2e.conftest import Catalogue, Deployment, base_env

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def deployment(catalogue: Catalogue, workdir: Path) -> Deployment:
    env = base_env(workdir / "data", catalogue.checkpoint, AGMAN_SCREEN_PROCESSES="2")  # 2 on any machine
    return Deployment("embedded", env, cwd=workdir, asynchronous=False)


def test_database_and_models(deployment: Deployment) -> None:
    journeys.database_commands(deployment)


def test_ingest(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.ingest(deployment, catalogue)


def test_search(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.search(deployment, catalogue, tmp_path)


def test_check_copy(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.check_copy(deployment, catalogue)


def test_python_api(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.python_api(deployment, catalogue)


def test_screen(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.screen(deployment, catalogue, tmp_path)
    database = Path(deployment.env["AGMAN_DATA_DIR"]) / "catalog.sqlite"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        workers = [w for (w,) in db.execute(
            "SELECT worker FROM screening_chunks WHERE job_id = (SELECT max(id) FROM screening_jobs)")]
    assert len(workers) == 2 and all(w.startswith("local-") for w in workers), workers  # child processes


def test_screen_resumed_after_a_kill(deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    journeys.screen_resumed(deployment, catalogue, tmp_path)


def test_calibrate(deployment: Deployment) -> None:
    journeys.calibrate(deployment)


def test_one_line_errors(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.one_line_errors(deployment, catalogue)


def test_reconcile(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reconcile(deployment, catalogue)


def test_reindex(deployment: Deployment, catalogue: Catalogue) -> None:
    journeys.reindex(deployment, catalogue)


def test_unreachable_or_locked_services_are_one_line_errors(deployment: Deployment, catalogue: Catalogue,
                                                             tmp_path: Path) -> None:
    """No model, a database nobody serves, a Milvus Lite directory held by a process that does
    not say where it serves it (plain pymilvus)."""
    image = str(catalogue.image(journeys.QUERY))
    cases = {
        "no model": {"AGMAN_CHECKPOINT": "", "AGMAN_DATA_DIR": str(tmp_path / "empty")},
        "database down": {"AGMAN_DATABASE_URL": "postgresql+psycopg://agman@127.0.0.1:9/agman"},
    }
    for what, env in cases.items():
        proc = deployment.run("search", image, "-a", "colour", ok=False, env=env)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (
            what,
            proc.stderr,
        )
    lite = Path(deployment.env["AGMAN_DATA_DIR"]) / "milvus.db"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom pymilvus import MilvusClient\n"
         f"MilvusClient({str(lite)!r})\nprint('ready', flush=True)\ntime.sleep(120)"],
        env=deployment.env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        proc = deployment.run("search", image, "-a", "colour", ok=False)
        assert proc.returncode == 2 and "in use by another process" in proc.stderr, proc.stderr
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1
    finally:
        holder.kill()
        holder.wait()


def test_a_second_terminal_works_while_a_process_holds_the_catalogue(
        deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    """`agman search`, `agman check-copy` and a screening job run in new processes while another
    agman process (an ingest, a notebook's Client) holds the embedded Milvus Lite: they work over
    the port that process published. Once it closes, the next command opens the directory."""
    image = str(catalogue.image(journeys.QUERY))
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent("""
            import sys
            from agman_milvus import Client
            client = Client()
            client.services.vectors  # opens the embedded Milvus Lite
            print("ready", flush=True)
            sys.stdin.readline()
            client.close()
            print("closed", flush=True)
            sys.stdin.readline()
        """)],
        env=deployment.env, cwd=deployment.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        proc = deployment.run("-v", "search", image, "-a", "colour", "--json")
        assert f"open in process {holder.pid}" in " ".join(proc.stderr.split()), proc.stderr[-2000:]
        assert json.loads(proc.stdout)[0]["product_id"] == journeys.QUERY
        check = deployment.json("check-copy", image, "--json")
        assert check["verdict"] == "copy" and check["matches"][0]["product_id"] == journeys.QUERY
        folder = tmp_path / "uploads"  # four chunks of one: the job's child processes join too
        folder.mkdir()
        for product in list(catalogue.products)[:4]:
            (folder / catalogue.products[product]["file"]).write_bytes(catalogue.image(product).read_bytes())
        report = tmp_path / "screen.json"
        deployment.run("screen", str(folder), "--chunk-size", "1", "-o", str(report), "--timeout", "300")
        screened = json.loads(report.read_text())
        assert screened["status"] == "done" and screened["done"] == 4, screened
        assert {m["product_id"] for m in screened["matches"] if m["verdict"] == "copy"} >= set(
            list(catalogue.products)[:4])
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        proc = deployment.run("-v", "search", image, "-a", "colour")
        assert "open in process" not in proc.stderr  # the directory is free: opened, not joined
    finally:
        holder.kill()
        holder.wait()


def test_a_closed_client_frees_the_embedded_database(deployment: Deployment, catalogue: Catalogue,
                                                     tmp_path: Path) -> None:
    """A notebook's ``with Client()`` block ends while its process lives on: another client of
    that process keeps the embedded Milvus Lite (and a screening job its own run) until the last
    one closes; then ``agman search`` in a terminal can open the directory."""
    image = str(catalogue.image(journeys.QUERY))
    log = tmp_path / "holder.log"  # a file, not a pipe nobody reads while the test waits on stdout
    with log.open("w") as err:  # the child keeps its own copy of the descriptor
        holder = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import sys
                from agman_milvus import Client
                keeper = Client()
                with Client() as first:
                    first.search({image!r}, "colour")
                assert keeper.search({image!r}, "colour")  # the process's other client still works
                print("one closed", flush=True)
                sys.stdin.readline()
                with Client() as screener:
                    job = screener.screen([{image!r}] * 20)
                keeper.close()
                assert job.wait(timeout=300).status == "done", job.error  # it outlived every client
                print("all closed", flush=True)
                sys.stdin.readline()
            """)],
            env=deployment.env, cwd=deployment.cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=err, text=True)
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "one closed", log.read_text()[-3000:]
        proc = deployment.run("-v", "search", image, "-a", "colour")  # over the keeper's port
        assert f"open in process {holder.pid}" in " ".join(proc.stderr.split()), proc.stderr[-2000:]
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "all closed", log.read_text()[-3000:]
        proc = deployment.run("-v", "search", image, "-a", "colour")  # the directory is free: it opens
        assert "open in process" not in proc.stderr
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.wait(timeout=60) == 0, log.read_text()[-3000:]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
