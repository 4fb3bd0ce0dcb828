"""RMLearner: one DeepSpeed data-parallel rank of the reward-model learner group.

Each rank is a Ray actor owning a RewardModel wrapped by a DeepSpeed engine (ZeRO
stage from config; gloo on CPU, NCCL on GPU). The loss is BT (or a baseline) plus
the GRM regulariser, computed on ONE forward pass of chosen+rejected: the value
head and the LM head read the same final hidden states.
`RMLearnerGroup` is the driver-side handle (a `LearnerGroup`): it slices each batch per rank.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
import torch

from r2m_ray.actors.distributed import (
    LearnerGroup,
    LearnerRank,
    deepspeed_config,
    gathered_state_dict,
    init_distributed,
    warmup_schedule,
)
from r2m_ray.algos.bt import bt_loss, label_smoothing_loss, margin_loss, pairwise_accuracy
from r2m_ray.algos.grm import grm_loss, grm_regulariser
from r2m_ray.config import RMConfig
from r2m_ray.data.tokenize import stack_pair_batch


def reward_losses(
    cfg: RMConfig, r_c: torch.Tensor, r_r: torch.Tensor, batch: dict[str, torch.Tensor], seq_logps: torch.Tensor | None
) -> tuple[torch.Tensor, dict[str, float]]:
    """The configured reward loss (+ GRM regulariser) on one batch's rewards."""
    weights = batch.get("weight")
    if cfg.loss == "bt":
        reward_loss = bt_loss(r_c, r_r, weights=weights)
    elif cfg.loss == "margin":
        margin = batch[cfg.margin_column] if cfg.margin_column else cfg.margin
        reward_loss = margin_loss(r_c, r_r, margin, weights=weights)
    else:
        reward_loss = label_smoothing_loss(r_c, r_r, eps=cfg.label_smoothing, weights=weights)
    stats = {
        "reward_loss": reward_loss.item(),
        "accuracy": pairwise_accuracy(r_c.detach(), r_r.detach()),
        "reward_margin": (r_c - r_r).mean().item(),
    }
    if cfg.grm.regulariser == "none":
        return reward_loss, stats
    n = r_c.shape[0]
    reg = grm_regulariser(
        cfg.grm.regulariser,
        seq_logps[:n],
        seq_logps[n:],
        batch.get("ref_logp_c"),
        batch.get("ref_logp_r"),
        beta=cfg.grm.beta,
        weights=weights,
    )
    stats["reg_loss"] = reg.item()
    stats["logp_chosen"] = seq_logps[:n].mean().item()
    return grm_loss(reward_loss, reg, alpha=cfg.grm.alpha), stats


@ray.remote
class RMLearner(LearnerRank):
    """One rank: RewardModel + DeepSpeed engine; trains on the slices it is handed."""

    def init(self, cfg_json: str, model_dir: str, rendezvous: str, seed: int) -> dict[str, Any]:
        """Join the process group, then build the model (same seed on every rank) and the DeepSpeed engine."""
        from r2m_ray.config import RMConfig as _RM

        backend = _RM.model_validate(json.loads(cfg_json)["rm"]).deepspeed.backend
        self.backend = init_distributed(self.rank, self.world_size, rendezvous, backend)
        return self.build(cfg_json, model_dir, seed)

    def build(self, cfg_json: str, model_dir: str, seed: int) -> dict[str, Any]:
        """A new model and DeepSpeed engine in this process, its process group kept: a group kept
        between the RMs of a comparison trains the next one without a new process (~10 s each).
        The seed is set before anything is drawn, so the model is the one a fresh rank would build."""
        import gc

        import deepspeed

        from r2m_ray.config import RMConfig as _RM
        from r2m_ray.models.config import ModelConfig
        from r2m_ray.models.reward_model import RewardModel

        self.engine = self.optimizer = self.scheduler = None  # the previous model's memory goes first
        gc.collect()
        payload = json.loads(cfg_json)
        self.cfg = _RM.model_validate(payload["rm"])
        self.zero3 = self.cfg.deepspeed.zero_stage == 3
        model_cfg = ModelConfig.model_validate(payload["model"])
        torch.manual_seed(seed)
        model = RewardModel.from_backbone_dir(
            Path(model_dir),
            value_head=model_cfg.value_head,
            head_hidden=model_cfg.head_hidden,
            head_dropout=model_cfg.head_dropout,
            seed=seed,
        )
        if self.cfg.freeze_backbone:
            model.freeze_backbone()
        lora = self.cfg.lora
        if lora.enabled:
            model.add_lora(lora.r, lora.alpha, lora.dropout, lora.target_modules)
        if self.cfg.gradient_checkpointing:
            # non-reentrant: gradients reach LoRA adapters even though the embeddings are frozen
            model.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        params = [p for p in model.parameters() if p.requires_grad]
        optim = torch.optim.AdamW(
            params, lr=self.cfg.optim.lr, betas=self.cfg.optim.betas, weight_decay=self.cfg.optim.weight_decay
        )
        micro = max(1, self.cfg.batch_size // self.world_size)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optim,
            lr_scheduler=warmup_schedule(optim, self.cfg.optim.warmup_steps),
            config=deepspeed_config(
                self.cfg.deepspeed.zero_stage, self.cfg.optim.grad_clip, micro, self.cfg.deepspeed.bf16
            ),
        )
        return {"rank": self.rank, "backend": self.backend, "trainable_params": sum(p.numel() for p in params)}

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One optimiser step on this rank's slice; gradients are averaged by DeepSpeed."""
        t0 = time.perf_counter()
        self.engine.train()
        batch = self.on_device(batch)
        ids, attn, resp = stack_pair_batch(batch)
        need_logps = self.cfg.grm.regulariser != "none"
        out = self.engine(ids, attn, response_mask=resp if need_logps else None, packed=self.cfg.packing)
        n = batch["chosen_input_ids"].shape[0]
        loss, stats = reward_losses(self.cfg, out.rewards[:n], out.rewards[n:], batch, out.seq_logps)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"rank {self.rank}: non-finite RM loss {loss.item()} ({stats})")
        self.engine.backward(loss)
        self.engine.step()
        stats["loss"] = loss.item()
        stats["lr"] = self.scheduler.get_last_lr()[0]
        stats["pairs"] = n
        stats["pad_fraction"] = 1.0 - float(attn.sum()) / attn.numel()  # of the padded [2B, T]: what packing saves
        stats["learner_seconds"] = time.perf_counter() - t0  # the driver's step time minus this is overhead
        return stats

    @torch.no_grad()
    def rewards(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Rewards of chosen and rejected (eval mode)."""
        self.engine.eval()
        batch = self.on_device(batch)
        ids, attn, _ = stack_pair_batch(batch)
        r = self.engine(ids, attn, packed=self.cfg.packing).rewards.float().cpu()
        n = batch["chosen_input_ids"].shape[0]
        return {"chosen": r[:n], "rejected": r[n:]}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Full CPU weights (gathered under ZeRO-3): snapshot for the prioritiser and checkpoints."""
        return gathered_state_dict(self.engine.module, self.zero3)

    def save(self, path: str, tokenizer_dir: str | None = None) -> str:
        """Rank 0 writes the RewardModel (safetensors); under ZeRO-3 every rank joins the gather."""
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir) if tokenizer_dir else None
        if self.zero3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.engine.module.parameters()), modifier_rank=None):
                if self.rank == 0:
                    self.engine.module.save_pretrained(path, tokenizer=tok)
        else:
            self.engine.module.save_pretrained(path, tokenizer=tok)
        return path


