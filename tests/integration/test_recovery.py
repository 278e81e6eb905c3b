"""Recovery of embedding work, embedded mode: real SQLite, real Milvus Lite, a tiny real model.

* which pending images are stale (claimed by a silent worker, or waiting unclaimed) and that
  taking them stamps them, so two callers never re-send the same image; a re-send goes slice
  by slice until none is left;
* an image whose worker died ``max_attempts`` times is failed with a reason, its batchmates are
  indexed (the state a killed worker leaves is made with the same ``claim`` calls it makes);
* ``agman reconcile`` re-embeds images left pending by a crashed in-process ingest.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.support import noise_jpeg
from tests.support.celery_harness import tiny_checkpoint

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture
def services(tmp_path: Path, checkpoint: Path) -> Iterator[object]:
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import Services

    settings = Settings(data_dir=tmp_path / "data", checkpoint=checkpoint, device="cpu", batch_size=4,
                        broker_url=None, milvus_uri=None, database_url=None, max_attempts=3)
    services = Services(settings)
    yield services
    services.close()


def _register(services, n: int, seed: int = 0) -> list[int]:
    from agman_milvus.usecases.ingest import register_image

    return [register_image(services, f"p{seed + i}", noise_jpeg(seed + i, 48, 40, quality=90),
                           {"colour": "red"}).image_id for i in range(n)]


def _pending_attempts(catalog, image_ids: list[int]) -> dict[int, int]:
    """Attempt counts of the pending images among ``image_ids``, by id."""
    from agman_milvus.services.store.catalog import ImageStatus

    rows = catalog.images.get_many(image_ids)
    return {i: row.attempts for i, row in rows.items() if row.status == ImageStatus.pending}


def test_stale_pending_claimed_unclaimed_and_taken_once(sqlite_catalog) -> None:
    from agman_milvus.services.store.repository import utcnow

    product = sqlite_catalog.products.upsert("p").id
    ids = [sqlite_catalog.images.add(product, f"{i:064x}")[0].id for i in range(4)]
    images = sqlite_catalog.images
    assert images.claim(ids[:2]) == {ids[0]: 1, ids[1]: 1}
    future = utcnow() + timedelta(seconds=5)
    past = utcnow() - timedelta(seconds=60)

    assert images.stale_pending(past, unclaimed=True) == []  # nothing waited 60 s
    assert images.stale_pending(future, unclaimed=False) == ids[:2]  # claimed: stale regardless
    assert images.stale_pending(future, unclaimed=True) == ids  # + unclaimed when none can queue
    assert images.stale_pending(future, unclaimed=True, image_ids=[ids[1], ids[3]]) == [ids[1], ids[3]]
    counts = [images.count_stale(cutoff, unclaimed=u) for cutoff, u in
              [(past, True), (future, False), (future, True)]]
    assert counts == [0, 2, 4]  # what a dry run reports: the same rows, counted in SQL

    assert images.stale_pending(future, unclaimed=False, take=True) == ids[:2]
    assert images.stale_pending(future - timedelta(seconds=4), unclaimed=False, take=True) == []
    rows = images.get_many(ids)
    assert all(rows[i].claimed_at is None for i in ids) and rows[ids[0]].attempts == 1
    # taken rows were stamped as sent now: they are unclaimed and fresh again (the other two,
    # never claimed, were added at the start: on a loaded machine over a second ago)
    assert images.stale_pending(utcnow() - timedelta(seconds=1), unclaimed=True, image_ids=ids[:2]) == []

    images.mark_indexed([ids[2]], "v1")
    assert images.claim(ids) == {ids[0]: 2, ids[1]: 2, ids[3]: 1}  # pending ones only
    images.unclaim([ids[0]])
    assert _pending_attempts(sqlite_catalog, ids) == {ids[0]: 1, ids[1]: 2, ids[3]: 1}
    images.mark_pending([ids[1]])  # an explicit retry starts afresh
    assert _pending_attempts(sqlite_catalog, [ids[1]]) == {ids[1]: 0}


def test_resend_stale_sends_slice_by_slice_until_drained(sqlite_catalog) -> None:
    from agman_milvus.usecases.recovery import resend_stale

    product = sqlite_catalog.products.upsert("p").id
    ids = [sqlite_catalog.images.add(product, f"{i:064x}")[0].id for i in range(5)]
    sqlite_catalog.images.claim(ids[:1])
    time.sleep(1.1)
    sent: list[list[int]] = []

    assert resend_stale(sqlite_catalog, sent.append, 1.0, unclaimed=False, limit=2) == 1
    assert sent == [ids[:1]]  # the queue may still hold the unclaimed ones' messages
    time.sleep(1.1)
    sent.clear()
    assert resend_stale(sqlite_catalog, sent.append, 1.0, unclaimed=True, limit=2) == 5
    assert sent == [ids[:2], ids[2:4], ids[4:]]  # bounded slices, none sent twice
    # Stamped as sent just now: not stale at 2 s, although four of them were added over 2.2 s ago
    # (the margin keeps a slow machine's seconds between the two calls from re-staling them).
    assert resend_stale(sqlite_catalog, sent.append, 2.0, unclaimed=True, limit=2) == 0
    assert resend_stale(sqlite_catalog, sent.append, 0, unclaimed=True) == 0  # 0 disables
    assert len(sent) == 3


def test_image_that_killed_its_workers_fails_and_its_batchmates_are_indexed(services) -> None:
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.recovery import embed_with_attempts

    catalog = services.catalog
    fresh = _register(services, 3, seed=50)
    report = embed_with_attempts(fresh, services)  # a fresh batch runs as one batch
    assert sorted(report.indexed) == sorted(fresh) and report.batches == 1
    assert _pending_attempts(catalog, fresh) == {}  # indexed: not pending any more

    ids = _register(services, 5)
    poison = ids[2]
    # What workers that died leave behind: the batch claimed twice (two workers killed), then
    # split: the images before the poison indexed one by one, the poison claimed alone (killed).
    catalog.images.claim(ids)
    catalog.images.claim(ids)
    for image_id in ids[:2]:
        embed_with_attempts([image_id], services)
    catalog.images.claim([poison])
    assert _pending_attempts(catalog, ids) == {poison: 3, ids[3]: 2, ids[4]: 2}

    report = embed_with_attempts(ids, services)  # the redelivered batch
    rows = catalog.images.get_many(ids)
    assert rows[poison].status == ImageStatus.failed
    assert rows[poison].failure_reason.startswith("gave up after 3 attempts: the worker")
    assert {i for i in ids if rows[i].status == ImageStatus.indexed} == set(ids) - {poison}
    assert sorted(report.indexed) == [ids[3], ids[4]] and list(report.failed) == [poison]
    store = services.vectors
    assert {label: store.count(label) for label in [*store.schema.names, "copy"]} == \
        dict.fromkeys([*store.schema.names, "copy"], 7)


def test_reconcile_reembeds_images_a_crashed_ingest_left_pending(tmp_path: Path, checkpoint: Path,
                                                                  monkeypatch) -> None:
    from typer.testing import CliRunner

    from agman_milvus.app.cli import app
    from agman_milvus.core.config import Settings
    from agman_milvus.services.container import Services
    from agman_milvus.services.store.catalog import ImageStatus

    data = tmp_path / "data"
    settings = Settings(data_dir=data, checkpoint=checkpoint, device="cpu", broker_url=None,
                        milvus_uri=None, database_url=None)
    services = Services(settings)
    _ = services.vectors  # the model version is registered, as the crashed ingest did
    ids = _register(services, 3, seed=200)
    services.close()

    for key in ("AGMAN_BROKER_URL", "AGMAN_MILVUS_URI", "MILVUS_URI", "AGMAN_DATABASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AGMAN_DATA_DIR", str(data))
    monkeypatch.setenv("AGMAN_CHECKPOINT", str(checkpoint))
    monkeypatch.setenv("AGMAN_DEVICE", "cpu")
    monkeypatch.setenv("AGMAN_PENDING_RESEND_AFTER", "3600")
    runner = CliRunner()

    def reconcile(*args: str) -> dict:
        result = runner.invoke(app, ["reconcile", *args])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout[result.stdout.index("{"):])

    assert reconcile("--dry-run")["stale_pending"] == 0  # registered under an hour ago
    monkeypatch.setenv("AGMAN_PENDING_RESEND_AFTER", "1")  # no wall-clock race with the CLI's start
    time.sleep(1.2)
    assert reconcile("--dry-run")["stale_pending"] == 3
    assert reconcile()["stale_pending"] == 3
    assert reconcile("--dry-run")["clean"]

    services = Services(settings)
    try:
        rows = services.catalog.images.get_many(ids)
        assert {r.status for r in rows.values()} == {ImageStatus.indexed}
        assert services.vectors.count("copy") == 3
    finally:
        services.close()
