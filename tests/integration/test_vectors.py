"""The vector store against real Milvus Lite, and a real Milvus 2.3.5 server in the server tier."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from pymilvus import MilvusClient

from agman_milvus.core.config import Settings
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.store import lite_sharing
from agman_milvus.services.store.filters import FilterError, build_filter, quote_string
from agman_milvus.services.store.milvus_compat import HNSW_BUILD, probe
from agman_milvus.services.store.vectors import (
    COPY,
    KEYPOINT_HNSW_BUILD,
    Hit,
    MilvusLiteLockedError,
    VectorRow,
    VectorStore,
    VectorStoreError,
    close_milvus,
    dedupe_by_product,
    hold_milvus,
    lite_server_uri,
    open_milvus,
    release_milvus,
    search_distinct_products,
    version_tag,
)

SCHEMA = AttributeSchema.from_dict({"sleeve length": ["short", "long"], "neckline": 3})
DIM, DESC_DIM = 16, 24
HOSTILE = [
    'x" or product_id > 0 or "',
    "x' or product_id > 0 or '",
    "back\\slash",
    "trailing\\",
    '\\"',
    "line\nbreak\r\ttab",
    "ünïcödé 🙂 中文",
    "a) or (product_id >= 0",
    "%_like",
]


def unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_store(client: MilvusClient, prefix: str, version: str = "v1", **kw: object) -> VectorStore:
    store = VectorStore(client, SCHEMA, version, embed_dim=DIM, descriptor_dim=DESC_DIM,
                        prefix=prefix, search_consistency="Strong", **kw)  # type: ignore[arg-type]
    store.ensure_collections()
    return store


def make_rows(rng: np.random.Generator, ids: list[int], products: list[int],
              brands: list[str] | None = None) -> list[VectorRow]:
    rows = []
    for k, (image_id, product_id) in enumerate(zip(ids, products, strict=True)):
        vecs = {a: unit(rng, 1, DIM)[0] for a in SCHEMA.names}
        meta = {"brand": brands[k] if brands else f"brand{product_id % 3}", "colour": "Red"}
        rows.append(VectorRow(image_id, product_id, vecs, unit(rng, 1, DESC_DIM)[0], meta))
    return rows


# -- filters (pure) ---------------------------------------------------------------------------
def test_build_filter_declared_fields_only() -> None:
    fields = {"brand": str, "colour": str, "product_id": int}
    assert build_filter(None, fields) == ""
    assert build_filter({"brand": "Nike", "colour": ["Red", "Blue"]}, fields) == \
        'brand == "Nike" and colour in ["Red", "Blue"]'
    assert build_filter({"product_id": 7}, fields) == "product_id == 7"
    with pytest.raises(FilterError, match="filterable fields: brand, colour, product_id"):
        build_filter({"brand or 1": "x"}, fields)
    with pytest.raises(FilterError, match="integer"):
        build_filter({"product_id": "7 or 1"}, fields)
    with pytest.raises(FilterError, match="empty list"):
        build_filter({"colour": []}, fields)
    with pytest.raises(FilterError, match="control character"):
        build_filter({"brand": "bell\x07"}, fields)


def test_quote_string_round_trips_through_python_literal_rules() -> None:
    # Milvus' escapes are a C-style subset; Python's literal syntax agrees on that subset.
    import ast

    for value in HOSTILE:
        assert ast.literal_eval(quote_string(value)) == value


# -- deployment quirks ------------------------------------------------------------------------
def test_deployment_probe_and_index_params(milvus_client: MilvusClient, collection_prefix: str) -> None:
    deployment = probe(milvus_client)
    store = make_store(milvus_client, collection_prefix)
    index = milvus_client.describe_index(store.collection(0), "vector")
    assert index["index_type"] == "HNSW" and index["metric_type"] == "COSINE"
    # Lite drops flat build params silently; the compat layer must make them stick
    assert _hnsw_build(index) == HNSW_BUILD
    keypoints = milvus_client.describe_index(store.keypoint_collection, "vector")
    assert _hnsw_build(keypoints) == KEYPOINT_HNSW_BUILD  # walked briefly for voting: a cheaper graph
    if deployment.lite:
        assert deployment.grouping_search and not deployment.binary_vectors
    else:
        assert deployment.version.startswith("v2.3") and not deployment.grouping_search

    store.upsert(make_rows(np.random.default_rng(9), [1, 2, 3], [1, 1, 2]))
    if deployment.lite:  # writes are flushed, so the HNSW index covers them (no slow path)
        index = milvus_client.describe_index(store.collection(0), "vector")
        assert index["indexed_rows"] == 3 and index["pending_index_rows"] == 0


def _hnsw_build(index: dict) -> dict[str, int]:
    """M and efConstruction of a described index: flat on a server, under "params" on Lite."""
    flat = {k: int(v) for k, v in index.items() if k in HNSW_BUILD}
    return flat or {k: int(v) for k, v in index.get("params", {}).items() if k in HNSW_BUILD}


def test_lite_quirk_no_binary_vectors(milvus_client: MilvusClient, collection_prefix: str) -> None:
    """Why perceptual hashes live in SQL: Lite cannot store binary vectors."""
    from pymilvus import DataType, MilvusException

    if not probe(milvus_client).lite:
        pytest.skip("a Lite quirk")
    schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
    schema.add_field("image_id", DataType.INT64, is_primary=True)
    schema.add_field("phash", DataType.BINARY_VECTOR, dim=64)
    index = milvus_client.prepare_index_params()
    index.add_index(field_name="phash", index_type="BIN_FLAT", metric_type="HAMMING")
    with pytest.raises(MilvusException, match="BinaryVector"):
        milvus_client.create_collection(f"{collection_prefix}_phash", schema=schema, index_params=index)


def test_ensure_collections_layout_and_idempotence(
    milvus_client: MilvusClient, collection_prefix: str
) -> None:
    store = make_store(milvus_client, collection_prefix)
    store.ensure_collections()
    names = store.collection_names()
    assert set(names) == {"sleeve length", "neckline", COPY}
    assert names["sleeve length"] == f"{collection_prefix}_sleeve_length__v1"
    assert set(names.values()) <= set(milvus_client.list_collections())
    assert store.active_version() == "v1" and store.is_active
    fields = {f["name"] for f in milvus_client.describe_collection(names[COPY])["fields"]}
    assert fields == {"image_id", "product_id", "model_version", "vector", *store.filter_fields}
    other_dim = VectorStore(milvus_client, SCHEMA, "v1", embed_dim=DIM + 1, descriptor_dim=DESC_DIM,
                            prefix=collection_prefix)
    with pytest.raises(VectorStoreError, match="different layout"):
        other_dim.ensure_collections()


def test_upsert_is_idempotent_and_delete(milvus_client: MilvusClient, collection_prefix: str) -> None:
    rng = np.random.default_rng(0)
    store = make_store(milvus_client, collection_prefix)
    rows = make_rows(rng, [1, 2, 3], [10, 10, 11])
    store.upsert(rows)
    store.upsert(rows)  # the same images again: no duplicates
    for label in store.collection_names():
        assert store.count(label) == 3

    changed = VectorRow(1, 10, {a: unit(rng, 1, DIM)[0] for a in SCHEMA.names}, None, {"brand": "new"})
    store.upsert([changed])
    got = store.get_vectors("neckline", [1, 2, 999])
    assert set(got) == {1, 2}
    np.testing.assert_allclose(got[1], changed.vectors["neckline"], atol=1e-6)
    assert store.count(COPY) == 3  # no descriptor given -> copy row untouched

    store.delete_images([2])
    assert all(store.count(label) == 2 for label in store.collection_names())
    store.delete_product(10)
    assert all(store.count(label) == 1 for label in store.collection_names())
    assert [i for i, _ in store.iter_image_ids(store.collection(0))] == [3]
    assert store.existing_collections() == set(store.collection_names().values())

    store.upsert(make_rows(rng, [4, 5, 6], [12, 12, 13]))
    store.delete_from(store.collection(COPY), [3, 4, 5], batch_size=2)  # one collection only
    assert store.count(COPY) == 1 and store.count(0) == 4


def keypoint_rows(store: VectorStore) -> dict[int, int]:
    """``{image_id: keypoint rows}`` in the store's keypoint collection."""
    rows = store.client.query(store.keypoint_collection, filter="image_id >= 0",
                              output_fields=["image_id"], consistency_level="Strong")
    out: dict[int, int] = {}
    for row in rows:
        out[int(row["image_id"])] = out.get(int(row["image_id"]), 0) + 1
    return out


