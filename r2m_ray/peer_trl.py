"""The peer side of `r2m-ray bench peer`: TRL's RewardTrainer / GRPOTrainer on a spec, in its own process.

Run as `python -m r2m_ray.peer_trl SPEC.json OUT.json` by bench_peer.py, so TRL's Trainer and
accelerate state never share a process with Ray, and the peer gets exactly the torch threads
the spec names (the same number our learner has). TRL is an optional extra: `pip install -e .[peer]`.
The timed span is the Trainer's own training loop (on_train_begin to on_train_end): model
loading and dataset preparation are outside it, as actor start-up is outside ours.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def _require_trl() -> Any:
    try:
        import trl
    except ImportError as err:
        raise SystemExit("bench peer needs TRL: pip install -e '.[peer]'") from err
    return trl


def _timer() -> Any:
    from transformers import TrainerCallback

    class LoopTimer(TrainerCallback):
        """Wall time of the training loop, and of each step (for the median)."""

        def __init__(self) -> None:
            self.begin = self.end = self.step_start = 0.0
            self.step_seconds: list[float] = []

        def on_train_begin(self, *args: Any, **kwargs: Any) -> None:
            self.begin = time.perf_counter()

        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.step_start = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            self.step_seconds.append(time.perf_counter() - self.step_start)

        def on_train_end(self, *args: Any, **kwargs: Any) -> None:
            self.end = time.perf_counter()

    return LoopTimer()


def _common_args(spec: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """TrainingArguments both trainers take the same way."""
    optim = spec["optim"]
    return {
        "output_dir": out_dir,
        "max_steps": spec["steps"],
        "learning_rate": optim["lr"],
        "weight_decay": optim["weight_decay"],
        "adam_beta1": optim["betas"][0],
        "adam_beta2": optim["betas"][1],
        "max_grad_norm": optim["grad_clip"],
        "warmup_steps": optim["warmup_steps"],
        "lr_scheduler_type": "constant_with_warmup",
        "logging_steps": spec["steps"],
        "save_strategy": "no",
        "report_to": [],
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": spec["seed"],
        "bf16": spec.get("bf16", False),
    }


def trl_reward(spec: dict[str, Any]) -> dict[str, Any]:
    """RewardTrainer on pre-tokenised pairs (chosen_ids / rejected_ids, so TRL tokenises nothing)."""
    _require_trl()
    from datasets import load_from_disk
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForSequenceClassification.from_pretrained(spec["model_dir"], num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    data = load_from_disk(spec["data_dir"])
    timer = _timer()
    common = _common_args(spec, spec["tmp"])
    args = RewardConfig(per_device_train_batch_size=spec["batch_size"], max_length=None, **common)
    trainer = RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer, callbacks=[timer])
    trainer.train()
    seconds = timer.end - timer.begin
    return {
        "trainer": "trl.RewardTrainer",
        "train_seconds": seconds,
        "steps": len(timer.step_seconds),
        "pairs_per_second": len(timer.step_seconds) * spec["batch_size"] / seconds,
        "median_step_seconds": sorted(timer.step_seconds)[len(timer.step_seconds) // 2],
    }


def trl_grpo(spec: dict[str, Any]) -> dict[str, Any]:
    """GRPOTrainer (HF generate) with our trained RM exported as a stock *ForSequenceClassification."""
    _require_trl()
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    generated = {"tokens": 0, "completions": 0}

    def count_tokens(completion_ids: list[list[int]], **kwargs: Any) -> list[float]:
        # weight 0: only counts the tokens the policy generated, as our tokens/s does
        generated["tokens"] += sum(len(ids) for ids in completion_ids)
        generated["completions"] += len(completion_ids)
        return [0.0] * len(completion_ids)

    rl = spec["rl"]
    group = rl["samples_per_prompt"]
    rows = rl["prompts_per_step"] * group
    args = GRPOConfig(
        # one generation of `rows` completions, trained as micro_batches optimiser steps per epoch
        per_device_train_batch_size=rows // rl["micro_batches"],
        steps_per_generation=rl["micro_batches"],
        num_generations=group,
        max_completion_length=rl["max_new_tokens"],
        temperature=rl["temperature"],
        top_p=rl["top_p"],
        beta=rl["kl_coef"],
        epsilon=rl["clip_eps"],
        num_iterations=rl["epochs"],
        loss_type="grpo",  # per-sequence token mean, then the batch mean: our policy_loss
        scale_rewards="group",
        reward_weights=[1.0, 0.0],
        **_common_args(spec, spec["tmp"]),
    )
    timer = _timer()
    trainer = GRPOTrainer(
        model=spec["policy_dir"],
        reward_funcs=[spec["reward_model_dir"], count_tokens],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": spec["prompts"]}),
        callbacks=[timer],
    )
    trainer.train()
    seconds = timer.end - timer.begin
    rl_steps = len(timer.step_seconds) // (rl["epochs"] * rl["micro_batches"])
    return {
        "trainer": "trl.GRPOTrainer (transformers generate)",
        "train_seconds": seconds,
        "optimizer_steps": len(timer.step_seconds),
        "rl_steps": rl_steps,
        "seconds_per_rl_step": seconds / max(rl_steps, 1),
        "generated_tokens": generated["tokens"],
        "completions": generated["completions"],
        "tokens_per_second": generated["tokens"] / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    """`python -m r2m_ray.peer_trl SPEC.json OUT.json`."""
    spec_path, out_path = argv if argv is not None else sys.argv[1:]
    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        spec["tmp"] = tmp
        result = {"rm": trl_reward, "rl": trl_grpo}[spec["kind"]](spec)
    result["threads"] = torch.get_num_threads()
    Path(out_path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
