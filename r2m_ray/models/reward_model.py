"""RewardModel: a causal-LM backbone that keeps its LM head, plus a value head.

Both heads read the same final hidden states (after the final norm), which is
what GRM regularises (ALGORITHMS.md §1): the value head at the last real token
gives r(x, y); the LM head over the response tokens gives log π(y|x).
The last-token hidden state ("reward token embedding", RTE) is returned too,
because R2M later mixes it with policy feedback and feeds it to `score_hidden`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from r2m_ray.data.packing import packed_decoder_states
from r2m_ray.models.config import ModelConfig
from r2m_ray.models.registry import load_causal_lm

logger = logging.getLogger(__name__)

HEAD_FILE = "value_head.safetensors"
META_FILE = "reward_model.json"
BACKBONE_SUBDIR = "backbone"
ADAPTER_SUBDIR = "adapter"


@dataclass
class RewardOutput:
    """rewards [B]; last_hidden [B, H] (what the value head reads); seq_logps [B] or None."""

    rewards: Tensor
    last_hidden: Tensor
    seq_logps: Tensor | None = None


def last_token_index(attention_mask: Tensor) -> Tensor:
    """Index of the rightmost real token per row; correct for left and right padding.

    Same rule as HF's *ForSequenceClassification (rightmost non-pad position), so an
    export scores the same token. A row with no real token yields 0.
    """
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * (attention_mask != 0)).argmax(-1)


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions counted over real tokens only (0 at each row's first real token), as vLLM does."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logps(
    hidden_states: Tensor,
    lm_head: nn.Module,
    input_ids: Tensor,
    response_mask: Tensor,
    attention_mask: Tensor,
) -> Tensor:
    """Sum over response tokens of log p(token_t | tokens_<t), shape [B].

    Token t is predicted from the hidden state at t-1, so a row's first real token
    (nothing before it; a pad on the left when left-padded) cannot be scored and is
    ignored, as are pads. The LM head runs only on the positions that predict a
    response token, and log-softmax is taken as `logit[target] - logsumexp(logits)`
    in float32, so no full [B, T, V] tensor is ever built.
    """
    real = attention_mask.bool()
    predicts_response = response_mask[:, 1:].bool() & real[:, 1:] & real[:, :-1]
    rows, cols = predicts_response.nonzero(as_tuple=True)
    out = hidden_states.new_zeros(input_ids.shape[0], dtype=torch.float32)
    if rows.numel() == 0:
        return out
    logits = lm_head(hidden_states[rows, cols]).float()
    targets = input_ids[rows, cols + 1]
    token_logps = logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return out.index_add(0, rows, token_logps)


def build_value_head(
    kind: Literal["mlp", "linear"], hidden_size: int, head_hidden: int, dropout: float, seed: int
) -> nn.Module:
    """The value head, initialised deterministically from `seed` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if kind == "mlp":
            return nn.Sequential(
                nn.Dropout(dropout), nn.Linear(hidden_size, head_hidden), nn.ReLU(), nn.Linear(head_hidden, 1)
            )
        if kind == "linear":
            # No bias: it then maps 1:1 onto HF's *ForSequenceClassification.score.
            return nn.Linear(hidden_size, 1, bias=False)
    raise ValueError(f"value_head: unknown kind {kind!r} (expected 'mlp' or 'linear')")


