"""Reconcile repairs drift created on purpose between a real catalog and real Milvus."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient
from typer.testing import CliRunner

from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.store.catalog import Catalog, ImageStatus
from agman_milvus.services.store.vectors import COPY, VectorRow, VectorStore
from agman_milvus.usecases.reconcile import reconcile

SCHEMA = AttributeSchema.from_dict({"colour": ["red", "blue"], "pattern": 3})
DIM, DESC_DIM = 8, 12


def vector_for(image_id: int, salt: str, dim: int) -> np.ndarray:
    """A deterministic unit vector per image (what an embedder would give for its pixels)."""
    seed = int.from_bytes(hashlib.sha256(f"{image_id}:{salt}".encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


class Embedder:
    """A real re-embed step: writes every image's vectors and marks the rows indexed."""

    def __init__(self, catalog: Catalog, store: VectorStore) -> None:
        self.catalog, self.store, self.calls = catalog, store, []  # type: list[list[int]]

    def __call__(self, image_ids: list[int]) -> None:
        self.calls.append(list(image_ids))
        images = self.catalog.images.get_many(image_ids)
        rows = [
            VectorRow(i, images[i].product_id,
                      {a: vector_for(i, a, DIM) for a in SCHEMA.names}, vector_for(i, COPY, DESC_DIM))
            for i in image_ids if images[i].status == ImageStatus.pending
        ]
        self.store.upsert(rows)
        self.catalog.images.mark_indexed([r.image_id for r in rows], self.store.model_version)


@pytest.fixture
def world(sqlite_catalog: Catalog, milvus_client: MilvusClient, collection_prefix: str):
    store = VectorStore(milvus_client, SCHEMA, "v2", embed_dim=DIM, descriptor_dim=DESC_DIM,
                        prefix=collection_prefix, search_consistency="Strong")
    store.ensure_collections()
    embed = Embedder(sqlite_catalog, store)
    product = sqlite_catalog.products.upsert("p1").id
    ids = [sqlite_catalog.images.add(product, f"{i:064x}")[0].id for i in range(8)]
    embed(ids)
    embed.calls.clear()
    return sqlite_catalog, store, embed, ids


def make_drift(catalog: Catalog, store: VectorStore, ids: list[int]) -> dict[str, object]:
    client = store.client
    # 1. an indexed row lost its vector in one attribute collection
    client.delete(store.collection("pattern"), ids=[ids[0]])
    # 2. vectors whose row does not exist at all
    orphan = VectorRow(9999, 1, {a: vector_for(9999, a, DIM) for a in SCHEMA.names},
                       vector_for(9999, COPY, DESC_DIM))
    store.upsert([orphan])
    # 3. vectors of a row that failed, and of a row that was deleted
    catalog.images.mark_failed(ids[1], "decode error")
    deleted_product = catalog.products.upsert("p-deleted").id
    deleted_id = catalog.images.add(deleted_product, "f" * 64)[0].id
    store.upsert([VectorRow(deleted_id, deleted_product,
                            {a: vector_for(deleted_id, a, DIM) for a in SCHEMA.names})])
    catalog.products.soft_delete("p-deleted")
    # 4. a row indexed by an older model version
    catalog.images.mark_indexed([ids[2]], "v1")
    # 5. a vector written by another model version into the active collection
    client.upsert(store.collection("colour"), [{
        "image_id": ids[3], "product_id": 1, "model_version": "v1",
        "vector": vector_for(ids[3], "old", DIM).tolist(),
        **{f: "" for f in store.filter_fields},
    }])
    store.deployment.after_write(client, store.collection("colour"))
    return {"deleted_id": deleted_id}


def test_reconcile_finds_and_repairs_drift(world) -> None:
    catalog, store, embed, ids = world
    drift = make_drift(catalog, store, ids)
    deleted_id = drift["deleted_id"]

    dry = reconcile(catalog, store, "v2", dry_run=True, reembed=embed)
    assert not dry.clean
    assert dry.missing_vectors == [ids[0], ids[3]]
    assert dry.stale_rows == [ids[2]]
    assert dry.stale_vectors["colour"] == [ids[3]]
    for label in (*SCHEMA.names, COPY):
        expected = {9999, ids[1]} | ({deleted_id} if label != COPY else set())
        assert set(dry.orphan_vectors[label]) == expected, label
    # a dry run changes nothing
    assert embed.calls == [] and store.count("colour") == 10
    assert catalog.images.get_many([ids[2]])[ids[2]].model_version == "v1"

    report = reconcile(catalog, store, "v2", dry_run=False, reembed=embed)
    assert report.deleted_vectors == 3 + 3 + 2 + 1  # 9999 x3, failed x3, deleted x2, stale x1
    assert report.reembedded == 3 and embed.calls == [sorted([ids[0], ids[2], ids[3]])]

    after = reconcile(catalog, store, "v2", dry_run=True, reembed=embed)
    assert after.clean, after.to_dict()
    for label in (*SCHEMA.names, COPY):
        assert store.count(label) == 7  # the 8 images minus the failed one
    assert {v for _, v in store.iter_image_ids(store.collection("colour"))} == {"v2"}
    assert catalog.images.get_many([ids[2]])[ids[2]].model_version == "v2"
    np.testing.assert_allclose(store.get_vectors("colour", [ids[3]])[ids[3]],
                               vector_for(ids[3], "colour", DIM), atol=1e-6)


