"""Policy-feedback similarity and the reward-hacking detector against hand values and planted cases."""

from __future__ import annotations

import math

import pytest
import torch

from r2m_ray.algos.feedback_similarity import (
    PrototypeDetector,
    better_labels,
    cosine_matrix,
    pooled_states,
    precision_recall,
    similarity_gap_correlation,
    within_across,
)


def test_pooled_states_average_response_tokens_only():
    h = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]], [[9.0, 9.0], [2.0, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    assert pooled_states(h, mask).tolist() == [[4.0, 3.0], [2.0, 2.0]]
    with pytest.raises(ValueError, match="no response token"):
        pooled_states(h, torch.tensor([[0, 1, 1], [0, 0, 0]]))


def test_labels_within_across_and_gap_correlation_by_hand():
    gold = torch.tensor([1.0, 0.0, 1.0, 0.0, 0.5, 0.5])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    better, usable = better_labels(gold, groups)
    assert better[:4].tolist() == [True, False, True, False] and usable.tolist() == [True] * 4 + [False] * 2
    # group 0: the better ones point along x, the worse ones along y → within cos 1, across 0
    pooled = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, -1.0]])
    stats = within_across(pooled, better, groups, usable)
    # float32 cosines: zero up to rounding (this CPU gives -1.3e-8 for [1, 1]·[1, -1]); a wrong one is O(1)
    assert stats["within"] == pytest.approx(1.0) and stats["across"] == pytest.approx(0.0, abs=1e-6)
    assert cosine_matrix(pooled)[4, 5] == pytest.approx(0.0, abs=1e-6)
    # similarity falls as the reward gap grows: a perfect negative correlation on a planted line
    angles = torch.tensor([0.0, 0.2, 0.4, 0.6])
    line = torch.stack([torch.cos(angles), torch.sin(angles)], dim=1)
    reward = angles.clone()
    corr = similarity_gap_correlation(line, reward, torch.zeros(4, dtype=torch.long))
    assert corr < -0.95
    assert math.isnan(similarity_gap_correlation(line[:2], reward[:2], torch.zeros(2, dtype=torch.long)))


def test_detector_finds_planted_hacked_states_and_not_random_labels():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(400, 16, generator=g)
    direction = torch.zeros(16)
    direction[0] = 6.0
    truth = torch.zeros(400, dtype=torch.bool)
    truth[::4] = True  # a quarter are hacked: their states are shifted along one direction
    states = base + truth.unsqueeze(1) * direction
    calib, test = slice(0, 200), slice(200, 400)
    detector = PrototypeDetector.fit(states[calib], truth[calib])
    pr = precision_recall(detector.flags(states[test]), truth[test])
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9 and pr["base_rate"] == pytest.approx(0.25)
    # labels unrelated to the states: precision stays near the base rate
    shuffled = truth[torch.randperm(400, generator=g)]
    null = PrototypeDetector.fit(base[calib], shuffled[calib])
    pr_null = precision_recall(null.flags(base[test]), shuffled[test])
    assert pr_null["precision"] < 0.45
    with pytest.raises(ValueError, match="hacked and clean"):
        PrototypeDetector.fit(states[:10], torch.zeros(10, dtype=torch.bool))


def test_precision_recall_by_hand():
    flags = torch.tensor([True, True, False, False])
    truth = torch.tensor([True, False, True, False])
    assert precision_recall(flags, truth) == {"precision": 0.5, "recall": 0.5, "flag_rate": 0.5, "base_rate": 0.5}
    none = precision_recall(torch.zeros(4, dtype=torch.bool), truth)
    assert math.isnan(none["precision"]) and none["recall"] == 0.0
