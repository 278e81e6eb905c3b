"""The SQL catalog against real SQLite and PostgreSQL (parametrized by ``database_url``)."""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from agman_milvus.core.config import Settings
from agman_milvus.services.store.catalog import (
    Catalog,
    CatalogError,
    ImageStatus,
    JobNotFoundError,
    JobStatus,
    open_catalog,
)
from agman_milvus.services.store.migrate import CatalogNotMigratedError
from agman_milvus.services.store.repository import utcnow
from agman_milvus.services.store.tables import Image, Product


def sha(n: int) -> str:
    return hashlib.sha256(str(n).encode()).hexdigest()


def test_upsert_product_creates_then_updates_metadata(catalog: Catalog) -> None:
    first = catalog.products.upsert("sku-1", {"title": "Red shirt", "brand": "Acme", "season": "Summer"})
    assert first.external_id == "sku-1" and first.brand == "Acme"
    assert first.extra == {"season": "Summer"}

    again = catalog.products.upsert("sku-1", {"brand": "Acme Co", "year": 2012, "title": None})
    assert again.id == first.id
    assert again.brand == "Acme Co"
    assert again.title == "Red shirt"  # None leaves the stored value alone
    assert again.extra == {"season": "Summer", "year": 2012}
    with Session(catalog.engine) as s:
        assert s.scalar(select(func.count()).select_from(Product)) == 1


def test_add_image_is_idempotent_per_product(catalog: Catalog) -> None:
    p1 = catalog.products.upsert("sku-1").id
    p2 = catalog.products.upsert("sku-2").id
    image, created = catalog.images.add(p1, sha(1), source_uri="file:///a.jpg", width=8, height=6,
                                        phash=-(2**63))
    assert created and image.status == ImageStatus.pending and image.phash == -(2**63)
    again, created_again = catalog.images.add(p1, sha(1), source_uri="file:///other.jpg")
    assert not created_again and again.id == image.id and again.source_uri == "file:///a.jpg"
    other, created_other = catalog.images.add(p2, sha(1))  # same bytes, another product
    assert created_other and other.id != image.id
    with pytest.raises(ValueError, match="signed 64-bit"):
        catalog.images.add(p1, sha(2), phash=2**63)


