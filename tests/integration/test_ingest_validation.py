"""One validation before anything is stored, the same on SQLite and PostgreSQL, and no bytes
kept that are not an image: invalid product events raise ``InvalidProductError`` with nothing
recorded (no row, no blob); what passes is stored as given on both backends; a failing SQL
write leaves no orphan blob; ``sweep_orphans`` keeps exactly the blobs rows name.
"""

from __future__ import annotations

import io
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.timeout(120)

FILTERS = ["category", "brand", "gender", "colour", "season"]


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture
def client(database_url: str, tmp_path: Path) -> Iterator[Client]:  # noqa: F821
    """A Client on the parametrized catalog backend; these tests never reach the model."""
    from agman_milvus.app.client import Client

    with Client(data_dir=tmp_path / "data", database_url=database_url, broker_url=None,
                milvus_uri=None, filter_fields=FILTERS) as c:
        yield c


def _blobs(client) -> list[str]:
    return sorted(client.services.blobs.iter_ids())


BAD_EVENTS = [
    ("", {}, "product_id"),
    ("   ", {}, "product_id"),
    ("p" * 256, {}, "product_id"),  # products.external_id is VARCHAR(255)
    ("sku\x00nul", {}, "product_id"),
    ("sku\nline", {}, "product_id"),
    ("sku-\ud800", {}, "product_id"),
    (1234, {}, "product_id"),
    ("sku", {"brand": "b" * 256}, "metadata['brand']"),
    ("sku", {"title": "t" * 513}, "metadata['title']"),
    ("sku", {"colour": "c" * 65}, "metadata['colour']"),
    ("sku", {"season": "\u00e9" * 257}, "metadata['season']"),  # 514 bytes: Milvus VARCHAR(512)
    ("sku", {"category": "\u4e2d" * 171}, "metadata['category']"),  # 171 chars but 513 bytes
    ("sku", {"brand": {"name": "acme"}}, "metadata['brand']"),  # nested in a typed field
    ("sku", {"season": ["ss", "aw"]}, "metadata['season']"),  # a filter field takes one value
    ("sku", {"rating": float("nan")}, "metadata['rating']"),
    ("sku", {"price": float("inf")}, "metadata['price']"),
    ("sku", {"raw": b"bytes"}, "metadata['raw']"),
    ("sku", {"pair": (1, 2)}, "metadata['pair']"),
    ("sku", {"m": {(1, 2): "tuple key"}}, "metadata['m']"),
    ("sku", {"deep": [[[[["five levels"]]]]]}, "metadata['deep'][0][0][0][0]"),
    ("sku", {"note": "nul\x00inside"}, "metadata['note']"),
    ("sku", {"big": 2**64}, "metadata['big']"),
    ("sku", {"": "empty key"}, "metadata"),
    ("sku", {"blob": "x" * 70_000}, "metadata"),
]


@pytest.mark.parametrize("product_id, metadata, field", BAD_EVENTS,
                         ids=[f"{i}-{e[2]}" for i, e in enumerate(BAD_EVENTS)])
def test_invalid_events_raise_one_typed_error_and_store_nothing(client, product_id, metadata,
                                                                field: str) -> None:
    from agman_milvus.core.errors import AgmanError, InvalidProductError

    with pytest.raises(InvalidProductError) as info:
        client.ingest(product_id, _png(1), metadata)
    assert isinstance(info.value, AgmanError) and isinstance(info.value, ValueError)
    assert info.value.field == field, str(info.value)
    assert "\n" not in str(info.value) and len(str(info.value)) < 300
    assert client.services.catalog.products.external_ids() == set()
    assert client.services.catalog.images.count() == 0
    assert _blobs(client) == []


