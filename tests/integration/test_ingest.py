"""Ingest in the embedded mode (no broker): real Milvus Lite, real SQLite, a tiny real model.

Events (ingest, duplicate, update, delete), the pipeline's batches with bad images in them,
re-embedding for reconcile, and ``agman ingest`` on a generated manifest, resumed.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.celery_harness import tiny_checkpoint

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def client(tmp_path: Path, checkpoint: Path) -> Iterator[Client]:  # noqa: F821
    from agman_milvus.app.client import Client

    with Client(data_dir=tmp_path / "data", checkpoint=checkpoint, device="cpu", batch_size=4,
                broker_url=None, milvus_uri=None, database_url=None) as c:
        yield c


def _image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    _image(seed).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _counts(client) -> dict[str, int]:
    store = client.services.vectors
    return {label: store.count(label) for label in [*store.schema.names, "copy"]}


def _keypoint_rows(client, image_id: int) -> int:
    store = client.services.vectors
    rows = store.client.query(store.keypoint_collection, filter=f"image_id == {image_id}",
                              output_fields=["image_id"], consistency_level="Strong")
    return len(rows)


def test_ingest_writes_every_collection_with_the_models_vectors(client, tmp_path: Path) -> None:
    from agman_milvus.core.images import decode_image_bytes
    from agman_milvus.core.phash import phash, to_signed64

    data = _jpeg(1)
    path = tmp_path / "p2.png"
    _image(2).save(path)
    h1 = client.ingest("sku-1", data, {"category": "shirt", "colour": "red", "season": "summer"})
    h2 = client.ingest("sku-2", path)
    h3 = client.ingest("sku-3", _image(3))
    assert [h.status for h in (h1, h2, h3)] == ["indexed"] * 3
    assert not any(h.duplicate for h in (h1, h2, h3))
    assert _counts(client) == {"colour": 3, "sleeve": 3, "copy": 3}

    services = client.services
    expected = services.embedder.encode([decode_image_bytes(data)])
    store = services.vectors
    for k, attribute in enumerate(store.schema.names):
        got = store.get_vectors(attribute, [h1.image_id])[h1.image_id]
        np.testing.assert_allclose(got, expected.embeddings[0, k], atol=1e-4)
    np.testing.assert_allclose(store.get_vectors("copy", [h1.image_id])[h1.image_id],
                               expected.descriptors[0], atol=1e-4)
    row = services.catalog.images.get_many([h1.image_id])[h1.image_id]
    assert (row.width, row.height) == (48, 40)
    assert row.phash == to_signed64(phash(decode_image_bytes(data)))
    assert row.model_version == services.embedder.version == h1.refresh().model_version
    milvus_row = store.client.get(store.collection("colour"), ids=[h1.image_id],
                                  output_fields=["category", "colour", "product_id"])[0]
    assert (milvus_row["category"], milvus_row["colour"]) == ("shirt", "red")
    assert services.blobs.exists(row.sha256)

    # the copy check's keypoints: cached by content, their strongest ones in Milvus for voting
    from agman_milvus.core import copy_vote
    from agman_milvus.services.local_features import LocalFeatureCache, cache_root

    cache = LocalFeatureCache(cache_root(client.settings.data_dir))
    assert cache.path(row.sha256).is_file()
    expected_points = len(copy_vote.vote_vectors(cache.get(row.sha256, lambda: None)))
    assert expected_points > 0 and _keypoint_rows(client, h1.image_id) == expected_points


def test_ingest_without_copy_keypoints(tmp_path: Path, checkpoint: Path) -> None:
    from agman_milvus.app.client import Client

    with Client(data_dir=tmp_path / "data", checkpoint=checkpoint, device="cpu", broker_url=None,
                milvus_uri=None, database_url=None, copy_keypoints=False) as c:
        handle = c.ingest("sku-1", _image(1))
        assert handle.status == "indexed" and _keypoint_rows(c, handle.image_id) == 0
        assert not (tmp_path / "data" / "local_features").exists()


def test_same_image_twice_and_same_event_twice_one_row_one_vector(client, tmp_path: Path) -> None:
    from agman_milvus.usecases.ingest import index_images

    data = _jpeg(7)
    first = client.ingest("sku-7", data)
    again = client.ingest("sku-7", data)  # the same event delivered twice
    path = tmp_path / "same.jpg"
    path.write_bytes(data)
    via_path = client.ingest("sku-7", path)  # the same bytes from another source
    assert first.image_id == again.image_id == via_path.image_id
    assert (first.duplicate, again.duplicate, via_path.duplicate) == (False, True, True)
    assert again.status == "indexed"
    # A redelivered task rewrites the same rows (forced, as after a lost acknowledgement).
    points = _keypoint_rows(client, first.image_id)
    report = index_images([first.image_id, first.image_id], client.services, force=True)
    assert report.indexed == [first.image_id]
    assert _keypoint_rows(client, first.image_id) == points > 0  # replaced, not doubled
    assert client.services.catalog.images.count() == 1
    assert _counts(client) == {"colour": 1, "sleeve": 1, "copy": 1}


def test_bad_images_fail_with_reason_and_the_batch_goes_on(client, tmp_path: Path) -> None:
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import index_images, register_image

    services = client.services
    good = [register_image(services, f"g{i}", _jpeg(20 + i)) for i in range(5)]
    whole = _jpeg(30)
    truncated = register_image(services, "bad-1", whole[:len(whole) // 2])  # header intact
    cut_short = register_image(services, "bad-4", _jpeg(31)[:len(whole) // 2][::-1])  # garbage
    text = register_image(services, "bad-2", b"<html>403</html>")
    missing = register_image(services, "bad-3", tmp_path / "nope.jpg")
    banner = register_image(services, "bad-5", Image.new("RGB", (1, 500)))  # checked before encoding
    assert missing.status == ImageStatus.failed and missing.reason.startswith("not_found:")
    assert not missing.needs_embedding
    # What the header shows is not an image fails at once and its bytes are never stored.
    for reg in (text, cut_short, banner):
        assert reg.status == ImageStatus.failed and not reg.needs_embedding
    assert text.reason.startswith("not_an_image:")
    assert banner.reason.startswith("extreme_aspect_ratio:")
    assert len(list(services.blobs.iter_ids())) == 6  # five good images and the truncated one
    assert truncated.needs_embedding  # pixel data cut short: only decoding finds it
    ids = [r.image_id for r in [good[0], truncated, *good[1:3], *good[3:]]]
    report = index_images(ids, services)  # batch_size 4: the bad image amid good ones
    assert sorted(report.indexed) == sorted(g.image_id for g in good)
    assert report.failed[truncated.image_id].startswith("truncated:")
    rows = services.catalog.images.get_many([*ids, text.image_id])
    assert rows[truncated.image_id].status == ImageStatus.failed
    assert rows[text.image_id].status == ImageStatus.failed
    assert rows[text.image_id].failure_reason.startswith("not_an_image:")
    assert _counts(client) == {"colour": 5, "sleeve": 5, "copy": 5}
    # Sending a failed image again retries it (and it fails again, with its reason).
    handle = client.ingest("bad-2", b"<html>403</html>")
    assert handle.duplicate and handle.status == "failed" and handle.reason.startswith("not_an_image:")


def test_update_reaches_milvus_filter_fields_and_delete_removes_vectors_first(client) -> None:
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import UnknownProductError

    a = client.ingest("sku-a", _jpeg(40), {"colour": "red", "brand": "acme"})
    b = client.ingest("sku-a", _jpeg(41))
    c = client.ingest("sku-c", _jpeg(42), {"colour": "red"})
    store = client.services.vectors
    assert client.update_product("sku-a", {"colour": "navy"}) == 2
    for label in [*store.schema.names, "copy"]:
        rows = store.client.query(store.collection(label), filter='colour == "navy"',
                                  output_fields=["image_id", "brand"], consistency_level="Strong")
        assert sorted(r["image_id"] for r in rows) == sorted([a.image_id, b.image_id])
        assert {r["brand"] for r in rows} == {"acme"}
    # Metadata changed by a new ingest event reaches Milvus too.
    client.ingest("sku-c", _jpeg(42), {"colour": "green"})
    got = store.client.get(store.collection("sleeve"), ids=[c.image_id], output_fields=["colour"])
    assert got[0]["colour"] == "green"

    assert sorted(client.delete_product("sku-a")) == sorted([a.image_id, b.image_id])
    assert _counts(client) == {"colour": 1, "sleeve": 1, "copy": 1}
    assert client.status(a.image_id).status == ImageStatus.deleted.value
    assert sorted(client.delete_product("sku-a")) == sorted([a.image_id, b.image_id])  # idempotent
    with pytest.raises(UnknownProductError, match="no product"):
        client.delete_product("never-seen")


def test_deleted_while_embedding_leaves_no_vector(client) -> None:
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import index_images, register_image

    services = client.services
    reg = register_image(services, "sku-race", _jpeg(50))
    calls = []

    def delete_between_batches(_part) -> None:  # the product is deleted after batch 1 is written
        if not calls:
            calls.append(services.catalog.products.soft_delete("sku-race"))

    other = [register_image(services, f"sku-x{i}", _jpeg(60 + i)).image_id for i in range(4)]
    report = index_images([*other, reg.image_id], services, on_batch=delete_between_batches)
    assert reg.image_id in report.skipped or reg.image_id not in report.indexed
    assert services.catalog.images.get_many([reg.image_id])[reg.image_id].status == ImageStatus.deleted
    assert reg.image_id not in services.vectors.get_vectors("colour", [reg.image_id])
    assert _counts(client) == {"colour": 4, "sleeve": 4, "copy": 4}


def test_reconcile_reembeds_missing_vectors(client) -> None:
    from agman_milvus.usecases.ingest import reembed_images
    from agman_milvus.usecases.reconcile import reconcile

    handles = [client.ingest(f"sku-r{i}", _jpeg(70 + i)) for i in range(3)]
    store = client.services.vectors
    store.client.delete(store.collection("sleeve"), ids=[handles[1].image_id])
    report = reconcile(client.services.catalog, store, store.model_version, dry_run=False,
                       reembed=lambda ids: reembed_images(ids, client.services))
    assert report.missing_vectors == [handles[1].image_id] and report.reembedded == 1
    assert _counts(client) == {"colour": 3, "sleeve": 3, "copy": 3}
    assert client.status(handles[1].image_id).status == "indexed"


def test_broker_without_shared_milvus_fails_fast(tmp_path: Path) -> None:
    from agman_milvus.app.client import Client
    from agman_milvus.services.container import DeploymentError

    with pytest.raises(DeploymentError, match="agman milvus-serve"):
        Client(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", milvus_uri=None)


def test_broker_with_a_served_data_dir_needs_no_milvus_uri(tmp_path: Path) -> None:
    """A process serving the data dir's Milvus Lite (`agman milvus-serve`) is found by workers
    and producers with the same data dir: the broker needs no AGMAN_MILVUS_URI then."""
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import check_shared_deployment
    from agman_milvus.services.store import lite_sharing

    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", milvus_uri=None)
    lite_sharing.publish(Path(settings.resolved_milvus_uri), "http://127.0.0.1:19540", pid=os.getppid())
    check_shared_deployment(settings)


def test_agman_ingest_manifest_resumes(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import Services
    from agman_milvus.services.store.catalog import ImageStatus

    root = tmp_path / "catalog"
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(10):
        _image(100 + i).save(root / "images" / f"{i}.jpg", quality=90)
        rows.append({"file": f"images/{i}.jpg", "id": f"P{i}", "gender": "Women",
                     "baseColour": "Red" if i % 2 else "Blue", "articleType": "Tshirts",
                     "productDisplayName": f"Shirt {i}"})
    rows.append({**rows[3]})  # a repeated row
    rows.append({**rows[0], "file": "images/missing.jpg", "id": "P99"})  # a missing file
    manifest = root / "manifest.csv"
    with manifest.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    data = tmp_path / "data"
    for key in ("AGMAN_BROKER_URL", "AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGMAN_DATA_DIR", str(data))
    monkeypatch.setenv("AGMAN_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("AGMAN_BATCH_SIZE", "4")
    runner = CliRunner()

    def run(*args: str) -> dict:
        result = runner.invoke(app, ["ingest", str(manifest), "--json", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout[result.stdout.index("{"):])

    first = run("--limit", "6")
    assert (first["total"], first["new"], first["indexed"], first["failed"]) == (6, 6, 6, 0)
    second = run()
    assert second["total"] == 12 and second["already_indexed"] == 7  # P0-P5 and the repeat of P3
    assert second["duplicate"] == 7  # six from the first run, one repeated row
    assert second["dispatched"] == 4 and second["indexed"] == 4
    assert second["failed"] == 1 and next(iter(second["failures"].values())).startswith("not_found:")

    services = Services(Settings(data_dir=data, checkpoint=checkpoint))
    catalog = services.catalog
    assert catalog.images.count(ImageStatus.indexed) == 10
    info = catalog.images.info([1])[1]
    assert (info.external_id, info.title, info.colour, info.category, info.gender) == \
        ("P0", "Shirt 0", "Blue", "Tshirts", "Women")
    counts = {label: services.vectors.count(label) for label in ["colour", "sleeve", "copy"]}
    assert counts == {"colour": 10, "sleeve": 10, "copy": 10}


def test_ingest_many_in_process_and_one_validation_first(client) -> None:
    from agman_milvus.core.errors import InvalidProductError

    items = [(f"m-{i}", _jpeg(300 + i), {"colour": "red"}) for i in range(5)]
    items.append({"product_id": "m-bad", "image": b"plain text, not an image"})
    items.append(("m-0", _jpeg(300)))  # a repeat of the first event
    handles = client.ingest_many(items)
    assert [h.status for h in handles] == ["indexed"] * 5 + ["failed", "indexed"]
    assert handles[5].reason.startswith("not_an_image:")
    assert handles[6].duplicate and handles[6].image_id == handles[0].image_id
    assert _counts(client) == {"colour": 5, "sleeve": 5, "copy": 5}

    with pytest.raises(InvalidProductError, match="item 1: ") as info:
        client.ingest_many([("m-new", _jpeg(400)), ("m-nan", _jpeg(401), {"rating": float("nan")})])
    assert info.value.field == "metadata['rating']"
    assert client.services.catalog.products.get("m-new") is None  # nothing of the batch stored


def test_agman_ingest_counts_an_invalid_row_as_failed(tmp_path: Path, checkpoint: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app

    root = tmp_path / "catalog"
    root.mkdir()
    _image(7).save(root / "a.jpg", quality=90)
    _image(8).save(root / "b.jpg", quality=90)
    manifest = root / "manifest.csv"
    manifest.write_text(f"file,id,brand\na.jpg,A1,acme\nb.jpg,{'X' * 300},acme\nb.jpg,B1,{'b' * 256}\n")
    for key in ("AGMAN_BROKER_URL", "AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGMAN_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AGMAN_CHECKPOINT", str(checkpoint))
    result = CliRunner().invoke(app, ["ingest", str(manifest), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{"):])
    assert (summary["total"], summary["indexed"], summary["failed"]) == (3, 1, 2)
    assert set(summary["rejected"]) == {"row 3", "row 4"}
    assert "product id" in summary["rejected"]["row 3"]
    assert "metadata['brand']" in summary["rejected"]["row 4"]
