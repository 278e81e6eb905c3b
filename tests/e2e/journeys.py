"""What a user does with a deployment, step by step, each step a new process.

Every deployment's test module runs these in order (ingest first; the model upgrade last,
because it changes the active model version).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import AGMAN, Catalogue, Deployment

QUERY = "sku-dress-green-1"
OTHER = "sku-shoe-yellow-2"


def database_commands(d: Deployment) -> None:
    """``agman db upgrade`` then ``agman db current`` (at head), and ``agman models``."""
    d.run("db", "upgrade")
    current = d.run("db", "current").stdout
    revisions = re.findall(r"^(current|head):\s+(\S+)", current, re.M)
    assert len(revisions) == 2 and revisions[0][1] == revisions[1][1], current
    models = d.run("models").stdout
    for name in ("agman", "asen_v2", "global"):
        assert name in models


def ingest(d: Deployment, cat: Catalogue) -> None:
    """``agman ingest`` indexes everything; a second run resumes and redoes nothing."""
    first = d.json("ingest", str(cat.manifest), "--json", "--timeout", "300")
    assert (first["total"], first["indexed"], first["failed"], first["pending"]) == (
        len(cat.products),
        len(cat.products),
        0,
        0,
    ), first
    again = d.json("ingest", str(cat.manifest), "--json", "--timeout", "300")
    assert again["already_indexed"] == len(cat.products) and again["dispatched"] == 0, again


def search(d: Deployment, cat: Catalogue, tmp: Path) -> None:
    """Attribute search finds the query's own product first, filters hold, --html writes a page."""
    for product in (QUERY, OTHER):
        hits = d.json("search", str(cat.image(product)), "-a", "colour", "-k", "3", "--json")
        assert hits and hits[0]["product_id"] == product, hits
        assert hits[0]["score"] > 0.99
    filtered = d.json("search", str(cat.image(QUERY)), "-a", "category", "-k", "30",
                      "-f", "category=shoe", "-f", "brand=acme,zenith", "--json")
    assert len(filtered) == 8 and {h["metadata"]["category"] for h in filtered} == {"shoe"}, filtered
    page = tmp / "search.html"
    d.run("search", str(cat.image(QUERY)), "-a", "colour", "-k", "4", "--html", str(page))
    html = page.read_text()
    assert QUERY in html and html.count("<img") >= 5  # the query and its four hits


def check_copy(d: Deployment, cat: Catalogue) -> None:
    """A pixel copy of a catalogue photo is called a copy of its product."""
    page = d.cwd / "check-copy.html"
    check = d.json("check-copy", str(cat.image(OTHER)), "--json", "--html", str(page))
    assert check["verdict"] == "copy", check
    assert check["matches"][0]["product_id"] == OTHER
    assert check["matches"][0]["verification"]["residual"] < 0.1, check["matches"][0]
    html = page.read_text()  # query and match side by side, the matched region and inliers drawn
    assert OTHER in html and re.search(r'<img src="data:image/jpeg;base64,[^"]+" alt="query \(left\)', html)


def python_api(d: Deployment, cat: Catalogue) -> None:
    """The Client and the embedding function, from a new Python process."""
    out = d.python(
        "import json, sys\n"
        "from agman_milvus import AgmanEmbeddingFunction, Client\n"
        "client = Client()\n"
        "hits = client.search(sys.argv[1], 'colour', top_k=3)\n"
        "similar = client.search_similar(sys.argv[2], 'category', top_k=5)\n"
        "vectors = AgmanEmbeddingFunction().encode_queries([sys.argv[1]], 'colour')\n"
        "print(json.dumps({'top': hits[0].product_id, 'similar': [h.product_id for h in similar],\n"
        "                  'dim': len(vectors[0])}))\n",
        str(cat.image(QUERY)), QUERY,
    )
    result = json.loads(out.strip().splitlines()[-1])
    assert result["top"] == QUERY
    assert len(result["similar"]) == 5 and QUERY not in result["similar"]
    assert result["dim"] == 512


def screen(d: Deployment, cat: Catalogue, tmp: Path) -> None:
    """A screening job over a folder (on workers when there are some) with all three reports."""
    folder = tmp / "uploads"
    folder.mkdir()
    for product in (QUERY, OTHER):
        (folder / cat.products[product]["file"]).write_bytes(cat.image(product).read_bytes())
    reports = [tmp / f"screening.{suffix}" for suffix in ("json", "html", "csv")]
    d.run("screen", str(folder), *[arg for r in reports for arg in ("-o", str(r))], "--timeout", "300",
          "--chunk-size", "1")  # two chunks: on workers, two tasks
    report = json.loads(reports[0].read_text())
    assert report["status"] == "done" and report["done"] == report["total"] == 2, report
    best: dict[str, dict] = {}
    for match in report["matches"]:
        if match["query"] not in best or match["score"] > best[match["query"]]["score"]:
            best[match["query"]] = match
    assert {(m["product_id"], m["verdict"]) for m in best.values()} == {(QUERY, "copy"), (OTHER, "copy")}
    assert QUERY in reports[1].read_text() and QUERY in reports[2].read_text()