def test_keypoints_are_replaced_per_image_found_and_deleted(
    milvus_client: MilvusClient, collection_prefix: str
) -> None:
    rng = np.random.default_rng(3)
    store = make_store(milvus_client, collection_prefix)
    assert store.keypoint_collection in milvus_client.list_collections()
    points = {1: unit(rng, 5, 128), 2: unit(rng, 3, 128), 3: unit(rng, 4, 128)}
    assert store.upsert_keypoints([(i, 10 + (i == 3), v) for i, v in points.items()]) == 12
    assert store.upsert_keypoints([(1, 10, points[1][:2])]) == 2  # image 1 again: replaced
    assert keypoint_rows(store) == {1: 2, 2: 3, 3: 4}

    found = store.search_keypoints(points[2][:2] + 0.01, top_k=2)
    assert [hits[0] for hits in found] == [2, 2]
    with pytest.raises(ValueError, match="NaN"):
        store.upsert_keypoints([(4, 10, np.full((1, 128), np.nan))])

    store.delete_images([2])
    assert keypoint_rows(store) == {1: 2, 3: 4}
    store.delete_product(11)
    assert keypoint_rows(store) == {1: 2}
    # every model version shares them; dropping an old version leaves them alone
    v2 = make_store(milvus_client, collection_prefix, "v2")
    v2.activate()
    store.drop_version("v1")
    assert keypoint_rows(v2) == {1: 2}


