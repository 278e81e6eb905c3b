"""Reports people read: screening reports (CSV, JSON, HTML) and a search result page (HTML).

The HTML pages are rendered from the templates ``screening_report.html`` and
``search_results.html`` (see :mod:`agman_milvus.usecases.rendering`): self-contained, every text
value escaped. A thumbnail that cannot be read shows as a short note instead. A verified match
also shows its evidence picture: query and match side by side, the matched region outlined on
the query and the inlier keypoint pairs joined by lines
(:func:`agman_milvus.core.copy_evidence.draw_evidence`); CSV and JSON keep the numbers.
"""

from __future__ import annotations

import base64
import csv
import functools
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

from PIL import Image

from agman_milvus.core.copy_evidence import evidence_jpeg
from agman_milvus.services.store.catalog import Catalog
from agman_milvus.usecases.rendering import render_page, thumbnail_data_uri

__all__ = [
    "ReportRow", "ScreeningReport", "ThumbnailLoader", "copy_check_report", "export_report",
    "html_pages", "load_screening_report",
    "search_page_html", "write_csv", "write_html", "write_json",
]

log = logging.getLogger(__name__)

ImageLoader = Callable[[str], Image.Image]
THUMB = 160
QUERY_THUMB = 224
#: in the head of every page :mod:`rendering` writes (templates/base.html)
GENERATOR_TAG = b'<meta name="generator" content="agman_milvus">'
#: Matches on one page of the HTML screening report (about 45 KB each with its pictures); a longer
#: report is written as linked pages, so a job with thousands of flagged rows opens in a browser.
ROWS_PER_PAGE = 100
CSV_FIELDS = ["query", "verdict", "score", "product_id", "image_id", "title",
              "descriptor_similarity", "phash_distance", "attributes_agreeing",
              "attributes_total", "attributes", "match_source", "candidate_score",
              "verification_method", "inliers", "inlier_ratio", "region_coverage", "residual",
              "colour_residual", "smoothed_score", "region"]


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
    candidate_score: float | None = None
    verification: dict[str, Any] | None = None

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
            candidate_score=ev.get("candidate_score"), verification=ev.get("verification"),
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
                "descriptor_similarity": ("" if r.descriptor_similarity is None
                                          else f"{r.descriptor_similarity:.4f}"),
                "phash_distance": "" if r.phash_distance is None else r.phash_distance,
                "attributes_agreeing": r.attributes_agreeing, "attributes_total": len(r.attributes),
                "attributes": ";".join(
                    f"{k}={'yes' if a.get('agrees') else 'no'}:{a.get('similarity', 0):.3f}"
                    for k, a in r.attributes.items()) or (r.error or ""),
                "match_source": r.match_source or "",
                "candidate_score": "" if r.candidate_score is None else f"{r.candidate_score:.4f}",
                **_verification_fields(r.verification),
            })
    return path


def _verification_fields(v: dict[str, Any] | None) -> dict[str, str]:
    if not v:
        return dict.fromkeys(("verification_method", "inliers", "inlier_ratio", "region_coverage",
                              "residual", "colour_residual", "smoothed_score", "region"), "")
    return {"verification_method": v.get("method", ""), "inliers": str(v.get("inliers", "")),
            "inlier_ratio": f"{v.get('inlier_ratio', 0):.3f}",
            "region_coverage": f"{v.get('coverage', 0):.3f}",
            "residual": f"{v.get('residual', 1):.3f}",
            "colour_residual": f"{v.get('colour_residual', 0):.3f}",
            "smoothed_score": f"{v.get('smoothed_score', 0):.3f}",
            "region": " ".join(f"{x:.0f},{y:.0f}" for x, y in v.get("region") or [])}


def write_json(report: ScreeningReport, path: Path) -> Path:
    path.write_text(json.dumps(report.to_dict(), indent=2, default=str), encoding="utf-8")
    return path


# -- HTML --------------------------------------------------------------------------------------
class ThumbnailLoader:
    """Thumbnails (``data:`` URIs) of images named by reference: paths, URIs and ``blob://``
    (read through ``load``); None for an image that cannot be read."""

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
            except Exception as exc:  # noqa: BLE001 - a report must render when an image is gone
                log.warning("no thumbnail for %s: %s", ref, exc)
                self._cache[ref] = None
        return self._cache[ref]


@dataclass(frozen=True)
class _MatchView:
    """What the HTML report shows for one match: the row, its thumbnails (``data:`` URIs, None
    when unavailable) and its figures as (label, formatted value) pairs, one line each in the
    scores cell. A further image or figure of a match is one more field or pair here and one
    line in ``screening_report.html``."""

    row: ReportRow
    query_thumbnail: str | None
    match_thumbnail: str | None
    scores: list[tuple[str, str]]
    evidence: str | None = None  # data:image/jpeg URI of the evidence picture


def _residual_text(v: dict[str, Any]) -> str:
    return (f"{v.get('residual', 1):.2f} of content cells differ"
            f" ({v.get('colour_residual', 0):.2f} in colour)")


def _match_view(row: ReportRow, thumbs: Callable[[str | None], str | None],
                evidence: Callable[[ReportRow], str | None]) -> _MatchView:
    scores: list[tuple[str, str]] = []
    if row.descriptor_similarity is not None:
        scores = [("score", f"{row.score:.3f}"), ("descriptor", f"{row.descriptor_similarity:.3f}"),
                  ("pHash distance", "-" if row.phash_distance is None else str(row.phash_distance))]
    v = row.verification
    if v and v.get("method") == "dense":
        scores += [("dense alignment", f"correlation {v.get('coverage', 0):.3f}"),
                   ("residual", _residual_text(v))]
    elif v:
        scores += [("inliers", f"{v.get('inliers', 0)} of {v.get('matches', 0)} matches"
                    + (" (mirrored)" if v.get("mirrored") else "")),
                   ("matched region", f"{100 * v.get('coverage', 0):.0f}% spanned by inliers"),
                   ("residual", _residual_text(v))]
    if v and v.get("smoothed_score"):
        scores.append(("pixelated", f"{v['smoothed_score']:.3f} with the blocks smoothed away "
                                    "(a copy only if no other photo is near)"))
    return _MatchView(row=row, query_thumbnail=thumbs(row.query),
                      match_thumbnail=thumbs(row.match_source) if row.image_id is not None else None,
                      scores=scores, evidence=evidence(row))