def screen_resumed(d: Deployment, cat: Catalogue, tmp: Path) -> None:
    """On the embedded default: ``agman screen`` killed in the middle of its job, then ``agman
    screen --job N`` in a new process goes on from the last committed query and reports every
    query once; ``--no-wait`` is refused (the job would die with the command)."""
    folder = tmp / "uploads"
    folder.mkdir()
    for product in cat.products:
        (folder / cat.products[product]["file"]).write_bytes(cat.image(product).read_bytes())
    refused = d.run("screen", str(folder), "--no-wait", ok=False)
    assert refused.returncode == 2 and "--no-wait needs workers" in refused.stderr, refused.stderr
    first = subprocess.Popen([str(AGMAN), "screen", str(folder), "--chunk-size", "1"], cwd=d.cwd,
                             env=d.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        line = first.stdout.readline() if first.stdout else ""
        started = re.match(r"screening job (\d+): (\d+) images", line)
        assert started, (line, first.stderr.read() if first.poll() is not None and first.stderr else "")
        job_id, total = int(started[1]), int(started[2])
        database = Path(d.env["AGMAN_DATA_DIR"]) / "catalog.sqlite"
        deadline, done = time.monotonic() + 300, 0
        while done == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
                done = db.execute("SELECT done FROM screening_jobs WHERE id = ?", (job_id,)).fetchone()[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)  # its whole session
        first.wait()
    assert first.returncode == -signal.SIGKILL and 0 < done < total, (first.returncode, done, total)
    report = tmp / "resumed.json"
    out = d.run("screen", "--job", str(job_id), "-o", str(report), "--timeout", "300").stdout
    assert re.search(rf"screening job {job_id}: (running|done), \d+/{total} images", out), out
    result = json.loads(report.read_text())
    assert result["status"] == "done" and result["done"] == result["total"] == total, result
    pairs = [(m["query"], m["product_id"]) for m in result["matches"]]
    assert len(pairs) == len(set(pairs)), "a query's match recorded twice"
    assert len({query for query, _ in pairs}) == total  # every upload is a catalogue photo
    listed = [json.loads(line) for line in d.run("screen", "--list").stdout.splitlines()]
    assert listed[0]["id"] == job_id and listed[0]["status"] == "done", listed


def calibrate(d: Deployment) -> None:
    """``agman calibrate`` on the user's own catalogue stores calibrated thresholds."""
    result = d.json("calibrate", "--sample", "24")
    assert result["thresholds"]["calibrated"] is True and result["queries"] == 48, result
    assert 0 <= result["copy_recall"] <= 1 and 0 <= result["copy_precision"] <= 1, result


def reconcile(d: Deployment, cat: Catalogue) -> None:
    """A clean deployment reports clean; a vector removed behind its back is found and repaired."""
    report = d.json("reconcile", "--dry-run")
    assert report["clean"] is True, report
    d.python(
        "import sys\n"
        "from agman_milvus import Client\n"
        "services = Client().services\n"
        "product = services.catalog.products.get(sys.argv[1])\n"
        "services.vectors.delete_product(product.id)\n",
        QUERY,
    )
    drift = d.json("reconcile", "--dry-run")
    assert drift["clean"] is False and drift["missing_vectors"] == 1, drift
    repaired = d.json("reconcile")
    assert repaired["reembedded"] == 1, repaired
    assert d.json("reconcile", "--dry-run")["clean"] is True


def reindex(d: Deployment, cat: Catalogue) -> None:
    """The model upgrade: fill the new version, switch, then search with the new checkpoint."""
    report = d.json("reindex", "--checkpoint", str(cat.new_checkpoint), "--json")
    assert report["activated"] is True and report["embedded"] == len(cat.products), report
    new = {"AGMAN_CHECKPOINT": str(cat.new_checkpoint)}
    hits = d.json("search", str(cat.image(QUERY)), "-a", "colour", "-k", "3", "--json", env=new)
    assert hits[0]["product_id"] == QUERY
    assert d.json("reconcile", "--dry-run", env=new)["clean"] is True


def one_line_errors(d: Deployment, cat: Catalogue) -> None:
    """Known errors print one line on stderr and exit 2, without a traceback."""
    cases = [
        ("search", str(cat.image(QUERY)), "-a", "sleeve_length"),
        ("search", str(cat.image(QUERY)), "-a", "colour", "-f", "material=silk"),
        ("search", "/nonexistent/query.jpg", "-a", "colour"),
        ("check-copy", "/nonexistent/query.jpg"),
        ("screen", "--job", "999999"),
    ]
    for args in cases:
        proc = d.run(*args, ok=False)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, (args, proc.returncode, proc.stderr)
        assert len(lines) == 1 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert lines[0].startswith("error: "), lines
