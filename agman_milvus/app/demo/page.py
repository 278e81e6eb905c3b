"""A self-contained HTML page for the demo: searches, copy checks and a summary of figures.

The page has no external resources: thumbnails are inlined as base64 JPEG ``data:`` URIs and
the stylesheet is embedded. Every piece of text is HTML-escaped. Inputs are plain dataclasses
(or dicts with the same keys); images may be PIL images, file paths or encoded bytes (paths and
bytes are decoded by :mod:`agman_milvus.core.images`, the project's one door for image bytes).

    page = build_page("agman demo", summary={"images/s": 41.2},
                      searches=[SearchResult(query_image=..., attribute="colour", query_value="red",
                                             hits=[SearchHit(image=..., score=0.93, value="red")])],
                      copy_checks=[CopyCheck(query_image=..., verdict="copy", ...)])
    write_page("demo.html", page)
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence, Union

from PIL import Image

logger = logging.getLogger(__name__)

ImageLike = Union[Image.Image, str, Path, bytes, None]

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ccc}
section.card{background:#fff;border:1px solid #ddd;border-radius:8px;padding:12px 16px;margin:12px 0}
.row{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;width:116px;flex:none;font-size:.74em;text-align:center}
section.search .row{flex-wrap:nowrap;overflow-x:auto;padding-bottom:4px}
figure img{width:112px;height:112px;object-fit:contain;border:3px solid #eee;border-radius:4px;background:#f3f3f3}
figure.match img{border-color:#2e9d4b}figure.miss img{border-color:#d0393e}
figure.query img{border-color:#3a6fd8}
.verdict{font-weight:bold;padding:2px 8px;border-radius:4px;color:#fff}
.verdict.copy{background:#c2372f}.verdict.no_copy,.verdict.unique,.verdict.distinct{background:#2e9d4b}
.verdict.uncertain,.verdict.review,.verdict.near_duplicate{background:#d88a1c}
span.right{color:#2e9d4b}span.miss{color:#d0393e;font-weight:bold}
.verdict.other{background:#666}
table{border-collapse:collapse;margin:6px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f0f0f0}.num{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#777}
"""


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
    evidence: Mapping[str, Any] | Sequence[tuple[str, Any]] = field(default_factory=dict)
    """Rows of the evidence table: name -> value (e.g. descriptor cosine, hash distance)."""
    query_label: str = ""
    """What the query is (e.g. ``crop 80% of image 12`` or ``unrelated image``)."""
    expected: str | None = None
    """The true answer when known; the page marks the verdict right or wrong."""


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


# -- pieces ------------------------------------------------------------------------------------
def thumbnail_uri(image: ImageLike, size: int = 128, quality: int = 82) -> str:
    """A ``data:image/jpeg;base64,...`` URI of ``image`` scaled to fit ``size`` x ``size``."""
    if image is None:
        raise ReportError("no image given")
    if isinstance(image, Image.Image):
        picture = image.convert("RGB")
    else:
        from agman_milvus.core.images import decode_image_bytes, load_image

        picture = decode_image_bytes(image) if isinstance(image, (bytes, bytearray)) else load_image(image)
    picture = picture.copy()
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=quality)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def _figure(image: ImageLike, caption_lines: Iterable[str], css: str = "", alt: str = "") -> str:
    try:
        src = thumbnail_uri(image)
        img = f'<img src="{src}" alt="{_e(alt)}">'
    except Exception as error:  # an unreadable image must not sink the whole page
        logger.warning("report: cannot show an image (%s): %s", alt or "image", error)
        img = f'<div class="muted">image unavailable: {_e(error)}</div>'
    caption = "<br>".join(_e(line) for line in caption_lines if line)
    return f'<figure class="{_e(css)}">{img}<figcaption>{caption}</figcaption></figure>'


def _table(rows: Iterable[tuple[Any, Any]], header: tuple[str, str] | None = None) -> str:
    head = f"<tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>" if header else ""
    body = "".join(f'<tr><td>{_e(k)}</td><td class="{"num" if isinstance(v, (int, float)) else ""}">'
                   f'{_e(_number(v))}</td></tr>' for k, v in rows)
    return f"<table>{head}{body}</table>"


def _rows(data: Mapping[str, Any] | Sequence[tuple[str, Any]]) -> list[tuple[Any, Any]]:
    return list(data.items()) if isinstance(data, Mapping) else [tuple(r) for r in data]  # type: ignore[misc]


