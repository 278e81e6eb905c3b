"""The HTML reports from the Jinja2 templates: escaping, inlined thumbnails, missing images, pages
of a long report, and a template value the caller forgot (an error, not an empty string)."""

from __future__ import annotations

import base64
import dataclasses
import io
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest
from jinja2 import UndefinedError
from PIL import Image

from agman_milvus.usecases.rendering import render_page, thumbnail_data_uri
from agman_milvus.usecases.reports import ReportRow, ScreeningReport, report_html, search_page_html

EVIL = '<script>alert("x")</script> & co'


class _Text(HTMLParser):
    """The page's text nodes, tags and image sources."""

    def __init__(self, page: str) -> None:
        super().__init__()
        self.text: list[str] = []
        self.tags: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.feed(page)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        if tag == "a":
            self.links.append(dict(attrs).get("href") or "")

    def handle_data(self, data: str) -> None:
        self.text.append(data)


@pytest.fixture
def photos(tmp_path: Path) -> list[Path]:
    paths = []
    for n, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        paths.append(tmp_path / f"photo{n}.png")
        Image.new("RGB", (300, 200), colour).save(paths[-1])
    return paths


def test_thumbnail_is_an_inline_jpeg_that_fits_the_size() -> None:
    uri = thumbnail_data_uri(Image.new("RGBA", (300, 200), (1, 2, 3, 4)), 100)
    assert uri.startswith("data:image/jpeg;base64,")
    thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert thumb.format == "JPEG" and thumb.size == (100, 67)


def test_screening_report_escapes_text_and_inlines_both_thumbnails(photos: list[Path]) -> None:
    rows = [
        ReportRow(query=str(photos[0]), verdict="copy", score=0.97, product_id=EVIL, image_id=1, title=EVIL,
                  descriptor_similarity=0.98, phash_distance=None,
                  attributes={"colour": {"similarity": 0.9, "threshold": 0.8, "agrees": True}},
                  match_source=str(photos[1])),
        ReportRow(query="/nowhere/" + EVIL, verdict="error", score=0.0, product_id=None, image_id=None,
                  error=EVIL),
    ]
    report = ScreeningReport(job_id=3, status="done", done=2, total=2, created_at=None, finished_at=None,
                             error=EVIL, rows=rows)
    page = report_html(report, lambda ref: Image.open(ref))
    parsed = _Text(page)
    assert "<script>" not in page and "script" not in parsed.tags
    assert sum(EVIL in t for t in parsed.text) >= 4  # error, product, title, missing query, row error
    assert len(parsed.images) == 2 and all(s.startswith("data:image/jpeg;base64,") for s in parsed.images)
    text = " ".join(" ".join(parsed.text).split())
    assert "1 copy and 0 near-duplicate matches" in text and "pHash distance -" in text
    assert "colour: agrees (0.900 vs 0.800)" in text and "image unavailable" in text
    assert "http" not in page


def test_a_pixelated_match_says_its_blocks_were_smoothed_away(photos: list[Path]) -> None:
    verification = {"method": "dense", "coverage": 0.98, "residual": 0.4, "colour_residual": 0.1,
                    "smoothed_score": 0.87}
    row = ReportRow(query=str(photos[0]), verdict="near_duplicate", score=0.52, product_id="p1", image_id=1,
                    descriptor_similarity=0.7, phash_distance=20, match_source=str(photos[1]),
                    verification=verification)
    report = ScreeningReport(job_id=5, status="done", done=1, total=1, created_at=None, finished_at=None,
                             error=None, rows=[row])
    text = " ".join(" ".join(_Text(report_html(report, lambda ref: Image.open(ref))).text).split())
    assert "pixelated 0.870 with the blocks smoothed away (a copy only if no other photo is near)" in text
    plain_verification = {**verification, "smoothed_score": 0.0}
    plain = ScreeningReport(job_id=6, status="done", done=1, total=1, created_at=None, finished_at=None,
                            error=None, rows=[dataclasses.replace(row, verification=plain_verification)])
    assert "smoothed away" not in report_html(plain, lambda ref: Image.open(ref))


def test_empty_screening_report_says_so() -> None:
    report = ScreeningReport(job_id=4, status="done", done=1, total=1, created_at=None, finished_at=None,
                             error=None, rows=[])
    page = report_html(report)
    assert "No copies or near-duplicates were found." in page and "<table" not in page


