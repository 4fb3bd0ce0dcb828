"""The RM stage end to end on real Ray + DeepSpeed, and the `r2m-ray` CLI as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from r2m_ray.config import load_config
from r2m_ray.pipelines.full_run import run_pipeline
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow


def load_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in a directory."""
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _cfg(tmp_path: Path, *extra: str):
    return load_config(ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp_path) + list(extra))


def rescored_accuracy(cfg, run_path: Path, split: str, scorers: list) -> tuple[float, float]:
    """Accuracy on the world's `split` recomputed pair by pair, outside the stage: each scorer maps
    (ids [1, T], mask) to one reward, the ensemble takes their minimum, ties count ½. With the
    tolerance of one pair: single rows and the stage's padded batches round differently, which
    could flip a pair whose margin is at rounding level."""
    from r2m_ray.actors.reward_annotator import rm_tokenizer_dir
    from r2m_ray.data.preference import load_preferences
    from r2m_ray.data.tokenize import tokenize_preferences
    from r2m_ray.models.registry import load_tokenizer

    tokenizer = load_tokenizer(rm_tokenizer_dir(run_path / "checkpoints" / "rm-0"))
    data = load_preferences(str(run_path / "world" / f"{split}.jsonl"), cfg.data, split=split)
    pairs = tokenize_preferences(data, tokenizer, cfg.data).dataset
    wins = 0.0
    with torch.no_grad():
        for row in pairs:
            side = {}
            for key in ("chosen", "rejected"):
                ids = torch.tensor([row[f"{key}_input_ids"]])
                side[key] = min(float(f(ids, torch.ones_like(ids))) for f in scorers)
            wins += 1.0 if side["chosen"] > side["rejected"] else 0.5 if side["chosen"] == side["rejected"] else 0.0
    return wins / len(pairs), 1.0 / len(pairs) + 1e-9


def checkpoint_scorer(path: Path):
    from r2m_ray.models.reward_model import RewardModel

    model = RewardModel.from_pretrained(path).eval()
    return lambda ids, mask: model(ids, mask).rewards.squeeze()


def test_bt_learns_the_biased_world(ray_session, tmp_path):
    """Plain BT: above chance in distribution, the planted bias costs it out of distribution."""
    rewardbench = ROOT / "tests" / "fixtures" / "data" / "rewardbench.jsonl"
    cfg = _cfg(tmp_path, "rm.epochs=2", "stages=[world, rm]", f"data.extra_eval=[{rewardbench}]")
    run = run_pipeline(cfg, run_dir=tmp_path / "bt")
    s = json.loads((run.path / "summary.json").read_text())
    assert s["method"] == "bt" and s["steps"] == 2 * (768 // 16)
    assert s["pairs_per_second"] == pytest.approx(s["steps"] * 16 / s["train_seconds"])
    assert s["accuracy"]["id"] > 0.65  # chance is 0.5
    assert s["accuracy"]["ood"] < s["accuracy"]["id"] - 0.1  # the generalisation gap
    assert set(s["eval"]["id"]["per_subset"]) and all(k.startswith("id/") for k in s["eval"]["id"]["per_subset"])
    extra = s["eval"]["rewardbench"]  # a RewardBench-style file, scored per subset
    assert extra["n"] > 0 and set(extra["per_subset"]) and all(v["n"] > 0 for v in extra["per_subset"].values())
    assert (run.path / "checkpoints" / "rm-0" / "value_head.safetensors").is_file()
    assert list((run.path / "plots").glob("*.png"))
    assert list((run.path / "tb").iterdir())
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["stage"] == "rm/member0"]
    assert losses[-1] < losses[0]
    assert s["data"]["train"]["n_out"] + sum(s["data"]["train"]["skipped"].values()) == 768


