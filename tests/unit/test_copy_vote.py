"""Local-feature voting (stage 1's second candidate source), without Milvus."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from agman_milvus.core import copy_features, copy_vote


def textured(seed: int, size: int = 160) -> Image.Image:
    """A picture of random shapes: corners and blobs that SIFT can tell apart."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), tuple(int(c) for c in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(im)
    for _ in range(25):
        x, y = rng.integers(0, size, 2)
        w, h = rng.integers(6, 40, 2)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((int(x), int(y), int(x + w), int(y + h)), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return im


def test_root_sift_is_unit_length_and_hellinger() -> None:
    d = np.random.default_rng(0).integers(0, 200, (4, 128)).astype(np.uint8)
    r = copy_vote.root_sift(d)
    np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, atol=1e-5)
    p = d[:2].astype(float) / d[:2].sum(axis=1, keepdims=True)
    hellinger = float(np.sqrt(p[0] * p[1]).sum())
    assert abs(float(r[0] @ r[1]) - hellinger) < 1e-5
    assert copy_vote.root_sift(np.zeros((1, 128), np.uint8)).shape == (1, 128)  # no division by 0


def test_vote_vectors_take_the_strongest_keypoints() -> None:
    features = copy_features.extract(textured(1))
    assert len(features.descriptors) > 20
    vectors = copy_vote.vote_vectors(features, limit=20)
    assert vectors.shape == (20, 128) and vectors.dtype == np.float32
    np.testing.assert_allclose(vectors, copy_vote.root_sift(features.descriptors[:20]))
    blank = copy_features.extract(Image.new("RGB", (64, 64), "white"))
    assert copy_vote.vote_vectors(blank).shape == (0, 128)


def test_tally_counts_each_image_once_per_keypoint_by_rank() -> None:
    votes = copy_vote.tally([[7, 7, 3], [3, 9], []])
    assert votes == {7: 1.0, 3: 1.0 / 3 + 1.0, 9: 0.5}


def test_vote_finds_the_original_of_a_cropped_rotated_copy() -> None:
    refs = [copy_features.extract(textured(seed)) for seed in range(6)]
    stored = np.concatenate([copy_vote.vote_vectors(f) for f in refs])
    owner = np.concatenate([np.full(len(copy_vote.vote_vectors(f)), i) for i, f in enumerate(refs)])

    def search(vectors: np.ndarray, k: int) -> list[list[int]]:  # exact inner-product search
        nearest = np.argsort(-(vectors @ stored.T), axis=1)[:, :k]
        return owner[nearest].tolist()

    copy = textured(3).crop((20, 10, 150, 140)).rotate(12, expand=True, fillcolor="white")
    features = copy_features.extract(copy)
    [votes] = copy_vote.vote_many([[features]], search)
    assert max(votes, key=votes.__getitem__) == 3
    blank = copy_features.extract(Image.new("RGB", (32, 32)))
    assert copy_vote.vote_many([[blank]], search) == [{}]

    # several queries share one search; each gets the votes it would get alone
    calls: list[int] = []

    def counted(vectors: np.ndarray, k: int) -> list[list[int]]:
        calls.append(len(vectors))
        return search(vectors, k)

    other = copy_features.extract(textured(5).rotate(8, fillcolor="white"))
    together = copy_vote.vote_many([[features], [blank], [other]], counted)
    assert len(calls) == 1
    assert together == [votes, {}, *copy_vote.vote_many([[other]], search)]
    assert max(together[2], key=together[2].__getitem__) == 5