def test_reconcile_deletes_orphan_keypoints(world) -> None:
    catalog, store, embed, ids = world
    rng = np.random.default_rng(0)

    def keypoints(n: int) -> np.ndarray:
        v = rng.random((n, 128), dtype=np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    # 9999 lies far above the others: the scan's windows widen across the gap
    store.upsert_keypoints([(ids[0], 1, keypoints(300)), (ids[1], 1, keypoints(300)),
                            (9999, 1, keypoints(5))])
    catalog.images.mark_failed(ids[1], "decode error")

    dry = reconcile(catalog, store, "v2", dry_run=True, reembed=embed)
    assert dry.orphan_keypoints == [ids[1], 9999] and not dry.clean
    assert dry.without_keypoints == 6  # indexed, never given keypoints: counted, not drift
    assert store.keypoint_image_ids() == {ids[0], ids[1], 9999}  # a dry run changes nothing

    reconcile(catalog, store, "v2", dry_run=False, reembed=embed)
    assert store.keypoint_image_ids() == {ids[0]}
    after = reconcile(catalog, store, "v2", dry_run=True, reembed=embed)
    assert after.clean and after.orphan_keypoints == [], after.to_dict()


def test_keypoint_scan_finds_every_image_of_a_window_fuller_than_one_query(world) -> None:
    from agman_milvus.services.store.vectors import KEYPOINT_QUERY_LIMIT, MAX_KEYPOINTS

    _, store, _, _ = world
    vectors = np.zeros((MAX_KEYPOINTS, 128), np.float32)
    vectors[:, 0] = 1.0
    images = range(100, 100 + KEYPOINT_QUERY_LIMIT // MAX_KEYPOINTS + 8)  # one query cannot hold them
    store.upsert_keypoints([(i, 1, vectors) for i in images])
    assert store.keypoint_image_ids() == set(images)


def test_reconcile_sweeps_orphan_blobs(world, tmp_path: Path) -> None:
    """Blobs no image row (any status) and no screening job names, older than an hour, go;
    named ones and fresh ones (an ingest in flight) stay."""
    from agman_milvus.services.blobs import BlobStore

    catalog, store, embed, _ = world
    blobs = BlobStore(tmp_path / "blobs")
    named, failed, orphan, fresh, screened = (blobs.put(f"bytes {n}".encode()) for n in range(5))
    catalog.screening_jobs.create(2, {"queries": ["/some/path.jpg", blobs.uri(screened)]})
    product = catalog.products.upsert("p-blobs").id
    catalog.images.add(product, named)
    failed_id = catalog.images.add(product, failed)[0].id
    catalog.images.mark_failed(failed_id, "corrupt: pixel data")  # kept: the event may be retried
    for sha in (named, failed, orphan, screened):
        old = os.stat(blobs.path(sha)).st_mtime - 7200
        os.utime(blobs.path(sha), (old, old))

    dry = reconcile(catalog, store, "v2", dry_run=True, reembed=embed, blobs=blobs)
    assert dry.orphan_blobs == [orphan] and dry.to_dict()["orphan_blobs"] == 1
    assert blobs.exists(orphan)
    report = reconcile(catalog, store, "v2", dry_run=False, reembed=embed, blobs=blobs)
    assert report.orphan_blobs == [orphan]
    assert set(blobs.iter_ids()) == {named, failed, fresh, screened}


def test_reconcile_without_pipeline_reports_missing(world) -> None:
    catalog, store, embed, ids = world
    store.client.delete(store.collection(COPY), ids=[ids[4]])
    store.upsert([VectorRow(5555, 1, {a: vector_for(5555, a, DIM) for a in SCHEMA.names})])
    report = reconcile(catalog, store, "v2", dry_run=False, reembed=None)
    assert report.missing_vectors == [ids[4]]
    assert report.deleted_vectors == 2  # the orphan is still removed
    assert report.unrepaired and "reembed_images" in report.unrepaired[0]
    assert catalog.images.get_many([ids[4]])[ids[4]].status == ImageStatus.indexed  # left alone
    with pytest.raises(ValueError, match="not the active version"):
        reconcile(catalog, store, "v3", dry_run=True, reembed=None)


@pytest.mark.parametrize("milvus_client", ["lite"], indirect=True)
def test_reconcile_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, milvus_client: MilvusClient) -> None:
    """``agman reconcile --dry-run`` on the embedded default (SQLite + Milvus Lite in data_dir)."""
    from agman_milvus.app.cli import app
    from agman_milvus.core.config import Settings
    from agman_milvus.services.store.catalog import open_catalog

    monkeypatch.setenv("AGMAN_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("AGMAN_DATABASE_URL", raising=False)
    monkeypatch.delenv("AGMAN_MILVUS_URI", raising=False)
    monkeypatch.delenv("MILVUS_URI", raising=False)
    runner = CliRunner()
    refused = runner.invoke(app, ["reconcile", "--dry-run"])
    assert refused.exit_code == 2 and "no active model" in refused.output

    settings = Settings(data_dir=tmp_path)
    catalog = open_catalog(settings)
    catalog.model_versions.register("v2", name="agman", backbone="mobilenet_v2",
                                    attribute_schema=SCHEMA.to_json(), embed_dim=DIM,
                                    descriptor_dim=DESC_DIM)
    catalog.model_versions.set_active("v2")
    store = VectorStore.from_settings(settings, SCHEMA, "v2", embed_dim=DIM, descriptor_dim=DESC_DIM)
    store.ensure_collections()
    product = catalog.products.upsert("p").id
    image_id = catalog.images.add(product, "a" * 64)[0].id
    catalog.images.mark_indexed([image_id], "v2")  # indexed, but no vectors: drift

    orphan = settings.blob_dir / "ab" / "cd" / ("abcd" + "0" * 60)  # bytes no row names
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"left by a crash")
    os.utime(orphan, (0, 0))
    result = runner.invoke(app, ["reconcile", "--dry-run"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["missing_vectors"] == 1 and report["dry_run"] is True and not report["clean"]
    assert report["orphan_blobs"] == 1 and orphan.exists()
    catalog.dispose()
