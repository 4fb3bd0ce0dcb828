"""Preference, SFT and prompt data: load (hub or local json/jsonl/parquet), check, tokenise, collate.

data = load_preferences("hh.jsonl.gz", cfg.data)          # normalised pairs + SkipReport
tok = tokenize_preferences(data, tokenizer, cfg.data)      # token columns, exact masks
batch = PreferenceCollator(tok.pad_token_id)(rows)         # padded tensors
input_ids, attention_mask, response_mask = stack_pair_batch(batch)
"""

from r2m_ray.data.collate import PreferenceCollator, SFTCollator, stack_pair_batch
from r2m_ray.data.config import DataConfig
from r2m_ray.data.preference import PreferenceData, load_preferences
from r2m_ray.data.prompts import load_prompts
from r2m_ray.data.report import BadRowError, SkipReport
from r2m_ray.data.schemas import detect_schema, parse_transcript
from r2m_ray.data.sft import load_sft
from r2m_ray.data.sources import DataSourceError
from r2m_ray.data.tokenize import (
    EncodedSequence,
    TokenizedPreferences,
    encode_prompt,
    encode_prompt_response,
    pad_token_id,
    render_prompt,
    tokenize_preferences,
    tokenize_prompts,
    tokenize_sft,
)

__all__ = [
    "BadRowError",
    "DataConfig",
    "DataSourceError",
    "EncodedSequence",
    "PreferenceCollator",
    "PreferenceData",
    "SFTCollator",
    "SkipReport",
    "TokenizedPreferences",
    "detect_schema",
    "encode_prompt",
    "encode_prompt_response",
    "load_preferences",
    "load_prompts",
    "load_sft",
    "pad_token_id",
    "parse_transcript",
    "render_prompt",
    "stack_pair_batch",
    "tokenize_preferences",
    "tokenize_prompts",
    "tokenize_sft",
]
