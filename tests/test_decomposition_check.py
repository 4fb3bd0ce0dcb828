"""The prompt-free gap estimator against the world's exact truth (issue I, item 2).

The world knows each pair's exact prompt-free gold gap Δg2 = −λ_len·Δexcess − λ_phrase·Δphrase.
The control gives the estimator gold itself as the reward: then Δr2 must recover Δg2, and far
better than the pair's own-prompt gap does (which mixes in the correctness gap). On the length
world's 1,000-pair test splits in batches of 32, `r2m-ray eval decomposition` (docs/results.md)
gives Pearson 0.74 / 0.90 / 0.96 at M = 2 / 4 / 8 (ID; OOD 0.66 / 0.88 / 0.95) against 0.42 / 0.28
for the own-prompt gap. The thresholds below (0.8 at M = 4, 0.9 at M = 8, own gap below 0.6) sit
under those values with room for another world's draw of pairs and batches.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from r2m_ray.actors.prioritizer import cross_prompt_indices
from r2m_ray.algos.decomposition import priorities, prompt_free_gap
from r2m_ray.eval.decomposition_check import correlation, gold_cross_gaps
from r2m_ray.world import build_world
from r2m_ray.world.config import WorldConfig
from r2m_ray.world.prompt_free_truth import pair_truth
from tests.conftest import ROOT, small_overrides


def test_batch_std_priorities_by_hand_and_scale_free():
    d = torch.tensor([0.0, 1.0, 2.0, 3.0])
    s = math.sqrt(sum((x - 1.5) ** 2 for x in [0, 1, 2, 3]) / 3)  # sample std 1.2910
    e = [math.exp(-x / (s * 0.5)) for x in [0, 1, 2, 3]]
    want = [4 * v / sum(e) for v in e]
    assert priorities(d, tau=0.5, normalize="batch_std").tolist() == pytest.approx(want, rel=1e-5)
    # the reward scale no longer sharpens the priorities; without normalising it does
    assert priorities(10 * d, 0.5, "batch_std").tolist() == pytest.approx(want, rel=1e-5)
    assert priorities(10 * d, 0.5).max() > 3.9 > priorities(d, 0.5).max()
    assert priorities(torch.full((5,), 2.0), 1.0, "batch_std").tolist() == [1.0] * 5  # all tied: uniform
    with pytest.raises(ValueError, match="normalize must be 'none' or 'batch_std'"):
        priorities(d, 1.0, "zscore")


def test_pair_truth_by_hand():
    cfg = WorldConfig()  # λ_len 0.05, λ_phrase 0.2, the lead-in free
    truth = pair_truth(
        ["add 3 5", "add 3 5", "max 3 9 2"],
        ["8", "i hope this helps 8", "9"],
        ["the answer is 8 . 8", "8", "3"],
        cfg,
    )
    # 1: "the answer is 8 . 8" has 6 tokens, 1 + 3 (free lead-in) allowed → excess 2; both answers right
    # 2: "i hope this helps 8": 5 tokens, 1 allowed → excess 4, plus the phrase
    assert truth["free_gap"] == pytest.approx([0.05 * 2, -0.05 * 4 - 0.2, 0.0])
    assert truth["related_gap"] == [0.0, 0.0, 1.0]
    assert truth["feature_gap"] == [1 - 6, 5 - 1, 0]  # the length world's feature: world tokens
    assert truth["family"] == ["add", "add", "max"]
    phrase = pair_truth(["add 3 5"], ["i hope this helps 8"], ["8"], WorldConfig(bias={"kind": "phrase"}))
    assert phrase["feature_gap"] == [1.0]


def test_truth_correlations_pick_the_batch_rows():
    from r2m_ray.eval.decomposition_check import truth_correlations

    truth = {"free_gap": torch.tensor([0.0, 1.0, 5.0, 2.0, 3.0]), "feature_gap": torch.tensor([3.0, 0.0, 0, 2.0, 1.0])}
    idx = [4, 1, 3]  # the batch's rows: free gaps 3, 1, 2 and feature gaps 1, 0, 2
    got = truth_correlations(torch.tensor([7.0, 3.0, 5.0]), truth, idx)  # = 2·free + 1
    assert got["delta_r2_corr_free_gold"] == pytest.approx(1.0)
    assert got["delta_r2_corr_feature"] == pytest.approx(0.5)  # Pearson of (3,1,2) with (1,0,2), by hand


@pytest.mark.parametrize(("kind", "split"), [("length", "test_id"), ("phrase", "test_ood")])
def test_with_gold_as_the_reward_the_estimator_recovers_the_exact_prompt_free_gap(kind, split):
    cfg = WorldConfig.model_validate(
        {
            "bias": {"kind": kind, "strength": 0.8, "ood_bias": "reversed"},
            "splits": {"sft": 8, "train": 8, "rl_prompts": 8, "test_id": 1000, "test_ood": 1000},
        }
    )
    ds = build_world(cfg)[split]
    p, c, r = ds["prompt"], ds["chosen"], ds["rejected"]
    truth = pair_truth(p, c, r, cfg)["free_gap"]
    corr = {}
    for m in (2, 4, 8):
        gen = torch.Generator().manual_seed(0)
        est, own = [], []
        for start in range(0, len(p), 32):
            rows = list(range(start, min(start + 32, len(p))))
            idx = cross_prompt_indices(len(rows), m, gen)
            d = gold_cross_gaps([p[i] for i in rows], [c[i] for i in rows], [r[i] for i in rows], idx, cfg)
            est += prompt_free_gap(d).tolist()
            own += d[:, 0].tolist()
        corr[m] = correlation(est, truth)
    assert corr[4] > 0.8 and corr[8] > 0.9 and corr[2] < corr[4] < corr[8], corr  # more prompts, closer
    assert correlation(own, truth) < 0.6  # the own-prompt gap alone mixes in correctness


@pytest.mark.slow
def test_eval_decomposition_reports_the_rm_and_the_control(trained, tmp_path):
    """The command on the session's RM: the RM's own-prompt gap equals its margin scored outside the
    estimator; the gold control clears its threshold on the small world's test split."""
    import subprocess
    import sys

    from r2m_ray.config import load_config
    from r2m_ray.data.preference import load_preferences
    from r2m_ray.data.tokenize import PreferenceCollator, tokenize_preferences
    from r2m_ray.eval.rm_accuracy import score_pairs
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.models.reward_model import RewardModel

    _, base = trained
    ckpt = base / "checkpoints" / "rm-0"
    ovr = small_overrides(tmp_path) + [
        f"eval.checkpoints=[{ckpt}]",
        "eval.decomposition.num_prompts=[4]",
        "eval.decomposition.splits=[test_id]",
    ]
    res = subprocess.run(
        [sys.executable, "-m", "r2m_ray.cli", "eval", "decomposition", str(ROOT / "jobs" / "quickstart.yaml"), *ovr]
        + ["--run-dir", str(tmp_path / "dec")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "RM Δr2 ~ planted feature gap" in res.stdout
    report = json.loads((tmp_path / "dec" / "decomposition_check.json").read_text())
    got = report["splits"]["test_id"]["4"]
    # the margin of every test pair, scored by the checkpoint on its own
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", ovr)
    tok = load_tokenizer(ckpt)
    data = load_preferences(str(tmp_path / "dec" / "world" / "test_id.jsonl"), cfg.data, split="test_id")
    ds = tokenize_preferences(data, tok, cfg.data).dataset
    assert got["pairs"] == len(ds)
    r_c, r_r = score_pairs([RewardModel.from_pretrained(ckpt)], ds, PreferenceCollator(tok.pad_token_id), 64, "mean")
    raw = data.dataset
    truth = pair_truth([m[-1]["content"] for m in raw["prompt_messages"]], raw["chosen"], raw["rejected"], cfg.world)
    c = got["correlations"]
    assert c["rm_d_own~feature_gap"]["pearson"] == pytest.approx(correlation(r_c - r_r, truth["feature_gap"]), abs=2e-3)
    assert c["gold_delta_r2~free_gap"]["pearson"] > 0.8  # the control, as in the pure test above
    assert set(c["rm_delta_r2~free_gap"]["per_family"]) == set(truth["family"])
