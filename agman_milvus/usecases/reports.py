"""Reports people read: screening reports (CSV, JSON, HTML) and a search result page (HTML).

HTML pages are self-contained: thumbnails are inlined as ``data:`` JPEG URIs and every text
value is escaped. A thumbnail that cannot be read shows as a short note instead.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from agman_milvus.services.store.catalog import Catalog

__all__ = [
    "ReportRow", "ScreeningReport", "ThumbnailLoader", "export_report", "load_screening_report",
    "search_page_html", "thumbnail_data_uri", "write_csv", "write_html", "write_json",
]

log = logging.getLogger(__name__)

ImageLoader = Callable[[str], Image.Image]
THUMB = 160
CSV_FIELDS = ["query", "verdict", "score", "product_id", "image_id", "title",
              "descriptor_similarity", "phash_distance", "attributes_agreeing",
              "attributes_total", "attributes", "match_source"]


@dataclass
class ReportRow:
    """One (query, match) pair of a screening job."""

    query: str
    verdict: str
    score: float
    product_id: str | None
    image_id: int | None
    title: str | None = None
    descriptor_similarity: float | None = None
    phash_distance: int | None = None
    attributes: dict[str, dict[str, Any]] = field(default_factory=dict)
    match_source: str | None = None
    error: str | None = None

    @property
    def attributes_agreeing(self) -> int:
        return sum(bool(a.get("agrees")) for a in self.attributes.values())


@dataclass
class ScreeningReport:
    job_id: int
    status: str
    done: int
    total: int
    created_at: str | None
    finished_at: str | None
    error: str | None
    rows: list[ReportRow]

    def to_dict(self) -> dict[str, Any]:
        return {"job_id": self.job_id, "status": self.status, "done": self.done,
                "total": self.total, "created_at": self.created_at,
                "finished_at": self.finished_at, "error": self.error,
                "matches": [{**asdict(r), "attributes_agreeing": r.attributes_agreeing}
                            for r in self.rows]}


def load_screening_report(catalog: Catalog, job_id: int) -> ScreeningReport:
    """The job and its matches, best first within each query (``JobNotFoundError`` if none)."""
    job, matches = catalog.screening_jobs.get_with_matches(job_id)
    order = {ref: i for i, ref in enumerate(job.params.get("queries", []))}
    rows = []
    for m in matches:
        ev = m.evidence or {}
        rows.append(ReportRow(
            query=m.query_ref, verdict=m.verdict, score=float(m.score),
            product_id=ev.get("product_id"), image_id=m.matched_image_id, title=ev.get("title"),
            descriptor_similarity=ev.get("descriptor_similarity"),
            phash_distance=ev.get("phash_distance"), attributes=ev.get("attributes") or {},
            match_source=ev.get("source_uri"), error=ev.get("error"),
        ))
    rows.sort(key=lambda r: (order.get(r.query, len(order)), -r.score))
    return ScreeningReport(
        job_id=job.id, status=job.status.value, done=job.done, total=job.total,
        created_at=job.created_at.isoformat() if job.created_at else None,
        finished_at=job.finished_at.isoformat() if job.finished_at else None,
        error=job.error, rows=rows,
    )


# -- CSV / JSON --------------------------------------------------------------------------------
def write_csv(report: ScreeningReport, path: Path) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for r in report.rows:
            writer.writerow({
                "query": r.query, "verdict": r.verdict, "score": f"{r.score:.4f}",
                "product_id": r.product_id or "", "image_id": r.image_id or "",
                "title": r.title or "",
                "descriptor_similarity": "" if r.descriptor_similarity is None else f"{r.descriptor_similarity:.4f}",
                "phash_distance": "" if r.phash_distance is None else r.phash_distance,
                "attributes_agreeing": r.attributes_agreeing, "attributes_total": len(r.attributes),
                "attributes": ";".join(f"{k}={'yes' if a.get('agrees') else 'no'}:{a.get('similarity', 0):.3f}"
                                       for k, a in r.attributes.items()) or (r.error or ""),
                "match_source": r.match_source or "",
            })
    return path


def write_json(report: ScreeningReport, path: Path) -> Path:
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return path


# -- thumbnails --------------------------------------------------------------------------------
class ThumbnailLoader:
    """Loads images for thumbnails: paths, URIs and ``blob://`` (through ``load``)."""

    def __init__(self, load: ImageLoader, size: int = THUMB) -> None:
        self._load = load
        self.size = size
        self._cache: dict[str, str | None] = {}

    def __call__(self, ref: str | None) -> str | None:
        if not ref:
            return None
        if ref not in self._cache:
            try:
                self._cache[ref] = thumbnail_data_uri(self._load(ref), self.size)
            except Exception as exc:  # a report must render even when an image is gone
                log.warning("no thumbnail for %s: %s", ref, exc)
                self._cache[ref] = None
        return self._cache[ref]


