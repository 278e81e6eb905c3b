"""The Embedder's model pass: chunked batches give the model's own outputs, empty input works."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from agman_milvus.core import runtime
from agman_milvus.core.model import build_model
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.embedding import Embedder


def test_chunks_give_the_models_outputs_and_empty_batches_their_shapes() -> None:
    schema = AttributeSchema.from_dict({"colour": 4, "sleeve": 3})
    torch.manual_seed(0)
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64).eval()
    images = [Image.new("RGB", (80, 64), (30 * i, 200 - 20 * i, 90)) for i in range(7)]
    embedder = Embedder(model, device="cpu", batch_size=3, precision="float32")  # chunks of 3, 3 and 1
    batch = embedder.preprocess(images)
    with torch.inference_mode():
        embeddings, descriptors = model.encode(batch)
        colour = model.embed(batch, schema.resolve("colour"))

    encoded = embedder.encode_tensor(batch)
    assert np.allclose(encoded.embeddings, embeddings.numpy(), atol=1e-5)
    assert np.allclose(encoded.descriptors, descriptors.numpy(), atol=1e-5)
    assert np.allclose(embedder.encode(images).embeddings, encoded.embeddings)
    assert np.allclose(embedder.embed(images, "colour"), colour.numpy(), atol=1e-5)

    empty = embedder.encode_tensor(batch[:0])
    assert empty.embeddings.shape == (0, 2, model.embed_dim)
    assert empty.descriptors.shape == (0, model.descriptor_dim)
    assert embedder.encode([]).embeddings.shape == (0, 2, model.embed_dim)
    assert embedder.embed([], "sleeve").shape == (0, model.embed_dim)


def test_batchnorms_are_folded_into_the_convolutions_of_a_copy() -> None:
    """The Embedder runs a copy with each BatchNorm after a convolution folded into it: the same
    outputs (with BatchNorm statistics far from the identity), and the caller's model untouched."""
    schema = AttributeSchema.from_dict({"colour": 4})
    torch.manual_seed(1)
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.2, 0.2)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    images = [Image.new("RGB", (64, 64), (40 * i, 120, 255 - 30 * i)) for i in range(4)]
    embedder = Embedder(model, device="cpu", precision="float32")
    batch = embedder.preprocess(images)
    with torch.inference_mode():
        embeddings, descriptors = model.encode(batch)
    encoded = embedder.encode_tensor(batch)
    assert np.allclose(encoded.embeddings, embeddings.numpy(), atol=1e-4)
    assert np.allclose(encoded.descriptors, descriptors.numpy(), atol=1e-4)
    assert embedder.model is not model
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) == norms
    left = sum(isinstance(m, torch.nn.BatchNorm2d) for m in embedder.model.modules())
    assert left < norms // 10  # only those that follow no convolution in a Sequential (the head's)


def test_bfloat16_arithmetic_stays_close_to_float32() -> None:
    """With ``precision="bfloat16"`` the model runs in bfloat16 (its outputs move) and stays
    within rounding of float32: every vector's cosine to float32's 0.99 or more."""
    schema = AttributeSchema.from_dict({"colour": 4})
    torch.manual_seed(2)
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64).eval()
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(4)]
    exact = Embedder(model, device="cpu", precision="float32").encode(images)
    rounded = Embedder(model, device="cpu", precision="bfloat16").encode(images)
    assert rounded.embeddings.dtype == rounded.descriptors.dtype == np.float32
    assert np.abs(rounded.embeddings - exact.embeddings).max() > 1e-6
    cosines = (rounded.descriptors * exact.descriptors).sum(1)
    cosines /= np.linalg.norm(rounded.descriptors, axis=1) * np.linalg.norm(exact.descriptors, axis=1)
    assert cosines.min() >= 0.99
    emb = (rounded.embeddings * exact.embeddings).sum(-1)
    emb /= np.linalg.norm(rounded.embeddings, axis=-1) * np.linalg.norm(exact.embeddings, axis=-1)
    assert emb.min() >= 0.99


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bfloat16_only_where_the_cpu_computes_it(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(runtime, "native_bfloat16_cpu", lambda: native)
    cpu = torch.device("cpu")
    with runtime.inference_autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") is native
    with runtime.inference_autocast(cpu, "float32"):
        assert not torch.is_autocast_enabled("cpu")
    with runtime.inference_autocast(cpu, "bfloat16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
