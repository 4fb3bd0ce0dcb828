"""RewardAnnotator: the frozen RM's reward-token embedding (cached) ⊕ the R2M head → rewards.

Per RL step the driver sends the step's (prompt, response) texts and, in `r2m` mode, refs to the
policy's last-layer hidden states h (produced by the policy learner's experience forward). The
annotator tokenises with the RM's OWN tokenizer (the policy's may differ), computes the RTE
H_last with the frozen backbone — once per (rendered prompt, response), then from an LRU cache,
because the backbone never changes — and scores:

- mode `frozen`:       r = RM(x, y)                         (hidden states ignored entirely)
- mode `gold`:         scores as `frozen` (the driver optimises the world's gold and logs this)
- mode `r2m`:          r = φ((1−ω)·CrossAttn(H_last, h) + ω·H_last),  ω = ω(t)
  - feedback `noise`:  h replaced by seeded Gaussian noise of h's shape and scale
  - `iterative`:       ω forced to 1 (no feedback); φ is still trained by the head learner
- mode `remote`:       r = the frozen RM of an `r2m-ray serve` server (serving/reward_client.py);
  no RM is loaded here, and there is no RTE and no head
- mode `function`:     r = a Python reward function (serving/reward_function.py), run here; no RM

Head weights arrive from the RewardHeadLearner through `load_head` (an ObjectRef the driver passes).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from r2m_ray.algos.feedback_similarity import PrototypeDetector
from r2m_ray.algos.r2m import omega as omega_schedule
from r2m_ray.data.collate import pad_ids
from r2m_ray.data.schemas import RowProblem
from r2m_ray.data.tokenize import encode_prompt_response, pad_token_id, render_prompt
from r2m_ray.models.r2m_head import R2MHead, fetch_feedback, fetch_pooled, noise_seed, parse_reward_config

logger = logging.getLogger(__name__)

NOISE_STREAM_ANNOTATOR = 0


def rm_tokenizer_dir(rm_checkpoint: Path) -> Path:
    """The checkpoint dir holds the tokenizer at its top level, or at least inside backbone/."""
    if (rm_checkpoint / "tokenizer_config.json").is_file():
        return rm_checkpoint
    return rm_checkpoint / "backbone"


@ray.remote
class RewardAnnotator:
    """Frozen RM + cached RTEs + an R2M head that the head learner keeps updating."""

    def __init__(
        self,
        rm_checkpoint: str,
        cfg_json: str,
        d_policy: int,
        max_length: int,
        seed: int,
        torch_threads: int = 1,
        batch_size: int = 32,
        cache_size: int = 65536,
        remote_token: str | None = None,
    ) -> None:
        """Load the frozen RM + tokenizer from `rm_checkpoint`; build the head (same `seed` as the learner's).

        In `remote` mode `rm_checkpoint` is unused: `remote_token` opens the server given by the config.
        """
        from r2m_ray.models.registry import actor_device

        torch.set_num_threads(torch_threads)
        self.cfg = parse_reward_config(cfg_json)
        self.cache: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self.cache_size, self.version = cache_size, 0
        self.detector: PrototypeDetector | None = None  # the reward-hacking monitor (fit_detector)
        self.stats = {"hits": 0, "misses": 0, "evictions": 0}
        self.external: Any = None  # the reward from outside: a server (remote) or a function
        if self.cfg.mode == "remote":
            from r2m_ray.serving.reward_client import RemoteReward

            r = self.cfg.remote
            self.external = RemoteReward(self.cfg.remote_url(), remote_token or "", r.timeout_s, r.retries, r.max_items)
            return
        if self.cfg.mode == "function":
            from r2m_ray.serving.reward_function import FunctionReward

            self.external = FunctionReward(self.cfg.function.path or "", self.cfg.function.kwargs)
            return
        self.device = actor_device()
        self.seed, self.max_length, self.batch_size, self.d_policy = seed, max_length, batch_size, d_policy
        self._load_rm(Path(rm_checkpoint))

    def _load_rm(self, ckpt: Path) -> None:
        from r2m_ray.models.registry import load_tokenizer
        from r2m_ray.models.reward_model import RewardModel

        self.rm = RewardModel.from_pretrained(ckpt).eval().to(self.device)
        self.rm.requires_grad_(False)
        self.tokenizer = load_tokenizer(rm_tokenizer_dir(ckpt))
        self.pad_id = pad_token_id(self.tokenizer)
        r2m = self.cfg.r2m
        self.head = R2MHead(self.rm.value_head, self.rm.hidden_size, self.d_policy, r2m.d_attn, r2m.n_heads, self.seed)
        self.head.requires_grad_(False)  # annotators only ever score
        self.head.to(self.device)

    def load_frozen_rm(self, rm_checkpoint: str) -> None:
        """Score with another frozen RM from now on (frozen mode only): best-of-n in a comparison
        scores one set of samples with every RM in one actor instead of starting one per RM."""
        if self.cfg.mode != "frozen":
            raise ValueError(f"load_frozen_rm: only a frozen-mode annotator changes its RM (mode={self.cfg.mode})")
        self._load_rm(Path(rm_checkpoint))
        self.cache.clear()  # the RTEs were the old backbone's

    # ------------------------------------------------------------------ RTE

    @torch.no_grad()
    def _rte(self, prompt_messages: list[list[dict]], responses: list[str]) -> tuple[Tensor, int, int]:
        """H_last [B, D_rm] per row from the cache or the frozen backbone → (rte, cache hits, sequences run)."""
        if len(prompt_messages) != len(responses):
            raise ValueError(f"prompt_messages has {len(prompt_messages)} rows but responses has {len(responses)}")
        if not responses:
            raise ValueError("annotate: no rows")
        keys = []
        for i, (messages, response) in enumerate(zip(prompt_messages, responses)):
            if not isinstance(response, str):
                raise ValueError(f"responses[{i}] must be a string, got {type(response).__name__}")
            try:
                keys.append((render_prompt(self.tokenizer, messages), response))
            except (RowProblem, KeyError, TypeError) as err:
                raise ValueError(f"prompt_messages[{i}]: cannot render the prompt: {err}") from None
        hits = sum(key in self.cache for key in keys)
        missing: dict[tuple[str, str], int] = {}
        for i, key in enumerate(keys):
            if key not in self.cache and key not in missing:
                missing[key] = i
        self._compute(missing, prompt_messages, responses)
        rte = torch.stack([self.cache[key] for key in keys])
        for key in keys:  # LRU: this batch is now the most recently used
            self.cache.move_to_end(key)
        self._evict()
        self.stats["hits"] += hits
        self.stats["misses"] += len(keys) - hits
        return rte, hits, len(missing)

    def _compute(self, missing: dict[tuple[str, str], int], prompt_messages: list, responses: list[str]) -> None:
        """Run the frozen backbone on the missing (prompt, response) pairs and cache their RTEs."""
        if not missing:
            return
        encoded, too_long = [], []
        for key, i in missing.items():
            enc = encode_prompt_response(
                self.tokenizer, prompt_messages[i], responses[i], self.max_length, self.max_length - 1
            )
            if enc is None:
                too_long.append(i)
            encoded.append((key, enc))
        if too_long:
            raise ValueError(
                f"rows {too_long}: the response alone fills max_length={self.max_length} RM tokens; "
                "raise data.max_length (or lower rl.rollout.max_new_tokens)"
            )
        for start in range(0, len(encoded), self.batch_size):
            chunk = encoded[start : start + self.batch_size]
            ids, attn = pad_ids([enc.input_ids for _, enc in chunk], self.pad_id)
            # pad-free (data/packing.py): the same RTEs on the real tokens only
            last_hidden = self.rm(ids.to(self.device), attn.to(self.device), packed=True).last_hidden.float().cpu()
            for (key, _), row in zip(chunk, last_hidden):
                self.cache[key] = row.clone()  # own storage: the batch tensor is not kept alive

    def _evict(self) -> None:
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
            self.stats["evictions"] += 1

    # --------------------------------------------------------------- scoring

    def _omega(self, t: int, T: int) -> float:
        if self.cfg.mode != "r2m" or self.cfg.r2m.iterative:
            return 1.0
        return float(omega_schedule(t, T, self.cfg.r2m.omega_floor))

    @torch.no_grad()
    def _score(self, rte: Tensor, hidden_refs: list | None, t: int, T: int) -> tuple[Tensor, float]:
        """Rewards for RTEs under this actor's mode; hidden_refs None → the head without feedback."""
        w = self._omega(t, T)
        rte = rte.to(self.device)  # the cache (and every answer) stays on the CPU
        if self.cfg.mode != "r2m":
            return self.rm.score_hidden(rte).cpu(), w
        if hidden_refs is None or w == 1.0:
            # ω = 1 makes Ĥ irrelevant; skip fetching and attending to h
            return self.head(rte).cpu(), w
        seed = noise_seed(self.seed, t, NOISE_STREAM_ANNOTATOR) if self.cfg.r2m.feedback == "noise" else None
        h, mask = fetch_feedback(hidden_refs, rte.shape[0], seed)
        return self.head(rte, h.to(self.device), mask.to(self.device), w).cpu(), w

    def _external(
        self, prompt_messages: list, responses: list[str], columns: dict[str, list] | None = None, t: int | None = None
    ) -> Tensor:
        """Rewards from the server or the function (only a function takes the prompt set's columns)."""
        if self.cfg.mode == "function":
            return self.external.score(prompt_messages, responses, columns, t)
        return self.external.score(prompt_messages, responses)

    def annotate(
        self,
        prompt_messages: list[list[dict]],
        responses: list[str],
        hidden_refs: list | None,
        t: int,
        T: int,
        columns: dict[str, list] | None = None,
    ) -> dict[str, Any]:
        """Rewards for one RL step's rows → {"rewards" [B], "frozen_rewards" [B], "rte" [B, D_rm], "omega", ...}.

        `hidden_refs`: refs of {"hidden": [b, S, D_p], "mask": [b, S]} in row order (required in
        `r2m` mode unless `iterative`; ignored in `frozen` mode). `rte` goes to the head learner.
        `frozen_rewards` is the frozen RM's own reward of the same rows, whatever the mode.
        `columns`: the prompt set's own columns per row, for a reward function (mode `function`).
        """
        needs_feedback = self.cfg.mode == "r2m" and not self.cfg.r2m.iterative
        if needs_feedback and hidden_refs is None:
            raise ValueError(
                "rl.reward.mode=r2m needs hidden_refs (the policy's hidden states); "
                "pass them, or use mode=frozen / r2m.iterative=true"
            )
        if hidden_refs is not None:  # fetched once: scoring and the hacking monitor both read them
            hidden_refs = [ray.get(x) if isinstance(x, ray.ObjectRef) else x for x in hidden_refs]
        if self.external is not None:  # the server's (or function's) rewards are the "frozen RM's"; no RTE, no head
            rte, hits, computed = None, 0, 0
            rewards, w = self._external(prompt_messages, responses, columns, t), 1.0
            frozen = rewards
        else:
            rte, hits, computed = self._rte(prompt_messages, responses)
            rewards, w = self._score(rte, hidden_refs if needs_feedback else None, t, T)
            with torch.no_grad():
                frozen = rewards if self.cfg.mode != "r2m" else self.rm.score_hidden(rte.to(self.device)).cpu()
        # counted, not raised: the driver skips the step and stops after rl.max_nonfinite_steps in a row
        bad_rows = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        flags = None
        if self.detector is not None and hidden_refs is not None:
            flags = self.detector.flags(fetch_pooled(hidden_refs, len(responses)))
        return {
            "rewards": rewards,
            "frozen_rewards": frozen,
            "hacking_flags": flags,
            "nonfinite": len(bad_rows),
            "nonfinite_rows": bad_rows[:10],
            "rte": rte,
            "omega": w,
            "cache_hits": hits,
            "rte_computed": computed,
            "head_version": self.version,
        }

    def frozen_rm_rewards(self, prompt_messages: list[list[dict]], responses: list[str]) -> Tensor:
        """The frozen RM's own rewards [B] (whatever the mode), through the same RTE cache."""
        if self.external is not None:
            return self._external(prompt_messages, responses)
        rte, _, _ = self._rte(prompt_messages, responses)
        with torch.no_grad():
            return self.rm.score_hidden(rte.to(self.device)).cpu()

    def pairwise_accuracy(
        self,
        prompt_messages: list[list[dict]],
        chosen: list[str],
        rejected: list[str],
        hidden_refs: list | None = None,
        t: int = 0,
        T: int = 1,
    ) -> float:
        """Share of gold-labelled pairs with r(chosen) > r(rejected), ties half (as eval/rm_accuracy).

        Scores with this actor's mode; in `r2m` mode without `hidden_refs` the (trained) head
        scores without feedback. `hidden_refs`, if given, cover the chosen rows then the rejected rows.
        """
        n = len(prompt_messages)
        if len(chosen) != n or len(rejected) != n:
            raise ValueError(f"pairwise_accuracy: {n} prompts, {len(chosen)} chosen, {len(rejected)} rejected")
        if n == 0:
            raise ValueError("pairwise_accuracy: no pairs")
        if self.external is not None:
            rewards = self._external(list(prompt_messages) * 2, list(chosen) + list(rejected))
        else:
            rte, _, _ = self._rte(list(prompt_messages) * 2, list(chosen) + list(rejected))
            rewards, _ = self._score(rte, hidden_refs, t, T)
        if not torch.isfinite(rewards).all():  # no accuracy to report, but not a reason to stop the run
            logger.warning(
                "pairwise_accuracy: %d of %d rewards are NaN/inf", int((~torch.isfinite(rewards)).sum()), 2 * n
            )
            return float("nan")
        r_c, r_r = rewards[:n], rewards[n:]
        return float(((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean())

    def fit_detector(
        self, prompt_messages: list[list[dict]], chosen: list[str], rejected: list[str], hidden_refs: list
    ) -> dict[str, Any]:
        """Calibrate the reward-hacking monitor (algos/feedback_similarity.PrototypeDetector).

        The pairs are gold-labelled (chosen = gold-better); `hidden_refs` hold the current policy's
        states of the chosen rows, then the rejected rows. A rejected response the frozen RM scores
        above its chosen one is a hacked example, every chosen response a clean one. From then on
        `annotate` flags the rows whose feedback is closer to the hacked prototype. Without any
        hacked example the monitor is off until the next calibration. Returns the counts and the
        prototypes (`set_detector` takes them back: checkpoints and restarts keep the monitor).
        """
        n = len(chosen)
        frozen = self.frozen_rm_rewards(list(prompt_messages) * 2, list(chosen) + list(rejected))
        hacked_pair = frozen[n:] > frozen[:n]
        if not hacked_pair.any():
            self.detector = None
            return {"hacked": 0, "clean": n, "prototypes": None}
        pooled = fetch_pooled(hidden_refs, 2 * n)
        keep = torch.cat([torch.ones(n, dtype=torch.bool), hacked_pair])
        labels = torch.cat([torch.zeros(n, dtype=torch.bool), hacked_pair])
        self.detector = PrototypeDetector.fit(pooled[keep], labels[keep])
        prototypes = [self.detector.hacked.tolist(), self.detector.clean.tolist()]
        return {"hacked": int(hacked_pair.sum()), "clean": n, "prototypes": prototypes}

    def set_detector(self, prototypes: list[list[float]] | None) -> None:
        """Install the monitor's (hacked, clean) prototypes from an earlier `fit_detector` (None: off)."""
        self.detector = None if prototypes is None else PrototypeDetector(*(torch.tensor(p) for p in prototypes))

    # ------------------------------------------------------------- head sync

    def load_head(self, state_dict: dict[str, Tensor], version: int) -> int:
        """Install head weights from the learner (an ObjectRef resolved by Ray); returns `version`."""
        self.head.load_head_state(state_dict)
        self.version = int(version)
        return self.version

    def ping(self) -> dict[str, int]:
        """Health check (the driver waits on it after a restart; a new pid = a new incarnation)."""
        return {"head_version": self.version, "pid": os.getpid()}

    def head_version(self) -> int:
        """The version of the head weights in use (0 = the RM's own φ + the seeded cross-attention)."""
        return self.version

    def head_state(self) -> dict[str, Tensor]:
        """The head weights in use (for tests and checkpoints)."""
        return self.head.head_state()

    def frozen_rm_digest(self) -> str:
        """sha256 over the frozen RM's full state (backbone + value head): proof nothing trained it.
        Remote: the served checkpoints' file digests, as the server reports them; function: its path,
        source file and kwargs."""
        if self.cfg.mode == "function":
            return self.external.digest()
        if self.external is not None:
            return "remote:" + self.external.digest()
        digest = hashlib.sha256()
        for name, tensor in sorted(self.rm.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def cache_info(self) -> dict[str, int]:
        """RTE cache size, cap and lifetime hits / misses / evictions."""
        remote = self.external.stats if self.external is not None else {}
        return {
            "size": len(self.cache),
            "cap": self.cache_size,
            **self.stats,
            **{f"remote_{k}": v for k, v in remote.items()},
        }
