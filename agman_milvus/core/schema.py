"""Attribute schemas: which attributes a model embeds and the names of their values.

An ``AttributeSchema`` is plain data. Collection names, CLI choices and error messages all come
from it, and it travels inside every checkpoint so a model always knows what it was trained on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from agman_milvus.core.errors import AgmanError

_IDENTIFIER = re.compile(r"[^0-9A-Za-z_]+")


class UnknownAttributeError(AgmanError, KeyError, ValueError):
    """Raised for an attribute name that the schema does not know."""

    def __init__(self, name: object, known: Sequence[str]) -> None:
        self.name = name
        self.known = tuple(known)
        super().__init__(f"unknown attribute {name!r}; known attributes: {', '.join(self.known)}")

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class Attribute:
    """One attribute (e.g. ``sleeve_length``) and its ordered value names."""

    name: str
    values: tuple[str, ...]

    @property
    def num_values(self) -> int:
        return len(self.values)

    @property
    def slug(self) -> str:
        """The name reduced to ``[0-9a-z_]``, safe for Milvus collection names."""
        slug = _IDENTIFIER.sub("_", self.name).strip("_").lower()
        return slug or "attribute"


@dataclass(frozen=True)
class AttributeSchema:
    """The ordered attributes of a model; the position of an attribute is its id."""

    attributes: tuple[Attribute, ...]

    def __post_init__(self) -> None:
        if not self.attributes:
            raise ValueError("an attribute schema needs at least one attribute")
        names = [a.name for a in self.attributes]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate attribute names in schema: {names}")
        slugs = [a.slug for a in self.attributes]
        if len(set(slugs)) != len(slugs):
            raise ValueError(f"attribute names collide once made collection-safe: {slugs}")

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, mapping: Mapping[str, Sequence[str] | int]) -> AttributeSchema:
        """Build from ``{attribute: [value names]}`` (or ``{attribute: number of values}``)."""
        attributes = []
        for name, values in mapping.items():
            if isinstance(values, int):
                values = [str(i) for i in range(values)]
            attributes.append(Attribute(str(name), tuple(str(v) for v in values)))
        return cls(tuple(attributes))

    @classmethod
    def from_meta_json(
        cls, path: str | Path, dataset: str = "FashionAI", values_path: str | Path | None = None
    ) -> AttributeSchema:
        """Build from the reference ``meta.json`` (``ATTRIBUTES`` order, ``ATTRIBUTES_NUM``).

        Value names come from an ``ATTRIBUTES_VALUES`` entry when the file (or ``values_path``)
        has one; otherwise values are named by their index.
        """
        meta = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        if dataset not in meta:
            raise ValueError(f"{path} has no dataset {dataset!r}; it has: {', '.join(meta)}")
        section = meta[dataset]
        names = section.get("ATTRIBUTES") or section.get("ATTRIBUTES_NAME")
        counts = section["ATTRIBUTES_NUM"]
        value_names: Mapping[str, Sequence[str]] = section.get("ATTRIBUTES_VALUES", {})
        if values_path is not None:
            other = json.loads(Path(values_path).read_text(encoding="utf-8-sig"))
            value_names = other.get(dataset, other).get("ATTRIBUTES_VALUES", {})
        attributes = []
        for name in names:
            count = int(counts[name])
            values = tuple(value_names.get(name, [str(i) for i in range(count)]))
            if len(values) != count:
                raise ValueError(f"{name}: {len(values)} value names for {count} values")
            attributes.append(Attribute(name, values))
        return cls(tuple(attributes))

    @classmethod
    def from_json(cls, data: Mapping[str, object]) -> AttributeSchema:
        """Inverse of :meth:`to_json`."""
        items = data["attributes"]
        if not isinstance(items, list):
            raise ValueError("schema JSON needs a list under 'attributes'")
        return cls(tuple(Attribute(str(i["name"]), tuple(map(str, i["values"]))) for i in items))

    def to_json(self) -> dict[str, object]:
        return {"attributes": [{"name": a.name, "values": list(a.values)} for a in self]}

    # -- lookup -------------------------------------------------------------------------------
    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attributes)

    def __len__(self) -> int:
        return len(self.attributes)

    def __iter__(self) -> Iterable[Attribute]:  # type: ignore[override]
        return iter(self.attributes)

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def index(self, name: str) -> int:
        """The id of attribute ``name``; raises :class:`UnknownAttributeError` listing the known."""
        try:
            return self.names.index(name)
        except ValueError:
            raise UnknownAttributeError(name, self.names) from None

    def __getitem__(self, key: int | str) -> Attribute:
        if isinstance(key, str):
            return self.attributes[self.index(key)]
        return self.attributes[key]

    def resolve(self, attribute: int | str) -> int:
        """Attribute id from a name or an id (range-checked)."""
        if isinstance(attribute, str):
            return self.index(attribute)
        if not 0 <= int(attribute) < len(self):
            raise UnknownAttributeError(attribute, self.names)
        return int(attribute)
