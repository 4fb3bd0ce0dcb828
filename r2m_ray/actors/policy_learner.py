"""PolicyLearner: one DeepSpeed data-parallel rank of the RL policy (GRPO / RLOO, ALGORITHMS.md §3–4).

Each rank is a Ray actor owning a Hugging Face causal LM wrapped by a DeepSpeed engine
(ZeRO stage from config; gloo + torch AdamW on CPU). Two calls per RL step:

- `experience`: ONE no-grad forward (eval mode) over prompt+response gives the old per-token
  log-probs, the response entropy, and the R2M policy feedback h: the last-layer hidden
  states after the final norm (transformers ties `hidden_states[-1]` to the post-norm
  `last_hidden_state` for Llama-style models). h is `ray.put` once by this actor.
- `train`: k epochs of the clipped ratio loss + KL to the reference over micro-batches;
  the forward passes of the LAST epoch also yield the refreshed feedback h'.

Tensor conventions (every [B, T] tensor is aligned with `input_ids`):
- `old_logp[:, t] = log π(input_ids[:, t] | input_ids[:, <t])` on response tokens, 0 elsewhere
  (position 0 has no prediction, so the prompt must be non-empty); float32.
- position ids are counted over real tokens (`position_ids_from_mask`), as vLLM does; with
  right padding that is simply 0..len−1 and padding never influences real tokens.
- the feedback payload behind a `hidden_ref` is `{"hidden": [B, T, D] in cfg.hidden_dtype, zero
  on padding, "mask": [B, T] long (the attention mask), "response_mask": [B, T] long}` for that
  rank's rows: the format of `r2m_ray.models.r2m_head.concat_feedback`. The ref is owned by the
  rank that put it.

`PolicyLearnerGroup` is the driver-side handle: it creates rank 0 first, reads its address
and a free port, starts the other ranks, and slices each batch by rows, one `ray.put` per rank.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor, nn

from r2m_ray.actors.distributed import (
    LearnerGroup,
    LearnerRank,
    deepspeed_config,
    gathered_state_dict,
    init_distributed,
    rendezvous_for,
    warmup_schedule,
)
from r2m_ray.algos.policy_loss import clipped_policy_loss, entropy_from_logits, kl_penalty
from r2m_ray.data.packing import packed_decoder_states
from r2m_ray.eval.flops import DecoderShape, training_flops
from r2m_ray.models.reward_model import position_ids_from_mask
from r2m_ray.rl_config import PolicyConfig

logger = logging.getLogger(__name__)

EXPERIENCE_KEYS = ("input_ids", "attention_mask", "response_mask")
RANK_AGREED = ("optimizer_steps", "nonfinite_skipped")  # equal on every rank: taken, not averaged
RANK_SUMMED = ("train_flops",)  # the group's work is the sum of its ranks'
RANK_SLOWEST = ("train_seconds",)  # ranks run together: the group takes as long as its slowest rank
TRAIN_KEYS = (*EXPERIENCE_KEYS, "advantages", "old_logp", "ref_logp")
OPTIONAL_TRAIN_KEYS = ("behaviour_weight",)  # [B, T], the async loop's per-token weights


def response_token_logprobs(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Per-token log-probs [B, T] (float32) aligned with ``input_ids``; 0 outside the response.

    ``out[:, t] = log softmax(logits[:, t−1])[input_ids[:, t]]`` where ``response_mask[:, t]`` is set.
    Differentiable w.r.t. ``logits``. Raises ValueError if the mask marks position 0.
    """
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} must be [B, T, V] over input_ids {tuple(input_ids.shape)}")
    if response_mask.shape != input_ids.shape:
        raise ValueError(
            f"response_mask {tuple(response_mask.shape)} does not match input_ids {tuple(input_ids.shape)}"
        )
    if (response_mask[:, 0] != 0).any():
        raise ValueError("response_mask marks position 0, which no logit predicts; the prompt must be non-empty")
    # gather − logsumexp instead of a full log_softmax: one [B, T, V] float32 tensor fewer.
    pred = logits[:, :-1].float()
    targets = input_ids[:, 1:].long().unsqueeze(-1)
    token_logp = pred.gather(-1, targets).squeeze(-1) - torch.logsumexp(pred, dim=-1)
    token_logp = torch.where(response_mask[:, 1:] != 0, token_logp, torch.zeros_like(token_logp))
    return torch.nn.functional.pad(token_logp, (1, 0))