# -- sections ----------------------------------------------------------------------------------
def render_search(result: SearchResult | Mapping[str, Any]) -> str:
    """One search: the query, the attribute (and filters), the hits with scores and match marks."""
    r = _coerce(SearchResult, result)
    hits = [_coerce(SearchHit, h) for h in r.hits]
    attributes = list(r.attributes) or [r.attribute]
    heading = r.title or f"Search by {' + '.join(attributes)}"
    facts = [f"attribute: <b>{_e(' + '.join(attributes))}</b>"]
    if r.query_value is not None:
        facts.append(f"query value: <b>{_e(r.query_value)}</b>")
    if r.filters:
        facts.append("filters: " + ", ".join(f"{_e(k)} = {_e(v)}" for k, v in r.filters.items()))
    known = [h for h in hits if _hit_matches(h, r.query_value) is not None]
    if known:
        good = sum(1 for h in known if _hit_matches(h, r.query_value))
        facts.append(f"matching hits: <b>{good}/{len(known)}</b>")
    figures = [_figure(r.query_image, ["query", r.query_value or ""], "query", "query image")]
    for rank, hit in enumerate(hits, start=1):
        match = _hit_matches(hit, r.query_value)
        css = "" if match is None else ("match" if match else "miss")
        mark = "" if match is None else ("✓ " if match else "✗ ")
        figures.append(_figure(hit.image, [f"#{rank} score {hit.score:.3f}", f"{mark}{hit.value or ''}".strip(),
                                           hit.title], css, f"hit {rank}"))
    return (f'<section class="card search"><h3>{_e(heading)}</h3><p>{" · ".join(facts)}</p>'
            f'<div class="row">{"".join(figures)}</div></section>')


def _hit_matches(hit: SearchHit, query_value: str | None) -> bool | None:
    if hit.matches is not None:
        return bool(hit.matches)
    if hit.value is None or query_value is None:
        return None
    return hit.value == query_value


def render_copy_check(check: CopyCheck | Mapping[str, Any]) -> str:
    """One copy check: query beside its best match, the verdict and the evidence table."""
    c = _coerce(CopyCheck, check)
    match = _coerce(CopyMatch, c.best_match) if c.best_match is not None else None
    slug = c.verdict.strip().lower().replace(" ", "_").replace("-", "_")
    css = slug if slug in {"copy", "no_copy", "unique", "uncertain", "review", "near_duplicate", "distinct"} else "other"
    verdict = f'<span class="verdict {_e(css)}">{_e(c.verdict)}</span>'
    if c.expected is not None:  # "a or b": either answer is right
        right = c.verdict.strip().lower() in {e.strip().lower() for e in c.expected.split(" or ")}
        verdict += f' <span class="{"right" if right else "miss"}">({"correct" if right else "wrong"}; expected {_e(c.expected)})</span>'
    figures = [_figure(c.query_image, ["query", c.query_label], "query", "copy-check query")]
    if match is not None:
        score = f"score {match.score:.3f}" if match.score is not None else ""
        figures.append(_figure(match.image, ["best match", match.title,
                                             f"product {match.product_id}" if match.product_id is not None else "",
                                             score], "", "best match"))
    else:
        figures.append('<figure><div class="muted">no candidate found</div></figure>')
    evidence = _table(_rows(c.evidence), ("evidence", "value")) if c.evidence else '<p class="muted">no evidence recorded</p>'
    return (f'<section class="card copy"><h3>{_e(c.query_label or "Copy check")}</h3><p>verdict: {verdict}</p>'
            f'<div class="row">{"".join(figures)}<div>{evidence}</div></div></section>')


def render_summary(summary: Mapping[str, Any] | Sequence[tuple[str, Any]], title: str = "Summary") -> str:
    """A two-column table of measured figures (name, value)."""
    return f'<section class="card summary"><h3>{_e(title)}</h3>{_table(_rows(summary), ("measure", "value"))}</section>'


def render_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A table with any number of columns (e.g. per-attribute precision@10 and MAP)."""
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if isinstance(v, (int, float)) else ""}">{_e(_number(v))}</td>'
                                    for v in row) + "</tr>" for row in rows)
    return f'<section class="card table"><h3>{_e(title)}</h3><table><tr>{head}</tr>{body}</table></section>'


def build_page(title: str, *, summary: Mapping[str, Any] | Sequence[tuple[str, Any]] | None = None,
               searches: Sequence[SearchResult | Mapping[str, Any]] = (),
               copy_checks: Sequence[CopyCheck | Mapping[str, Any]] = (),
               tables: Sequence[str] = (), notes: Sequence[str] = ()) -> str:
    """The whole page. ``tables`` are fragments from :func:`render_table`; notes are paragraphs."""
    parts = [f"<h1>{_e(title)}</h1>"]
    parts += [f"<p>{_e(note)}</p>" for note in notes]
    if summary is not None:
        parts.append(render_summary(summary))
    parts += list(tables)
    if searches:
        parts.append("<h2>Attribute searches</h2>")
        parts += [render_search(s) for s in searches]
    if copy_checks:
        parts.append("<h2>Copy checks</h2>")
        parts += [render_copy_check(c) for c in copy_checks]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{_STYLE}</style></head><body>{''.join(parts)}</body></html>\n")


def write_page(path: str | Path, page: str) -> Path:
    """Write ``page`` to ``path`` (UTF-8, parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path
