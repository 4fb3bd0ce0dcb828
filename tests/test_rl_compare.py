"""`r2m-ray compare` over paired seeds on a tiny two-arm RL table, and `eval feedback` on one of its runs."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from r2m_ray.cli import main
from r2m_ray.eval.rl_report import paired_difference
from tests.conftest import ROOT, small_overrides

# The first test also runs the module's comparison (2 seeds × world, SFT, two RMs and two arms): a
# comparison trains its own per-seed models by design, which is what is tested.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


RMS = ("biased", "unbiased")  # in the spec's order


@pytest.fixture(scope="module")
def compared(ray_session, tmp_path_factory):
    """2 seeds × {frozen, gold}, each seed with its own world, SFT policy and two reward models."""
    tmp = tmp_path_factory.mktemp("compare")
    spec = {
        "base": str(ROOT / "jobs" / "quickstart.yaml"),
        # HF generate instead of vLLM: this test is about the comparison, and an engine start per run is slow
        "overrides": small_overrides(tmp)
        + ["rm.max_steps=10", "rl.steps=3", "rl.eval_every=3", "rl.rollout.backend=hf"],
        "seeds": [0, 1],
        "output": str(tmp / "results.md"),
        "section": "tiny_rl",
        "figures": str(tmp / "figures"),
        "reward_models": {"biased": [], "unbiased": ["world.bias.kind=none"]},
        "arm_reward_model": {"gold": "unbiased"},
        "reference": "frozen",
        "kl_budgets": [0.001],
        "variants": {"frozen": ["rl.reward.mode=frozen"], "gold": ["rl.reward.mode=gold"]},
    }
    path = tmp / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert main(["compare", str(path), "--run-dir", str(tmp / "run")]) == 0
    return tmp, spec


def test_compare_writes_paired_tables_and_figure(compared):
    tmp, spec = compared
    root = tmp / "run"
    results = json.loads((root / "tiny_rl.json").read_text())
    assert set(results) == {"frozen", "gold"} and [r["seed"] for r in results["frozen"]] == [0, 1]
    # paired by seed: one SFT policy per seed, shared by both arms; each seed its own world
    for seed in (0, 1):
        summaries = [
            json.loads((root / f"seed{seed}" / arm / "summary.json").read_text())["rl"] for arm in ("frozen", "gold")
        ]
        assert (
            summaries[0]["policy_start"]
            == summaries[1]["policy_start"]
            == str(root / f"seed{seed}" / "checkpoints" / "sft")
        )
        assert summaries[0]["reward_checkpoint"].endswith(f"seed{seed}/rm-biased/checkpoints/rm-0")
        assert summaries[1]["reward_checkpoint"].endswith(f"seed{seed}/rm-unbiased/checkpoints/rm-0")
        reused = [json.loads((root / f"seed{seed}" / f"rm-{n}" / "summary.json").read_text()) for n in RMS]
        assert [s["learner_reused"] for s in reused] == [False, True]  # the seed's 2nd RM: the 1st's ranks
    unbiased = yaml.safe_load((root / "seed0" / "rm-unbiased" / "config.yaml").read_text())
    assert unbiased["world"]["bias"]["kind"] == "none"
    # every per-run number the table shows comes from that run's logged curve
    for arm, runs in results.items():
        for r in runs:
            rows = [json.loads(x) for x in open(root / r["path"] / "metrics.jsonl") if '"stage": "rl"' in x]
            assert r["late_gold"] == pytest.approx(sum(x["gold_reward"] for x in rows) / len(rows))  # window > 3 steps
            if arm == "gold":  # mode=gold optimises the world's gold itself; the frozen RM is still logged
                for x in rows:
                    assert x["proxy_reward"] == pytest.approx(x["gold_reward"], abs=1e-6) and x["head"] == {}
                    assert x["agreement_gold"] == 1.0 or math.isnan(x["agreement_gold"])  # NaN: no gold order
                    assert x["frozen_rm_reward"] != x["proxy_reward"]
    text = (tmp / "results.md").read_text()
    assert "<!-- tiny_rl:begin -->" in text and "`r2m-ray compare" in text
    diff = paired_difference([r["late_gold"] for r in results["gold"]], [r["late_gold"] for r in results["frozen"]])
    row = next(line for line in text.splitlines() if line.startswith("| gold | ") and "±" in line and "(" in line)
    assert f"{diff['mean']:+.3f} ± {diff['half_width']:.3f} ({diff['detectable']:.3f})" in row
    # the peak statement counts the seeds whose smoothed gold peaks strictly inside the run
    inside = sum(r["rise"] > 0 and r["fall"] > 0 for r in results["frozen"])
    statement = next(line for line in text.splitlines() if line.startswith("- `frozen`: "))
    assert f"strictly inside the run in {inside} of 2 seeds" in statement
    assert f"0: +{results['frozen'][0]['rise']:.3f}/" in statement
    assert (tmp / "figures" / "tiny_rl_gold_vs_kl.png").stat().st_size > 0
    # the tables are rebuilt from the finished runs without running anything again
    mtime = (root / "seed0" / "gold" / "metrics.jsonl").stat().st_mtime
    assert main(["compare", str(tmp / "spec.yaml"), "--run-dir", str(root), "--report-only"]) == 0
    assert (root / "seed0" / "gold" / "metrics.jsonl").stat().st_mtime == mtime


def test_compare_refuses_a_run_dir_made_with_another_config(compared, capsys):
    tmp, spec = compared
    changed = dict(spec, overrides=spec["overrides"] + ["rl.policy.kl_coef=0.5"])
    path = tmp / "changed.yaml"
    path.write_text(yaml.safe_dump(changed))
    assert main(["compare", str(path), "--run-dir", str(tmp / "run")]) == 2
    assert "rl.policy.kl_coef" in capsys.readouterr().err


def test_eval_feedback_on_an_rl_run(compared, capsys):
    tmp, _ = compared
    rl_run = tmp / "run" / "seed0" / "frozen"
    assert main(["eval", "feedback", f"eval.rl_run={rl_run}", "--run-dir", str(tmp / "feedback")]) == 0
    result = json.loads((tmp / "feedback" / "feedback_analysis.json").read_text())
    for name in ("start", "final"):
        res = result["policies"][name]
        assert res["samples"] == 8 * 4  # the 8 held-out prompts × K = 4 samples
        assert [r["layer"] for r in res["layers"]] == [0, 1, 2]  # embeddings + the tiny model's 2 layers
        for r in res["layers"]:
            assert -1.0 <= r["across"] <= 1.0 and -1.0 <= r["within"] <= 1.0
    # the run's own monitor, averaged over the steps where it flagged something
    rows = [json.loads(x) for x in open(rl_run / "metrics.jsonl") if '"stage": "rl"' in x]
    flagged = [x for x in rows if x.get("detector_precision") is not None and math.isfinite(x["detector_precision"])]
    assert result["monitor"]["steps"] == len(flagged)
    if flagged:
        expected = sum(x["hacked_rate"] for x in flagged) / len(flagged)
        assert result["monitor"]["hacked_rate"] == pytest.approx(expected)
    assert (tmp / "feedback" / "plots" / "feedback_similarity.png").stat().st_size > 0
    assert main(["eval", "feedback", f"eval.rl_run={tmp}", "--run-dir", str(tmp / "feedback2")]) == 2
    assert "not a finished RL run" in capsys.readouterr().err