def test_what_passes_is_stored_as_given_on_every_backend(client) -> None:
    from agman_milvus.core.errors import InvalidProductError
    from agman_milvus.usecases.ingest import register_image

    services = client.services
    product_id = "\u00fc" * 255
    metadata = {
        "title": "T" * 512, "brand": "\u00e9" * 255,  # 510 bytes: fits Milvus' 512
        "category": "\u4e2d" * 170, "colour": "Red", "gender": 1, "season": True,
        "tags": ["a", {"sizes": ["S", "M"], "stock": {"eu": [1, 2.5, None, False]}}],
        "notes": "tab\tnewline\n", "rating": 4.5,
    }
    reg = register_image(services, product_id, _png(2), metadata)
    assert reg.status.value == "pending" and reg.needs_embedding
    product = services.catalog.products.get(product_id)
    assert (product.title, product.brand, product.category, product.colour, product.gender) == (
        metadata["title"], metadata["brand"], metadata["category"], "Red", "1")
    assert product.extra == {"season": True, "tags": metadata["tags"], "notes": "tab\tnewline\n",
                             "rating": 4.5}
    with pytest.raises(InvalidProductError):  # update_product validates the same way
        client.update_product(product_id, {"brand": "b" * 300})
    assert services.catalog.products.get(product_id).brand == metadata["brand"]


def test_bytes_that_are_not_an_image_are_never_kept(client, tmp_path: Path) -> None:
    from agman_milvus.usecases.ingest import register_image

    services = client.services
    text = tmp_path / "shadow.jpg"
    text.write_text("root:$6$salt$hash:19000:0:99999:7:::\n")
    link = tmp_path / "passwd.png"
    link.symlink_to("/etc/passwd")
    line = io.BytesIO()
    Image.new("L", (1, 200_000)).save(line, "PNG")
    outcomes = {
        "text": register_image(services, "p-text", text),
        "symlink": register_image(services, "p-link", link),
        "uri": register_image(services, "p-uri", link.as_uri()),
        "bytes": register_image(services, "p-bytes", b"<html>not an image</html>"),
        "line": register_image(services, "p-line", line.getvalue()),
        "proc": register_image(services, "p-proc", "/proc/self/environ"),
    }
    reasons = {name: (reg.status.value, (reg.reason or "").split(":")[0])
               for name, reg in outcomes.items()}
    assert reasons == {
        "text": ("failed", "not_an_image"), "symlink": ("failed", "not_an_image"),
        "uri": ("failed", "not_an_image"), "bytes": ("failed", "not_an_image"),
        "line": ("failed", "extreme_aspect_ratio"), "proc": ("failed", "forbidden_path"),
    }
    assert _blobs(client) == []

    good = register_image(services, "p-good", _png(3))
    (sha,) = _blobs(client)
    path = services.blobs.path(sha)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(services.blobs.root.stat().st_mode) == 0o700
    assert good.needs_embedding


def test_a_failed_sql_write_leaves_no_orphan_blob(tmp_path: Path) -> None:
    """A real SQL failure after the bytes were stored (the images table is gone): the call
    raises and its blob is removed again."""
    from sqlalchemy.exc import OperationalError

    from agman_milvus.app.client import Client
    from agman_milvus.services.store.migrate import upgrade
    from agman_milvus.usecases.ingest import register_image

    db = tmp_path / "broken.sqlite"
    upgrade(f"sqlite:///{db}")
    with sqlite3.connect(db) as con:
        con.execute("DROP TABLE images")
    with Client(data_dir=tmp_path / "data", database_url=f"sqlite:///{db}", broker_url=None,
                milvus_uri=None) as client:
        with pytest.raises(OperationalError):
            register_image(client.services, "p-1", _png(4))
        assert _blobs(client) == []


def test_sweep_keeps_exactly_the_blobs_rows_name(client) -> None:
    from agman_milvus.usecases.ingest import register_image

    services = client.services
    kept = register_image(services, "p-kept", _png(5))
    orphan = services.blobs.put(_png(6))  # bytes no row names (e.g. a crash between the two)
    (sha_kept,) = services.catalog.images.referenced_sha256(services.blobs.iter_ids())
    assert services.catalog.images.get_many([kept.image_id])[kept.image_id].sha256 == sha_kept
    for sha in (sha_kept, orphan):
        old = os.stat(services.blobs.path(sha)).st_mtime - 7200
        os.utime(services.blobs.path(sha), (old, old))
    assert services.blobs.sweep_orphans(services.catalog.images.referenced_sha256) == [orphan]
    assert _blobs(client) == [sha_kept]
