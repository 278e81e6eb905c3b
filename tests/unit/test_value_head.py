"""The value head (product recipe): what it does to retrieval vectors, and that checkpoints keep it."""

from __future__ import annotations

import pytest
import torch

from agman_milvus.core.model import build_model, load_checkpoint, save_checkpoint
from agman_milvus.core.model.value_head import ValueHead
from agman_milvus.core.schema import AttributeSchema


@pytest.fixture(scope="module")
def schema() -> AttributeSchema:
    return AttributeSchema.from_dict({"colour": ["red", "green", "blue"], "sleeve": ["short", "long"]})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def test_weight_zero_returns_the_embedding_and_one_the_value_posterior() -> None:
    head = ValueHead([3], dim=8, scale=32.0, weight=0.0).requires_grad_(False)
    head.proxies[0].copy_(torch.eye(3, 8))
    near_first = _unit(torch.tensor([[1.0, 0.1, 0, 0, 0, 0.3, 0, 0], [1.0, 0, 0.1, 0, 0, 0, -0.3, 0]]))
    torch.testing.assert_close(head.blend(near_first, 0), near_first)
    head.set_weight(1.0)
    snapped = head.blend(near_first, 0)  # both confidently value 0: the same vector, proxy 0
    torch.testing.assert_close(snapped[0], snapped[1], atol=1e-4, rtol=0)
    assert float(snapped[0, 0]) > 0.999
    head.set_weight(0.5)  # in between: the same value first, the embedding still tells them apart
    half = head.blend(near_first, 0)
    assert float(half[0] @ half[1]) > float(near_first[0] @ near_first[1])
    assert float(half[0] @ half[1]) < 0.9999
    torch.testing.assert_close(half.norm(dim=1), torch.ones(2))


def test_weight_outside_zero_one_is_refused() -> None:
    with pytest.raises(ValueError, match="weight"):
        ValueHead([2], dim=4, weight=1.5)
    head = ValueHead([2], dim=4, weight=0.7)
    with pytest.raises(ValueError, match="weight"):
        head.set_weight(-0.1)
    assert float(head.weight) == pytest.approx(0.7)  # a refused weight leaves the blend as it was


@pytest.mark.parametrize("name", ["agman", "asen_v2", "global"])
def test_embed_embed_all_and_encode_agree_with_a_value_head(name: str, schema, images) -> None:
    torch.manual_seed(0)
    model = build_model(name, schema=schema, backbone="mobilenet_v2", taps="late", image_size=64)
    model.attach_value_head(scale=16.0, weight=0.6)
    with torch.no_grad():
        raw = model.head_embeddings(images)
        everything = model.embed_all(images)
        assert not torch.allclose(raw, everything)
        for k in range(len(schema)):
            torch.testing.assert_close(model.embed(images, k), everything[:, k], atol=1e-5, rtol=0)
        mixed = torch.tensor([0, 1, 1, 0])
        torch.testing.assert_close(model.embed(images, mixed), everything[torch.arange(4), mixed],
                                   atol=1e-5, rtol=0)
        torch.testing.assert_close(model.encode(images)[0], everything)


def test_checkpoint_keeps_the_value_head_and_its_weight_is_part_of_the_version(tmp_path, schema,
                                                                                 images) -> None:
    model = build_model("agman", schema=schema, backbone="mobilenet_v2", taps="late", image_size=64)
    model.attach_value_head(scale=16.0, weight=0.5)
    version = save_checkpoint(model, tmp_path / "a.safetensors")
    loaded = load_checkpoint(tmp_path / "a.safetensors")
    assert loaded.value_head is not None and loaded.value_head.config() == {"scale": 16.0, "weight": 0.5}
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_all(images), model.eval().embed_all(images))
    model.value_head.set_weight(0.25)
    assert save_checkpoint(model, tmp_path / "b.safetensors") != version