def thumbnail_data_uri(image: Image.Image, size: int = THUMB) -> str:
    """A small JPEG of ``image`` as a ``data:`` URI."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size))
    buf = io.BytesIO()
    thumb.save(buf, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
table{border-collapse:collapse;width:100%}th,td{border:1px solid #ccc;padding:6px;vertical-align:top}
th{background:#f3f3f3;text-align:left}img{max-width:160px;max-height:160px;display:block}
.copy{background:#fde2e2}.near_duplicate{background:#fff4d6}.error{background:#eee}
.verdict{font-weight:bold}.missing{color:#999;font-style:italic}ul{margin:0;padding-left:18px}
.no{color:#b00}.yes{color:#070}caption{text-align:left;font-size:1.1em;margin-bottom:8px}
"""


def _img(uri: str | None, alt: str) -> str:
    if uri is None:
        return f'<span class="missing">image unavailable ({html.escape(alt)})</span>'
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _page(title: str, body: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def write_html(report: ScreeningReport, path: Path, loader: ImageLoader | None = None) -> Path:
    path.write_text(report_html(report, loader), encoding="utf-8")
    return path


def report_html(report: ScreeningReport, loader: ImageLoader | None = None) -> str:
    """The screening report as one HTML page: query and match side by side, scores, and the
    per-attribute agreement."""
    thumbs = ThumbnailLoader(loader) if loader else (lambda ref: None)
    e = html.escape
    copies = sum(r.verdict == "copy" for r in report.rows)
    near = sum(r.verdict == "near_duplicate" for r in report.rows)
    summary = (f'<p class="summary">Job {report.job_id}: status <b>{e(report.status)}</b>, '
               f"{report.done} of {report.total} images screened; {copies} copy and {near} "
               f"near-duplicate matches.</p>")
    if report.error:
        summary += f'<p class="error">Error: {e(report.error)}</p>'
    head = ("<tr><th>query</th><th>catalogue match</th><th>verdict</th><th>scores</th>"
            "<th>attributes</th></tr>")
    body = []
    for r in report.rows:
        attrs = "".join(
            f'<li class="{"yes" if a.get("agrees") else "no"}">{e(k)}: '
            f'{"agrees" if a.get("agrees") else "differs"} '
            f'({float(a.get("similarity", 0)):.3f} vs {float(a.get("threshold", 0)):.3f})</li>'
            for k, a in r.attributes.items())
        scores = (f"score {r.score:.3f}<br>descriptor {r.descriptor_similarity:.3f}<br>"
                  f"pHash distance {'-' if r.phash_distance is None else r.phash_distance}"
                  if r.descriptor_similarity is not None else e(r.error or ""))
        match = (f"{_img(thumbs(r.match_source), r.match_source or '')}"
                 f"<div>product {e(str(r.product_id))}</div><div>{e(r.title or '')}</div>"
                 if r.image_id is not None else '<span class="missing">-</span>')
        body.append(
            f'<tr class="match {e(r.verdict)}"><td class="query">{_img(thumbs(r.query), r.query)}'
            f"<div>{e(r.query)}</div></td><td class=\"catalogue\">{match}</td>"
            f'<td class="verdict">{e(r.verdict)}</td><td class="scores">{scores}</td>'
            f'<td class="attributes"><ul>{attrs}</ul></td></tr>')
    table = (f'<table class="matches"><caption>Matches</caption><thead>{head}</thead>'
             f"<tbody>{''.join(body)}</tbody></table>")
    if not report.rows:
        table = '<p class="empty">No copies or near-duplicates were found.</p>'
    return _page(f"Screening report, job {report.job_id}", summary + table)


def export_report(report: ScreeningReport, path: Path, fmt: str | None = None,
                  loader: ImageLoader | None = None) -> Path:
    """Write ``report`` as ``csv``, ``json`` or ``html`` (default: from the file suffix)."""
    fmt = (fmt or path.suffix.lstrip(".")).lower()
    if fmt == "csv":
        return write_csv(report, path)
    if fmt == "json":
        return write_json(report, path)
    if fmt in ("html", "htm"):
        return write_html(report, path, loader)
    raise ValueError(f"unknown report format {fmt!r}; use csv, json or html")


# -- search page -----------------------------------------------------------------------------
def search_page_html(query: Image.Image, attribute: str, hits: Sequence[Any],
                     loader: ImageLoader | None = None, title: str | None = None) -> str:
    """A result page: the query image, then each hit's thumbnail, product id, score, metadata."""
    thumbs = ThumbnailLoader(loader) if loader else (lambda ref: None)
    e = html.escape
    cells = []
    for rank, hit in enumerate(hits, start=1):
        meta = "".join(f"<li>{e(str(k))}: {e(str(v))}</li>"
                       for k, v in hit.metadata.items() if v not in (None, "", {}))
        cells.append(
            f'<tr class="hit"><td>{rank}</td><td>{_img(thumbs(hit.source_uri), str(hit.product_id))}</td>'
            f'<td class="product">{e(str(hit.product_id))}</td><td class="score">{hit.score:.4f}</td>'
            f"<td><ul>{meta}</ul></td></tr>")
    body = (f'<div class="query"><h2>Query</h2>{_img(thumbnail_data_uri(query, 224), "query")}'
            f"<p>attribute: <b>{e(attribute)}</b></p></div>"
            '<table class="hits"><thead><tr><th>#</th><th>image</th><th>product</th><th>score</th>'
            f"<th>metadata</th></tr></thead><tbody>{''.join(cells)}</tbody></table>")
    return _page(title or f"Search by {attribute}", body)
