"""ASFR MAP and TR accuracy on hand-computed cases (spec §4)."""

from __future__ import annotations

import numpy as np
import pytest

from agman_milvus.training.metrics import (
    average_precision,
    average_precisions,
    mean_average_precision,
    triplet_accuracy,
)


def test_average_precision_of_spec_example() -> None:
    assert average_precision(np.array([1, 0, 1, 0])) == pytest.approx((1 / 1 + 2 / 3) / 2)
    assert average_precision(np.array([1, 0, 1, 0])) == pytest.approx(0.8333, abs=1e-4)


def test_average_precision_without_relevant_items_is_zero() -> None:
    assert average_precision(np.array([0, 0, 0])) == 0.0


def test_average_precisions_ranks_by_similarity() -> None:
    # candidate values [5, 7, 5, 7]; similarities put them in order 1, 0, 3, 2 -> rel [0,1,0,1]
    sim = np.array([[0.8, 0.9, 0.1, 0.2]])
    aps = average_precisions(sim, np.array([5]), np.array([5, 7, 5, 7]))
    assert aps[0] == pytest.approx((1 / 2 + 2 / 4) / 2)


def test_ties_keep_candidate_order() -> None:
    # All similarities equal: the stable sort keeps candidate order -> relevance [0, 1, 1].
    aps = average_precisions(np.zeros((1, 3)), np.array([1]), np.array([0, 1, 1]))
    assert aps[0] == pytest.approx((1 / 2 + 2 / 3) / 2)


def test_map_is_query_weighted_and_counts_r_zero_queries() -> None:
    # attribute 0: two queries; q0 ranks its only relevant first (AP 1), q1 has no relevant (AP 0).
    # attribute 1: one query with relevance [0, 1] (AP 0.5).
    q_emb = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    c_emb = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.0]])
    result = mean_average_precision(
        q_emb, np.array([0, 0, 1]), np.array([3, 9, 4]),
        c_emb, np.array([0, 0, 1, 1]), np.array([3, 2, 5, 4]),
        names={0: "colour", 1: "shape"},
    )
    assert result.per_attribute[0] == pytest.approx(50.0)
    assert result.per_attribute[1] == pytest.approx(50.0)
    assert result.queries == {0: 2, 1: 1}
    assert result.overall == pytest.approx(100 * (1 + 0 + 0.5) / 3)
    assert result.to_json()["per_attribute"]["shape"]["queries"] == 1


def test_overall_differs_from_plain_mean_of_attributes() -> None:
    q_emb = np.array([[1.0], [1.0], [1.0]])
    c_emb = np.array([[1.0], [1.0]])
    # attribute 0: 2 queries with AP 1 (one relevant candidate); attribute 1: 1 query, AP 0.
    result = mean_average_precision(q_emb, np.array([0, 0, 1]), np.array([1, 1, 2]),
                                    c_emb, np.array([0, 1]), np.array([1, 1]))
    assert result.per_attribute == {0: pytest.approx(100.0), 1: pytest.approx(0.0)}
    assert result.overall == pytest.approx(200 / 3)


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="does not match"):
        average_precisions(np.zeros((2, 3)), np.array([1]), np.array([1, 2, 3]))


def test_triplet_accuracy_is_strict() -> None:
    assert triplet_accuracy(np.array([0.9, 0.5, 0.2]), np.array([0.1, 0.5, 0.3])) == pytest.approx(100 / 3)
    with pytest.raises(ValueError):
        triplet_accuracy(np.array([]), np.array([]))