def test_grm_dpo_prioritized_resample_ensemble(ray_session, tmp_path):
    """The heaviest combination: reference actor, GRM-dpo, prioritiser (resample), 2 ranks, 2 members."""
    cfg = _cfg(
        tmp_path,
        "stages=[world, rm]",
        "rm.grm.regulariser=dpo",
        "rm.prioritizer.enabled=true",
        "rm.prioritizer.mode=resample",
        "rm.prioritizer.refresh_every=5",
        "rm.max_steps=12",
        "rm.deepspeed.ranks=2",
        "rm.ensemble=2",
        "rm.ensemble_reduce=min",
        "rm.method=combo",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / "combo")
    s = json.loads((run.path / "summary.json").read_text())
    assert s["method"] == "combo" and s["steps"] == 12 and len(s["checkpoints"]) == 2
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    member_rows = [r for r in rows if r["stage"].startswith("rm/member")]
    assert {r["stage"] for r in member_rows} == {"rm/member0", "rm/member1"}
    assert all("reg_loss" in r and "delta_r2_mean" in r for r in member_rows)
    # the reported accuracy is the min-ensemble of the two saved members, rescored here pair by pair
    scorers = [checkpoint_scorer(Path(p)) for p in s["checkpoints"]]
    for split, name in (("test_id", "id"), ("test_ood", "ood")):
        acc, tol = rescored_accuracy(cfg, run.path, split, scorers)
        assert s["accuracy"][name] == pytest.approx(acc, abs=tol)


def test_prioritizer_warmup_reference_weights_and_truth_in_the_summary(ray_session, tmp_path):
    """No prioritiser scores during the warm-up; after it, reference importance weights and each
    batch's Δr2 correlation with the world's exact truth are logged and averaged into the summary.
    rm.train_pairs trains on the first pairs only (the data-size axis of a sweep)."""
    cfg = _cfg(
        tmp_path,
        "stages=[world, rm]",
        "rm.prioritizer.enabled=true",
        "rm.prioritizer.warmup_steps=4",
        "rm.prioritizer.weights=reference",
        "rm.prioritizer.normalize=batch_std",
        "rm.train_pairs=160",  # of the world's 768: 160 // 16 = 10 steps in the one epoch
        "rm.log_every=1",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / "warm")
    s = json.loads((run.path / "summary.json").read_text())
    assert s["steps"] == 10 and s["data"]["train_pairs_used"] == 160
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["stage"] == "rm/member0"]
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert not any("delta_r2_mean" in r for r in rows[:4])  # warm-up: uniform weights, nothing asked
    assert all("delta_r2_mean" in r and 0 < r["importance_weight_own"] < 1 for r in rows[4:])
    v = s["delta_r2_validation"]
    assert v["steps"] == 6
    for key in ("delta_r2_corr_free_gold", "delta_r2_corr_feature"):
        assert v[key] == pytest.approx(sum(r[key] for r in rows[4:]) / 6)
        assert all(-1 <= r[key] <= 1 for r in rows[4:])


def test_sft_stage_improves_gold_reward(tmp_path):
    cfg = _cfg(tmp_path, "stages=[world, sft]", "sft.epochs=2")
    run = run_pipeline(cfg, run_dir=tmp_path / "sft")
    s = json.loads((run.path / "summary.json").read_text())["sft"]
    assert s["gold_reward"]["after"] > s["gold_reward"]["before"] + 0.3
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run.path / "checkpoints" / "sft")  # a plain HF checkpoint


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "R2M_RAY_LOG": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "r2m_ray.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900
    )


