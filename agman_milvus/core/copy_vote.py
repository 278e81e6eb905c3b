"""Stage 1 of copy checks, second source: candidate images by local-feature voting.

A global descriptor misses copies that change the picture's frame or texture (crops, pads,
pastes into another photo, rotations, pixelation): on edited catalogue photos its candidates
cap near 0.88 recall. Local features survive those edits. Each indexed image's strongest
SIFT keypoints (the first :data:`VOTE_KEYPOINTS` of the verification features, which are
ordered by response) are stored as RootSIFT vectors in Milvus; the query's strongest
:data:`QUERY_KEYPOINTS` each look up their :data:`VOTE_NEIGHBOURS` nearest stored keypoints,
and every catalogue image found gets one vote per query keypoint, weighted by the rank of its
first hit (``1 / (rank + 1)``). The images with the most votes are candidates beside the
descriptor's (whose mirrored view covers flips).

Sizes measured on 1,000 catalogue photos and 360 edited copies (exact original among the 10
most voted): 300 stored keypoints do as well as 1,000 (0.88 both); 250 query keypoints with
3 neighbours as well as 1,000 with 5 (0.91 vs 0.88), at an eighth of the lookups; voting with
the mirrored query too lifts flips (0.79 -> 0.91) but not the whole (0.90). 150 query
keypoints instead of 250 (an A/B run of bench/copydetect.py): the same recall@1 (0.903),
candidate recall 0.942 against 0.933, and 40% fewer lookups. Those sizes were measured with
SIFT at 448 px; at 224 (:data:`~agman_milvus.core.copy_features.SIFT_SIDE`) 146 keypoints are
stored a catalogue photo on average (269 at 448, 200 photos), and voting's recall@1 rose from
0.74 to 0.82 (its finest-scale keypoints had been noise to the edits).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np

from agman_milvus.core.copy_features import LocalFeatures

__all__ = ["VOTE_KEYPOINTS", "VOTE_NEIGHBOURS", "QUERY_KEYPOINTS", "root_sift", "tally", "vote_many",
           "vote_vectors"]

#: Nearest stored keypoints: ``search(vectors, k)`` -> per vector, image ids nearest first.
KeypointSearch = Callable[[np.ndarray, int], list[list[int]]]

VOTE_KEYPOINTS = 300  # stored per catalogue image
QUERY_KEYPOINTS = 150  # looked up per query
VOTE_NEIGHBOURS = 3  # stored keypoints returned per query keypoint
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


def vote_many(queries: Sequence[Sequence[LocalFeatures]], search: KeypointSearch) -> list[dict[int, float]]:
    """Votes per catalogue image for each query, a query seen as its ``views`` (its features,
    or several views' pooled), with one ``search`` over all their keypoints (Milvus
    Lite pays a cost proportional to the collection's rows on every search call: at 263k
    keypoint rows 0.3 s to look up 1 vector, 0.46 s for 250)."""
    vectors = [np.concatenate([vote_vectors(f, QUERY_KEYPOINTS) for f in views]) if views
               else np.zeros((0, DIM), np.float32) for views in queries]
    stacked = np.concatenate(vectors) if vectors else np.zeros((0, DIM), np.float32)
    found = search(stacked, VOTE_NEIGHBOURS) if len(stacked) else []
    out, start = [], 0
    for v in vectors:
        out.append(tally(found[start:start + len(v)]))
        start += len(v)
    return out