class RMLearnerGroup(LearnerGroup):
    """Driver-side handle of `rm.deepspeed.ranks` RMLearner actors forming one DeepSpeed group."""

    def __init__(self, cfg_json: str, rm: RMConfig, model_dir: Path, seed: int) -> None:
        ds = rm.deepspeed
        super().__init__(
            RMLearner,
            "rm.deepspeed (RMLearner ranks)",
            ds.ranks,
            ds.zero_stage,
            (ds.num_cpus_per_rank, ds.num_gpus_per_rank),
            ds.torch_threads,
            (cfg_json, str(model_dir), seed),
            deadlines=self._deadlines(rm),
        )
        self.rm = rm

    @staticmethod
    def _deadlines(rm: RMConfig) -> dict[str, tuple[str, float]]:
        return {
            "start": ("rm.startup_timeout_s", rm.startup_timeout_s),
            "call": ("rm.wait_timeout_s", rm.wait_timeout_s),
        }

    def shape(self) -> tuple:
        """What a kept group must match to train another RM (what `build` cannot change)."""
        return self.shape_of(self.rm)

    @staticmethod
    def shape_of(rm: RMConfig) -> tuple:
        ds = rm.deepspeed
        return ds.ranks, ds.zero_stage, ds.backend, ds.num_cpus_per_rank, ds.num_gpus_per_rank, ds.torch_threads

    def rebuild(self, cfg_json: str, rm: RMConfig, model_dir: Path, seed: int) -> None:
        """Train another RM with these ranks: every rank builds a new model and engine (same shape)."""
        if self.shape_of(rm) != self.shape():
            raise ValueError(f"rm.deepspeed {self.shape_of(rm)} differs from this group's {self.shape()}")
        self.rm = rm
        self.deadlines = self._deadlines(rm)
        builds = [a.build.remote(cfg_json, str(model_dir), seed) for a in self.actors]
        self.init_info = self._get(builds, "build (model load, DeepSpeed)", start=True)

    def train_step_async(self, batch: dict[str, torch.Tensor]) -> list[ray.ObjectRef]:
        """Start a step on every rank (rows split contiguously); returns their metric refs."""
        refs = self.put_slices(batch, self.row_bounds(batch["chosen_input_ids"].shape[0], "pairs"))
        return [a.train_step.remote(ref) for a, ref in zip(self.actors, refs)]

    @staticmethod
    def reduce_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
        """Pair-weighted mean of per-rank metrics; pairs summed."""
        total = sum(m["pairs"] for m in per_rank)
        out = {k: sum(m[k] * m["pairs"] for m in per_rank) / total for k in per_rank[0] if k != "pairs"}
        out["pairs"] = total
        return out