def test_delete_images_takes_a_long_id_list(milvus_client: MilvusClient, collection_prefix: str) -> None:
    """2,500 ids go out in requests of 1,000, not as one oversized delete expression."""
    rng = np.random.default_rng(5)
    store = make_store(milvus_client, collection_prefix)
    store.upsert(make_rows(rng, [7, 1500, 2400, 3000], [1, 2, 3, 4]))
    store.upsert_keypoints([(i, 1, unit(rng, 2, 128)) for i in (7, 1500, 2400, 3000)])
    store.delete_images(range(2500))
    assert all(store.count(label) == 1 for label in store.collection_names())
    assert keypoint_rows(store) == {3000: 2}


def test_upsert_rejects_bad_rows(milvus_client: MilvusClient, collection_prefix: str) -> None:
    store = make_store(milvus_client, collection_prefix)
    good = np.ones(DIM, np.float32)
    with pytest.raises(ValueError, match="no vector for attributes"):
        store.upsert([VectorRow(1, 1, {"neckline": good})])
    with pytest.raises(ValueError, match="expected a 16-d vector"):
        store.upsert([VectorRow(1, 1, {"neckline": good, "sleeve length": np.ones(3)})])
    with pytest.raises(ValueError, match="NaN"):
        store.upsert([VectorRow(1, 1, {"neckline": good, "sleeve length": good * np.nan})])
    with pytest.raises(KeyError, match="known attributes"):
        store.search("hem", [good], 3)
    assert store.count(0) == 0


