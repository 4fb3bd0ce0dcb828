"""Preference, SFT and prompt data: load (hub or local json/jsonl/parquet), check, tokenise, collate.

data = load_preferences("hh.jsonl.gz", cfg.data)          # normalised pairs + SkipReport
tok = tokenize_preferences(data, tokenizer, cfg.data)      # token columns, exact masks
batch = PreferenceCollator(tok.pad_token_id)(rows)         # padded tensors
input_ids, attention_mask, response_mask = stack_pair_batch(batch)
"""

import importlib
from typing import Any

# Lazy (PEP 562): an actor that needs one collator must not import `datasets` (~1 s a process).
_EXPORTS = {
    "BadRowError": "r2m_ray.data.report",
    "DataConfig": "r2m_ray.data.config",
    "DataSourceError": "r2m_ray.data.sources",
    "EncodedSequence": "r2m_ray.data.tokenize",
    "PreferenceCollator": "r2m_ray.data.collate",
    "PreferenceData": "r2m_ray.data.preference",
    "SFTCollator": "r2m_ray.data.collate",
    "SkipReport": "r2m_ray.data.report",
    "TokenizedPreferences": "r2m_ray.data.tokenize",
    "detect_schema": "r2m_ray.data.schemas",
    "encode_prompt": "r2m_ray.data.tokenize",
    "encode_prompt_response": "r2m_ray.data.tokenize",
    "load_preferences": "r2m_ray.data.preference",
    "load_prompts": "r2m_ray.data.prompts",
    "load_sft": "r2m_ray.data.sft",
    "pad_token_id": "r2m_ray.data.tokenize",
    "parse_transcript": "r2m_ray.data.schemas",
    "render_prompt": "r2m_ray.data.tokenize",
    "stack_pair_batch": "r2m_ray.data.collate",
    "tokenize_preferences": "r2m_ray.data.tokenize",
    "tokenize_prompts": "r2m_ray.data.tokenize",
    "tokenize_sft": "r2m_ray.data.tokenize",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


__all__ = sorted(_EXPORTS)
