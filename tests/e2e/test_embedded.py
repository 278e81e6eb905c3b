"""The embedded default (Milvus Lite + SQLite, in-process ingest): every step its own process."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.e2e import journeys
from tests.e2e.conftest import AGMAN, Catalogue, Deployment, base_env

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


def _client_holding_the_catalogue(deployment: Deployment) -> subprocess.Popen[str]:
    """A process whose ``Client`` holds the embedded Milvus Lite: it prints "ready", closes the
    client at the next line on its input and prints "closed", then waits for one more line."""
    return subprocess.Popen(
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


def test_a_second_terminal_works_while_a_process_holds_the_catalogue(
        deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    """`agman search`, `agman check-copy` and a screening job run in new processes while another
    agman process (an ingest, a notebook's Client) holds the embedded Milvus Lite: they work over
    the port that process published. Once it closes, the next command opens the directory."""
    image = str(catalogue.image(journeys.QUERY))
    holder = _client_holding_the_catalogue(deployment)
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


def test_a_screening_job_goes_on_when_the_process_it_joined_lets_the_catalogue_go(
        deployment: Deployment, catalogue: Catalogue, tmp_path: Path) -> None:
    """`agman screen` in a second terminal, its children included, works over the port of the
    process holding the catalogue (an ingest, a notebook's Client); when that process closes
    it mid-job, they follow the directory and the job finishes."""
    holder = _client_holding_the_catalogue(deployment)
    folder = tmp_path / "uploads"
    folder.mkdir()
    for n in range(40):  # forty chunks of one, so the holder closes while most are still to run
        image = catalogue.image(list(catalogue.products)[n % len(catalogue.products)])
        (folder / f"{n:02d}-{image.name}").write_bytes(image.read_bytes())
    report, output = tmp_path / "screen.json", tmp_path / "screen.log"
    database = Path(deployment.env["AGMAN_DATA_DIR"]) / "catalog.sqlite"
    screen = None
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        earlier_job = _newest_job(database)[0]
        with open(output, "w") as log:
            screen = subprocess.Popen(
                [str(AGMAN), "screen", str(folder), "--chunk-size", "1", "-o", str(report),
                 "--timeout", "300"],
                env=deployment.env, cwd=deployment.cwd, stdout=log, stderr=subprocess.STDOUT, text=True)
        _wait_for_a_chunk_done_by_a_child(database, earlier_job, screen)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closed"
        assert _newest_job(database)[2] < 40, "the job ended before the holder closed: nothing was tested"
        assert screen.wait(timeout=600) == 0, output.read_text()[-3000:]
        screened = json.loads(report.read_text())
        assert screened["status"] == "done" and screened["done"] == 40, screened
        assert "Traceback" not in output.read_text(), output.read_text()[-3000:]
    finally:
        for proc in (holder, screen):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def _newest_job(database: Path) -> tuple[int, int, int]:
    """The newest screening job's id, its chunks finished by a child process, its queries done."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        row = db.execute(
            "SELECT j.id, (SELECT count(*) FROM screening_chunks c WHERE c.job_id = j.id AND "
            "c.done = c.stop - c.start AND c.worker LIKE 'local-%'), j.done FROM screening_jobs j "
            "ORDER BY j.id DESC LIMIT 1").fetchone()
    return (int(row[0]), int(row[1]), int(row[2])) if row is not None else (0, 0, 0)


def _wait_for_a_chunk_done_by_a_child(database: Path, after_job: int, screen: subprocess.Popen[str]) -> None:
    """Wait until a child has finished a chunk of a job newer than ``after_job``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and screen.poll() is None:
        try:
            job, by_children, _ = _newest_job(database)
            if job > after_job and by_children > 0:
                return
        except sqlite3.OperationalError:  # the database is being created or migrated
            pass
        time.sleep(0.1)
    raise AssertionError(f"no child finished a chunk (screen exit status {screen.poll()})")


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
