"""Metadata filters -> Milvus boolean expressions, safely.

Only declared fields may be filtered, and values become escaped literals, so nothing in a value
(quotes, backslashes, newlines, operators) can change the structure of the expression.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from agman_milvus.core.errors import AgmanError

Scalar = str | int | float | bool
FilterValue = Scalar | Sequence[Scalar]

#: Escapes understood identically by Milvus Lite's parser and the server's (C-style subset).
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


class FilterError(AgmanError, ValueError):
    """A filter names an undeclared field or has a value that cannot be expressed."""


def quote_string(value: str) -> str:
    """A double-quoted Milvus string literal for ``value``."""
    out = []
    for ch in value:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            raise FilterError(f"filter value {value!r} contains a control character")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _literal(field: str, kind: type, value: object) -> str:
    if kind is str:
        if isinstance(value, bool):
            value = "true" if value else "false"
        if isinstance(value, float) and not math.isfinite(value):
            raise FilterError(f"filter {field!r}: value {value!r} is not a finite number")
        if not isinstance(value, (str, int, float)):
            raise FilterError(f"filter {field!r}: unsupported value {value!r} ({type(value).__name__})")
        return quote_string(str(value))
    # integer fields (product_id)
    if isinstance(value, bool):
        raise FilterError(f"filter {field!r} needs an integer, got {value!r}")
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return str(int(value))
    raise FilterError(f"filter {field!r} needs an integer, got {value!r}")


def build_filter(
    filters: Mapping[str, FilterValue] | None,
    fields: Mapping[str, type] | Iterable[str],
) -> str:
    """``{"brand": "Nike", "colour": ["Red", "Blue"]}`` -> ``brand == "Nike" and colour in [...]``.

    ``fields`` declares the filterable fields: names (VARCHAR) or ``{name: str | int}``.
    A list value means "any of"; an empty filter gives ``""`` (match everything).
    """
    kinds: dict[str, type] = dict(fields) if isinstance(fields, Mapping) else {f: str for f in fields}
    clauses = []
    for field, value in (filters or {}).items():
        if field not in kinds:
            allowed = ", ".join(sorted(kinds)) or "(none)"
            raise FilterError(f"cannot filter on {field!r}; filterable fields: {allowed}")
        kind = kinds[field]
        if isinstance(value, (list, tuple, set, frozenset)):
            items = list(value)
            if not items:
                raise FilterError(f"filter {field!r} has an empty list of values")
            literals = ", ".join(_literal(field, kind, v) for v in items)
            clauses.append(f"{field} in [{literals}]")
        else:
            clauses.append(f"{field} == {_literal(field, kind, value)}")
    return " and ".join(clauses)
