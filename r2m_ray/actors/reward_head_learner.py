"""RewardHeadLearner: the GREBT update of the R2M head (cross-attention + φ only).

Once per RL step, after the policy epochs, the driver sends the step's RTEs (from the
annotator), refs to the REFRESHED policy hidden states h' (the last policy epoch's forward)
and the self-labelled winner/loser of each group, picked from the ANNOTATION-time rewards
(`self_labelled_groups`). The learner recomputes the group's scores with h', takes
L = (1−α)·L_BT + α·L_GRE (algos/r2m.grebt_loss) and steps AdamW over the head. It never
holds the RM backbone: the RTE already is the frozen backbone's output. The driver then
ships `head_state()` (an ObjectRef) to every annotator's `load_head`.

Ablations by config: `r2m.train=false` (never steps, still scores and reports the loss),
`feedback=noise` (h' replaced by seeded noise), `iterative=true` (no feedback: ω = 1, only φ
learns), `loss.bt` / `loss.gre` (drop a term).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from r2m_ray.algos.r2m import grebt_loss, self_labelled_pairs
from r2m_ray.algos.r2m import omega as omega_schedule
from r2m_ray.models.r2m_head import (
    R2MHead,
    fetch_feedback,
    load_value_head,
    noise_seed,
    nonfinite_check,
    parse_reward_config,
)

logger = logging.getLogger(__name__)

NOISE_STREAM_LEARNER = 1


def self_labelled_groups(rewards: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Annotation-time rewards [G·K] (rows grouped consecutively) → (winner [G], loser [G], informative [G]).

    `informative` is False for a group whose rewards are all equal (its winner/loser are arbitrary).
    """
    if rewards.dim() != 1 or group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [G*K] with K=group_size>=2, got {tuple(rewards.shape)}, K={group_size}")
    groups = rewards.detach().float().view(-1, group_size)
    winner, loser = self_labelled_pairs(groups)
    return winner, loser, groups.max(1).values > groups.min(1).values


