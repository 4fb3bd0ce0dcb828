"""`r2m-ray bench peer rm|rl`: our learner beside TRL on the same work, at a tiny size (TRL is the [peer] extra)."""

from __future__ import annotations

import json

from tests.conftest import ROOT, small_overrides


def test_bench_peer_rm_runs_both_sides_on_the_same_pairs(ray_session, tmp_path):
    from r2m_ray.bench_peer import bench_peer_rm
    from r2m_ray.config import load_config

    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp_path) + ["rm.max_steps=4"])
    report = bench_peer_rm(cfg, str(tmp_path / "peer_rm.json"), str(tmp_path / "bench"), repeats=1)
    assert json.loads((tmp_path / "peer_rm.json").read_text())["ratio"] == report["ratio"]
    ours, peer = report["ours_runs"][0], report["peer_runs"][0]
    assert ours["steps"] == peer["steps"] == 4  # TRL really trained, step for step
    assert peer["trainer"] == "trl.RewardTrainer" and peer["threads"] == report["held_equal"]["torch_threads"] == 1
    assert report["ratio"] == report["ours_pairs_per_second_median"] / report["peer_pairs_per_second_median"] > 0
    # TRL was given exactly our tokenised pairs
    from datasets import load_from_disk

    pairs = load_from_disk(str(tmp_path / "bench" / "peer_pairs"))
    assert len(pairs) == report["held_equal"]["pairs"] and set(pairs.column_names) == {"chosen_ids", "rejected_ids"}


def test_bench_peer_rl_counts_the_tokens_trl_generates(ray_session, tmp_path):
    from r2m_ray.bench_peer import bench_peer_rl
    from r2m_ray.config import load_config

    # our side on the HF rollout backend: vLLM's start-up is tested elsewhere; this test is about the peer
    overrides = small_overrides(tmp_path) + ["rm.max_steps=4", "rl.eval_every=1000", "rl.rollout.backend=hf"]
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", overrides)
    report = bench_peer_rl(cfg, None, str(tmp_path / "bench"), repeats=1)
    peer = report["peer_runs"][0]
    # 2 RL steps x 2 policy epochs x 1 micro-batch of 16 = 4 optimiser steps; 4 prompts x 4 samples per step
    assert peer["optimizer_steps"] == 4 and peer["rl_steps"] == 2
    assert peer["completions"] == 2 * 4 * 4
    assert 0 < peer["generated_tokens"] <= peer["completions"] * 8  # ≤ max_new_tokens each
    assert report["ours_runs"][0]["steps"] == 2
    assert report["ours_runs"][0]["policy_learner"]["steps"] == 2 and report["gemm_peak"]["threads"] == 1
    assert report["policy_learner_mfu_median"] == report["ours_runs"][0]["policy_learner"]["mfu"] > 0
    assert report["held_equal"]["rl"]["max_new_tokens"] == 8 and report["held_equal"]["rl"]["micro_batches"] == 1
    assert report["held_equal"]["prompts"] > 0
    assert (tmp_path / "bench" / "peer_rm_hf" / "config.json").is_file()  # a stock classifier TRL can load
    assert json.loads((tmp_path / "bench" / "bench_peer_rl.json").read_text())["ratio"] == report["ratio"]


def test_bench_peer_needs_a_side(capsys):
    from r2m_ray.cli import main

    assert main(["bench", "peer", "jobs/quickstart.yaml"]) == 2
    assert "bench peer: say which side" in capsys.readouterr().err
