"""AgmanEmbeddingFunction: pymilvus.model-style interface over a real (tiny, random) model."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from agman_milvus.app.embedding_function import AgmanEmbeddingFunction, BaseEmbeddingFunction
from agman_milvus.core.model import build_model
from agman_milvus.core.schema import AttributeSchema, UnknownAttributeError

SCHEMA = AttributeSchema.from_dict({"colour": 3, "sleeve length": 2})


@pytest.fixture(scope="module")
def ef() -> AgmanEmbeddingFunction:
    torch.manual_seed(0)
    model = build_model("asen_v2", schema=SCHEMA, backbone="mobilenet_v2", image_size=32)
    return AgmanEmbeddingFunction(model=model, device="cpu", batch_size=2)


def _images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)) for _ in range(3)]


def test_interface_and_shapes(ef: AgmanEmbeddingFunction) -> None:
    assert isinstance(ef, BaseEmbeddingFunction)
    assert ef.attributes == ("colour", "sleeve length")
    docs = ef.encode_documents(_images())
    assert set(docs) == set(ef.attributes)
    for vectors in docs.values():
        assert len(vectors) == 3
        for v in vectors:
            assert v.dtype == np.float32 and v.shape == (ef.dim,)
            assert np.linalg.norm(v) == pytest.approx(1.0, abs=1e-4)
    assert ef(_images(), "colour")[0].shape == (ef.dim,)
    descriptors = ef.encode_copy_descriptors(_images()[:1])
    assert descriptors[0].shape == (ef.descriptor_dim,)


def test_queries_match_documents_and_sources_agree(ef: AgmanEmbeddingFunction) -> None:
    images = _images()
    docs = ef.encode_documents(images)
    queries = ef.encode_queries(images, "sleeve length")
    for q, d in zip(queries, docs["sleeve length"], strict=True):
        np.testing.assert_allclose(q, d, atol=1e-5)  # one backbone pass == per-attribute pass
    buf = io.BytesIO()
    images[0].save(buf, "PNG")
    from_bytes = ef.encode_queries([buf.getvalue()], "colour")[0]
    np.testing.assert_allclose(from_bytes, docs["colour"][0], atol=1e-5)
    assert ef.encode_documents(images, "colour")[1].shape == (ef.dim,)
    # different attributes give different vectors for the same image
    assert not np.allclose(docs["colour"][0], docs["sleeve length"][0])


def test_errors(ef: AgmanEmbeddingFunction) -> None:
    with pytest.raises(UnknownAttributeError, match="known attributes: colour, sleeve length"):
        ef.encode_queries(_images()[:1], "neckline")
    with pytest.raises(TypeError, match="list of images"):
        ef.encode_queries(_images()[0], "colour")  # type: ignore[arg-type]


def test_a_drop_in_for_pymilvus_model_code(ef: AgmanEmbeddingFunction) -> None:
    base = pytest.importorskip("pymilvus.model.base", reason="pymilvus[model] is not installed")
    assert issubclass(AgmanEmbeddingFunction, base.BaseEmbeddingFunction)
    bound = AgmanEmbeddingFunction(embedder=ef._embedder, attribute="colour")
    images = _images()
    documents, queries = bound(images), bound.encode_queries(images)
    assert len(documents) == len(queries) == 3
    for d, q in zip(documents, queries, strict=True):
        np.testing.assert_allclose(d, q, atol=1e-5)
    with pytest.raises(ValueError, match="name the attribute to query"):
        ef.encode_queries(images)
