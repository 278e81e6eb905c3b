"""The Embedder's model pass: chunked batches give the model's own outputs, empty input works."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from agman_milvus.core.model import build_model
from agman_milvus.core.schema import AttributeSchema
from agman_milvus.services.embedding import Embedder


def test_chunks_give_the_models_outputs_and_empty_batches_their_shapes() -> None:
    schema = AttributeSchema.from_dict({"colour": 4, "sleeve": 3})
    torch.manual_seed(0)
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", image_size=64).eval()
    images = [Image.new("RGB", (80, 64), (30 * i, 200 - 20 * i, 90)) for i in range(7)]
    embedder = Embedder(model, device="cpu", batch_size=3)  # chunks of 3, 3 and 1
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
