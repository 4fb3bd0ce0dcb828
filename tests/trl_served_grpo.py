"""Run by test_reward_server.py in its own process (TRL's Trainer and accelerate never share a
process with the test's Ray): TRL's GRPOTrainer trains a few steps with `ServedReward`, the
served RM over HTTP, as its only reward. `python tests/trl_served_grpo.py SPEC.json OUT.json`;
the URL and token come from the environment, as a user's would.

OUT.json: every reward call (prompts, completion texts, rewards), TRL's log history, and the
largest change of any policy weight."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch


def main(spec_path: str, out_path: str) -> int:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from r2m_ray.serving.trl_reward import ServedReward

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(1)
    served = ServedReward()
    calls: list[dict[str, Any]] = []

    def served_rm(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        rewards = served(prompts, completions, **kwargs)
        calls.append({"prompts": prompts, "completions": [c[-1]["content"] for c in completions], "rewards": rewards})
        return rewards

    start = AutoModelForCausalLM.from_pretrained(spec["policy_dir"]).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        args = GRPOConfig(
            output_dir=tmp,
            max_steps=spec["steps"],
            per_device_train_batch_size=4,
            num_generations=2,
            max_completion_length=8,
            temperature=1.0,
            learning_rate=1e-4,
            beta=0.0,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            use_cpu=True,
            dataloader_num_workers=0,
            disable_tqdm=True,
            seed=0,
        )
        data = Dataset.from_dict({"prompt": spec["prompts"]})  # conversational: lists of messages
        trainer = GRPOTrainer(model=spec["policy_dir"], reward_funcs=[served_rm], args=args, train_dataset=data)
        trainer.train()
        end = trainer.model.state_dict()
        change = max(float((end[k].float() - v.float()).abs().max()) for k, v in start.items() if k in end)
        history = trainer.state.log_history
    Path(out_path).write_text(json.dumps({"calls": calls, "log_history": history, "max_weight_change": change}))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
