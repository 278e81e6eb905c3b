"""One validation of a product event before anything is stored, the same on every backend.

SQLite stores strings of any length and PostgreSQL refuses them with a raw ``DataError``; Milvus
cuts VARCHAR values at its ``max_length``. So the rules are checked here, once, against the
actual schema (column lengths of :mod:`.tables`, the Milvus filter field length of
:mod:`.vectors`), and broken events raise :class:`InvalidProductError` whatever the backend.

Rules:

* **product id**: a string of 1 to 255 characters (the ``products.external_id`` column), no
  control characters (NUL, newlines, DEL, C1), no lone surrogates;
* **metadata**: a mapping with string keys (1 to 255 characters, no control characters);
  ``None`` values mean "leave as stored";
* **typed fields** (``title``, ``brand``, ``category``, ``gender``, ``colour``) and **filter
  fields** (``filter_fields``, stored in Milvus) take one scalar (string, integer, finite
  float or boolean), stored as text; its text must fit the column (``title`` 512,
  ``gender``/``colour`` 64, others 255 characters) and, for a filter field, Milvus' VARCHAR
  (512 UTF-8 bytes);
* **other keys** take JSON values: strings, integers (signed 64-bit), finite floats, booleans,
  ``None``, lists and string-keyed objects of those, nested at most :data:`MAX_DEPTH` levels
  (``{"sizes": ["S", "M"]}`` is 1 level, ``{"stock": {"eu": [1, 2]}}`` is 2); no bytes, tuples,
  sets or other objects; the whole metadata at most :data:`MAX_METADATA_BYTES` as JSON;
* strings never hold NUL (PostgreSQL cannot store it) or control characters other than tab,
  newline and carriage return.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

from agman_milvus.core.errors import InvalidProductError
from agman_milvus.services.store.products import PRODUCT_FIELDS
from agman_milvus.services.store.tables import Product
from agman_milvus.services.store.vectors import META_MAX_LENGTH

__all__ = ["MAX_DEPTH", "MAX_METADATA_BYTES", "InvalidProductError", "validate_product"]

#: How deep lists/objects may nest inside one metadata value.
MAX_DEPTH = 4
#: Largest metadata, serialised as JSON (UTF-8 bytes).
MAX_METADATA_BYTES = 64 * 1024
_ID_LENGTH: int = Product.__table__.c.external_id.type.length
_FIELD_LENGTH: dict[str, int] = {name: Product.__table__.c[name].type.length for name in PRODUCT_FIELDS}
_KEY_LENGTH = 255
_INT64 = (-(2**63), 2**63 - 1)


def validate_product(
    product_id: object, metadata: Mapping[str, Any] | None, *, filter_fields: Iterable[str] = ()
) -> dict[str, Any]:
    """Check a product event; returns its metadata as a plain dict (``{}`` for None).

    Raises :class:`InvalidProductError` naming the first rule broken.
    """
    _check_id(product_id)
    label = f"product {_shown(product_id)}"
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InvalidProductError(
            f"{label}: metadata must be a mapping of names to values, got {type(metadata).__name__}",
            field="metadata",
        )
    filters = set(filter_fields)
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        where = _check_key(key, label)
        if value is not None:
            if key in _FIELD_LENGTH or key in filters:
                _check_scalar_field(key, value, where, label, filters)
            else:
                _check_json(value, where, label, depth=0)
        out[key] = value
    size = len(json.dumps(out, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        raise InvalidProductError(
            f"{label}: metadata is {size:,} bytes as JSON, the limit is {MAX_METADATA_BYTES:,}",
            field="metadata",
        )
    return out


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_id(product_id: object) -> None:
    if not isinstance(product_id, str):
        raise InvalidProductError(
            f"a product id must be a string, got {type(product_id).__name__} {_shown(product_id)}",
            field="product_id",
        )
    if not product_id.strip():
        raise InvalidProductError("a product id must not be empty or blank", field="product_id")
    if len(product_id) > _ID_LENGTH:
        raise InvalidProductError(
            f"product id {_shown(product_id)} has {len(product_id):,} characters, the limit is "
            f"{_ID_LENGTH}", field="product_id",
        )
    problem = _text_problem(product_id, in_text=False)
    if problem:
        raise InvalidProductError(f"product id {_shown(product_id)} {problem}", field="product_id")


def _check_key(key: object, label: str) -> str:
    if not isinstance(key, str) or not key:
        raise InvalidProductError(
            f"{label}: metadata keys must be non-empty strings, got {_shown(key)}", field="metadata"
        )
    where = f"metadata[{_shown(key)}]"
    problem = _text_problem(key, in_text=False)
    if problem or len(key) > _KEY_LENGTH:
        raise InvalidProductError(
            f"{label}: the metadata key {_shown(key)} {problem or f'is over {_KEY_LENGTH} characters'}",
            field=where,
        )
    return where


def _check_scalar_field(key: str, value: object, where: str, label: str, filters: set[str]) -> None:
    """A typed column or a Milvus filter field: one scalar, stored as text that must fit."""
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidProductError(f"{label}: {where} is {value!r}, not a finite number", field=where)
    if not isinstance(value, (str, int, float)):  # bool is an int
        raise InvalidProductError(
            f"{label}: {where} must be a single string or number (it is stored as text"
            f"{' and filtered in Milvus' if key in filters else ''}), got {type(value).__name__}",
            field=where,
        )
    text = value if isinstance(value, str) else str(value)
    problem = _text_problem(text, in_text=True)
    if problem:
        raise InvalidProductError(f"{label}: {where} {problem}", field=where)
    limit = _FIELD_LENGTH.get(key)
    if limit is not None and len(text) > limit:
        raise InvalidProductError(
            f"{label}: {where} has {len(text):,} characters, the limit is {limit}", field=where
        )
    if key in filters and len(text.encode("utf-8")) > META_MAX_LENGTH:
        raise InvalidProductError(
            f"{label}: {where} is {len(text.encode('utf-8')):,} bytes (UTF-8); a filter field "
            f"holds at most {META_MAX_LENGTH} in Milvus", field=where,
        )


def _check_json(value: object, where: str, label: str, depth: int) -> None:
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise InvalidProductError(f"{label}: {where} is outside the signed 64-bit range", field=where)
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidProductError(f"{label}: {where} is {value!r}, not a finite number",
                                      field=where)
        return
    if isinstance(value, str):
        problem = _text_problem(value, in_text=True)
        if problem:
            raise InvalidProductError(f"{label}: {where} {problem}", field=where)
        return
    if isinstance(value, (list, Mapping)):
        if depth >= MAX_DEPTH:
            raise InvalidProductError(
                f"{label}: {where} nests lists/objects more than {MAX_DEPTH} levels deep", field=where
            )
        if isinstance(value, list):
            for i, item in enumerate(value):
                _check_json(item, f"{where}[{i}]", label, depth + 1)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                raise InvalidProductError(
                    f"{label}: {where} has the key {_shown(key)}; object keys must be strings",
                    field=where,
                )
            problem = _text_problem(key, in_text=False)
            if problem:
                raise InvalidProductError(f"{label}: a key in {where} {problem}", field=where)
            _check_json(item, f"{where}[{_shown(key)}]", label, depth + 1)
        return
    raise InvalidProductError(
        f"{label}: {where} is a {type(value).__name__}; metadata values must be JSON "
        "(string, number, boolean, null, list, object)", field=where,
    )


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_CONTROL_IN_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")  # tab, LF, CR allowed
_SURROGATE = re.compile("[\ud800-\udfff]")


def _text_problem(text: str, *, in_text: bool) -> str | None:
    """Why ``text`` cannot be stored the same everywhere (NUL, control characters, lone
    surrogates), or None. ``in_text``: tab, newline and carriage return are allowed."""
    if "\x00" in text:
        return "contains a NUL character"
    bad = (_CONTROL_IN_TEXT if in_text else _CONTROL).search(text)
    if bad:
        return f"contains the control character {bad.group()!r}"
    if _SURROGATE.search(text):
        return "contains a lone surrogate (not valid Unicode text)"
    return None
