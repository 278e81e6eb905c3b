"""Copy scores: a verification weighed against the query's other candidates."""

from __future__ import annotations

import pytest

from agman_milvus.core.copy_scoring import DECISIVE_INLIERS, PIXELATED_MAX, copy_scores


def test_copy_score_weighs_a_candidate_against_the_others() -> None:
    alone, = copy_scores([0.9])
    stands_out = copy_scores([0.9, 0.2, 0.1])
    look_alikes = copy_scores([0.9, 0.88, 0.85])
    assert alone > stands_out[0] > 0.85 > look_alikes[0]  # three shots align: none is the original
    assert stands_out[1] < 0.01 and look_alikes == sorted(look_alikes, reverse=True)
    # one picture filed twice (pHashes 1 bit apart) does not count against itself
    twice = copy_scores([0.9, 0.9, 0.2], hashes=[0b1011, 0b1010, 0xFFFF_0000])
    assert twice[0] == twice[1] == stands_out[0]
    assert copy_scores([0.9, 0.9, 0.2], hashes=[0b1011, None, 0])[0] < 0.85  # unknown: counted
    assert copy_scores([]) == []
    # a verification beyond doubt stands on its own, even beside a close look-alike
    assert copy_scores([0.99, 0.87])[0] == 0.99 and copy_scores([0.99, 0.87])[1] < 0.5
    # nothing near lifts a weak alignment, but not far
    assert 0.6 < copy_scores([0.6, 0.01])[0] <= 0.7


def test_a_dense_look_alike_is_no_rival_to_a_decisive_keypoint_match() -> None:
    """A greyscale copy matched by 33 keypoint inliers, beside another product whose outline
    alone aligned densely as well (0 inliers: its keypoints matched nothing): the keypoint
    match is weighed against keypoint evidence only. Below DECISIVE_INLIERS, or against a
    keypoint rival, the margin counts as before, and the dense one stays weighed against it."""
    scores = [0.73, 0.71, 0.1]
    plain = copy_scores(scores)
    decisive = copy_scores(scores, inliers=[33, 0, 45])
    assert plain[0] < 0.2 and decisive[0] == pytest.approx(0.83)  # lifted by MAX_LIFT at most
    assert decisive[1] == plain[1] < 0.2  # the dense one still meets the keypoint match
    assert copy_scores(scores, inliers=[DECISIVE_INLIERS - 1, 0, 45]) == plain
    assert copy_scores(scores, inliers=[33, 8, 45]) == plain  # a keypoint rival counts


def test_a_pixelated_match_is_a_copy_when_it_stands_out() -> None:
    """The score with a pixelated picture's blocks smoothed away goes through the margin model:
    alone, it makes a copy; beside a look-alike of one shoot, a near-duplicate at most; never
    sure on its own."""
    stands_out = copy_scores([0.05, 0.1, 0.0], smoothed=[0.85, 0.2, 0.0])
    assert stands_out[0] >= 0.9 and stands_out[1] < 0.2
    look_alikes = copy_scores([0.05, 0.1], smoothed=[0.91, 0.74])  # 2 shoot-mates, no original
    assert PIXELATED_MAX * 0.91 <= look_alikes[0] < 0.75
    assert copy_scores([0.0, 0.0], smoothed=[0.99, 0.95])[0] < 0.75
    # a keypoint match beside it counts against the smoothed one
    assert copy_scores([0.8, 0.0], smoothed=[0.0, 0.85])[1] < 0.75
    assert copy_scores([0.05, 0.0], smoothed=[0.85, 0.0])[0] == copy_scores([0.05], smoothed=[0.85])[0]