def test_cli_eval_export(ray_session, tmp_path):
    """What the README tells a user to do after a run: eval and export its checkpoint with the
    `r2m-ray` command. The run itself is the in-process RM stage (a linear head: the export loads
    without remote code); `r2m-ray run` as a user's process is tested end to end in test_job_submit."""
    ovr = small_overrides(tmp_path) + ["model.value_head=linear", "rm.max_steps=20"]
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", [*ovr, "stages=[world, rm]"])
    summary = run_pipeline(cfg, run_dir=tmp_path / "run").summary
    ckpt = tmp_path / "run" / "checkpoints" / "rm-0"
    res = _cli(
        "eval",
        str(ROOT / "jobs" / "quickstart.yaml"),
        *ovr,
        f"eval.checkpoints=[{ckpt}]",
        "--run-dir",
        str(tmp_path / "eval"),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert again["accuracy"]["id"] == pytest.approx(summary["accuracy"]["id"], abs=1e-6)
    res = _cli("export", *ovr, f"eval.checkpoints=[{ckpt}]", f"eval.export_dir={tmp_path / 'hf'}", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from r2m_ray.models.reward_model import RewardModel

    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    ours = RewardModel.from_pretrained(ckpt).eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "hf")
    tok.padding_side = "left"
    enc = tok(
        ["<|user|> add 3 5 <|assistant|> 8", "<|user|> max 1 9 2 <|assistant|> the answer is 9"],
        return_tensors="pt",
        padding=True,
    )
    with torch.no_grad():
        assert torch.allclose(
            hf(**enc).logits.squeeze(-1), ours(enc["input_ids"], enc["attention_mask"]).rewards, atol=1e-4
        )


@pytest.mark.parametrize(
    "args, needle",
    [
        (["rm", "rm.grm.alphaa=1"], "rm.grm.alphaa: unknown key"),
        (["rm", "rm.deepspeed.ranks=zero"], "rm.deepspeed.ranks"),
        (["rm", "/nonexistent.yaml"], "config file not found"),
        (["eval"], "eval.checkpoints"),
        (["rm", "data.train=/nonexistent/pairs.jsonl"], "/nonexistent/pairs.jsonl"),
    ],
)
def test_cli_bad_input_is_one_clear_line(tmp_path, args, needle):
    """The `r2m-ray` process itself (its logging, its exit code): the small world and the session's
    tiny model, so a refusal after the world is built does not first build the default world."""
    res = _cli(*args, *small_overrides(tmp_path), cwd=tmp_path)
    assert res.returncode == 2
    assert needle in res.stderr
    assert "Traceback" not in res.stderr


def test_bench_rm_writes_json(ray_session, tmp_path):
    from r2m_ray.bench import bench_rm

    cfg = _cfg(tmp_path, "rm.max_steps=6")
    report = bench_rm(cfg, str(tmp_path / "bench.json"), str(tmp_path / "bench"))
    on_disk = json.loads((tmp_path / "bench.json").read_text())
    assert set(on_disk["variants"]) == {"bt", "grm_sft", "bt_prioritized"}
    assert all(v["steps"] == 6 and v["pairs_per_second"] > 0 for v in on_disk["variants"].values())
    assert all(v["learner_reused"] for v in on_disk["variants"].values())  # all in the warm-up's ranks
    assert on_disk["grm_step_time_ratio"] == pytest.approx(
        on_disk["variants"]["grm_sft"]["train_seconds"] / on_disk["variants"]["bt"]["train_seconds"]
    )
    assert report["json"] == str(tmp_path / "bench.json")


@pytest.mark.parametrize("loss", ["margin", "label_smoothing"])
def test_frozen_backbone_baseline_trains_only_the_head(ray_session, tmp_path, tiny_model_dir, loss):
    """frozen backbone + MLP head: the backbone in the checkpoint is bit-identical to the initial one."""
    cfg = _cfg(
        tmp_path,
        "stages=[world, rm]",
        "rm.freeze_backbone=true",
        f"rm.loss={loss}",
        "rm.max_steps=10",
        "rm.optim.lr=1.0e-2",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / loss)
    ckpt = run.path / "checkpoints" / "rm-0"
    init, trained = load_tensors(tiny_model_dir), load_tensors(ckpt / "backbone")
    shared = set(init) & set(trained)
    assert len(shared) >= len(init) - 1  # every backbone tensor is in the checkpoint
    assert all(torch.equal(init[k], trained[k]) for k in shared)
    from r2m_ray.models.reward_model import RewardModel

    fresh = RewardModel.from_backbone_dir(tiny_model_dir, seed=cfg.seed)
    head_after = RewardModel.from_pretrained(ckpt).value_head.state_dict()
    assert any(not torch.equal(v, head_after[k]) for k, v in fresh.value_head.state_dict().items())


def test_lora_rm_stage_with_grm_sft(ray_session, tmp_path, tiny_model_dir):
    """rm.lora on a DeepSpeed learner with the GRM-sft regulariser: only the adapted matrices move,
    the checkpoint holds merged weights (+ adapter/) and is scored like any other."""
    cfg = _cfg(
        tmp_path,
        "stages=[world, rm]",
        "rm.lora.enabled=true",
        "rm.lora.target_modules=[q_proj, v_proj]",
        "rm.grm.regulariser=sft",
        "rm.gradient_checkpointing=true",
        "rm.max_steps=10",
        "rm.optim.lr=1.0e-2",
        "model.value_head=linear",
        "rm.export_hf=true",
    )
    run = run_pipeline(cfg, run_dir=tmp_path / "lora")
    ckpt = run.path / "checkpoints" / "rm-0"
    assert (ckpt / "adapter" / "adapter_config.json").is_file()
    init, trained = load_tensors(tiny_model_dir), load_tensors(ckpt / "backbone")
    changed = [k for k in init if k in trained and not torch.equal(init[k], trained[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    # the HF export scores a pair like the checkpoint it came from
    from transformers import AutoModelForSequenceClassification

    from r2m_ray.models.reward_model import RewardModel

    exported = AutoModelForSequenceClassification.from_pretrained(run.summary["exports"][0]).eval()
    ours = RewardModel.from_pretrained(ckpt).eval()
    # the accuracy the stage reports is that of the merged weights it saved and exported
    acc, tol = rescored_accuracy(
        cfg, run.path, "test_id", [lambda i, m: exported(input_ids=i, attention_mask=m).logits]
    )
    assert run.summary["accuracy"]["id"] == pytest.approx(acc, abs=tol)
    ids = torch.tensor([[1, 5, 9, 14, 20, 7]])
    with torch.no_grad():
        theirs = exported(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.squeeze()
        mine = ours(ids, torch.ones_like(ids)).rewards.squeeze()
    assert torch.allclose(theirs, mine, atol=1e-4)


def test_load_split_reuses_an_unchanged_file_and_reads_a_changed_one(small_cfg, tiny_model_dir, world_paths, tmp_path):
    """A comparison loads the same split for every RM: the second load is the first's rows (with the
    world's truth columns), its skip report in the second run's summary too; a file rewritten since
    is read again."""
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.pipelines.rm_stage import TRUTH_COLUMNS, load_split
    from r2m_ray.rundir import RunDir

    src = tmp_path / "train.jsonl"
    rows = world_paths["train"].read_text().splitlines()[:64]
    src.write_text("\n".join(rows) + "\n")
    tokenizer = load_tokenizer(tiny_model_dir)
    runs = [RunDir(tmp_path / f"run{i}", small_cfg) for i in range(3)]
    first = load_split(str(src), small_cfg, "train", tokenizer, runs[0], small_cfg.world)
    again = load_split(str(src), small_cfg, "train", tokenizer, runs[1], small_cfg.world)
    assert again is first and set(TRUTH_COLUMNS) <= set(first.column_names)  # from memory, not re-read
    assert runs[1].summary["data"]["train"] == runs[0].summary["data"]["train"]
    assert runs[1].summary["data"]["train"]["n_out"] == len(first)
    src.write_text("\n".join(rows[:-1]) + "\n")  # one pair fewer
    changed = load_split(str(src), small_cfg, "train", tokenizer, runs[2], small_cfg.world)
    assert len(changed) == len(first) - 1 and runs[2].summary["data"]["train"]["n_in"] == len(rows) - 1
    for run in runs:
        run.close()


def test_kept_learner_ranks_train_the_same_rm_as_new_ranks(ray_session, tmp_path, tiny_model_dir, world_paths):
    """A comparison trains RM after RM in kept learner ranks (keep_learners): a seed trained there
    after another RM comes out with the very weights new ranks give it; the ranks were reused
    (2 DeepSpeed ranks: the process group outlives the engine) and are shut down after the block."""
    from r2m_ray.pipelines.rm_stage import _KEPT, keep_learners, run_rm_stage
    from r2m_ray.rundir import RunDir

    def train(seed: int, name: str) -> dict:
        cfg = _cfg(tmp_path, "stages=[rm]", "rm.max_steps=6", "rm.deepspeed.ranks=2", f"seed={seed}")
        run = RunDir.create(cfg, tmp_path / name, "force")
        summary = run_rm_stage(cfg, run, tiny_model_dir, world_paths)
        run.close()
        return summary

    fresh = train(3, "fresh")
    assert not _KEPT  # outside a block the ranks end with their RM
    with keep_learners():
        other = train(4, "other")
        again = train(3, "again")
        assert len(_KEPT) == 1
        kept = next(iter(_KEPT.values()))
    assert not _KEPT and (fresh["learner_reused"], other["learner_reused"], again["learner_reused"]) == (
        False,
        False,
        True,
    )
    import ray

    with pytest.raises(ray.exceptions.RayActorError):  # shut down when the block ended
        ray.get(kept.actors[0].address.remote(), timeout=60)

    def all_weights(ckpt: Path) -> dict[str, torch.Tensor]:  # value head + backbone (its own subdirectory)
        return {**load_tensors(ckpt), **{f"backbone.{k}": v for k, v in load_tensors(ckpt / "backbone").items()}}

    weights = [all_weights(Path(s["checkpoints"][0])) for s in (fresh, again, other)]
    assert any(k.startswith("backbone.") for k in weights[0])
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])  # another seed: other weights
    assert fresh["accuracy"] == again["accuracy"]
