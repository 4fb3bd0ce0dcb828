"""SFT stage driver: warm up the policy on the world's sft split, read top to bottom.

A plain torch loop (one process): the tiny policy trains in about a minute on
2 cores, so a learner group would only add start-up time here. The loss is the
mean token cross-entropy on completion tokens (the prompt is masked). Before and
after training the policy answers `sft.eval_prompts` RL prompts (HF generate)
and the world's gold reward of those answers is reported.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset
from tqdm.auto import tqdm

from r2m_ray.actors.distributed import warmup_schedule
from r2m_ray.config import RunConfig
from r2m_ray.data.tokenize import SFTCollator, load_prompts, load_sft, render_prompt, tokenize_sft
from r2m_ray.models.registry import load_causal_lm, load_tokenizer
from r2m_ray.rundir import RunDir
from r2m_ray.world import gold_rewards

log = logging.getLogger(__name__)


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy over completion tokens (token t predicted at position t−1)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    target = batch["input_ids"][:, 1:]
    mask = batch["response_mask"][:, 1:].float()
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1), reduction="none"
    ).view_as(mask)
    return (nll * mask).sum() / mask.sum().clamp_min(1.0)


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: list[list[dict]],
    max_new_tokens: int,
    temperature: float = 0.0,
    batch_size: int = 64,
) -> list[str]:
    """HF generate with left padding; returns the decoded responses only."""
    model.eval()
    tokenizer.padding_side = "left"
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        texts = [render_prompt(tokenizer, p) for p in prompts[start : start + batch_size]]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        gen = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=temperature > 0,
            temperature=temperature if temperature > 0 else None,
            top_p=None,
            top_k=None,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out += tokenizer.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return [s.strip() for s in out]


def gold_of_policy(model: torch.nn.Module, tokenizer: Any, prompts: Dataset, cfg: RunConfig) -> dict[str, Any]:
    """Mean gold reward and length of the policy's answers to RL prompts (world prompts only)."""
    if cfg.data.prompts is not None:
        return {"gold_reward": None, "response_words": None, "example": "no gold reward for user prompts"}
    msgs = prompts["prompt_messages"][: cfg.sft.eval_prompts]
    answers = generate_answers(model, tokenizer, msgs, cfg.sft.max_new_tokens, cfg.sft.temperature)
    texts = [m[-1]["content"] for m in msgs]
    gold = gold_rewards(texts, answers, cfg.world)
    return {
        "gold_reward": sum(gold) / len(gold),
        "response_words": sum(len(a.split()) for a in answers) / len(answers),
        "example": f"{texts[0]!r} -> {answers[0]!r}",
    }


def run_sft_stage(cfg: RunConfig, run: RunDir, policy_dir: Path, world_paths: dict[str, Path]) -> tuple[Path, dict]:
    """Train the policy on the sft split; returns the checkpoint dir and the stage summary."""
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(policy_dir)
    model = load_causal_lm(policy_dir)
    sft_src = cfg.data.sft or (str(world_paths["sft"]) if "sft" in world_paths else None)
    prompt_src = cfg.data.prompts or (str(world_paths["rl_prompts"]) if "rl_prompts" in world_paths else None)
    if sft_src is None or prompt_src is None:
        raise ValueError("data.sft / data.prompts are not set and no synthetic world was built in this run")
    train = tokenize_sft(load_sft(sft_src, cfg.data), tokenizer, cfg.data)
    if len(train) == 0:
        raise ValueError(f"data.sft: no usable SFT examples in {sft_src}")
    prompts = load_prompts(prompt_src, cfg.data)
    before = gold_of_policy(model, tokenizer, prompts, cfg)
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.sft.optim.lr, weight_decay=cfg.sft.optim.weight_decay)
    sched = warmup_schedule(optim, cfg.sft.optim.warmup_steps)
    steps_per_epoch = len(train) // cfg.sft.batch_size
    total = cfg.sft.epochs * steps_per_epoch
    total = min(total, cfg.sft.max_steps) if cfg.sft.max_steps else total
    if total < 1:
        raise ValueError(f"sft.batch_size={cfg.sft.batch_size} is larger than the {len(train)} sft examples")
    g = torch.Generator().manual_seed(cfg.seed)
    step, t0 = 0, time.perf_counter()
    model.train()
    with tqdm(total=total, desc="sft") as bar:
        while step < total:
            order = torch.randperm(len(train), generator=g).tolist()
            for start in range(0, steps_per_epoch * cfg.sft.batch_size, cfg.sft.batch_size):
                if step >= total:
                    break
                batch = collate(list(train.select(order[start : start + cfg.sft.batch_size])))
                loss = sft_loss(model, batch)
                optim.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.sft.optim.grad_clip)
                optim.step()
                sched.step()
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
                if step % 20 == 0 or step == total:
                    run.log("sft", step, {"loss": loss.item(), "lr": sched.get_last_lr()[0]})
    elapsed = time.perf_counter() - t0
    out_dir = run.path / "checkpoints" / "sft"
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    after = gold_of_policy(model, tokenizer, prompts, cfg)
    summary = {
        "steps": total,
        "seconds": elapsed,
        "final_loss": loss.item(),
        "gold_reward": {"before": before["gold_reward"], "after": after["gold_reward"]},
        "response_words": after["response_words"],
        "example": after["example"],
    }
    run.update_summary("sft", summary)
    log.info(
        "sft: gold reward on rl_prompts %s -> %s (%s)", before["gold_reward"], after["gold_reward"], after["example"]
    )
    return out_dir, summary
