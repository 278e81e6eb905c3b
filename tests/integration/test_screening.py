"""Screening jobs through the real Client (background thread, SQLite, Milvus Lite) and the
CSV / JSON / HTML reports, parsed back."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.integration.test_copyright import N, jpeg, photo, require_imagenet
from tests.integration.test_search import make_client

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:  # noqa: F821
    require_imagenet()
    c = make_client(tmp_path_factory.mktemp("screen"), pretrained="imagenet", image_size=96)
    for i in range(N):
        assert c.ingest(f"p{i}", photo(i), {"brand": "acme", "title": f"Product {i}"}).status == "indexed"
    c.calibrate_copy(precision=0.95, sample=N, seed=1)
    yield c
    c.close()


class _Structure(HTMLParser):
    """Collects the match rows of the report: their classes, cells and images."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[dict] = []
        self.title = ""
        self._in_title = False
        self._cell: str | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        a = dict(attrs)
        if tag == "title":
            self._in_title = True
        if tag == "tr" and "match" in (a.get("class") or "").split():
            self.rows.append({"class": a["class"], "cells": {}, "images": []})
        if tag == "td" and self.rows:
            self._cell = a.get("class")
            self.rows[-1]["cells"][self._cell] = ""
        if tag == "img" and self.rows:
            self.rows[-1]["images"].append(a.get("src", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if tag == "td":
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if self._cell and self.rows:
            self.rows[-1]["cells"][self._cell] += data


def test_screening_job_reports_the_right_pairs(client, tmp_path: Path) -> None:
    copy3 = tmp_path / "copy3.jpg"
    jpeg(photo(3).crop((2, 2, 62, 63)).resize((80, 84)), 70).save(copy3)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image at all")
    unrelated = Image.fromarray(np.random.default_rng(5).integers(0, 256, (64, 64, 3), np.uint8))
    copy7 = jpeg(photo(7), 80)  # bytes/PIL go through the blob store
    job = client.screen([copy3, unrelated, broken, copy7], top_k=3)
    job.wait(timeout=240)
    assert job.status == "done" and (job.done, job.total) == (4, 4) and job.progress == 1.0

    report = job.report()
    copies = {(r.query, r.product_id) for r in report.rows if r.verdict == "copy"}
    queries = json.loads(json.dumps([r.query for r in report.rows]))
    blob_ref = next(q for q in queries if q.startswith("blob://"))
    assert (str(copy3), "p3") in copies and (blob_ref, "p7") in copies
    assert not any(r.verdict in ("copy", "near_duplicate") and r.product_id not in ("p3", "p7")
                   for r in report.rows)
    errors = [r for r in report.rows if r.verdict == "error"]
    assert [r.query for r in errors] == [str(broken)] and errors[0].error
    assert len(job.matches()) == len(report.rows)  # every stored match is in the report

    # CSV and JSON
    rows = list(csv.DictReader(open(job.export(tmp_path / "r.csv"), encoding="utf-8")))
    assert {(r["query"], r["product_id"]) for r in rows if r["verdict"] == "copy"} == copies
    assert all(r["attributes_total"] == "2" for r in rows if r["verdict"] == "copy")
    data = json.loads(job.export(tmp_path / "r.json").read_text())
    assert data["job_id"] == job.id and data["status"] == "done" and len(data["matches"]) == len(rows)
    assert {"descriptor_similarity", "phash_distance", "attributes", "verification"} <= set(
        data["matches"][0])
    verified = next(m for m in data["matches"] if m["verdict"] == "copy")["verification"]
    assert verified["residual"] < 0.5 and len(verified["region"]) == 4

    # HTML: one row per match, query and match thumbnails side by side, scores, attributes
    page = _Structure()
    html = job.export(tmp_path / "r.html").read_text()
    page.feed(html)
    assert f"images screened; {len(copies)} copy and" in html
    assert page.title == f"Screening report, job {job.id}"
    assert len(page.rows) == len(report.rows)
    copy_rows = [r for r in page.rows if "copy" in r["class"].split()]
    assert len(copy_rows) == len(copies)
    for row in copy_rows:
        assert set(row["cells"]) == {"query", "catalogue", "verdict", "scores", "evidence", "attributes"}
        thumbs, evidence = row["images"][:2], row["images"][2:]
        assert all(s.startswith("data:image/jpeg;base64,") for s in thumbs)
        assert len(evidence) == 1 and evidence[0].startswith("data:image/jpeg;base64,")
        assert "descriptor" in row["cells"]["scores"] and "pHash distance" in row["cells"]["scores"]
        assert "residual" in row["cells"]["scores"]
        assert "colour" in row["cells"]["attributes"] and "shape" in row["cells"]["attributes"]
        assert row["cells"]["verdict"] == "copy"
    with pytest.raises(ValueError, match="csv, json or html"):
        job.export(tmp_path / "r.xlsx")


def test_screening_job_handle_can_be_reopened_and_is_resumable(client) -> None:
    from agman_milvus.usecases.copyright import CopyChecker
    from agman_milvus.usecases.screening import create_job, run_chunk, run_job

    refs = [str(Path(f"/nonexistent/{name}.jpg")) for name in "abc"]
    job_id = create_job(client.services.catalog, refs, top_k=2, chunk_size=2)
    handle = client.screening_job(job_id)
    assert handle.status == "queued" and handle.done == 0 and handle.total == 3
    checker = CopyChecker.from_services(client.services)
    assert run_chunk(job_id, 2, checker, worker="w@host").done == 1  # the last chunk first
    assert handle.refresh().status == "running"
    run_job(job_id, checker)  # the rest, in this process
    run_job(job_id, checker)  # a redelivered task: nothing duplicated
    run_chunk(job_id, 0, checker)
    handle.refresh()
    assert handle.status == "done" and handle.done == 3 and len(handle.matches()) == 3
    assert sorted(m.query_ref for m in handle.matches()) == refs
    assert {m.verdict for m in handle.matches()} == {"error"}

    twice = create_job(client.services.catalog, [refs[0], refs[0]], top_k=2)
    run_job(twice, checker, batch_size=1)  # one image listed twice, in two batches: both kept
    assert [m.query_ref for m in client.screening_job(twice).matches()] == [refs[0]] * 2


def test_a_stopped_or_failed_job_goes_on_where_it_stopped(client) -> None:
    from agman_milvus.services.store.catalog import JobStatus
    from agman_milvus.usecases.copyright import CopyChecker
    from agman_milvus.usecases.local_screening import resume_in_thread
    from agman_milvus.usecases.screening import create_job, restart_failed, run_chunk

    catalog = client.services.catalog
    checker = CopyChecker.from_services(client.services)
    refs = [str(Path(f"/nonexistent/{name}.jpg")) for name in "abcd"]
    job_id = create_job(catalog, refs, top_k=2, chunk_size=2)
    run_chunk(job_id, 0, checker)  # the first chunk, then its process "ends"
    catalog.screening_jobs.fail(job_id, "OSError: no space left on device")
    handle = client.resume_screening(job_id).wait(timeout=120)
    assert (handle.status, handle.error, handle.done) == ("done", None, 4)
    assert sorted(m.query_ref for m in handle.matches()) == refs  # each query once
    assert resume_in_thread(catalog.screening_jobs.get(job_id), checker) is None  # done: nothing to run

    # for workers: only a failed job's unfinished chunks are sent again
    other = create_job(catalog, refs, top_k=2, chunk_size=2)
    assert restart_failed(catalog, catalog.screening_jobs.get(other)) == []  # queued: with the workers
    run_chunk(other, 2, checker)
    catalog.screening_jobs.fail(other, "RuntimeError: boom")
    assert restart_failed(catalog, catalog.screening_jobs.get(other)) == [0]
    row = catalog.screening_jobs.get(other)
    assert (row.status, row.error) == (JobStatus.running, None)
    newest = client.screening_jobs(limit=2)  # newest first, without their queries
    assert [(j.id, j.status, j.done, j.total) for j in newest] == [(other, "running", 2, 4),
                                                                   (job_id, "done", 4, 4)]
    assert newest[1].to_dict()["finished_at"] and newest[0].to_dict()["finished_at"] is None


def test_cli_inputs_from_directory_and_manifests(tmp_path: Path) -> None:
    import typer

    from agman_milvus.app.commands.copyright import screening_inputs
    from agman_milvus.app.commands.search import parse_filters

    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("b.jpg", "a.PNG", "sub/c.webp", "notes.txt"):
        (tmp_path / "d" / name).write_bytes(b"x")
    assert [Path(p).name for p in screening_inputs(tmp_path / "d")] == ["a.PNG", "b.jpg", "c.webp"]
    (tmp_path / "m.csv").write_text("id,file\n1,d/b.jpg\n2,https://x.test/i.jpg\n")
    assert screening_inputs(tmp_path / "m.csv") == [str(tmp_path / "d/b.jpg"), "https://x.test/i.jpg"]
    (tmp_path / "m.txt").write_text("# queries\nd/a.PNG\n\n")
    assert screening_inputs(tmp_path / "m.txt") == [str(tmp_path / "d/a.PNG")]
    assert parse_filters(["brand=Nike", "colour=Red,Blue"]) == {"brand": "Nike", "colour": ["Red", "Blue"]}
    with pytest.raises(typer.BadParameter):
        parse_filters(["brand"])


def test_a_batch_of_large_photos_is_checked_in_groups_with_the_same_results(
        client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from agman_milvus.usecases import screening
    from agman_milvus.usecases.copyright import CopyChecker

    refs = []
    for i in range(5):
        refs.append(str(tmp_path / f"q{i}.png"))
        jpeg(photo(i), quality=85).save(refs[-1])
    refs.insert(2, str(tmp_path / "missing.png"))
    checker = CopyChecker.from_services(client.services)
    groups: list[int] = []
    check_many = checker.check_many

    def counted(images: list, top_k: int) -> list:
        groups.append(len(images))
        return check_many(images, top_k)

    monkeypatch.setattr(checker, "check_many", counted)
    together = screening._screen_batch(checker, refs, top_k=2)
    monkeypatch.setattr(screening, "GROUP_PIXELS", 2 * 64 * 64)  # two of these 64 px photos
    apart = screening._screen_batch(checker, refs, top_k=2)
    assert groups == [5, 2, 2, 1]
    assert apart == together and {r["verdict"] for r in together} >= {"copy", "error"}
    assert sorted({r["query_ref"] for r in together}) == sorted(refs)  # each query has its rows