class RewardModel(nn.Module):
    """Causal-LM backbone (LM head kept) + value head on the post-norm last-token state."""

    def __init__(
        self,
        backbone: PreTrainedModel,
        value_head: Literal["mlp", "linear"] = "mlp",
        head_hidden: int = 1024,
        head_dropout: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head_kind = value_head
        self.head_hidden = head_hidden
        self.head_dropout = head_dropout
        self.seed = seed
        self.hidden_size = int(backbone.config.get_text_config().hidden_size)
        dtype = next(backbone.parameters()).dtype
        self.value_head = build_value_head(value_head, self.hidden_size, head_hidden, head_dropout, seed).to(dtype)

    # ----------------------------------------------------------------- forward

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The HF causal LM (inside the peft wrapper when LoRA is on; its layers carry the adapters)."""
        return self.backbone.get_base_model() if self.lora else self.backbone

    @property
    def lora(self) -> bool:
        return hasattr(self.backbone, "peft_config")

    @property
    def decoder(self) -> nn.Module:
        """The transformer body without the LM head (returns post-norm last_hidden_state)."""
        return self.causal_lm.base_model

    @property
    def lm_head(self) -> nn.Module:
        """The backbone's own LM head (tied or not)."""
        return self.causal_lm.get_output_embeddings()

    def hidden_states(self, input_ids: Tensor, attention_mask: Tensor, packed: bool = False) -> Tensor:
        """Final-layer hidden states after the final norm, [B, T, H] (packed: zeros on pads)."""
        if packed:
            return packed_decoder_states(self.decoder, input_ids, attention_mask)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            use_cache=False,
        )
        return out.last_hidden_state

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor | None = None, packed: bool = False
    ) -> RewardOutput:
        """Rewards at the last real token; with response_mask also log π(y|x) summed over the response.

        packed=True computes the same outputs pad-free (data/packing.py; right-padded batches only).
        """
        hidden = self.hidden_states(input_ids, attention_mask, packed)
        last = last_token_index(attention_mask)
        last_hidden = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        rewards = self.score_hidden(last_hidden)
        seq_logps = None
        if response_mask is not None:
            if response_mask.shape != input_ids.shape:
                raise ValueError(
                    f"response_mask shape {tuple(response_mask.shape)} != input_ids shape {tuple(input_ids.shape)}"
                )
            seq_logps = response_logps(hidden, self.lm_head, input_ids, response_mask, attention_mask)
        return RewardOutput(rewards=rewards, last_hidden=last_hidden, seq_logps=seq_logps)

    def score_hidden(self, last_hidden: Tensor) -> Tensor:
        """Apply the value head to hidden states [..., H] → rewards [...] (float32)."""
        return self.value_head(last_hidden.to(self._head_dtype())).squeeze(-1).float()

    def _head_dtype(self) -> torch.dtype:
        return next(self.value_head.parameters()).dtype

    # --------------------------------------------------------------- training

    def freeze_backbone(self) -> None:
        """Make only the value head trainable (the 'frozen backbone + MLP head' baseline)."""
        self.backbone.requires_grad_(False)
        self.value_head.requires_grad_(True)

    def add_lora(self, r: int, alpha: float, dropout: float, target_modules: list[str]) -> int:
        """Low-rank adapters (peft) on the backbone's `target_modules`; the backbone's own weights are
        frozen, the adapters and the value head train. Returns the number of trainable parameters.

        `save_pretrained` merges the adapters into the weights, so a LoRA checkpoint loads, serves
        and exports exactly like a fully fine-tuned one (the adapters alone go to adapter/).
        """
        from peft import LoraConfig, get_peft_model

        present = {name.rsplit(".", 1)[-1] for name, _ in self.backbone.named_modules()}
        missing = [m for m in target_modules if m not in present]
        if missing:
            raise ValueError(f"rm.lora.target_modules: the backbone has no modules named {missing}")
        config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
        self.backbone = get_peft_model(self.backbone, config)
        self.value_head.requires_grad_(True)
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    # ------------------------------------------------------------- persistence

    def head_meta(self) -> dict:
        """The small json that describes the value head."""
        return {
            "value_head": self.head_kind,
            "hidden_size": self.hidden_size,
            "head_hidden": self.head_hidden,
            "head_dropout": self.head_dropout,
            "seed": self.seed,
            "backbone": BACKBONE_SUBDIR,
        }

    def save_pretrained(self, out_dir: Path | str, tokenizer: PreTrainedTokenizerBase | None = None) -> Path:
        """Write backbone/ (HF causal-LM dir, safetensors), value_head.safetensors, reward_model.json.

        The tokenizer, if given, goes both into backbone/ (so it is a complete HF
        model dir for vLLM / generation) and into out_dir.
        """
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.lora:
            import copy

            self.backbone.save_pretrained(out_dir / ADAPTER_SUBDIR)  # adapters only (safetensors)
            # W + (α/r)·B·A written as plain weights; the training copy keeps its adapters
            copy.deepcopy(self.backbone).merge_and_unload().save_pretrained(out_dir / BACKBONE_SUBDIR)
        else:
            self.backbone.save_pretrained(out_dir / BACKBONE_SUBDIR)
        head_state = {k: v.detach().contiguous().cpu() for k, v in self.value_head.state_dict().items()}
        save_file(head_state, str(out_dir / HEAD_FILE))
        (out_dir / META_FILE).write_text(json.dumps(self.head_meta(), indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(out_dir / BACKBONE_SUBDIR)
            tokenizer.save_pretrained(out_dir)
        return out_dir

    @classmethod
    def from_pretrained(
        cls, model_dir: Path | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
    ) -> RewardModel:
        """Load what `save_pretrained` wrote."""
        model_dir = Path(model_dir)
        meta_path = model_dir / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{model_dir}: no {META_FILE}; not a RewardModel directory")
        meta = json.loads(meta_path.read_text())
        backbone = load_causal_lm(model_dir / meta["backbone"], dtype=dtype, trust_remote_code=trust_remote_code)
        rm = cls(
            backbone,
            value_head=meta["value_head"],
            head_hidden=meta["head_hidden"],
            head_dropout=meta["head_dropout"],
            seed=meta["seed"],
        )
        state = load_file(str(model_dir / HEAD_FILE))
        rm.value_head.load_state_dict({k: v.to(dtype) for k, v in state.items()})
        return rm

    @classmethod
    def from_backbone_dir(
        cls,
        model_dir: Path | str,
        value_head: Literal["mlp", "linear"] = "mlp",
        head_hidden: int = 1024,
        head_dropout: float = 0.1,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> RewardModel:
        """A fresh reward model on a prepared causal-LM dir, value head seeded by `seed`."""
        backbone = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(backbone, value_head=value_head, head_hidden=head_hidden, head_dropout=head_dropout, seed=seed)

    @classmethod
    def from_model_config(
        cls,
        cfg: ModelConfig,
        model_dir: Path | str,
        dtype: torch.dtype = torch.float32,
        seed: int | None = None,
    ) -> RewardModel:
        """`from_backbone_dir` with the head settings of a ModelConfig (seed overridable, e.g. ensembles)."""
        return cls.from_backbone_dir(
            model_dir,
            value_head=cfg.value_head,
            head_hidden=cfg.head_hidden,
            head_dropout=cfg.head_dropout,
            seed=cfg.seed if seed is None else seed,
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
        )
