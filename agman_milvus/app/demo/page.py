"""The demo's HTML page: searches, copy checks and tables of measured figures.

Rendered from the template ``demo.html`` (see :mod:`agman_milvus.usecases.rendering`): no
external resources, every piece of text escaped. Inputs are plain dataclasses (or dicts with
the same keys); images may be PIL images, file paths or encoded bytes (paths and bytes are
decoded by :mod:`agman_milvus.core.images`, the project's one door for image bytes).

    page = build_page("agman demo", summary={"images/s": 41.2},
                      searches=[SearchResult(query_image=..., attribute="colour", query_value="red",
                                             hits=[SearchHit(image=..., score=0.93, value="red")])],
                      copy_checks=[CopyCheck(query_image=..., verdict="copy", ...)],
                      tables=[Table("Time (seconds)", ["stage", "seconds"], [["ingest", 3.2]])])
    write_page("demo.html", page)
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from agman_milvus.core.images import decode_image_bytes, load_image
from agman_milvus.usecases.rendering import render_page, thumbnail_data_uri

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path | bytes | None
Rows = Mapping[str, Any] | Sequence[tuple[str, Any]]
THUMB = 128
VERDICT_STYLES = {"copy", "no_copy", "unique", "uncertain", "review", "near_duplicate", "distinct"}
"""Verdicts with their own badge colour; any other verdict shows as ``other``."""


class ReportError(ValueError):
    """Report input that cannot be rendered (e.g. a missing field in a section dict)."""


# -- inputs ------------------------------------------------------------------------------------
@dataclass
class SearchHit:
    """One result of an attribute search."""

    image: ImageLike
    score: float
    value: str | None = None
    """The hit's value of the searched attribute (None when unknown)."""
    matches: bool | None = None
    """Whether ``value`` equals the query's value; derived from them when left None."""
    title: str = ""
    product_id: str | int | None = None


@dataclass
class SearchResult:
    """A query image, the attribute searched, and its hits in rank order."""

    query_image: ImageLike
    attribute: str
    hits: list[SearchHit]
    query_value: str | None = None
    title: str = ""
    filters: Mapping[str, Any] | None = None
    """Metadata filters of the search, shown beside the attribute."""
    attributes: Sequence[str] = ()
    """For a multi-attribute search: every attribute combined (``attribute`` is the first)."""


@dataclass
class CopyMatch:
    """The best catalog match of a copy check."""

    image: ImageLike
    title: str = ""
    product_id: str | int | None = None
    score: float | None = None


@dataclass
class CopyCheck:
    """A copy check: the query, the verdict, the best match and the evidence behind it."""

    query_image: ImageLike
    verdict: str
    best_match: CopyMatch | None = None
    evidence: Rows = field(default_factory=dict)
    """Rows of the evidence table: name -> value (e.g. descriptor cosine, hash distance)."""
    query_label: str = ""
    """What the query is (e.g. ``crop 80% of image 12`` or ``unrelated image``)."""
    expected: str | None = None
    """The true answer when known; the page marks the verdict right or wrong."""
    evidence_image: ImageLike = None
    """Query and match side by side with the matched region and the inlier lines drawn."""


@dataclass(frozen=True)
class Table:
    """A titled table with any number of columns (e.g. per-attribute precision@10 and MAP)."""

    title: str
    columns: Sequence[str]
    rows: Sequence[Sequence[Any]]


def _coerce(kind: type, value: Any) -> Any:
    """A dataclass instance from itself or from a dict with its field names."""
    if isinstance(value, kind):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(kind)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ReportError(f"{kind.__name__} has no field(s) {unknown}; fields: {sorted(names)}")
        try:
            return kind(**value)
        except TypeError as error:
            raise ReportError(f"cannot build {kind.__name__}: {error}") from None
    raise ReportError(f"expected a {kind.__name__} or a dict, got {type(value).__name__}")


# -- what the template shows -------------------------------------------------------------------
@dataclass(frozen=True)
class _Figure:
    """A thumbnail and its caption lines; ``src`` is None when the image cannot be shown and
    ``problem`` says why."""

    src: str | None
    problem: str
    alt: str
    caption: list[str]
    css: str = ""


@dataclass(frozen=True)
class _SearchCard:
    """One search as the page shows it: heading, the facts line and the figures in rank order."""

    heading: str
    attributes: str
    query_value: str | None
    filters: Mapping[str, Any]
    matching: str | None
    """``good/known``: hits whose match with the query's value is known, and how many match."""
    figures: list[_Figure]


@dataclass(frozen=True)
class _CopyCard:
    """One copy check as the page shows it: verdict badge, query and best match, evidence rows."""

    heading: str
    verdict: str
    verdict_style: str
    expected: str | None
    correct: bool
    query: _Figure
    match: _Figure | None
    evidence: list[tuple[Any, Any]]
    evidence_figure: _Figure | None = None