def test_add_image_is_race_safe(catalog: Catalog) -> None:
    product = catalog.products.upsert("sku-race").id
    barrier = threading.Barrier(6)

    def add(_: int) -> tuple[int, bool]:
        barrier.wait()
        image, created = catalog.images.add(product, sha(42))
        return image.id, created

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(add, range(6)))
    assert len({image_id for image_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    with Session(catalog.engine) as s:
        assert s.scalar(select(func.count()).select_from(Image)) == 1


def test_upsert_product_is_race_safe(catalog: Catalog) -> None:
    barrier = threading.Barrier(6)

    def upsert(i: int) -> int:
        barrier.wait()
        return catalog.products.upsert("sku-same", {"brand": f"b{i % 2}"}).id

    with ThreadPoolExecutor(6) as pool:
        ids = set(pool.map(upsert, range(6)))
    assert len(ids) == 1


def test_status_transitions_and_listing(catalog: Catalog) -> None:
    pid = catalog.products.upsert("sku-1").id
    ids = [catalog.images.add(pid, sha(i))[0].id for i in range(5)]

    def pending() -> list[int]:
        return [image_id for image_id, _ in catalog.images.iter_ids(ImageStatus.pending)]

    assert pending() == ids

    assert catalog.images.mark_indexed(ids[:2], "v1") == 2
    catalog.images.mark_failed(ids[2], "cannot decode: truncated JPEG")
    catalog.images.mark_failed(ids[2], "cannot decode: truncated JPEG")
    rows = catalog.images.get_many(ids)
    assert rows[ids[0]].status == ImageStatus.indexed and rows[ids[0]].model_version == "v1"
    assert rows[ids[0]].indexed_at is not None
    assert rows[ids[2]].status == ImageStatus.failed
    assert rows[ids[2]].failure_reason == "cannot decode: truncated JPEG"
    assert rows[ids[2]].attempts == 2
    assert pending() == ids[3:]

    assert list(catalog.images.iter_ids(ImageStatus.indexed, batch_size=1)) == [
        (ids[0], "v1"),
        (ids[1], "v1"),
    ]
    assert catalog.images.count(ImageStatus.pending) == 2

    catalog.images.mark_pending([ids[0], ids[2]])
    assert pending() == [ids[0], ids[2], ids[3], ids[4]]
    assert catalog.images.get_many([ids[2]])[ids[2]].failure_reason is None


def test_soft_delete_product(catalog: Catalog) -> None:
    keep = catalog.products.upsert("keep").id
    gone = catalog.products.upsert("gone").id
    kept = catalog.images.add(keep, sha(1))[0].id
    doomed = [catalog.images.add(gone, sha(i))[0].id for i in (2, 3)]
    catalog.images.mark_indexed([kept, *doomed], "v1")

    assert sorted(catalog.products.soft_delete("gone")) == sorted(doomed)
    rows = catalog.images.get_many([kept, *doomed])
    assert rows[kept].status == ImageStatus.indexed
    assert all(rows[i].status == ImageStatus.deleted for i in doomed)
    product = catalog.products.get("gone")
    assert product is not None and product.deleted and product.deleted_at is not None
    # deleted rows stay deleted even when a late worker reports them indexed
    assert catalog.images.mark_indexed(doomed, "v1") == 0
    with pytest.raises(CatalogError, match="no product"):
        catalog.products.soft_delete("never-existed")

    # re-ingesting revives the product and the image
    catalog.products.upsert("gone")
    image, created = catalog.images.add(gone, sha(2))
    assert not created and image.status == ImageStatus.pending
    assert not catalog.products.get("gone").deleted  # type: ignore[union-attr]


def test_image_info_joins_product_metadata(catalog: Catalog) -> None:
    pid = catalog.products.upsert("sku-9", {"title": "Blue dress", "brand": "Zeta",
                                            "category": "Dress", "gender": "Women",
                                            "colour": "Blue", "usage": "Party"}).id
    image_id = catalog.images.add(pid, sha(9), source_uri="s3://bucket/9.jpg")[0].id
    info = catalog.images.info([image_id, 999_999])
    assert list(info) == [image_id]
    row = info[image_id]
    assert (row.external_id, row.brand, row.colour, row.source_uri) == ("sku-9", "Zeta", "Blue", "s3://bucket/9.jpg")
    assert row.metadata()["usage"] == "Party" and row.metadata()["category"] == "Dress"


def test_model_registry(catalog: Catalog) -> None:
    schema = {"attributes": [{"name": "colour", "values": ["red", "blue"]}]}
    for version in ("v1", "v2"):
        catalog.model_versions.register(version, name="agman", backbone="mobilenet_v2",
                                        attribute_schema=schema, embed_dim=16, descriptor_dim=24)
    again = catalog.model_versions.register("v1", name="x", backbone="y", attribute_schema={},
                                            embed_dim=1, descriptor_dim=1)
    assert again.name == "agman"  # idempotent: the first registration wins
    assert catalog.model_versions.active() is None
    catalog.model_versions.set_active("v1")
    catalog.model_versions.set_active("v2")
    active = catalog.model_versions.active()
    assert active is not None and active.version == "v2" and active.attribute_schema == schema
    with pytest.raises(CatalogError, match="not registered"):
        catalog.model_versions.set_active("v3")


def test_indexed_ids_and_sources(catalog: Catalog) -> None:
    pid = catalog.products.upsert("sku-1").id
    other = catalog.products.upsert("sku-2").id
    with_uri = catalog.images.add(pid, sha(1), source_uri="file:///1.jpg")[0].id
    without_uri = catalog.images.add(pid, sha(2))[0].id
    pending = catalog.images.add(pid, sha(3), source_uri="file:///3.jpg")[0].id
    elsewhere = catalog.images.add(other, sha(4), source_uri="file:///4.jpg")[0].id
    catalog.images.mark_indexed([without_uri, with_uri, elsewhere], "v1")

    assert catalog.images.indexed_ids(pid) == sorted([with_uri, without_uri])
    assert pending not in catalog.images.indexed_ids(pid)
    assert sorted(catalog.images.indexed_sources()) == [
        (with_uri, pid, "file:///1.jpg"), (elsewhere, other, "file:///4.jpg")]


def test_switch_model_activates_and_restamps_live_images_together(catalog: Catalog) -> None:
    for version in ("v1", "v2"):
        catalog.model_versions.register(version, name="agman", backbone="mobilenet_v2",
                                        attribute_schema={}, embed_dim=4, descriptor_dim=4)
    catalog.model_versions.set_active("v1")
    pid = catalog.products.upsert("sku").id
    indexed, pending, failed = (catalog.images.add(pid, sha(i))[0].id for i in range(3))
    deleted = catalog.images.add(catalog.products.upsert("gone").id, sha(9))[0].id
    catalog.images.mark_indexed([indexed, deleted], "v1")
    catalog.images.mark_failed(failed, "broken")
    catalog.products.soft_delete("gone")

    with pytest.raises(CatalogError, match="not registered"):
        catalog.model_versions.switch("v3", [indexed, pending])
    assert catalog.model_versions.active().version == "v1"  # type: ignore[union-attr]

    assert catalog.model_versions.switch("v2", [indexed, pending, failed, deleted]) == 2
    assert catalog.model_versions.active().version == "v2"  # type: ignore[union-attr]
    rows = catalog.images.get_many([indexed, pending, failed, deleted])
    assert {i: (r.status, r.model_version) for i, r in rows.items()} == {
        indexed: (ImageStatus.indexed, "v2"), pending: (ImageStatus.indexed, "v2"),
        failed: (ImageStatus.failed, None), deleted: (ImageStatus.deleted, "v1"),
    }


def test_screening_job_lifecycle(catalog: Catalog) -> None:
    jobs = catalog.screening_jobs
    job_id = jobs.create(5, {"queries": ["a", "b", "c", "d", "e"], "top_k": 2}, chunk_size=2)
    job = jobs.get(job_id)
    assert (job.status, job.done, job.total, job.params["top_k"]) == (JobStatus.queued, 0, 5, 2)
    assert [(c.start, c.stop, c.done) for c in jobs.chunks(job_id)] == [(0, 2, 0), (2, 4, 0), (4, 5, 0)]

    jobs.start_chunk(job_id, 2, "w1@host")
    assert jobs.get(job_id).status == JobStatus.running and jobs.chunk(job_id, 2).worker == "w1@host"
    match = {"query_ref": "c", "matched_image_id": None, "matched_product_id": None,
             "verdict": "copy", "score": 0.9, "evidence": {"rank": 1}}
    assert jobs.record_batch(job_id, 2, [match], done_before=0, done_after=2)
    # a second run of that chunk (a redelivered message) cannot commit the same batch again
    assert not jobs.record_batch(job_id, 2, [{**match, "score": 0.8}], done_before=0, done_after=2)
    assert [(m.query_ref, m.score) for m in jobs.matches(job_id)] == [("c", 0.9)]
    assert jobs.get(job_id).done == 2 and jobs.chunk(job_id, 2).done == 2

    jobs.fail(job_id, "RuntimeError: " + "x" * 5000)
    failed = jobs.get(job_id)
    assert failed.status == JobStatus.failed and len(failed.error or "") == 4000
    assert failed.finished_at is not None
    jobs.start_chunk(job_id, 0, "w2@host")  # another chunk starting does not hide the failure
    assert jobs.get(job_id).status == JobStatus.failed
    jobs.start(job_id)  # a rerun of the whole job does
    assert jobs.get(job_id).error is None and jobs.get(job_id).status == JobStatus.running

    assert jobs.record_batch(job_id, 4, [], done_before=0, done_after=1)
    jobs.finish_if_complete(job_id)
    assert jobs.get(job_id).status == JobStatus.running  # chunk 0 is still to do
    assert jobs.record_batch(job_id, 0, [{**match, "query_ref": "a"}], done_before=0, done_after=2)
    job, matches = jobs.get_with_matches(job_id)  # the last batch marked it done
    assert (job.status, job.done) == (JobStatus.done, 5) and job.finished_at is not None
    assert [m.query_ref for m in matches] == ["c", "a"]
    summary = jobs.summary(job_id)  # what following a job reads: its state, not its queries
    assert (summary.status, summary.done, summary.total, summary.error) == ("done", 5, 5, None)
    assert summary.finished_at == job.finished_at and summary.to_dict()["id"] == job_id

    with pytest.raises(JobNotFoundError):
        jobs.get(job_id + 1000)
    with pytest.raises(JobNotFoundError):
        jobs.summary(job_id + 1000)
    with pytest.raises(JobNotFoundError):
        jobs.get_with_matches(job_id + 1000)
    with pytest.raises(JobNotFoundError):
        jobs.chunk(job_id, 1)


def test_open_catalog_embedded_default_migrates_sqlite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    catalog = open_catalog(settings)
    try:
        pid = catalog.products.upsert("sku").id
        assert catalog.images.add(pid, sha(1))[1]
        assert (tmp_path / "data" / "catalog.sqlite").exists()
    finally:
        catalog.dispose()


def test_open_catalog_refuses_unmigrated_configured_database(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url=f"sqlite:///{tmp_path / 'empty.sqlite'}")
    with pytest.raises(CatalogNotMigratedError, match="agman db upgrade"):
        open_catalog(settings)


def test_stale_screening_chunks_are_taken_once(catalog: Catalog) -> None:
    jobs = catalog.screening_jobs
    job_id = jobs.create(4, {"queries": list("abcd")}, chunk_size=2)
    earlier, later = utcnow() - timedelta(seconds=60), utcnow() + timedelta(seconds=60)
    assert jobs.stale_chunks(earlier, unclaimed=True) == []  # sent just now
    assert jobs.stale_chunks(later, unclaimed=False) == []  # none claimed
    assert jobs.stale_chunks(later, unclaimed=True) == [(job_id, 0), (job_id, 2)]  # never claimed

    jobs.start_chunk(job_id, 0, "w1@host")
    assert jobs.stale_chunks(earlier, unclaimed=False) == []  # its run is alive
    assert jobs.stale_chunks(later, unclaimed=False, take=True) == [(job_id, 0)]  # gone silent
    assert jobs.stale_chunks(later, unclaimed=False, take=True) == []  # taken once
    chunk = jobs.chunk(job_id, 0)
    assert chunk.claimed_at is None and chunk.sent_at is not None

    assert jobs.record_batch(job_id, 2, [], done_before=0, done_after=2)  # finished: never stale
    assert jobs.stale_chunks(later, unclaimed=True) == [(job_id, 0)]
    jobs.fail(job_id, "RuntimeError: boom")  # a failed job's chunks are not re-sent
    assert jobs.stale_chunks(later, unclaimed=True) == []