@ray.remote
class RewardHeadLearner:
    """Owns the trainable R2M head and its AdamW; answers `score` / `head_state` in every mode."""

    def __init__(
        self,
        rm_checkpoint: str,
        cfg_json: str,
        d_policy: int,
        seed: int,
        torch_threads: int = 1,
        steps_per_update: int | None = None,
        grad_clip: float | None = 1.0,
    ) -> None:
        """Head from the checkpoint's value head + cross-attention seeded by `seed` (as the annotators').

        `steps_per_update`: AdamW steps per `update` (default rl.reward.r2m.steps_per_update).
        """
        torch.set_num_threads(torch_threads)
        self.cfg = parse_reward_config(cfg_json)
        steps_per_update = self.cfg.r2m.steps_per_update if steps_per_update is None else steps_per_update
        if steps_per_update < 1:
            raise ValueError(f"steps_per_update must be >= 1, got {steps_per_update}")
        r2m = self.cfg.r2m
        from r2m_ray.models.registry import actor_device

        value_head, d_rm = load_value_head(Path(rm_checkpoint))
        self.device = actor_device()
        self.head = R2MHead(value_head, d_rm, d_policy, r2m.d_attn, r2m.n_heads, seed).to(self.device)
        # No weight decay: there is no config key for it, and decay would pull φ away from the RM.
        self.optimizer = torch.optim.AdamW(self.head.trainable_parameters(), lr=r2m.lr, weight_decay=0.0)
        self.seed, self.steps_per_update, self.grad_clip = seed, steps_per_update, grad_clip
        self.version = 0
        self.skipped_steps = 0

    def _inputs(
        self, rte: Tensor, hidden_refs: list | None, t: int, T: int
    ) -> tuple[Tensor, Tensor | None, Tensor | None, float]:
        """(rte float32, h', mask, ω) for this learner's mode."""
        if rte.dim() != 2 or rte.shape[1] != self.head.d_rm:
            raise ValueError(f"rte must be [B, {self.head.d_rm}], got {tuple(rte.shape)}")
        rte = rte.float().to(self.device)
        r2m = self.cfg.r2m
        if r2m.iterative:
            return rte, None, None, 1.0
        if hidden_refs is None:
            raise ValueError("rl.reward.r2m needs hidden_refs (the refreshed policy hidden states h') for update")
        w = float(omega_schedule(t, T, r2m.omega_floor))
        seed = noise_seed(self.seed, t, NOISE_STREAM_LEARNER) if r2m.feedback == "noise" else None
        h, mask = fetch_feedback(hidden_refs, rte.shape[0], seed)
        return rte, h.to(self.device), mask.to(self.device), w

    @torch.no_grad()
    def score(self, rte: Tensor, hidden_refs: list | None, t: int, T: int) -> Tensor:
        """The head's rewards [B] for RTEs and feedback at step t (what an annotator with this head gives)."""
        rte, h, mask, w = self._inputs(rte, hidden_refs, t, T)
        return self.head(rte, h, mask, w).cpu()

    def update(
        self,
        rte: Tensor,
        hidden_refs: list | None,
        group_size: int,
        winner_idx: Tensor,
        loser_idx: Tensor,
        t: int,
        T: int,
        informative: Tensor | None = None,
    ) -> dict[str, Any]:
        """GREBT step(s) on G groups of K consecutive rows → stats (floats; loss parts before the step).

        `informative` [G] bool: only these groups enter the loss (a group whose labelling rewards
        all tie has no winner); None = every group. With none left the head does not step.
        Keys: loss, bt, gre (at the pre-update weights), loss_after (after the last step),
        grad_norm (before clipping), omega, groups (used), steps (0 when r2m.train=false, no group
        was informative, or a step was skipped for a non-finite gradient), version. Fetch the
        weights with `head_state()`.
        """
        if group_size < 2 or rte.shape[0] % group_size:
            raise ValueError(f"{rte.shape[0]} rows do not split into groups of group_size={group_size} (>= 2)")
        groups = rte.shape[0] // group_size
        keep = torch.ones(groups, dtype=torch.bool) if informative is None else torch.as_tensor(informative).bool()
        if keep.shape != (groups,):
            raise ValueError(f"informative must be [G]=[{groups}], got shape {tuple(keep.shape)}")
        keep = keep.to(self.device)
        if not keep.any():
            nothing = {"loss": None, "bt": None, "gre": None, "loss_after": None, "grad_norm": 0.0}
            return {**nothing, "omega": None, "groups": 0, "steps": 0, "version": self.version}
        winner = torch.as_tensor(winner_idx).long().to(self.device)[keep]
        loser = torch.as_tensor(loser_idx).long().to(self.device)[keep]
        rte, h, mask, w = self._inputs(rte, hidden_refs, t, T)
        loss_cfg = self.cfg.r2m.loss

        def loss_fn() -> tuple[Tensor, dict[str, float]]:
            r = self.head(rte, h, mask, w)
            nonfinite_check(r, "head scores")
            grouped = r.view(groups, group_size)[keep]
            return grebt_loss(grouped, winner, loser, loss_cfg.alpha, loss_cfg.bt, loss_cfg.gre)

        if not self.cfg.r2m.train:
            with torch.no_grad():
                _, parts = loss_fn()
            return {
                **parts,
                "loss_after": parts["loss"],
                "grad_norm": 0.0,
                "omega": w,
                "groups": int(keep.sum()),
                "steps": 0,
                "version": self.version,
            }
        first: dict[str, float] | None = None
        grad_norms, steps = [], 0
        for _ in range(self.steps_per_update):
            loss, parts = loss_fn()
            first = first or parts
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for p in self.head.trainable_parameters() if p.grad is not None]
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.grad_clip or math.inf)) if params else 0.0
            grad_norms.append(norm)
            if not math.isfinite(norm):
                # one bad batch must not poison the head every annotator is about to load
                self.skipped_steps += 1
                logger.warning(
                    "head update at t=%d: non-finite grad norm, step skipped (%d so far)", t, self.skipped_steps
                )
                self.optimizer.zero_grad(set_to_none=True)
                continue
            self.optimizer.step()
            steps += 1
        if steps:
            self.version += 1
        with torch.no_grad():
            _, after = loss_fn()
        assert first is not None
        return {
            **first,
            "loss_after": after["loss"],
            "grad_norm": grad_norms[0],
            "omega": w,
            "groups": int(keep.sum()),
            "steps": steps,
            "version": self.version,
        }

    def head_state(self) -> dict[str, Tensor]:
        """The head's weights (cross_attn.* and phi.*) for the annotators' `load_head`."""
        return self.head.head_state()

    def head_version(self) -> int:
        """Number of updates that changed the head."""
        return self.version

    def save_checkpoint(self, path: str) -> str:
        """Head weights (safetensors), AdamW state, version and RNG: what a resumed run needs."""
        from safetensors.torch import save_file

        from r2m_ray.actors.distributed import save_rng

        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head.head_state().items()}, str(out / "head.safetensors"))
        torch.save(self.optimizer.state_dict(), out / "optimizer.pt")  # tensors + numbers only
        (out / "head.json").write_text(json.dumps({"version": self.version, "skipped_steps": self.skipped_steps}))
        save_rng(out / "rng.safetensors")
        return path

    def load_checkpoint(self, path: str) -> int:
        """Restore what `save_checkpoint` wrote (optimizer read with weights_only=True); returns the version."""
        from safetensors.torch import load_file

        from r2m_ray.actors.distributed import load_rng

        src = Path(path)
        self.head.load_head_state(load_file(str(src / "head.safetensors")))
        self.optimizer.load_state_dict(torch.load(src / "optimizer.pt", weights_only=True, map_location=self.device))
        meta = json.loads((src / "head.json").read_text())
        self.version, self.skipped_steps = int(meta["version"]), int(meta["skipped_steps"])
        load_rng(src / "rng.safetensors")
        return self.version

    def ping(self) -> dict[str, int]:
        """Liveness and process id (for the driver's actor table)."""
        return {"pid": os.getpid(), "version": self.version}

    def load_head(self, state_dict: dict[str, Tensor], version: int) -> int:
        """Restore head weights; the optimizer state starts afresh (a resume uses `load_checkpoint`)."""
        self.head.load_head_state(state_dict)
        self.optimizer = torch.optim.AdamW(self.head.trainable_parameters(), lr=self.cfg.r2m.lr, weight_decay=0.0)
        self.version = int(version)
        return self.version
