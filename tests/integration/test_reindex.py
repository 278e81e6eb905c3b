"""Model upgrade (``agman reindex``): real Milvus Lite, real SQLite, two tiny real models.

Model A indexes a few generated images; model B (other weights, so another version) fills its
own collections while A keeps serving; the switch moves SQL and the aliases together; changes
made meanwhile are caught up; a re-run resumes; ``--drop-old`` drops A; reconcile agrees.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.support import noise_jpeg
from tests.support.celery_harness import tiny_checkpoint

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return tiny_checkpoint(root / "a.safetensors"), tiny_checkpoint(root / "b.safetensors")


def _settings(data_dir: Path, checkpoint: Path):  # noqa: ANN202 - Settings
    from agman_milvus.core.config import Settings

    return Settings(data_dir=data_dir, checkpoint=checkpoint, device="cpu", batch_size=2,
                    broker_url=None, milvus_uri=None, database_url=None)


def _ingest(services, product: str, seed: int, **metadata: str) -> int:  # noqa: ANN001
    from agman_milvus.usecases.ingest import index_images, register_image

    reg = register_image(services, product, noise_jpeg(seed, 48, 40, quality=75), metadata or None)
    index_images([reg.image_id], services)
    return reg.image_id


def _store(settings, checkpoint: Path):  # noqa: ANN001, ANN202 - VectorStore of a checkpoint
    from agman_milvus.services.container import Services

    return Services(settings.model_copy(update={"checkpoint": checkpoint})).vectors


def _counts(store) -> dict[str, int]:  # noqa: ANN001
    return {label: store.count(label) for label in [*store.schema.names, "copy"]}


def _reconcile(services, store):  # noqa: ANN001, ANN202
    from agman_milvus.usecases.reconcile import reconcile

    return reconcile(services.catalog, store, store.model_version, dry_run=True, reembed=None)


def _assert_found(search, image_id: int, seed: int) -> None:  # noqa: ANN001 - SearchService
    """The query's own image comes back with cosine ~1 (random models may tie others close)."""
    hits = search.search(noise_jpeg(seed, 48, 40, quality=75), "colour", top_k=5)
    scores = {h.image_id: h.score for h in hits}
    assert scores.get(image_id, 0.0) == pytest.approx(1.0, abs=1e-3)


