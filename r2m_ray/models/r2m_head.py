"""R2MHead: the trainable part of R2M — sequence-to-token cross-attention + the scoring head φ.

reward = φ(H_fin),  H_fin = (1 − ω)·Ĥ + ω·H_last,  Ĥ = CrossAttn(H_last, h)   (ALGORITHMS.md §3)

φ is a deep copy of the trained RM's value head, so with no feedback (h is None) or ω = 1 the
head returns exactly the frozen RM's reward. The frozen backbone is not part of this module:
only `cross_attn` and `phi` are ever trained or shipped between actors.

Also here: the helpers both R2M actors share (kept out of the actor modules so the head
learner never imports the tokenisation stack): parsing the `rl.reward` config, turning
policy-feedback chunks (refs) into one padded batch, the seeded Gaussian noise of the
"w/ noise" ablation, and the non-finite reward check.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from r2m_ray.algos.r2m import SequenceToTokenCrossAttention, mix_hidden
from r2m_ray.models.reward_model import HEAD_FILE, META_FILE, build_value_head
from r2m_ray.rl_config import RewardConfig


class R2MHead(nn.Module):
    """cross_attn (W_q, W_k, W_v, W_o) + phi (copy of the RM's value head); no backbone.

    Use it in eval mode (dropout off, which is how the RM scores) in every actor, so the
    head learner and the annotators give the same reward for the same inputs; gradients
    still flow in eval mode.
    """

    def __init__(
        self,
        value_head: nn.Module,
        d_rm: int,
        d_policy: int,
        d_attn: int = 128,
        n_heads: int = 1,
        seed: int = 0,
    ) -> None:
        """Copy `value_head` into `phi`; build the cross-attention seeded by `seed` (global RNG untouched)."""
        super().__init__()
        self.phi = copy.deepcopy(value_head)
        dtype = next(self.phi.parameters()).dtype
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.cross_attn = SequenceToTokenCrossAttention(d_rm, d_policy, d_attn, n_heads).to(dtype)
        # The RM the value head came from is frozen; its copy here is the part that learns ...
        self.requires_grad_(True)
        # ... except φ's output bias: GREBT is shift-invariant (BT sees r_w − r_l, GRE the
        # standardised r), so its gradient is 0 up to rounding, which Adam would amplify into
        # a random walk of every reward by ~lr per step.
        linears = [m for m in self.phi.modules() if isinstance(m, nn.Linear)]
        if linears and linears[-1].bias is not None:
            linears[-1].bias.requires_grad_(False)
        self.eval()
        self.d_rm, self.d_policy = d_rm, d_policy

    def score(self, hidden: Tensor) -> Tensor:
        """φ(hidden) for hidden [..., D_rm] → rewards [...] float32 (the RM's own `score_hidden` rule)."""
        return self.phi(hidden.to(self._dtype())).squeeze(-1).float()

    def forward(
        self, h_last: Tensor, h: Tensor | None = None, mask: Tensor | None = None, omega: float = 1.0
    ) -> Tensor:
        """Rewards [B] from the RTE h_last [B, D_rm], policy feedback h [B, S, D_p], mask [B, S], ω.

        h is None or ω == 1 → φ(h_last) exactly: the cross-attention is not even run, so a
        non-finite Ĥ cannot leak into the frozen RM's reward through 0·Ĥ.
        """
        if not 0.0 <= float(omega) <= 1.0:
            raise ValueError(f"omega must be in [0, 1], got {omega}")
        if h is None or float(omega) == 1.0:
            return self.score(h_last)
        if mask is None:
            mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device)
        h_last = h_last.to(self._dtype())
        h_hat = self.cross_attn(h_last, h, mask)
        return self.score(mix_hidden(h_hat, h_last, float(omega)))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters GREBT updates: the cross-attention's and φ's, but not φ's output bias."""
        return [p for p in [*self.cross_attn.parameters(), *self.phi.parameters()] if p.requires_grad]

    def head_state(self) -> dict[str, Tensor]:
        """A detached CPU copy of the state dict (safe to ship through the object store)."""
        return {k: v.detach().cpu().clone().contiguous() for k, v in self.state_dict().items()}

    def load_head_state(self, state: Mapping[str, Tensor]) -> None:
        """Load a `head_state`; keys must match exactly and every value must be finite."""
        bad = [k for k, v in state.items() if torch.is_floating_point(v) and not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"head state has non-finite values in {bad}; refusing to load it")
        self.load_state_dict(dict(state), strict=True)

    def save(self, path: Path | str) -> Path:
        """Write the head as safetensors (the weights only; sizes come from the config)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(self.head_state(), str(path))
        return path

    def load(self, path: Path | str) -> None:
        """Load what `save` wrote."""
        self.load_head_state(load_file(str(path)))

    def _dtype(self) -> torch.dtype:
        return next(self.phi.parameters()).dtype


def load_value_head(rm_checkpoint: Path | str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, int]:
    """The trained value head of a RewardModel checkpoint and its input size, without the backbone.

    Builds the head exactly as `RewardModel.from_pretrained` does, so a head learner that never
    needs the (frozen) backbone starts from the same φ as the annotators.
    """
    rm_dir = Path(rm_checkpoint)
    meta_path = rm_dir / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{rm_dir}: no {META_FILE}; not a RewardModel directory")
    meta: dict[str, Any] = json.loads(meta_path.read_text())
    head = build_value_head(
        meta["value_head"], meta["hidden_size"], meta["head_hidden"], meta["head_dropout"], meta["seed"]
    ).to(dtype)
    head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(rm_dir / HEAD_FILE)).items()})
    return head, int(meta["hidden_size"])


def concat_feedback(chunks: Sequence[Mapping[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Policy-feedback chunks {"hidden": [b, S_i, D_p], "mask": [b, S_i]} → (h float32 [B, S, D_p], mask [B, S]).

    Chunks come in row order (one per policy rank or micro-batch) and may be padded to different
    lengths; shorter ones are right-padded with masked zeros (attention ignores position).
    """
    if not chunks:
        raise ValueError("hidden_refs is empty: policy feedback needs at least one chunk")
    for i, chunk in enumerate(chunks):
        if not isinstance(chunk, Mapping) or "hidden" not in chunk or "mask" not in chunk:
            raise ValueError(f"hidden_refs[{i}] must be a dict with 'hidden' and 'mask', got {type(chunk).__name__}")
        hid, msk = chunk["hidden"], chunk["mask"]
        if hid.dim() != 3 or msk.shape != hid.shape[:2]:
            raise ValueError(
                f"hidden_refs[{i}]: hidden must be [b, S, D] with mask [b, S], got {tuple(hid.shape)} "
                f"and {tuple(msk.shape)}"
            )
    widths = {int(c["hidden"].shape[2]) for c in chunks}
    if len(widths) != 1:
        raise ValueError(f"hidden_refs: chunks disagree on the hidden size D_p: {sorted(widths)}")
    seq = max(int(c["hidden"].shape[1]) for c in chunks)
    hidden, masks = [], []
    for chunk in chunks:
        pad = seq - chunk["hidden"].shape[1]
        hidden.append(nn.functional.pad(chunk["hidden"].float(), (0, 0, 0, pad)))
        masks.append(nn.functional.pad(chunk["mask"].long(), (0, pad)))
    return torch.cat(hidden), torch.cat(masks)


def feedback_noise(h: Tensor, mask: Tensor, seed: int) -> Tensor:
    """Gaussian noise shaped like h with h's per-channel mean and std over real tokens ("w/ noise").

    Matching each channel's scale keeps the ablation about the information in h, not its size.
    Pads stay zero; the same seed gives the same noise.
    """
    real = mask != 0
    values = h[real]
    if values.numel() == 0:
        raise ValueError("feedback mask has no real token: cannot match the noise to h's scale")
    mean, std = values.mean(0), values.std(0, correction=0)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(h.shape, generator=generator, dtype=torch.float32).to(h.dtype) * std + mean
    return noise.masked_fill(~real.unsqueeze(-1), 0.0)


def noise_seed(seed: int, t: int, stream: int) -> int:
    """A distinct, reproducible noise seed per (actor seed, RL step, stream: 0 annotator, 1 learner)."""
    return ((seed * 1_000_003 + t) * 4 + stream) % (2**63)


def parse_reward_config(cfg_json: str) -> RewardConfig:
    """A RewardConfig from its JSON; the whole run config's JSON is accepted too (its rl.reward)."""
    payload = json.loads(cfg_json)
    if isinstance(payload, dict) and "rl" in payload and "mode" not in payload:
        payload = payload["rl"]["reward"]
    return RewardConfig.model_validate(payload)


def fetch_feedback(hidden_refs: Sequence[Any], rows: int, noise: int | None = None) -> tuple[Tensor, Tensor]:
    """Resolve feedback refs (or already-resolved dicts) into (h float32 [B, S, D_p], mask [B, S]).

    `noise` is a seed: when given, h is replaced by `feedback_noise` (the "w/ noise" ablation).
    """
    import ray  # only the actors call this; the head itself stays usable without Ray

    if not isinstance(hidden_refs, (list, tuple)):
        raise ValueError(f"hidden_refs must be a list of refs to {{'hidden', 'mask'}} dicts, got {type(hidden_refs)}")
    resolved = list(hidden_refs)
    refs = [i for i, x in enumerate(resolved) if isinstance(x, ray.ObjectRef)]
    for i, value in zip(refs, ray.get([resolved[i] for i in refs])):
        resolved[i] = value
    h, mask = concat_feedback(resolved)
    if h.shape[0] != rows:
        raise ValueError(f"hidden_refs hold {h.shape[0]} rows of policy feedback for {rows} responses")
    if noise is not None:
        h = feedback_noise(h, mask, noise)
    return h, mask


def nonfinite_check(rewards: Tensor, what: str = "rewards") -> None:
    """Raise ValueError naming the rows whose reward is NaN or ±inf."""
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"non-finite {what} in rows {bad} (of {rewards.numel()})")


def fetch_pooled(hidden_refs: Sequence[Any], rows: int) -> Tensor:
    """Policy feedback refs → each row's hidden state averaged over its response tokens [B, D_p].

    The chunks must carry "response_mask" (the policy learner's payloads do).
    """
    import ray

    from r2m_ray.algos.feedback_similarity import pooled_states

    chunks = [ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in hidden_refs]
    missing = [i for i, c in enumerate(chunks) if not isinstance(c, Mapping) or "response_mask" not in c]
    if missing:
        raise ValueError(f"hidden_refs {missing}: no 'response_mask' in the feedback payload; cannot pool responses")
    pooled = torch.cat([pooled_states(c["hidden"], c["response_mask"]) for c in chunks])
    if pooled.shape[0] != rows:
        raise ValueError(f"hidden_refs hold {pooled.shape[0]} rows of policy feedback for {rows} responses")
    return pooled
