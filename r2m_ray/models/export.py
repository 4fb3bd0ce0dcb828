"""Export a RewardModel as an HF sequence-classification model.

The exported model scores the same token as RewardModel: HF's
*ForSequenceClassification takes the rightmost position whose id is not
pad_token_id, which equals our rightmost real token from the attention mask for
both padding sides as long as the pad token never occurs as a real token (our
tokenizers guarantee pad != eos, so a response ending in eos is not mistaken
for padding).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerBase

from r2m_ray.models.reward_model import RewardModel

MODELING_FILE = "modeling_r2m_reward.py"
MLP_CLASS = "R2MRewardForSequenceClassification"
MLP_CONFIG_CLASS = "R2MRewardConfig"
MLP_MODEL_TYPE = "r2m_reward"

_MLP_MODELING_TEMPLATE = '''"""Reward model exported by r2m_ray: {arch} backbone + MLP value head.

score = Linear(Hh, 1)(ReLU(Linear(H, Hh)(Dropout(h_last)))), read at the last real
token of the post-norm final hidden states. Load with
AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True).
"""

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutputWithPast
from {config_module} import {config_class} as BackboneConfig
from {base_module} import {base_class}, {decoder_class}


class {config_cls}(BackboneConfig):
    # Its own model_type: without trust_remote_code loading fails loudly instead of
    # silently building a stock classifier with a random linear score.
    model_type = "{model_type}"


class {cls}({base_class}):
    config_class = {config_cls}

    def __init__(self, config):
        super().__init__(config)
        self.num_labels = 1
        setattr(self, self.base_model_prefix, {decoder_class}(config))
        hidden = config.get_text_config().hidden_size
        self.score = nn.Sequential(
            nn.Dropout(config.r2m_head_dropout),
            nn.Linear(hidden, config.r2m_head_hidden),
            nn.ReLU(),
            nn.Linear(config.r2m_head_hidden, 1),
        )
        self.post_init()

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, inputs_embeds=None, **kwargs):
        if position_ids is None and attention_mask is not None:
            # Positions over real tokens only, as in training; left padding then changes nothing.
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        kwargs.pop("labels", None)
        out = getattr(self, self.base_model_prefix)(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=False,
            **kwargs,
        )
        hidden = out.last_hidden_state
        batch = hidden.shape[0]
        if attention_mask is not None:
            real = attention_mask != 0
        elif input_ids is not None and self.config.pad_token_id is not None:
            real = input_ids != self.config.pad_token_id
        else:
            real = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        last = (positions * real.to(hidden.device)).argmax(-1)
        pooled = self.score(hidden[torch.arange(batch, device=hidden.device), last])
        return SequenceClassifierOutputWithPast(logits=pooled, hidden_states=out.hidden_states)
'''


def export_sequence_classification(rm: RewardModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path | str) -> Path:
    """Write `rm` as an HF sequence-classification model (num_labels=1) plus tokenizer.

    - value_head='linear': a plain *ForSequenceClassification (e.g. LlamaForSequenceClassification)
      whose `score.weight` is our head; loads with
      `AutoModelForSequenceClassification.from_pretrained(out_dir)` and NO trust_remote_code.
    - value_head='mlp': no stock class has an MLP score head, so the folder carries a
      small `modeling_r2m_reward.py` and an `auto_map`; loading it needs
      `AutoModelForSequenceClassification.from_pretrained(out_dir, trust_remote_code=True)`,
      which the user must ask for explicitly (it runs the code in that file).

    Both pick the last non-pad token like HF does; `config.pad_token_id` is set from the
    tokenizer, which must have a pad token distinct from eos.
    """
    out_dir = Path(out_dir)
    pad_id = tokenizer.pad_token_id
    if pad_id is None or pad_id == tokenizer.eos_token_id:
        raise ValueError(
            "tokenizer.pad_token must be set and differ from eos_token; HF sequence classifiers find "
            "the last token by pad_token_id, so pad == eos would score the wrong token"
        )
    config = copy.deepcopy(rm.backbone.config)
    config.num_labels = 1
    config.pad_token_id = pad_id
    config.problem_type = "regression"
    out_dir.mkdir(parents=True, exist_ok=True)
    if rm.head_kind == "linear":
        _export_linear(rm, config, out_dir)
    elif rm.head_kind == "mlp":
        _export_mlp(rm, config, out_dir)
    else:
        raise ValueError(f"value_head: cannot export head kind {rm.head_kind!r}")
    tokenizer.save_pretrained(out_dir)
    return out_dir


def _export_linear(rm: RewardModel, config, out_dir: Path) -> None:
    config.architectures = None
    dtype = next(rm.backbone.parameters()).dtype
    seq = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
    base = seq.base_model
    base.load_state_dict(rm.decoder.state_dict(), strict=True)
    if not hasattr(seq, "score") or seq.score.weight.shape != rm.value_head.weight.shape:
        raise ValueError(f"{type(seq).__name__} has no score layer of shape {tuple(rm.value_head.weight.shape)}")
    with torch.no_grad():
        seq.score.weight.copy_(rm.value_head.weight)
    seq.save_pretrained(out_dir)


def _pretrained_base(rm: RewardModel) -> type:
    """The architecture's *PreTrainedModel class (e.g. LlamaPreTrainedModel), for the modeling file."""
    for klass in type(rm.backbone).__mro__:
        if klass.__name__.endswith("PreTrainedModel") and klass.__name__ != "PreTrainedModel":
            return klass
    raise ValueError(f"{type(rm.backbone).__name__}: no architecture-specific PreTrainedModel base found")


def _export_mlp(rm: RewardModel, config, out_dir: Path) -> None:
    base = _pretrained_base(rm)
    decoder_cls = type(rm.decoder)
    config_cls = type(rm.backbone.config)
    code = _MLP_MODELING_TEMPLATE.format(
        arch=type(rm.backbone).__name__,
        config_module=config_cls.__module__,
        config_class=config_cls.__name__,
        base_module=base.__module__,
        base_class=base.__name__,
        decoder_class=decoder_cls.__name__,
        config_cls=MLP_CONFIG_CLASS,
        model_type=MLP_MODEL_TYPE,
        cls=MLP_CLASS,
    )
    if decoder_cls.__module__ != base.__module__:
        raise ValueError(f"{decoder_cls.__name__} and {base.__name__} live in different modules; cannot export")
    (out_dir / MODELING_FILE).write_text(code)
    module = MODELING_FILE[:-3]
    tree = config.to_dict()
    tree.pop("_name_or_path", None)  # a local training path says nothing to the user of the export
    tree.update(
        model_type=MLP_MODEL_TYPE,
        architectures=[MLP_CLASS],
        auto_map={
            "AutoConfig": f"{module}.{MLP_CONFIG_CLASS}",
            "AutoModelForSequenceClassification": f"{module}.{MLP_CLASS}",
        },
        r2m_value_head="mlp",
        r2m_head_hidden=rm.head_hidden,
        r2m_head_dropout=rm.head_dropout,
    )
    (out_dir / "config.json").write_text(json.dumps(tree, indent=2, sort_keys=True))
    prefix = base.base_model_prefix
    state = {f"{prefix}.{k}": v for k, v in rm.decoder.state_dict().items()}
    state.update({f"score.{k}": v for k, v in rm.value_head.state_dict().items()})
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    (out_dir / "r2m_ray_export.json").write_text(json.dumps(rm.head_meta(), indent=2))