def test_search_page_escapes_ids_and_metadata_and_notes_missing_images(photos: list[Path]) -> None:
    hits = [SimpleNamespace(product_id=EVIL, score=0.91234, source_uri=str(photos[1]),
                            metadata={"title": EVIL, "colour": "red", "empty": "", "none": None}),
            SimpleNamespace(product_id="p2", score=0.5, source_uri="/nowhere/x.jpg", metadata={})]
    page = search_page_html(Image.open(photos[0]), "colour", hits, lambda ref: Image.open(ref))
    parsed = _Text(page)
    assert "script" not in parsed.tags
    assert len(parsed.images) == 2  # the query and the first hit; the second is gone
    text = " ".join(" ".join(parsed.text).split())
    assert "Search by colour" in text and "0.9123" in text and f"title: {EVIL}" in text
    assert "empty:" not in text and "none:" not in text
    assert "image unavailable (/nowhere/x.jpg)" in text


def test_a_value_the_template_needs_but_was_not_given_is_an_error() -> None:
    with pytest.raises(UndefinedError, match="attribute"):
        render_page("search_results.html", title="t", query_thumbnail=None, hits=[])


def test_a_long_report_is_written_in_linked_pages(tmp_path: Path) -> None:
    """A job with thousands of flagged rows stays readable: pages of ``rows_per_page`` matches,
    each with the whole job's summary and links to the others."""
    from agman_milvus.usecases.reports import write_html

    rows = [ReportRow(query=f"upload-{n:03d}.jpg", verdict="copy" if n % 2 else "near_duplicate", score=0.9,
                      product_id=f"p{n}", image_id=n) for n in range(250)]
    report = ScreeningReport(job_id=7, status="done", done=250, total=250, created_at=None, finished_at=None,
                             error=None, rows=rows)
    first = write_html(report, tmp_path / "report.html", rows_per_page=100)
    assert first == tmp_path / "report.html"
    pages = ["report.html", "report-2.html", "report-3.html"]
    assert sorted(p.name for p in tmp_path.glob("report*")) == sorted(pages)
    for number, name in enumerate(pages, start=1):
        parsed = _Text((tmp_path / name).read_text(encoding="utf-8"))
        text = " ".join(" ".join(parsed.text).split())
        assert "125 copy and 125 near-duplicate matches" in text and f"Page {number} of 3" in text
        shown = [t for t in parsed.text if t.startswith("upload-")]
        assert shown == [f"upload-{n:03d}.jpg" for n in range(100 * (number - 1), min(250, 100 * number))]
        assert parsed.links == [page for page in pages if page != name] * 2  # above and below the table
    write_html(dataclasses.replace(report, rows=rows[:10]), tmp_path / "short.html", rows_per_page=100)
    assert not _Text((tmp_path / "short.html").read_text(encoding="utf-8")).links
    assert [p.name for p in tmp_path.glob("short*")] == ["short.html"]


def test_a_shorter_report_removes_the_pages_a_longer_one_left(tmp_path: Path) -> None:
    """Writing a report again over a longer one leaves no stale pages behind (only pages this
    package wrote: a user's own file of that name stays), and the CLI counts the pages."""
    from agman_milvus.app.commands.copyright import written
    from agman_milvus.usecases.reports import html_pages, write_html

    rows = [ReportRow(query=f"q{n}.jpg", verdict="copy", score=0.9, product_id=f"p{n}", image_id=n)
            for n in range(25)]
    report = ScreeningReport(job_id=3, status="done", done=25, total=25, created_at=None, finished_at=None,
                             error=None, rows=rows)
    path = tmp_path / "report.html"
    write_html(report, path, rows_per_page=5)
    assert [p.name for p in html_pages(path)] == ["report.html"] + [f"report-{n}.html" for n in range(2, 6)]
    assert written(path) == f"{path} and 4 linked pages (report-2.html ... report-5.html)"
    (tmp_path / "report-6.html").write_text("<p>the user's own page</p>", encoding="utf-8")
    write_html(dataclasses.replace(report, rows=rows[:8]), path, rows_per_page=5)
    left = ["report-2.html", "report-6.html", "report.html"]
    assert sorted(p.name for p in tmp_path.glob("report*")) == left
    assert written(path) == f"{path} and 1 linked page (report-2.html)"
    write_html(dataclasses.replace(report, rows=[]), path, rows_per_page=5)
    assert sorted(p.name for p in tmp_path.glob("report*")) == ["report-6.html", "report.html"]
    assert written(path) == str(path)
    assert written(tmp_path / "missing.json") == str(tmp_path / "missing.json")
