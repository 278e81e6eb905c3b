"""HTML pages from the package's Jinja2 templates, and the inline thumbnails they show.

The templates live in ``agman_milvus/usecases/templates/``: ``base.html`` is the one layout
(page head, stylesheet, heading) that every page extends, ``macros.html`` holds the thumbnail
markup, and the filter ``readable`` formats a table cell. Every value is HTML-escaped
(autoescape), and a value a template names but the caller did not pass is an error, not an
empty string. Pages are self-contained: images are inlined as ``data:`` JPEG URIs made by
:func:`thumbnail_data_uri`.
"""

from __future__ import annotations

import base64
import io
import math
from functools import cache
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from PIL import Image

__all__ = ["render_page", "thumbnail_data_uri"]


@cache
def _environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("agman_milvus.usecases", "templates"),
        autoescape=select_autoescape(["html"]),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    environment.filters["readable"] = _readable
    return environment


def render_page(template: str, **context: Any) -> str:
    """The page ``template`` (a file name in the templates folder) rendered with ``context``."""
    return _environment().get_template(template).render(**context)


def _readable(value: Any) -> str:
    """A table cell's text (the templates' ``readable`` filter): yes/no for booleans, a dash for
    NaN, four significant digits for a float (thousands separated from 10,000 up)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def thumbnail_data_uri(image: Image.Image, size: int) -> str:
    """``image`` scaled to fit ``size`` x ``size``, as a ``data:image/jpeg;base64,...`` URI."""
    thumb = image.convert("RGB")
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    thumb.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")
