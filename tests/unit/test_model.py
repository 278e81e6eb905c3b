"""AG-MAN and baselines: shapes, parameter counts, embed/embed_all equality, checkpoints."""

from __future__ import annotations

import pytest
import torch

from agman_milvus.app.commands.train import BUILT_IN_MODELS
from agman_milvus.core.model import (
    CheckpointError,
    build_model,
    create_model_and_transforms,
    list_models,
    load_checkpoint,
    save_checkpoint,
)
from agman_milvus.core.model.agman import csn_masks
from agman_milvus.core.schema import AttributeSchema, UnknownAttributeError

BACKBONES = ["resnet50", "mobilenet_v2", "efficientnet_lite0"]


@pytest.fixture(scope="module")
def schema8() -> AttributeSchema:
    return AttributeSchema.from_dict({f"attr{i}": [f"v{j}" for j in range(3 + i)] for i in range(8)})


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_lists_the_three_variants() -> None:
    assert list_models() == ["agman", "asen_v2", "global"] == list(BUILT_IN_MODELS)  # `agman train`'s help
    with pytest.raises(ValueError, match="known models: agman, asen_v2, global"):
        build_model("nope", schema=AttributeSchema.from_dict({"a": 2}))
    with pytest.raises(ValueError, match="known backbones"):
        build_model("agman", schema=AttributeSchema.from_dict({"a": 2}), backbone="vgg")


@pytest.mark.parametrize("num_attributes,expected", [(8, 26_420_909), (5, 26_411_690), (4, 26_408_617)])
def test_agman_resnet50_parameter_count_matches_reference(num_attributes: int, expected: int) -> None:
    schema = AttributeSchema.from_dict({f"a{i}": 2 for i in range(num_attributes)})
    model = build_model("agman", schema=schema, backbone="resnet50")
    assert n_params(model) == expected
    assert n_params(model.trunk) == 23_508_032  # ResNet-50 without fc
    assert n_params(model.trunk.layer4) == 14_964_736
    assert n_params(model.fusion) == 525_312
    head = n_params(model.head) - model.head.attr_embedding.weight.numel() - model.head.masks.weight.numel()
    assert head == 2_362_981


def test_csn_mask_init_blocks() -> None:
    masks = csn_masks(5, 512).weight
    assert masks.requires_grad
    assert torch.all(masks[0, :102] == 1.0) and torch.all(masks[0, 102:] == 0.1)
    assert torch.all(masks[4, 408:510] == 1.0) and torch.all(masks[:, 510:] == 0.1)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("name", ["agman", "asen_v2", "global"])
def test_embed_all_equals_k_calls_of_embed(name: str, backbone: str, schema8, images) -> None:
    torch.manual_seed(1)
    model = build_model(name, schema=schema8, backbone=backbone).eval()
    with torch.no_grad():
        # random-init BN running stats are trivial; make them non-trivial so the test means something
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
        everything = model.embed_all(images)
        assert everything.shape == (3, 8, model.embed_dim)
        for k in range(8):
            single = model.embed(images, k)
            torch.testing.assert_close(everything[:, k], single, atol=1e-5, rtol=0)
        norms = everything.norm(dim=-1)
        torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
        embeddings, descriptors = model.encode(images)
        torch.testing.assert_close(embeddings, everything)
        assert descriptors.shape == (3, model.descriptor_dim)


def test_agman_heads_differ_per_attribute(schema8, images) -> None:
    model = build_model("agman", schema=schema8, backbone="mobilenet_v2")
    with torch.no_grad():
        e = model.embed_all(images)
    assert (e[:, 0] - e[:, 1]).abs().max() > 1e-3