def test_search_self_match_and_attribute_spaces(milvus_client: MilvusClient, collection_prefix: str) -> None:
    rng = np.random.default_rng(1)
    store = make_store(milvus_client, collection_prefix)
    rows = make_rows(rng, list(range(1, 41)), list(range(1, 41)))
    store.upsert(rows)
    for attr in SCHEMA.names:
        queries = np.stack([rows[5].vectors[attr], rows[17].vectors[attr]])
        hits = store.search(attr, queries, top_k=5)
        assert [h[0].image_id for h in hits] == [6, 18]
        assert hits[0][0].score == pytest.approx(1.0, abs=1e-4)
        assert all(a.score >= b.score for a, b in zip(hits[0], hits[0][1:], strict=False))
    copy_hits = store.search_copy([rows[3].descriptor], top_k=3)  # type: ignore[list-item]
    assert copy_hits[0][0].image_id == 4


def test_a_released_collection_is_loaded_again_without_pymilvus_traceback(
        milvus_client: MilvusClient, collection_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """A collection released under the store (another process took the catalogue over) is
    loaded and the call made again; pymilvus' report of the first try, a traceback, is dropped
    (the store's warning says what happened)."""
    rng = np.random.default_rng(3)
    store = make_store(milvus_client, collection_prefix)
    rows = make_rows(rng, list(range(1, 11)), list(range(1, 11)))
    store.upsert(rows)
    attr = SCHEMA.names[0]
    assert store.search(attr, [rows[2].vectors[attr]], top_k=1)[0][0].image_id == 3
    milvus_client.release_collection(store.collection(attr))
    with caplog.at_level(logging.DEBUG):
        hits = store.search(attr, [rows[2].vectors[attr]], top_k=1)
    assert hits[0][0].image_id == 3
    assert any("was released" in r.getMessage() for r in caplog.records if r.name.startswith("agman_milvus"))
    assert not [r for r in caplog.records if r.name.startswith("pymilvus")], caplog.text


@pytest.mark.parametrize("grouping", [None, False], ids=["probed", "overfetch"])
def test_one_hit_per_product(milvus_client: MilvusClient, collection_prefix: str,
                             grouping: bool | None) -> None:
    rng = np.random.default_rng(2)
    store = make_store(milvus_client, collection_prefix, grouping=grouping)
    # 12 products with 1..8 images each; product 0's images crowd the neighbourhood of q
    q = unit(rng, 1, DIM)[0]
    ids, products, vecs = [], [], []
    next_id = 1
    for product in range(12):
        for _ in range(8 if product == 0 else 1 + product % 3):
            noise = 0.05 if product == 0 else 0.6
            v = q + noise * rng.normal(size=DIM).astype(np.float32)
            ids.append(next_id)
            products.append(product)
            vecs.append(v / np.linalg.norm(v))
            next_id += 1
    rows = [
        VectorRow(i, p, {a: v for a in SCHEMA.names}, None, {})
        for i, p, v in zip(ids, products, vecs, strict=True)
    ]
    store.upsert(rows)

    hits = store.search("neckline", [q], top_k=5)[0]
    # exact answer by brute force: best image per product, top 5 products
    sims = np.stack(vecs) @ q
    best: dict[int, tuple[float, int]] = {}
    for i, p, s in zip(ids, products, sims, strict=True):
        if p not in best or s > best[p][0]:
            best[p] = (float(s), i)
    expected = sorted(best.items(), key=lambda kv: -kv[1][0])[:5]
    assert [h.product_id for h in hits] == [p for p, _ in expected]
    assert [h.image_id for h in hits] == [i for _, (_, i) in expected]
    assert len({h.product_id for h in hits}) == 5

    everything = store.search("neckline", [q], top_k=50)[0]  # more than there are products
    assert sorted(h.product_id for h in everything) == list(range(12))
    raw = store.search("neckline", [q], top_k=5, one_per_product=False)[0]
    assert [h.product_id for h in raw].count(0) >= 4  # without dedupe product 0 dominates


def test_search_distinct_products_fetches_more_until_enough() -> None:
    calls: list[int] = []
    pool = [Hit(i, 0 if i < 30 else i, 1.0 - i / 100) for i in range(40)]

    def run(batch: list[list[float]], limit: int) -> list[list[Hit]]:
        calls.append(limit)
        return [pool[:limit] for _ in batch]

    out = search_distinct_products(run, [[0.0]], top_k=3)
    assert [h.product_id for h in out[0]] == [0, 30, 31]
    assert calls == [12, 48]  # 12 hits held only 1 product; 48 exhausted the pool
    assert dedupe_by_product([Hit(1, 5, 0.2), Hit(2, 5, 0.9)], 3) == [Hit(2, 5, 0.9)]


def test_hostile_filter_values(milvus_client: MilvusClient, collection_prefix: str) -> None:
    rng = np.random.default_rng(3)
    store = make_store(milvus_client, collection_prefix)
    brands = [*HOSTILE, "plain"]
    rows = make_rows(rng, list(range(1, len(brands) + 1)), list(range(1, len(brands) + 1)), brands)
    store.upsert(rows)
    q = [rows[0].vectors["neckline"]]
    for k, brand in enumerate(brands):
        hits = store.search("neckline", q, top_k=20, filters={"brand": brand})[0]
        assert [h.image_id for h in hits] == [k + 1], brand
    hits = store.search("neckline", q, top_k=20, filters={"brand": [HOSTILE[0], "plain"]})[0]
    assert sorted(h.image_id for h in hits) == [1, len(brands)]
    hits = store.search("neckline", q, top_k=20, filters={"brand": "plain", "product_id": 1})[0]
    assert hits == []
    with pytest.raises(FilterError, match="filterable fields: brand, category, colour, gender, product_id"):
        store.search("neckline", q, top_k=3, filters={"model_version": "v1"})


def test_version_switch_never_mixes_versions(milvus_client: MilvusClient, collection_prefix: str) -> None:
    rng = np.random.default_rng(4)
    v1 = make_store(milvus_client, collection_prefix, "v1")
    v1.upsert(make_rows(rng, [1, 2, 3], [1, 2, 3]))
    assert v1.active_version() == "v1"

    v2 = make_store(milvus_client, collection_prefix, "model-2.0+abc")  # built while v1 serves
    assert v2.active_version() == "v1" and not v2.is_active
    v2.upsert(make_rows(rng, [1, 2], [1, 2]))
    q = [np.ones(DIM, np.float32)]
    assert {h.image_id for h in v2.search("neckline", q, top_k=10)[0]} == {1, 2}
    assert {h.image_id for h in v1.search("neckline", q, top_k=10)[0]} == {1, 2, 3}
    assert {v for _, v in v2.iter_image_ids(v2.collection(0))} == {"model-2.0+abc"}

    v2.activate()
    assert v1.active_version() == v2.active_version() == "model-2.0+abc"
    alias = milvus_client.describe_alias(v2.alias("neckline"))
    assert alias["collection_name"] == v2.collection("neckline")
    assert set(v2.versions()) == {"v1", "model-2.0+abc"}

    v2.delete_images([1])  # deletes reach every version's collections
    assert v1.count("neckline") == 2 and v2.count("neckline") == 1
    with pytest.raises(VectorStoreError, match="is active"):
        v1.drop_version("model-2.0+abc")
    assert sorted(v2.drop_version("v1")) == sorted(v1.collection_names().values())
    assert set(v2.versions()) == {"model-2.0+abc"}


def test_version_tag_is_collection_safe() -> None:
    assert version_tag("v1") == "v1"
    tag = version_tag("agman-mobilenet_v2@2026.11/abc")
    assert tag.replace("_", "").isalnum() and len(tag) <= 40
    assert version_tag("a.b") != version_tag("a_b")


# -- opening Milvus Lite ----------------------------------------------------------------------
def _lite_holder(directory: Path) -> subprocess.Popen[str]:
    """Another process holding the Milvus Lite ``directory`` (opened by pymilvus alone, no port
    published) until its input ends; returned once it holds it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from pymilvus import MilvusClient
            MilvusClient({str(directory)!r})
            print("ready", flush=True)
            sys.stdin.read()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
    return holder


@pytest.mark.skipif(__import__("os").environ.get("AGMAN_TEST_MILVUS_SERVER") == "1",
                    reason="Milvus Lite tests run in the default tier")
def test_open_milvus_caches_and_explains_the_lite_lock(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    holder = _lite_holder(tmp_path / "milvus.db")
    try:
        start = time.monotonic()
        with pytest.raises(MilvusLiteLockedError, match="agman milvus-serve.*AGMAN_MILVUS_URI"):
            open_milvus(settings)
        assert time.monotonic() - start < 30
        ended = subprocess.Popen([sys.executable, "-c", "pass"])
        ended.wait()  # a record left by a process that is gone is not followed
        lite_sharing.publish(tmp_path / "milvus.db", "http://127.0.0.1:9", pid=ended.pid)
        with pytest.raises(MilvusLiteLockedError):
            open_milvus(settings)
        lite_sharing.serving_file(tmp_path / "milvus.db").unlink()
    finally:
        holder.communicate("", timeout=60)
    client = open_milvus(settings)  # the holder exited: now it opens, once per process
    assert open_milvus(settings) is client
    assert client.list_collections() == []

    # closing it frees the directory for another process while this one lives on
    assert close_milvus(settings)
    other = subprocess.run(
        [sys.executable, "-c", f"from pymilvus import MilvusClient\n"
                               f"print(MilvusClient({str(tmp_path / 'milvus.db')!r}).list_collections())"],
        capture_output=True, text=True, timeout=120)
    assert other.returncode == 0 and other.stdout.strip().splitlines()[-1] == "[]", other.stderr[-2000:]
    assert open_milvus(settings).list_collections() == []  # and this process opens it afresh


def test_a_held_lite_is_joined_over_the_port_its_holder_published(tmp_path: Path) -> None:
    """A process that opens an embedded Milvus Lite publishes the port it serves it on; another
    process works over that port (and names it to its own children). When the holder closes it
    (its process lives on), the other process's next call waits for the lock and opens the
    directory itself, and that process publishes its own port."""
    settings = Settings(data_dir=tmp_path)
    record = lite_sharing.serving_file(tmp_path / "milvus.db")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from agman_milvus.core.config import Settings
            from agman_milvus.services.store.vectors import close_milvus, open_milvus
            settings = Settings(data_dir={str(tmp_path)!r})
            open_milvus(settings).create_collection("shared", dimension=4)
            print("ready", flush=True)
            sys.stdin.readline()
            print("closing", flush=True)
            close_milvus(settings)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "ready"
        published = json.loads(record.read_text())
        assert published["pid"] == holder.pid
        client = open_milvus(settings)
        assert client.list_collections() == ["shared"]
        client.insert("shared", [{"id": 7, "vector": [1.0, 0.0, 0.0, 0.0]}])
        assert lite_server_uri(settings) == published["uri"]  # what this process's children search
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "closing"
        deadline = time.monotonic() + 30
        while record.exists() and time.monotonic() < deadline:  # withdrawn first, then the lock freed
            time.sleep(0.01)
        assert client.list_collections() == ["shared"]  # opened here now, by the same client
        assert json.loads(record.read_text())["pid"] == os.getpid()  # and this process publishes
        assert lite_server_uri(settings) == json.loads(record.read_text())["uri"] != published["uri"]
        client.load_collection("shared")
        rows = client.query("shared", filter="id >= 0", output_fields=["id"], consistency_level="Strong")
        assert [r["id"] for r in rows] == [7]
        assert close_milvus(settings) and not record.exists()
    finally:
        holder.communicate("\n", timeout=60)


def test_an_open_is_tried_again_when_the_holder_frees_the_lock_right_after_it_failed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process opening a Lite directory whose holder is letting it go (a screening job's
    children when the process they joined closes it) may fail to open while the lock is still
    held and then find it free: it opens it again instead of failing ("Open local milvus
    failed" ended a job in CI). The holder is a real process; it exits exactly in that gap."""
    from agman_milvus.services.store import vectors

    holder = _lite_holder(tmp_path / "milvus.db")
    real_locked = lite_sharing.locked
    checks: list[bool] = []

    def lock_freed_after_the_failed_open(directory: Path) -> bool:
        if not checks:  # the first open failed on the held lock: the holder lets it go now
            holder.communicate("", timeout=60)
        checks.append(real_locked(directory))
        return checks[-1]

    monkeypatch.setattr(vectors.lite_sharing, "locked", lock_freed_after_the_failed_open)
    settings = Settings(data_dir=tmp_path)
    try:
        client = open_milvus(settings)
        assert checks == [False]  # one failed open, found unlocked, then opened here
        assert client.list_collections() == []
        assert json.loads(lite_sharing.serving_file(tmp_path / "milvus.db").read_text())["pid"] == os.getpid()
    finally:
        close_milvus(settings)
        if holder.poll() is None:
            holder.communicate("", timeout=60)


#: Runs the CLI (its arguments after ``-c``) with SIGINT handled and not blocked, as a shell starts
#: it: an ignored or blocked SIGINT survives exec, and under the full suite the server ignored
#: Ctrl+C for two minutes in two runs (something in the test process may change its signal state;
#: not traced). Set in the new interpreter, not in a ``preexec_fn``: forking a process whose gRPC
#: threads are busy runs gRPC's fork handlers, and the server's child once died of SIGABRT there.
_CLI_AS_FROM_A_SHELL = (
    "import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT}); "
    "runpy.run_module('agman_milvus.app.cli', run_name='__main__', alter_sys=True)"
)


def test_a_client_of_a_stopped_milvus_serve_waits_for_a_server_and_never_opens_the_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that joined `agman milvus-serve` (a worker found it by the data dir) does not
    take the directory over when the server stops, which would keep the restarted server out:
    its calls fail with a one-line reason until a server serves it again, then join that one."""
    from agman_milvus.services.store import vectors
    from tests.support import listening
    from tests.support.celery_harness import free_port

    def serve() -> subprocess.Popen[bytes]:
        port = free_port()
        command = [sys.executable, "-c", _CLI_AS_FROM_A_SHELL, "milvus-serve", "--port", str(port)]
        server = subprocess.Popen(command, env={**os.environ, "AGMAN_DATA_DIR": str(tmp_path)})
        deadline = time.monotonic() + 60
        while not listening(f"http://127.0.0.1:{port}", port):
            assert server.poll() is None and time.monotonic() < deadline, "milvus-serve did not start"
            time.sleep(0.2)
        return server

    monkeypatch.setattr(vectors, "RECONNECT_TIMEOUT", 3.0)
    settings = Settings(data_dir=tmp_path)
    record = lite_sharing.serving_file(tmp_path / "milvus.db")
    server = serve()
    try:
        assert json.loads(record.read_text())["server"] is True
        client = open_milvus(settings)
        client.create_collection("shared", dimension=4)
        server.send_signal(2)  # Ctrl+C
        server.wait(timeout=60)
        with pytest.raises(VectorStoreError, match="start `agman milvus-serve` again"):
            client.list_collections()
        assert not lite_sharing.locked(tmp_path / "milvus.db")  # this process did not open it
        server = serve()  # started again: the next call joins it
        assert client.list_collections() == ["shared"]
        assert lite_server_uri(settings) == json.loads(record.read_text())["uri"]
    finally:
        close_milvus(settings)
        server.send_signal(2)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a server that ignores Ctrl+C (it happened under the full suite):
            server.kill()  # leave no server behind
            server.wait()
            raise


def test_only_the_last_holder_closes_an_embedded_lite(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    client = open_milvus(settings)
    try:
        assert release_milvus(settings) is False  # nobody held it: nothing to release
        assert open_milvus(settings) is client
        hold_milvus(settings)
        hold_milvus(settings)
        assert release_milvus(settings) is False and open_milvus(settings) is client
        assert release_milvus(settings) is True  # the last holder closes it
        client = open_milvus(settings)  # a new client for the next user
    finally:
        close_milvus(settings)