def disable_dropout(model: nn.Module) -> None:
    """Zero every dropout: the ratio π/π_old must be exactly 1 before the first update."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def micro_batch_slices(rows: int, num_micro: int) -> list[slice]:
    """Split ``rows`` into ``num_micro`` contiguous, near-equal, non-empty slices."""
    if num_micro < 1 or rows < num_micro:
        raise ValueError(f"cannot split {rows} rows into {num_micro} non-empty micro-batches")
    bounds = torch.linspace(0, rows, num_micro + 1).round().long().tolist()
    return [slice(bounds[i], bounds[i + 1]) for i in range(num_micro)]


@ray.remote
class PolicyLearner(LearnerRank):
    """One rank: causal LM + DeepSpeed engine; experience and k-epoch policy updates on its rows."""

    def __init__(self, rank: int, world_size: int, torch_threads: int) -> None:
        super().__init__(rank, world_size, torch_threads)
        self.optimizer_steps = 0
        self.train_calls = 0

    def init(self, cfg_json: str, model_dir: str, rendezvous: str, seed: int) -> dict[str, Any]:
        """Load the policy (same weights on every rank) and build the DeepSpeed engine.

        ``cfg_json`` is ``PolicyConfig.model_dump_json()``.
        """
        import deepspeed

        from r2m_ray.models.registry import load_causal_lm

        self.cfg = PolicyConfig.model_validate_json(cfg_json)
        self.zero3 = self.cfg.zero_stage == 3
        self.hidden_dtype = getattr(torch, self.cfg.hidden_dtype)
        backend = init_distributed(self.rank, self.world_size, rendezvous, "auto")
        torch.manual_seed(seed)
        model = load_causal_lm(Path(model_dir))
        disable_dropout(model)
        n_params = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        self.shape = DecoderShape.of(model)
        opt = self.cfg.optim
        optim = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=opt.betas, weight_decay=opt.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optim,
            lr_scheduler=warmup_schedule(optim, opt.warmup_steps),
            config=deepspeed_config(self.cfg.zero_stage, opt.grad_clip, self.cfg.micro_batch_size),
        )
        hidden = int(model.config.get_text_config().hidden_size)
        return {"rank": self.rank, "backend": backend, "hidden_size": hidden, "params": n_params}

    def counters(self) -> dict[str, int]:
        """Optimiser steps and train calls (restored on resume)."""
        return {"optimizer_steps": self.optimizer_steps, "train_calls": self.train_calls}

    # ------------------------------------------------------------------ forward

    def _forward(self, ids: Tensor, attn: Tensor, resp: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(per-token log-probs [B, T] aligned like `response_token_logprobs`, the logits [N, V] of the N
        positions that predict a response token, post-norm last-layer hidden states [B, T, D]).

        The LM head runs on those N positions only (a full [B, T, V] would be mostly prompt and
        padding), and with rl.policy.packing the decoder runs pad-free (data/packing.py).
        """
        if (resp[:, 0] != 0).any():
            raise ValueError("response_mask marks position 0, which no logit predicts; the prompt must be non-empty")
        model = self.engine.module
        if self.cfg.packing:
            hidden = packed_decoder_states(model.base_model, ids, attn)
        else:
            hidden = model.base_model(
                input_ids=ids, attention_mask=attn, position_ids=position_ids_from_mask(attn), use_cache=False
            ).last_hidden_state
        rows, cols = (resp[:, 1:] != 0).nonzero(as_tuple=True)
        logits = model.get_output_embeddings()(hidden[rows, cols]).float()
        picked = logits.gather(-1, ids[rows, cols + 1].long()[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        logp = torch.zeros(ids.shape, dtype=torch.float32, device=ids.device).index_put((rows, cols + 1), picked)
        return logp, logits, hidden

    @staticmethod
    def _entropy_sum(logits: Tensor) -> tuple[float, int]:
        """(Σ entropy, count) over the rows of the response-predicting logits [N, V] (no grad)."""
        if logits.shape[0] == 0:
            return 0.0, 0
        with torch.no_grad():
            return float(entropy_from_logits(logits.unsqueeze(0)).sum()), int(logits.shape[0])

    def _put_hidden(self, parts: list[Tensor], attn: Tensor, response_mask: Tensor) -> ray.ObjectRef:
        """Put the feedback h of this rank's rows once; consumers ray.get the ref themselves."""
        hidden = torch.cat(parts) * attn.unsqueeze(-1).to(self.hidden_dtype)
        return ray.put({"hidden": hidden.cpu(), "mask": attn.long().cpu(), "response_mask": response_mask.long().cpu()})

    @staticmethod
    def _check(batch: dict[str, Tensor], keys: tuple[str, ...]) -> int:
        """Rows of a batch after checking that the named [B, T] / [B] fields are present and agree."""
        missing = [k for k in keys if k not in batch]
        if missing:
            raise ValueError(f"policy batch is missing field(s) {missing}")
        rows, length = batch["input_ids"].shape
        for k in keys:
            want = (rows,) if k == "advantages" else (rows, length)
            if tuple(batch[k].shape) != want:
                raise ValueError(f"policy batch field {k!r} has shape {tuple(batch[k].shape)}, expected {want}")
        return rows

    @torch.no_grad()
    def experience(
        self, batch: dict[str, Tensor], num_micro: int | None = None, sampler_temperature: float | None = None
    ) -> dict[str, Any]:
        """Old per-token log-probs, response entropy and the feedback h from ONE eval-mode forward per row.

        ``num_micro``: micro-batch count (the group makes it equal on every rank, as ZeRO-3
        forwards are collectives); default ⌈rows / micro_batch_size⌉. Returns
        ``{"old_logp": [B, T] float32, "entropy": float, "hidden_ref": ObjectRef, "rows": B}``;
        with ``sampler_temperature`` τ also ``"sampler_logp"``: log softmax(logits/τ) of each
        response token, the current weights' sampler (the async loop's behaviour weights).
        """
        rows = self._check(batch, EXPERIENCE_KEYS)
        batch = self.on_device(batch)
        self.engine.eval()
        logps, sampler_logps, hidden, ent_sum, ent_count = [], [], [], 0.0, 0
        for sl in micro_batch_slices(rows, num_micro or math.ceil(rows / self.cfg.micro_batch_size)):
            ids, attn, resp = (batch[k][sl] for k in EXPERIENCE_KEYS)
            logp, logits, h = self._forward(ids, attn, resp)
            logps.append(logp)
            if sampler_temperature is not None:
                sampler_logps.append(self._at_temperature(logits, ids, resp, sampler_temperature))
            s, c = self._entropy_sum(logits)
            ent_sum, ent_count = ent_sum + s, ent_count + c
            hidden.append(h.to(self.hidden_dtype))
        out = {
            "old_logp": torch.cat(logps).cpu(),
            "entropy": ent_sum / max(ent_count, 1),
            "hidden_ref": self._put_hidden(hidden, batch["attention_mask"], batch["response_mask"]),
            "rows": rows,
        }
        if sampler_temperature is not None:
            out["sampler_logp"] = torch.cat(sampler_logps).cpu()
        return out

    @staticmethod
    def _at_temperature(logits: Tensor, ids: Tensor, resp: Tensor, temperature: float) -> Tensor:
        """[B, T] log-probs of the response tokens under softmax(logits/τ), placed like `_forward`'s."""
        if temperature <= 0:
            raise ValueError(f"sampler_temperature must be > 0, got {temperature}")
        rows, cols = (resp[:, 1:] != 0).nonzero(as_tuple=True)
        scaled = logits / temperature
        picked = scaled.gather(-1, ids[rows, cols + 1].long()[:, None]).squeeze(-1) - torch.logsumexp(scaled, dim=-1)
        return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device).index_put((rows, cols + 1), picked)

    # ------------------------------------------------------------------- train

    def train(self, batch: dict[str, Tensor], epochs: int, num_micro: int | None = None) -> dict[str, Any]:
        """``epochs`` passes of clipped ratio loss + β_KL·KL over micro-batches; one optimiser step each.

        ``batch`` adds ``advantages`` [B] (per sequence), ``old_logp`` and ``ref_logp`` [B, T]
        (aligned like ``experience``'s old_logp) to the experience fields. Returns the
        micro-batch means of loss, pg_loss, kl, clip_fraction, approx_kl, ratio_mean, entropy,
        grad_norm (when DeepSpeed reports it), lr, plus ``rows`` and ``hidden_ref``: the
        feedback h' from the last epoch's forwards (each taken before its micro-batch's step).
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        rows = self._check(batch, TRAIN_KEYS + tuple(k for k in OPTIONAL_TRAIN_KEYS if k in batch))
        batch = self.on_device(batch)
        slices = micro_batch_slices(rows, num_micro or math.ceil(rows / self.cfg.micro_batch_size))
        self.train_calls += 1
        self.engine.train()  # dropout is disabled at load, so train mode changes no numbers
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        hidden: list[Tensor] = []
        skipped, flops, tick = 0, 0.0, time.perf_counter()
        for epoch in range(epochs):
            for i, sl in enumerate(slices):
                mb = {k: batch[k][sl] for k in (*TRAIN_KEYS, *OPTIONAL_TRAIN_KEYS) if k in batch}
                resp = mb["response_mask"]
                logp, logits, h = self._forward(mb["input_ids"], mb["attention_mask"], resp)
                if epoch == epochs - 1:
                    hidden.append(h.detach().to(self.hidden_dtype))
                kl = kl_penalty(logp, mb["ref_logp"].float(), self.cfg.kl_estimator)
                loss, stats = clipped_policy_loss(
                    logp,
                    mb["old_logp"].float(),
                    mb["advantages"].float(),
                    resp,
                    self.cfg.clip_eps,
                    kl=kl,
                    kl_coef=self.cfg.kl_coef,
                    behaviour_weight=mb.get("behaviour_weight"),
                )
                if self._any_rank_nonfinite(loss):
                    # every rank skips this micro-batch together: backward is a collective
                    skipped += 1
                    logger.warning(
                        "rank %d: non-finite policy loss on some rank; micro-batch %d/%d of epoch %d skipped (%s)",
                        self.rank,
                        i + 1,
                        len(slices),
                        epoch + 1,
                        stats,
                    )
                    continue
                ent_sum, ent_count = self._entropy_sum(logits.detach())
                self.engine.backward(loss)
                self.engine.step()
                self.optimizer_steps += 1
                flops += training_flops(self.shape, mb["attention_mask"], len(logits))
                stats.update(loss=loss.item(), entropy=ent_sum / max(ent_count, 1), lr=self.scheduler.get_last_lr()[0])
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    stats["grad_norm"] = float(grad_norm)
                    if not math.isfinite(stats["grad_norm"]):
                        # the step has already been applied: the weights are suspect, stop the stage
                        raise FloatingPointError(
                            f"rank {self.rank}: non-finite gradient norm at optimiser step {self.optimizer_steps}; "
                            "the policy weights are no longer trustworthy (lower rl.policy.optim.lr or "
                            "rl.policy.optim.grad_clip)"
                        )
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                    counts[k] = counts.get(k, 0) + 1
        out: dict[str, Any] = {k: sums[k] / counts[k] for k in sums}
        out.update(rows=rows, optimizer_steps=self.optimizer_steps, nonfinite_skipped=skipped)
        out.update(train_flops=flops, train_seconds=time.perf_counter() - tick)  # for MFU (eval/flops.py)
        out["hidden_ref"] = self._put_hidden(hidden, batch["attention_mask"], batch["response_mask"])
        return out

    def _any_rank_nonfinite(self, loss: Tensor) -> bool:
        """True on every rank when the loss is NaN/inf on any rank (one tiny all-reduce)."""
        flag = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=loss.device)  # NCCL: on the GPU
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    # ------------------------------------------------------------------ weights

    def state_dict(self) -> dict[str, Tensor]:
        """Full CPU weights keyed exactly like the HF model's ``state_dict()`` (for vLLM reloads).

        Under ZeRO-3 every rank must call it (a gather); ranks other than 0 then return {}
        so the object store holds one copy.
        """
        state = gathered_state_dict(self.engine.module, self.zero3)
        return state if self.rank == 0 or not self.zero3 else {}

    def init_weight_transfer(
        self, backend: str, rendezvous: str, world_size: int, rollouts: list[Any], workers_per_engine: int
    ) -> None:
        """Join the collective weight-sync group (rank 0 sends; under ZeRO-3 every rank gathers)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from r2m_ray.actors.weight_transfer import (
            LearnerWeightSource,
            RolloutSyncClient,
            register_gloo_backend,
            trainer_init_info,
        )

        register_gloo_backend()
        self.sync_client = RolloutSyncClient(rollouts, workers_per_engine)
        source = LearnerWeightSource(self.engine.module, self.zero3)
        info = trainer_init_info(backend, rendezvous, world_size, rank=self.rank)
        self.weight_transfer = WeightTransferTrainerFactory.trainer_init(info, client=self.sync_client, source=source)

    def check_weight_transfer(self, version: int) -> None:
        """Rank 0: every engine checks the version and the tensors' names and shapes."""
        self.sync_client.version = version
        self.sync_client.check(self.weight_transfer.source.metadata())

    def send_weights(self) -> None:
        """Broadcast the current weights into every engine (a collective under ZeRO-3)."""
        self.weight_transfer.send_weights()

    def save(self, path: str, tokenizer_dir: str | None = None) -> str:
        """Rank 0 writes an HF directory (safetensors, + tokenizer if given); ZeRO-3 ranks all join the gather."""
        state = gathered_state_dict(self.engine.module, self.zero3)
        if self.rank == 0:
            from transformers import AutoTokenizer

            self.engine.module.save_pretrained(path, state_dict=state)
            if tokenizer_dir:
                AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
        return path


class PolicyLearnerGroup(LearnerGroup):
    """Driver-side handle of ``cfg.ranks`` PolicyLearner actors forming one DeepSpeed group.

    ``experience_async`` / ``train_async`` return one ref per rank, in row order; each resolves
    to a dict holding a ``hidden_ref``. Pass those hidden refs on (as a list, one per rank,
    in row order) to the actors that need h: they ``ray.get`` them themselves.
    """

    def __init__(
        self,
        cfg: PolicyConfig,
        model_dir: Path,
        seed: int,
        rank_options: Callable[[int], dict[str, Any]] | None = None,
        deadlines: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        self.cfg = cfg
        super().__init__(
            PolicyLearner,
            "rl.policy (PolicyLearner ranks)",
            cfg.ranks,
            cfg.zero_stage,
            (cfg.num_cpus_per_rank, cfg.num_gpus_per_rank),
            cfg.torch_threads,
            (cfg.model_dump_json(), str(model_dir), seed),
            rank_options,
            deadlines,
        )

    def _slices(self, batch: dict[str, Tensor]) -> tuple[list[ray.ObjectRef], int]:
        """One ObjectRef per rank (rows split contiguously, put once) and the common micro-batch count."""
        n = batch["input_ids"].shape[0]
        bounds = self.row_bounds(n, "sequences")
        sizes = [bounds[i + 1] - bounds[i] for i in range(self.world_size)]
        # Every rank must take as many optimiser steps (and, under ZeRO-3, forwards) as the others.
        num_micro = math.ceil(max(sizes) / self.cfg.micro_batch_size)
        if min(sizes) < num_micro:
            raise ValueError(
                f"batch of {n} sequences over {self.world_size} ranks with rl.policy.micro_batch_size="
                f"{self.cfg.micro_batch_size} gives ranks unequal micro-batch counts; use a multiple of the ranks"
            )
        return self.put_slices(batch, bounds), num_micro

    def experience_async(
        self, batch: dict[str, Tensor], sampler_temperature: float | None = None
    ) -> list[ray.ObjectRef]:
        """Start `experience` on every rank; refs in row order (cat their old_logp along dim 0)."""
        refs, num_micro = self._slices({k: batch[k] for k in EXPERIENCE_KEYS})
        return [a.experience.remote(ref, num_micro, sampler_temperature) for a, ref in zip(self.actors, refs)]

    def train_async(self, batch: dict[str, Tensor], epochs: int) -> list[ray.ObjectRef]:
        """Start `epochs` policy epochs on every rank; refs in row order, each with its h' hidden_ref."""
        refs, num_micro = self._slices({k: batch[k] for k in (*TRAIN_KEYS, *OPTIONAL_TRAIN_KEYS) if k in batch})
        return [a.train.remote(ref, epochs, num_micro) for a, ref in zip(self.actors, refs)]

    @staticmethod
    def reduce_metrics(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
        """Row-weighted mean of the per-rank numeric stats; rows and FLOPs summed, train_seconds the slowest
        rank's; refs and tensors are left out."""
        total = sum(m["rows"] for m in per_rank)
        special = ("rows", *RANK_AGREED, *RANK_SUMMED, *RANK_SLOWEST)
        keys = [k for k, v in per_rank[0].items() if isinstance(v, (int, float)) and k not in special]
        out: dict[str, Any] = {k: sum(m[k] * m["rows"] for m in per_rank) / total for k in keys}
        out["rows"] = total
        out.update({k: sum(m[k] for m in per_rank) for k in RANK_SUMMED if k in per_rank[0]})
        out.update({k: max(m[k] for m in per_rank) for k in RANK_SLOWEST if k in per_rank[0]})
        out.update({k: per_rank[0][k] for k in RANK_AGREED if k in per_rank[0]})
        return out

    def init_weight_transfer(
        self, rollouts: list[Any], num_gpus_per_engine: float, workers_per_engine: int = 1
    ) -> None:
        """Open the collective weight-sync group {learner rank 0, every engine worker}."""
        from r2m_ray.actors.weight_transfer import collective_backend

        backend = collective_backend(num_gpus_per_engine)
        ip, port = self._get(self.actors[0].address.remote(), "address")  # rank 0 hosts the group's store
        rendezvous = f"tcp://{ip}:{port}" if backend == "nccl" else rendezvous_for(ip, port)
        world_size = 1 + len(rollouts) * workers_per_engine
        self._get(
            self._on_all_ranks("init_weight_transfer", backend, rendezvous, world_size, rollouts, workers_per_engine),
            "init_weight_transfer",
            start=True,
        )
        self.extra_rendezvous.append(rendezvous)

    def send_weights(self, version: int) -> None:
        """Broadcast the weights into the engines opened by `init_weight_transfer`.

        Checked on rank 0 first, apart: under ZeRO-3 the other ranks would otherwise
        start gathering while a refused rank 0 never joins them.
        """
        self._get(self.actors[0].check_weight_transfer.remote(version), "check_weight_transfer")
        self._get(self._on_all_ranks("send_weights"), "send_weights")
