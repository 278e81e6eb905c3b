"""Local features of one image on real pixels: where keypoints land, the stored form and the
on-disk keypoint cache, pixel blocks, the mirror image's features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from agman_milvus.core.copy_features import (
    WORK_SIDE,
    EarlierFeatures,
    LocalFeatures,
    _edge_profiles,
    extract,
    pixel_block,
)
from agman_milvus.core.copy_verify import verify
from agman_milvus.services.local_features import LocalFeatureCache
from tests.unit.test_copy_verify import textured


def test_keypoint_cache_computes_once_and_reads_back(tmp_path: Path) -> None:
    cache = LocalFeatureCache(tmp_path)
    calls = []

    def load() -> Image.Image:
        calls.append(1)
        return textured(6)

    first = cache.get("ab" * 32, load)
    again = LocalFeatureCache(tmp_path).get("ab" * 32, load)  # a fresh process: from disk
    assert len(calls) == 1 and cache.path("ab" * 32).is_file()
    assert np.array_equal(first.descriptors, again.descriptors) and again.size == first.size
    assert np.array_equal(first.chroma, again.chroma)
    assert verify(extract(textured(6)), again).score > 0.9
    path = cache.path("ab" * 32)
    path.write_bytes(path.read_bytes()[:-100])  # a damaged file is recomputed and replaced
    assert np.array_equal(LocalFeatureCache(tmp_path).get("ab" * 32, load).descriptors, first.descriptors)
    assert len(calls) == 2 and len(path.read_bytes()) == len(first.to_bytes())


def test_keypoint_cache_extracts_again_what_an_earlier_version_stored(tmp_path: Path) -> None:
    """A record of an earlier format version, or an ``.npz`` file of an earlier version still,
    holds keypoints of another detector setting: they are extracted again and replace it."""
    cache = LocalFeatureCache(tmp_path)
    current = extract(textured(7)).to_bytes()
    earlier = cache.path("cd" * 32)
    earlier.parent.mkdir(parents=True)
    earlier.write_bytes(b"AGLOCF01" + current[8:])
    npz = cache.path("ef" * 32).with_suffix(".npz")
    npz.parent.mkdir(parents=True)
    np.savez(npz, points=np.zeros((3, 2), np.float32))
    calls = []
    for key in ("cd" * 32, "ef" * 32):
        feats = cache.get(key, lambda: calls.append(1) or textured(7))
        assert feats.chroma.shape[2] == 2 and cache.path(key).read_bytes() == current
    assert calls == [1, 1] and not npz.exists()
    with pytest.raises(EarlierFeatures):
        LocalFeatures.from_bytes(b"AGLOCF01" + current[8:])


def test_keypoints_land_where_the_picture_s_features_are_in_the_work_frame() -> None:
    """SIFT runs at ``SIFT_SIDE``; its keypoints are placed where the picture's features are in
    the ``WORK_SIDE`` frame that every fit's pixel thresholds are set in."""
    grey = np.full((300, 200), 255, np.uint8)
    grey[74:87, 44:57] = 0  # a dark square centred on pixel (50, 80)
    feats = extract(Image.fromarray(grey))
    assert feats.scale == WORK_SIDE / 300 and feats.work.shape == (448, 299)
    expected = (np.array([50, 80]) + 0.5) * feats.scale - 0.5
    assert np.linalg.norm(feats.points - expected, axis=1).min() < 2.0


def test_stored_features_read_back_exactly_and_refuse_damaged_records() -> None:
    feats = extract(textured(9), block=2.5)
    data = feats.to_bytes()
    back = LocalFeatures.from_bytes(bytearray(data))
    for name in ("points", "descriptors", "thumb", "chroma"):
        assert np.array_equal(getattr(back, name), getattr(feats, name))
        assert getattr(back, name).dtype == getattr(feats, name).dtype
    assert (back.size, back.scale, back.block) == (feats.size, feats.scale, 2.5)
    back.thumb[0, 0] ^= 1  # arrays over a bytearray are writable
    empty = LocalFeatures.from_bytes(extract(Image.new("RGB", (64, 64), "white")).to_bytes())
    assert empty.points.shape == (0, 2) and empty.descriptors.shape == (0, 128)
    for damaged in (data[:-1], data + b"x", b"AGLOCF00" + data[8:], data[:20]):
        with pytest.raises(ValueError):
            LocalFeatures.from_bytes(damaged)


def test_pixel_block_finds_the_blocks_of_a_pixelated_picture_only() -> None:
    rng = np.random.default_rng(5)
    smooth = Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).resize((200, 200),
                                                                                      Image.Resampling.BICUBIC)
    assert pixel_block(np.asarray(smooth.convert("L"))) == 0.0
    blocky = smooth.resize((20, 20), Image.Resampling.BILINEAR).resize((200, 200), Image.Resampling.NEAREST)
    assert pixel_block(np.asarray(blocky.convert("L"))) == pytest.approx(10.0, abs=0.5)
    assert extract(blocky).block == pytest.approx(10.0, abs=0.5)
    assert pixel_block(np.zeros((2, 2), np.uint8)) == 0.0  # too small to tell
    tall = smooth.resize((30, 60), Image.Resampling.BILINEAR).resize((300, 600), Image.Resampling.NEAREST)
    assert pixel_block(np.asarray(tall.convert("L"))) == pytest.approx(10.0, abs=0.5)  # 3 stripes
    small = smooth.resize((20, 20), Image.Resampling.BILINEAR)
    stretched = small.resize((200, 280), Image.Resampling.NEAREST)  # 10 x 14 px blocks: pasted so
    assert pixel_block(np.asarray(stretched.convert("L"))) == pytest.approx(np.sqrt(140), abs=0.5)
    assert pixel_block(np.asarray(small.resize((200, 400), Image.Resampling.NEAREST).convert("L"))) == 0.0


@pytest.mark.parametrize("shape", [(3, 5), (15, 9), (16, 9), (17, 9), (40, 33)])
def test_edge_profiles_read_in_stripes_equal_the_whole_image_difference(shape: tuple[int, int]) -> None:
    grey = np.random.default_rng(2).integers(0, 256, shape, dtype=np.uint8)
    across_columns, across_rows = _edge_profiles(grey, stripe=8)
    whole = grey.astype(np.float64)
    np.testing.assert_allclose(across_columns, np.abs(np.diff(whole, axis=1)).mean(axis=0))
    np.testing.assert_allclose(across_rows, np.abs(np.diff(whole, axis=0)).mean(axis=1))


def test_flipped_keypoints_are_those_of_the_mirror_image() -> None:
    """Where SIFT on the mirror image finds a keypoint at a flipped one's place, their
    descriptors agree (the bins' permutation is that of a horizontal flip)."""
    query = extract(textured(6))
    flipped, mirror = query.flipped(), query.mirrored()
    dist = ((flipped.points[:, None, :] - mirror.points[None, :, :]) ** 2).sum(-1)
    nearest = dist.argmin(axis=1)
    same = dist[np.arange(len(dist)), nearest] < 0.01
    assert same.mean() > 0.4
    a = flipped.descriptors[same].astype(np.float32)
    b = mirror.descriptors[nearest[same]].astype(np.float32)
    assert np.median(np.linalg.norm(a - b, axis=1) / np.linalg.norm(b, axis=1)) < 0.1
    assert np.array_equal(flipped.thumb, query.thumb[:, ::-1])