def _figure(image: ImageLike, caption: Iterable[str], alt: str, css: str = "", size: int = THUMB) -> _Figure:
    try:
        src, problem = _thumbnail(image, size), ""
    except Exception as error:  # noqa: BLE001 - an unreadable image must not sink the whole page
        logger.warning("report: cannot show an image (%s): %s", alt, error)
        src, problem = None, str(error)
    return _Figure(src=src, problem=problem, alt=alt, caption=[line for line in caption if line], css=css)


def _thumbnail(image: ImageLike, size: int = THUMB) -> str:
    if image is None:
        raise ReportError("no image given")
    if isinstance(image, Image.Image):
        picture = image
    elif isinstance(image, (bytes, bytearray)):
        picture = decode_image_bytes(image)
    else:
        picture = load_image(image)
    return thumbnail_data_uri(picture, size)


def _rows(data: Rows) -> list[tuple[Any, Any]]:
    return list(data.items()) if isinstance(data, Mapping) else [tuple(r) for r in data]  # type: ignore[misc]


def _hit_matches(hit: SearchHit, query_value: str | None) -> bool | None:
    if hit.matches is not None:
        return bool(hit.matches)
    if hit.value is None or query_value is None:
        return None
    return hit.value == query_value


def _search_card(result: SearchResult | Mapping[str, Any]) -> _SearchCard:
    """One search: the query, the attribute (and filters), the hits with scores and match marks."""
    r = _coerce(SearchResult, result)
    hits = [_coerce(SearchHit, h) for h in r.hits]
    attributes = " + ".join(list(r.attributes) or [r.attribute])
    known = [m for m in (_hit_matches(h, r.query_value) for h in hits) if m is not None]
    figures = [_figure(r.query_image, ["query", r.query_value or ""], "query image", "query")]
    for rank, hit in enumerate(hits, start=1):
        match = _hit_matches(hit, r.query_value)
        css = "" if match is None else ("match" if match else "miss")
        mark = "" if match is None else ("✓ " if match else "✗ ")
        figures.append(
            _figure(
                hit.image,
                [f"#{rank} score {hit.score:.3f}", f"{mark}{hit.value or ''}".strip(), hit.title],
                f"hit {rank}",
                css,
            )
        )
    return _SearchCard(heading=r.title or f"Search by {attributes}", attributes=attributes,
                       query_value=r.query_value, filters=r.filters or {},
                       matching=f"{sum(known)}/{len(known)}" if known else None, figures=figures)


def _copy_card(check: CopyCheck | Mapping[str, Any]) -> _CopyCard:
    """One copy check: query beside its best match, the verdict and the evidence table."""
    c = _coerce(CopyCheck, check)
    best = _coerce(CopyMatch, c.best_match) if c.best_match is not None else None
    slug = c.verdict.strip().lower().replace(" ", "_").replace("-", "_")
    match = None
    if best is not None:
        match = _figure(
            best.image,
            [
                "best match",
                best.title,
                f"product {best.product_id}" if best.product_id is not None else "",
                f"score {best.score:.3f}" if best.score is not None else "",
            ],
            "best match",
        )
    # "a or b": either answer is right
    right = {answer.strip().lower() for answer in (c.expected or "").split(" or ")}
    return _CopyCard(heading=c.query_label or "Copy check", verdict=c.verdict,
                     verdict_style=slug if slug in VERDICT_STYLES else "other", expected=c.expected,
                     correct=c.verdict.strip().lower() in right,
                     query=_figure(c.query_image, ["query", c.query_label], "copy-check query", "query"),
                     match=match, evidence=_rows(c.evidence),
                     evidence_figure=None if c.evidence_image is None else _figure(
                         c.evidence_image, ["matched region and inlier pairs"], "verification evidence",
                         size=3 * THUMB))


# -- the page ----------------------------------------------------------------------------------
def build_page(title: str, *, summary: Rows | None = None,
               searches: Sequence[SearchResult | Mapping[str, Any]] = (),
               copy_checks: Sequence[CopyCheck | Mapping[str, Any]] = (),
               tables: Sequence[Table] = (), notes: Sequence[str] = ()) -> str:
    """The whole page: notes (paragraphs), the summary (name, value), the tables, the searches
    and the copy checks."""
    return render_page("demo.html", title=title, notes=notes,
                       summary=_rows(summary) if summary is not None else None, tables=tables,
                       searches=[_search_card(s) for s in searches],
                       copy_checks=[_copy_card(c) for c in copy_checks])


def write_page(path: str | Path, page: str) -> Path:
    """Write ``page`` to ``path`` (UTF-8, parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