def test_reindex_fills_the_new_version_then_switches(tmp_path: Path, checkpoints) -> None:
    from agman_milvus.services.container import Services
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import delete_product, update_product
    from agman_milvus.usecases.reindex import reindex
    from agman_milvus.usecases.search import SearchService

    ckpt_a, ckpt_b = checkpoints
    settings = _settings(tmp_path / "data", ckpt_a)
    services = Services(settings)
    ids = [_ingest(services, f"sku-{i}", i, colour="red") for i in range(4)]
    store_a = services.vectors
    version_a = store_a.model_version
    store_a.delete_keypoints([ids[0]])  # as if indexed before copy checks stored keypoints
    assert ids[0] not in store_a.keypoint_image_ids()

    report = reindex(services, ckpt_b, activate=False)
    version_b = report.new_version
    assert version_b != version_a and report.old_version == version_a
    assert sorted(report.embedded) == ids and report.already_done == 0 and not report.activated
    store_b = _store(settings, ckpt_b)
    assert store_b.keypoint_image_ids() == set(ids)  # the missing keypoints were filled in
    assert _counts(store_b) == _counts(store_a) == {"colour": 4, "sleeve": 4, "copy": 4}
    # A still serves: SQL, the aliases and the rows all name A, and reconcile sees no drift.
    assert services.catalog.model_versions.active().version == version_a
    assert store_a.active_version() == version_a
    assert {r.model_version for r in services.catalog.images.get_many(ids).values()} == {version_a}
    assert _reconcile(services, store_a).clean
    alias = store_a.alias("colour")
    before = store_a.client.get(alias, ids=[ids[0]], output_fields=["vector"])[0]["vector"]
    np.testing.assert_allclose(before, store_a.get_vectors("colour", [ids[0]])[ids[0]], atol=1e-6)
    _assert_found(SearchService.from_services(services), ids[0], 0)

    # A re-run skips finished images; a lost vector is written again.
    store_b.client.delete(store_b.collection("sleeve"), ids=[ids[1]])
    again = reindex(services, ckpt_b, activate=False)
    assert again.embedded == [ids[1]] and again.already_done == 3

    # Meanwhile A's world moves on: a new image, an edited product, a deleted product.
    new_id = _ingest(services, "sku-new", 10, colour="blue")
    update_product("sku-2", {"colour": "green"}, services)  # reaches A's collections only
    deleted = delete_product("sku-3", services)  # reaches every version's collections
    assert store_b.count("copy") == 3

    final = reindex(services, ckpt_b)
    assert final.activated and final.old_version == version_a
    assert sorted(final.embedded) == sorted([new_id, ids[2]])  # new image + edited metadata
    assert final.switched_rows == 4 and not final.left_for_reconcile
    assert services.catalog.model_versions.active().version == version_b
    assert store_b.active_version() == version_b
    live = [ids[0], ids[1], ids[2], new_id]
    rows = services.catalog.images.get_many(live)
    assert {(r.status, r.model_version) for r in rows.values()} == {(ImageStatus.indexed, version_b)}
    assert services.catalog.images.get_many(deleted)[deleted[0]].status == ImageStatus.deleted
    assert _counts(store_b) == {"colour": 4, "sleeve": 4, "copy": 4}
    edited = store_b.client.get(store_b.collection("copy"), ids=[ids[2]], output_fields=["colour"])
    assert edited[0]["colour"] == "green"
    after = store_b.client.get(alias, ids=[ids[0]], output_fields=["vector"])[0]["vector"]
    np.testing.assert_allclose(after, store_b.get_vectors("colour", [ids[0]])[ids[0]], atol=1e-6)
    assert not np.allclose(before, after, atol=1e-3)  # the alias now serves B's vectors
    assert _reconcile(services, store_b).clean
    assert version_a in store_b.versions()  # kept without --drop-old

    services_b = Services(settings.model_copy(update={"checkpoint": ckpt_b}))
    _assert_found(SearchService.from_services(services_b), ids[0], 0)
    assert reindex(services_b).to_dict()["embedded"] == 0  # already active: nothing to do
    services.close()
    services_b.close()


def test_cli_reindex_drops_the_old_version(tmp_path: Path, checkpoints, monkeypatch) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app
    from agman_milvus.services.container import Services

    ckpt_a, ckpt_b = checkpoints
    settings = _settings(tmp_path / "data", ckpt_a)
    services = Services(settings)
    ids = [_ingest(services, f"p{i}", 20 + i) for i in range(3)]
    version_a = services.vectors.model_version
    services.close()
    for key, value in {"AGMAN_DATA_DIR": str(tmp_path / "data"), "AGMAN_CHECKPOINT": str(ckpt_a),
                       "AGMAN_DEVICE": "cpu", "AGMAN_BATCH_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    for key in ("AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL", "AGMAN_BROKER_URL"):
        monkeypatch.delenv(key, raising=False)
    runner = CliRunner()

    refused = runner.invoke(app, ["reindex", "--checkpoint", str(ckpt_b), "--no-activate", "--drop-old"])
    assert refused.exit_code == 2 and "needs activate" in refused.output

    result = runner.invoke(app, ["reindex", "--checkpoint", str(ckpt_b), "--drop-old", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["embedded"] == 3 and report["activated"] and report["old_version"] == version_a
    assert len(report["dropped"]) == 3  # colour, sleeve, copy of A

    store_b = _store(settings, ckpt_b)
    assert set(store_b.versions()) == {report["new_version"]}
    assert _counts(store_b) == {"colour": 3, "sleeve": 3, "copy": 3}
    services_b = Services(settings.model_copy(update={"checkpoint": ckpt_b}))
    rows = services_b.catalog.images.get_many(ids)
    assert {r.model_version for r in rows.values()} == {report["new_version"]}
    assert _reconcile(services_b, store_b).clean
    services_b.close()