@pytest.mark.parametrize("size", [(64, 64), (97, 131), (224, 224), (320, 200)])
def test_any_input_size(size, schema8) -> None:
    model = build_model("agman", schema=schema8, backbone="mobilenet_v2")
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert model.embed_all(x).shape == (2, 8, 512)
        attention = model.attention_map(x, ["attr1", "attr2"])
    h, w = -(-size[0] // 16), -(-size[1] // 16)
    assert attention.shape == (2, h, w)
    torch.testing.assert_close(attention.sum(dim=(1, 2)), model.head.w1.detach().expand(2))


def test_resnet50_maps_for_224_input(schema8) -> None:
    model = build_model("agman", schema=schema8, backbone="resnet50")
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        mid = model.trunk.forward_mid(x)
        high = model.trunk.forward_high(mid)
        fused, x_local = model.fusion(mid, high)
    assert mid.shape == (1, 512, 28, 28) and high.shape == (1, 1024, 14, 14)
    assert fused.shape == (1, 2048, 14, 14)
    torch.testing.assert_close(fused[:, :1024], high)
    torch.testing.assert_close(fused[:, 1024:], x_local)


def test_training_forward_gives_logits_and_gradients(schema8, images) -> None:
    model = build_model("agman", schema=schema8, backbone="mobilenet_v2").train()
    out = model(images, ["attr0", "attr3", "attr7"])
    assert out.embeddings.shape == (3, 512) and out.logits.shape == (3, 8)
    (out.embeddings.sum() + out.logits.sum()).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    for name in ["head.w", "head.w1", "head.masks.weight", "fc_embed.weight", "fusion.conv1_1.weight"]:
        assert grads[name] is not None and grads[name].abs().sum() > 0, name
    # w2 only rescales g before the L2 normalisation, so (as in the reference) it gets no gradient
    assert grads["head.w2"].abs().item() < 1e-4
    assert build_model("asen_v2", schema=schema8, backbone="mobilenet_v2")(images, 0).logits is None


def test_unknown_attribute_is_a_clear_error(schema8, images) -> None:
    model = build_model("agman", schema=schema8, backbone="mobilenet_v2")
    with pytest.raises(UnknownAttributeError, match="known attributes: attr0, attr1"):
        model.embed(images, "sleeve")
    with pytest.raises(ValueError, match="3 images"):
        model.embed(images, [0, 1])


def test_preprocess_comes_with_the_model(schema8) -> None:
    from PIL import Image

    model, preprocess = create_model_and_transforms(
        "agman", schema=schema8, backbone="mobilenet_v2", image_size=96
    )
    tensor = preprocess(Image.new("RGB", (300, 150), (255, 0, 0)))
    assert tensor.shape == (3, 96, 96)
    assert tensor[0].mean().item() == pytest.approx((1 - 0.485) / 0.229, rel=1e-5)


@pytest.mark.parametrize("name", ["agman", "asen_v2", "global"])
def test_checkpoint_round_trip(tmp_path, name, schema8, images) -> None:
    model = build_model(name, schema=schema8, backbone="mobilenet_v2", image_size=96)
    path = tmp_path / "m.safetensors"
    version = save_checkpoint(model, path)
    assert version.startswith(f"{name}-mobilenet_v2-")
    loaded = load_checkpoint(path)
    assert loaded.version == version and loaded.image_size == 96
    assert loaded.schema == schema8 and loaded.schema["attr2"].values == ("v0", "v1", "v2", "v3", "v4")
    with torch.no_grad():
        torch.testing.assert_close(loaded.embed_all(images), model.eval().embed_all(images))


def test_version_changes_with_weights(tmp_path, schema8) -> None:
    model = build_model("global", schema=schema8, backbone="mobilenet_v2")
    v1 = save_checkpoint(model, tmp_path / "a.safetensors")
    with torch.no_grad():
        model.conv1.bias.add_(1.0)
    assert save_checkpoint(model, tmp_path / "b.safetensors") != v1


def test_refuses_pickle_and_tampered_files(tmp_path, schema8) -> None:
    model = build_model("global", schema=schema8, backbone="mobilenet_v2")
    pt = tmp_path / "model.pt"
    torch.save(model.state_dict(), pt)
    with pytest.raises(CheckpointError, match="pickled"):
        load_checkpoint(pt)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not weights")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(text)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.safetensors")
    good = tmp_path / "good.safetensors"
    save_checkpoint(model, good)
    data = bytearray(good.read_bytes())
    data[-3] ^= 0xFF
    bad = tmp_path / "tampered.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="do not match"):
        load_checkpoint(bad)
    with pytest.raises(CheckpointError, match=".safetensors files"):
        save_checkpoint(model, tmp_path / "x.pt")


@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_compiled_embedder_matches_eager(schema8, precision: str) -> None:
    """Compiled equals eager in float32; in bfloat16 (``agman worker``'s default on a CPU that
    computes it natively) the two round differently, within bfloat16's precision."""
    from PIL import Image

    from agman_milvus.services.embedding import Embedder

    model = build_model("agman", schema=schema8, backbone="mobilenet_v2", image_size=64)
    images = [Image.new("RGB", (80, 64), (40 * i, 200 - 30 * i, 90)) for i in range(5)]
    eager = Embedder(model, device="cpu", batch_size=4, precision=precision).encode(images)
    compiled = Embedder(model, device="cpu", batch_size=4, compile=True, precision=precision).encode(images)
    assert compiled.embeddings.shape == (5, 8, 512)
    tolerance = 1e-4 if precision == "float32" else 5e-3  # bfloat16: 1e-3 measured, 2.5e-3 to float32
    assert abs(compiled.embeddings - eager.embeddings).max() < tolerance
    assert abs(compiled.descriptors - eager.descriptors).max() < tolerance
