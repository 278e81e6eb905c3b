"""Stage 1 of copy checks, second source: candidate images by local-feature voting.

A global descriptor misses copies that change the picture's frame or texture (crops, pads,
pastes into another photo, rotations, pixelation): on edited catalogue photos its candidates
cap near 0.88 recall. Local features survive those edits. Each indexed image's strongest
SIFT keypoints (the first :data:`VOTE_KEYPOINTS` of the verification features, which are
ordered by response) are stored as RootSIFT vectors in Milvus; a query's keypoints (and its
mirror image's) each look up their :data:`VOTE_NEIGHBOURS` nearest stored keypoints, and every
catalogue image found gets one vote per query keypoint, weighted by the rank of its first hit
(``1 / (rank + 1)``). The images with the most votes are candidates beside the descriptor's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from agman_milvus.core.copy_verify import LocalFeatures

__all__ = ["VOTE_KEYPOINTS", "VOTE_NEIGHBOURS", "QUERY_KEYPOINTS", "root_sift", "tally", "vote",
           "vote_vectors"]

#: Nearest stored keypoints: ``search(vectors, k)`` -> per vector, image ids nearest first.
KeypointSearch = Callable[[np.ndarray, int], list[list[int]]]

VOTE_KEYPOINTS = 300  # stored per catalogue image
QUERY_KEYPOINTS = 1000  # looked up per query view
VOTE_NEIGHBOURS = 5  # stored keypoints returned per query keypoint
DIM = 128


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT (L1-normalise, square root), then L2-normalised: inner product = Hellinger
    similarity, which matches SIFT better than the plain descriptor's cosine."""
    d = descriptors.astype(np.float32)
    d /= np.maximum(d.sum(axis=1, keepdims=True), 1e-6)
    np.sqrt(d, out=d)
    return d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-6)


def vote_vectors(features: LocalFeatures, limit: int = VOTE_KEYPOINTS) -> np.ndarray:
    """``[n, 128]`` float32 RootSIFT vectors of the ``limit`` strongest keypoints."""
    return root_sift(features.descriptors[:limit]).reshape(-1, DIM)


def tally(neighbours: Iterable[Sequence[int]]) -> dict[int, float]:
    """Votes per image id; ``neighbours`` holds, per query keypoint, the image ids of its
    nearest stored keypoints, nearest first."""
    votes: dict[int, float] = {}
    for ids in neighbours:
        seen: set[int] = set()
        for rank, image_id in enumerate(ids):
            if image_id in seen:
                continue
            seen.add(image_id)
            votes[image_id] = votes.get(image_id, 0.0) + 1.0 / (rank + 1)
    return votes


def vote(views: Sequence[LocalFeatures], search: KeypointSearch) -> dict[int, float]:
    """Votes per catalogue image for a query seen as ``views`` (the query and its mirror)."""
    vectors = np.concatenate([vote_vectors(f, QUERY_KEYPOINTS) for f in views])
    return tally(search(vectors, VOTE_NEIGHBOURS)) if len(vectors) else {}
