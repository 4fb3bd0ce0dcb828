"""The RL stage's measurements against values computed by hand on small batches (no Ray)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from r2m_ray.config import load_config
from r2m_ray.eval.rl_metrics import group_order_agreement, hacked_mask, label_accuracy, sequence_kl
from r2m_ray.eval.rl_report import curve_stats, mean_ci, paired_difference, smooth
from r2m_ray.pipelines.rl_measure import best_per_owner, gold_step_metrics, optimal_rows, win_rate
from r2m_ray.world import WorldConfig, gold_parts, optimal_responses
from tests.conftest import ROOT


def test_sequence_kl_sums_tokens_and_averages_sequences():
    # two sequences; position 0 is the prompt, response tokens marked by the mask
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, 0.0]])
    ref = torch.tensor([[0.0, -2.0, -2.0], [0.0, -1.5, 0.0]])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0]])
    # k1 per token = logp − ref: seq 0 → 1.0 + 0.0, seq 1 → 1.0; mean 1.0
    assert sequence_kl(logp, ref, mask, "k1") == pytest.approx(1.0)
    # k3 = e^u − u − 1 with u = ref − logp = −1 → e^-1 = 0.3679; each sequence has one such token
    assert sequence_kl(logp, ref, mask, "k3") == pytest.approx(math.exp(-1.0))
    assert sequence_kl(logp, logp, mask, "k3") == 0.0


def test_group_order_agreement_counts_pairs_within_groups():
    # group 0: reward orders (a > b > c), gold orders (a > c > b): 2 of 3 pairs agree
    # group 1: reward ties two samples whose gold differs (½), one gold tie left out
    reward = torch.tensor([[3.0, 2.0, 1.0], [1.0, 1.0, 0.0]])
    gold = torch.tensor([[1.0, 0.0, 0.5], [0.2, 0.8, 0.8]])
    # group 1 pairs: (0,1) reward tie, gold differs → ½; (0,2) r 1>0, g .2<.8 → 0; (1,2) gold tie → out
    assert group_order_agreement(reward, gold) == pytest.approx((2 + 0.5 + 0) / 5)
    assert math.isnan(group_order_agreement(reward, torch.ones(2, 3)))


def test_hacked_means_proxy_above_every_optimal_answer_and_gold_below():
    proxy = torch.tensor([2.0, 0.5, 2.0, 3.0])
    optimal = torch.tensor([1.0, 1.0, 1.0, 3.0])
    gold = torch.tensor([0.4, 0.4, 1.0, 0.0])
    # 0: hacked; 1: proxy below the optimum; 2: gold-optimal itself; 3: proxy ties the optimum
    assert hacked_mask(proxy, optimal, gold).tolist() == [True, False, False, False]


def test_label_accuracy_of_winner_loser_against_gold():
    gold = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, 0.5], [0.3, 0.3, 0.3]])
    winner, loser = torch.tensor([0, 0, 1]), torch.tensor([1, 1, 2])
    assert label_accuracy(gold, winner, loser) == pytest.approx((1 + 0 + 0.5) / 3)
    assert label_accuracy(gold, winner, loser, torch.tensor([True, False, False])) == 1.0
    assert math.isnan(label_accuracy(gold, winner, loser, torch.zeros(3, dtype=torch.bool)))


def test_win_rate_compares_every_sample_pair_per_prompt():
    a = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    b = torch.tensor([[0.5, 0.0], [0.5, 0.5]])
    # prompt 0: (1>.5) (1>0) (0<.5) (0=0 → ½) = 2.5/4; prompt 1: all ties = ½
    assert win_rate(a, b) == pytest.approx((2.5 / 4 + 0.5) / 2)
    assert win_rate(b, a) == pytest.approx(1 - win_rate(a, b))


def test_gold_parts_add_up_to_gold():
    cfg = WorldConfig()
    prompts = ["add 3 5", "add 3 5", "sort 3 1 2", "max 4 9 2"]
    responses = ["8", "the answer is 8 . 8 . i hope this helps", "1 3 2", "7"]
    parts = gold_parts(prompts, responses, cfg)
    assert [p.correctness for p in parts] == [1.0, 1.0, pytest.approx(1 / 3), 0.0]
    # "the answer is 8 . 8 . i hope this helps": 11 tokens − 1 answer − 3 free lead-in = 7 excess
    assert [p.excess_tokens for p in parts] == [0, 7, 0, 0]
    assert [p.has_phrase for p in parts] == [False, True, False, False]
    for p in parts:
        assert p.gold == pytest.approx(p.correctness - 0.05 * p.excess_tokens - 0.2 * p.has_phrase)
    assert optimal_responses("add 3 5", cfg) == ["8", "the answer is 8"]
    assert [p.gold for p in gold_parts(["add 3 5"] * 2, optimal_responses("add 3 5", cfg), cfg)] == [1.0, 1.0]


def test_gold_step_metrics_on_a_planted_batch():
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml")
    prompts = ["add 3 5"] * 2 + ["max 4 9 2"] * 2
    responses = ["8", "8 . 8 . 8 . 8", "9", "4"]
    frozen = torch.tensor([0.0, 2.0, 1.0, 0.5])  # the RM prefers the repeated answer: hacked
    used = torch.tensor([1.0, 0.0, 1.0, 0.0])  # an optimised reward that orders both groups as gold does
    owners, msgs, texts = optimal_rows(["add 3 5", "max 4 9 2"], cfg)
    assert owners == [0, 0, 1, 1] and texts == ["8", "the answer is 8", "9", "the answer is 9"]
    best = best_per_owner(torch.tensor([0.1, 0.3, 1.0, 0.2]), owners, 2)
    assert best.tolist() == pytest.approx([0.3, 1.0])
    gold, hacked, m = gold_step_metrics(prompts, responses, used, frozen, best[torch.tensor([0, 0, 1, 1])], 2, cfg)
    assert gold.tolist() == pytest.approx([1.0, 1.0 - 0.05 * 6, 1.0, 0.0])
    assert m["gold_correctness"] == pytest.approx(0.75)
    assert m["gold_excess_tokens"] == pytest.approx(6 / 4)
    assert m["agreement_gold"] == 1.0 and m["agreement_gold_frozen_rm"] == 0.5
    assert m["hacked_rate"] == pytest.approx(1 / 4)  # only "8 . 8 . 8 . 8": 2.0 > 0.3 and gold 0.7 < 1
    assert hacked.tolist() == [False, True, False, False]
    _, _, with_gold = gold_step_metrics(prompts, responses, None, frozen, best[torch.tensor([0, 0, 1, 1])], 2, cfg)
    assert with_gold["agreement_gold"] == 1.0  # used=None: the policy optimised gold itself


def test_curve_stats_find_a_planted_peak_and_read_gold_at_kl():
    steps = np.arange(1, 101)
    gold = 0.5 - ((steps - 40) / 60.0) ** 2  # peak 0.5 at step 40
    kl = (steps / 10.0) ** 2  # √KL = step / 10
    history = [
        {"step": int(s), "gold_reward": float(g), "kl_seq": float(k), "proxy_reward": float(s), "frozen_rm_reward": 1.0}
        for s, g, k in zip(steps, gold, kl)
    ]
    stats = curve_stats(history, [16.0], window=1)
    assert stats["peak_step"] == 40 and stats["peak_gold"] == pytest.approx(0.5)
    assert stats["kl_at_peak"] == pytest.approx(16.0)
    assert stats["gold_at_kl_16"] == pytest.approx(0.5)  # √16 = 4 → step 40
    assert stats["rise"] == pytest.approx(0.5 - gold[0]) and stats["fall"] == pytest.approx(0.5 - gold[-1])
    assert stats["late_gold"] == pytest.approx(gold[-1])
    assert math.isnan(curve_stats(history, [1e4], window=1)["gold_at_kl_10000"])  # never reached
    assert stats["area_frozen_rm_gold"] == pytest.approx(np.mean(np.abs((gold - gold.mean()) / gold.std())))


def test_smoothing_and_interval_statistics_by_hand():
    assert smooth([0.0, 3.0, 6.0, 9.0], window=3).tolist() == pytest.approx([1.5, 3.0, 6.0, 7.5])
    mean, half, n = mean_ci([1.0, 2.0, 3.0])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    d = paired_difference([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])  # differences 1, 2, 3
    assert d["mean"] == pytest.approx(2.0) and d["n"] == 3
    assert d["half_width"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    # (t_.975 + t_.8) at 2 degrees of freedom: 4.3027 + 1.0607
    assert d["detectable"] == pytest.approx((4.302653 + 1.060660) / math.sqrt(3), rel=1e-4)