def _no_thumbnail(ref: str | None) -> None:
    return None


def _no_evidence(row: ReportRow) -> None:
    return None


class EvidenceRenderer:
    """The evidence picture of a verified match as a ``data:image/jpeg`` URI (None when the
    match was not verified or an image cannot be read)."""

    def __init__(self, load: ImageLoader) -> None:
        self._load = load

    def __call__(self, row: ReportRow) -> str | None:
        v = row.verification
        if not v or not v.get("region") or not row.match_source:
            return None
        try:
            picture = evidence_jpeg(self._load(row.query), self._load(row.match_source), v)
        except Exception as exc:  # noqa: BLE001 - a report must render when an image is gone
            log.warning("no evidence picture for %s vs %s: %s", row.query, row.match_source, exc)
            return None
        return "data:image/jpeg;base64," + base64.b64encode(picture).decode("ascii")


def report_html(report: ScreeningReport, loader: ImageLoader | None = None, title: str | None = None, *,
                rows: Sequence[ReportRow] | None = None, pages: Sequence[str] = (), page: int = 0) -> str:
    """The screening report as an HTML page: the job's summary, then for each of ``rows`` (default
    all the report's) query and match side by side, scores, the evidence picture and the
    per-attribute agreement. ``pages`` names the files of all the report's pages (linked from
    this one, page number ``page`` counted from 0) when it has more than one."""
    if loader:  # thumbnails and evidence pictures read the same images: decode each once
        loader = functools.lru_cache(maxsize=64)(loader)
    thumbs = ThumbnailLoader(loader) if loader else _no_thumbnail
    evidence = EvidenceRenderer(loader) if loader else _no_evidence
    shown = report.rows if rows is None else rows
    return render_page("screening_report.html", title=title or f"Screening report, job {report.job_id}",
                       report=report, matches=[_match_view(r, thumbs, evidence) for r in shown],
                       pages=[quote(name) for name in pages], page=page)


def write_html(report: ScreeningReport, path: Path, loader: ImageLoader | None = None,
               title: str | None = None, rows_per_page: int = ROWS_PER_PAGE) -> Path:
    """Write the HTML report to ``path``, its matches ``rows_per_page`` a page: past one page,
    ``path`` is the first and ``{stem}-2{suffix}``, ``{stem}-3{suffix}``, ... beside it the
    others, each linked from every page; pages an earlier, longer report left there are
    removed. Returns ``path``."""
    chunks = [report.rows[start:start + rows_per_page] for start in range(0, len(report.rows), rows_per_page)]
    names = [path.name] + [f"{path.stem}-{number}{path.suffix}" for number in range(2, len(chunks) + 1)]
    for stale in html_pages(path)[len(names):]:
        stale.unlink()
    for page, rows in enumerate(chunks or [[]]):
        html = report_html(report, loader, title, rows=rows, pages=names, page=page)
        path.with_name(names[page]).write_text(html, encoding="utf-8")
    if len(names) > 1:
        log.info("wrote the screening report of job %d as %d pages: %s, ...", report.job_id, len(names), path)
    return path


def html_pages(path: Path) -> list[Path]:
    """The pages of the HTML report whose first page is ``path`` (:func:`write_html`): ``path``
    and the ``{stem}-2{suffix}``, ``{stem}-3{suffix}``, ... that follow it and were written by
    this package (its ``generator`` tag); empty when ``path`` does not exist."""
    pages = []
    candidate, number = path, 1
    while candidate.is_file() and _written_here(candidate):
        pages.append(candidate)
        number += 1
        candidate = path.with_name(f"{path.stem}-{number}{path.suffix}")
    return pages


def _written_here(page: Path) -> bool:
    with page.open("rb") as f:
        return GENERATOR_TAG in f.read(1024)


def copy_check_report(query: str, check: Any) -> ScreeningReport:
    """One copy check (a :class:`~agman_milvus.usecases.copyright.CopyCheck` of the image
    ``query``) as a report of its non-distinct matches, for ``agman check-copy --html``."""
    rows = [ReportRow(
        query=query, verdict=m.verdict, score=m.score, product_id=m.product_id, image_id=m.image_id,
        title=m.metadata.get("title"), descriptor_similarity=m.descriptor_similarity,
        phash_distance=m.phash_distance,
        attributes={k: {"similarity": a.similarity, "threshold": a.threshold, "agrees": a.agrees}
                    for k, a in m.attributes.items()},
        match_source=m.source_uri, candidate_score=m.candidate_score,
        verification=m.verification.to_dict() if m.verification is not None else None,
    ) for m in check.matches if m.verdict != "distinct"]
    return ScreeningReport(job_id=0, status="done", done=1, total=1, created_at=None, finished_at=None,
                           error=None, rows=rows)


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
    thumbs = ThumbnailLoader(loader) if loader else _no_thumbnail
    return render_page("search_results.html", title=title or f"Search by {attribute}",
                       attribute=attribute, query_thumbnail=thumbnail_data_uri(query, QUERY_THUMB),
                       hits=[(hit, thumbs(hit.source_uri)) for hit in hits])
