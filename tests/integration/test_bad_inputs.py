"""The bad-input corpus through a real worker: every case ends failed with its reason or
indexed with the right vectors, the good images of the same batch are indexed, and the worker
survives. What the header already shows is bad fails at registration and leaves no bytes in
the blob store; the rest (damaged pixel data, URLs) fails in the worker. Real Redis, an
``agman worker`` subprocess, a ``milvus-lite server`` subprocess,
the corpus's local HTTP servers, a tiny real model.
"""

from __future__ import annotations

import io
import os
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support.bad_images import CORPUS_ENV, CORPUS_LIMITS, bad_image_corpus
from tests.support.celery_harness import (
    REDIS_URL,
    Worker,
    delete_redis_keys,
    milvus_lite_server,
    redis_available,
    tiny_checkpoint,
    wait_until,
)

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]


def _good_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_bad_input_corpus_through_a_worker(tmp_path: Path) -> None:
    if not redis_available():
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    from agman_milvus.core.config import Settings
    from agman_milvus.core.images import probe_image_bytes
    from agman_milvus.services.container import Services
    from agman_milvus.services.embedding import Embedder
    from agman_milvus.services.fetch import load_image
    from agman_milvus.services.store.catalog import ImageStatus
    from agman_milvus.usecases.ingest import register_image
    from agman_milvus.workers.app import create_app
    from agman_milvus.workers.producer import CeleryDispatcher

    checkpoint = tiny_checkpoint(tmp_path / "tiny.safetensors")
    key_prefix = f"agman-test-{uuid.uuid4().hex[:8]}:"
    with milvus_lite_server(tmp_path / "milvus.db") as milvus_uri, \
            bad_image_corpus(tmp_path / "corpus") as cases:
        values = {
            "AGMAN_DATA_DIR": str(tmp_path / "data"), "AGMAN_MILVUS_URI": milvus_uri,
            "AGMAN_BROKER_URL": REDIS_URL, "AGMAN_BROKER_KEY_PREFIX": key_prefix,
            "AGMAN_CHECKPOINT": str(checkpoint), "AGMAN_COLLECTION_PREFIX": f"b{uuid.uuid4().hex[:8]}",
            "AGMAN_BATCH_SIZE": "8", "AGMAN_DEVICE": "cpu", **CORPUS_ENV,
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AGMAN_", "MILVUS_URI"))}
        env.update(values, OMP_NUM_THREADS="1")
        settings = Settings(**{k[len("AGMAN_"):].lower(): v for k, v in values.items()})
        services = Services(settings)
        worker = Worker(env, tmp_path / "worker.log").start()
        try:
            regs = {case.name: register_image(services, f"case-{case.name}", case.source)
                    for case in cases}
            good = [register_image(services, f"good-{i}", _good_jpeg(i)) for i in range(3)]
            todo = [r.image_id for r in [*regs.values(), *good] if r.needs_embedding]
            assert len(todo) >= 20  # most cases reach the worker, in one batch with the good ones
            # Only images are stored: every blob passes the header checks, and no case that
            # failed at registration left bytes behind.
            stored = set(services.blobs.iter_ids())
            for sha in stored:
                probe_image_bytes(services.blobs.get(sha), settings=settings)
            early = [r.image_id for r in regs.values() if r.status == ImageStatus.failed]
            assert len(early) >= 10
            assert not {row.sha256 for row in services.catalog.images.get_many(early).values()} & stored
            CeleryDispatcher(create_app(settings), task_batch=len(todo)).submit(todo)
            catalog = services.catalog

            def settled() -> bool:
                rows = catalog.images.get_many(todo).values()
                return all(r.status != ImageStatus.pending for r in rows)

            wait_until(settled, 120, poll=0.2, what="the batch to finish")
            assert worker.alive(), worker.log()[-3000:]

            rows = catalog.images.get_many([r.image_id for r in [*regs.values(), *good]])
            wrong = []
            for case in cases:
                row = rows[regs[case.name].image_id]
                if case.ok and row.status != ImageStatus.indexed:
                    wrong.append(f"{case.name}: {row.status.value} {row.failure_reason}")
                if not case.ok and (row.status != ImageStatus.failed
                                    or not (row.failure_reason or "").startswith(case.expect + ":")):
                    wrong.append(f"{case.name}: expected failed({case.expect}), got "
                                 f"{row.status.value} {row.failure_reason!r}")
            assert not wrong, "\n".join(wrong)
            assert all(rows[g.image_id].status == ImageStatus.indexed for g in good)

            # Indexed means indexed correctly: the stored vectors are the model's output for the
            # safely decoded image, and width/height/phash were recorded.
            embedder = Embedder(checkpoint=checkpoint, device="cpu")
            indexed = [c for c in cases if c.ok]
            ids = [regs[c.name].image_id for c in indexed]
            expected = embedder.encode([load_image(c.source, **CORPUS_LIMITS) for c in indexed])
            store = services.vectors
            for k, attribute in enumerate(store.schema.names):
                got = store.get_vectors(attribute, ids)
                for j, image_id in enumerate(ids):
                    np.testing.assert_allclose(got[image_id], expected.embeddings[j, k], atol=2e-3)
            copies = store.get_vectors("copy", ids)
            for j, image_id in enumerate(ids):
                np.testing.assert_allclose(copies[image_id], expected.descriptors[j], atol=2e-3)
                assert rows[image_id].width and rows[image_id].height and rows[image_id].phash is not None

            n_indexed = catalog.images.count(ImageStatus.indexed)
            assert n_indexed == len(indexed) + len(good)
            assert {label: store.count(label) for label in [*store.schema.names, "copy"]} == \
                dict.fromkeys([*store.schema.names, "copy"], n_indexed)
            assert "raised unexpected" not in worker.log()  # no task failed as a whole
        finally:
            worker.stop()
            services.close()
            delete_redis_keys(key_prefix)
