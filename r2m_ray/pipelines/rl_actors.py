"""The actors of one RL attempt, how the driver spreads rollouts over them, and what it does when
one of them fails.

Two kinds of failure:
- in place: Ray restarts a dead rollout engine, the annotator or the reference (`max_restarts`).
  The driver waits for the new incarnation, restores what it lost (the engine's weights, the
  annotator's head; the reference has no state) and repeats the call with the same
  arguments and seed, so the step's samples and rewards are the ones it would have had.
- the stage: a policy rank (its DeepSpeed group cannot take a new member), the head learner
  (its optimizer state would be lost), or an actor whose restarts are spent. `ActorLost` is
  raised; rl_stage stops every actor and starts them again from the last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch
from torch.nn.utils.rnn import pad_sequence

from r2m_ray.actors.distributed import LearnerHung
from r2m_ray.actors.policy_learner import PolicyLearnerGroup
from r2m_ray.actors.reference import ReferenceActor
from r2m_ray.actors.reward_annotator import RewardAnnotator
from r2m_ray.actors.reward_head_learner import RewardHeadLearner
from r2m_ray.actors.rollout import RolloutActor
from r2m_ray.algos.policy_loss import behaviour_weights
from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import RunConfig
from r2m_ray.data.collate import pad_ids
from r2m_ray.pipelines.waits import ACTOR_LOST, ActorLost, get_all, get_one
from r2m_ray.placement import PlacementPlan, actor_nodes, actor_processes

log = logging.getLogger(__name__)

# + objects owned by a dead actor, and a learner-group call past its deadline (a hung rank or collective)
STAGE_LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, LearnerHung)
RESTART_TIMEOUT_S = 600  # a restarted engine reloads its model (and may recompile) before it answers


@dataclass
class PendingGenerate:
    """A generate call in flight: which engine runs which prompts, with the step's seed."""

    step: int
    prompt_ids: list[list[int]]
    chunks: list[list[int]]  # engine i → the prompt indices it was given
    refs: dict[Any, int] = field(default_factory=dict)  # ObjectRef → engine
    pids: list[int] | None = None  # the engines' pids when submitted (None: not tracked)
    version: int | None = None  # the weights the engines held when it was sent (None: not tracked) ...
    weights_ref: Any = None  # ... and their ObjectRef: a restarted engine regenerates with them


def _submit_chunk(rollouts: list, pending: PendingGenerate, i: int, cfg: RunConfig) -> None:
    ro = cfg.rl.rollout
    ref = rollouts[i].generate.remote(
        [pending.prompt_ids[j] for j in pending.chunks[i]],
        ro.samples_per_prompt,
        ro.temperature,
        ro.top_p,
        ro.max_new_tokens,
        cfg.seed * 100_003 + pending.step,
    )
    pending.refs[ref] = i


def submit_generate(
    rollouts: list,
    prompt_ids: list[list[int]],
    cfg: RunConfig,
    step: int,
    pids: list[int] | None = None,
    weights: tuple[int, Any] | None = None,
) -> PendingGenerate:
    """Spread prompts over the rollout actors and start them; `collect_generate` gathers the samples.

    Each engine runs its calls in order, so a weight update sent after this call reaches the
    engine after these samples are drawn (the async loop's one-step-off generate relies on it).
    `pids` and `weights` (version, ObjectRef) record the engines and their weights at submission.
    """
    chunks = [list(range(i, len(prompt_ids), len(rollouts))) for i in range(len(rollouts))]
    version, weights_ref = weights if weights is not None else (None, None)
    pending = PendingGenerate(
        step,
        [list(p) for p in prompt_ids],
        chunks,
        pids=list(pids) if pids else None,
        version=version,
        weights_ref=weights_ref,
    )
    for i in range(len(rollouts)):
        if chunks[i]:
            _submit_chunk(rollouts, pending, i, cfg)
    return pending


def collect_generate(
    pending: PendingGenerate,
    rollouts: list,
    cfg: RunConfig,
    recover: Callable[[int, BaseException, PendingGenerate, Callable[[], None]], None] | None = None,
) -> dict[str, list]:
    """Collect as each engine finishes (ray.wait); prompt order kept.

    When an engine dies mid-call, `recover(i, err, pending, resubmit)` waits for Ray to restart
    actor i, loads the weights the call was sent with and calls `resubmit()`, which sends the
    same chunk again with the same seed: the step's samples are the ones it would have had,
    none lost and none twice.
    """
    rows: list[tuple[int, int, dict]] = []
    deadline = time.monotonic() + cfg.rl.wait_timeout_s
    while pending.refs:
        done, _ = ray.wait(list(pending.refs), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:  # alive but not answering: a hung engine is treated as a lost one
            raise ActorLost(
                f"rl.rollout: engine(s) {sorted(pending.refs.values())} did not answer generate within "
                f"rl.wait_timeout_s={cfg.rl.wait_timeout_s:g} s"
            )
        i = pending.refs.pop(done[0])
        try:
            out = ray.get(done[0])
        except ACTOR_LOST as err:
            if recover is None:
                raise
            recover(i, err, pending, lambda i=i: _submit_chunk(rollouts, pending, i, cfg))
            continue
        for j in range(len(out["prompt_index"])):
            row = {k: v[j] for k, v in out.items()}
            rows.append((pending.chunks[i][row["prompt_index"]], row["sample_index"], row))
    rows.sort(key=lambda r: (r[0], r[1]))  # groups of K consecutive rows, one group per prompt
    return {k: [r[2][k] if k != "prompt_index" else r[0] for r in rows] for k in rows[0][2]}


def generate(
    rollouts: list,
    prompt_ids: list[list[int]],
    cfg: RunConfig,
    step: int,
    recover: Callable[[int, BaseException, PendingGenerate, Callable[[], None]], None] | None = None,
) -> dict[str, list]:
    """Generate and wait: `submit_generate` then `collect_generate`."""
    return collect_generate(submit_generate(rollouts, prompt_ids, cfg, step), rollouts, cfg, recover)


def sequence_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids with attention and response masks."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    ids, attn = pad_ids(seqs, pad_id, side="right")
    resp, _ = pad_ids([[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)], 0, side="right")
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def behaviour_logp_batch(prompt_ids: list[list[int]], response_logprobs: list[list[float]]) -> torch.Tensor:
    """The engines' log-prob of each sampled token, placed like the learner's old_logp [B, T] (0 elsewhere)."""
    rows = [torch.tensor([0.0] * len(p) + list(lp)) for p, lp in zip(prompt_ids, response_logprobs)]
    return pad_sequence(rows, batch_first=True)


def stale_rows(versions: list[int], learner_version: int, max_staleness: int, step: int) -> tuple[torch.Tensor, int]:
    """([B] bool: rows drawn with weights older than the learner's, the batch's staleness in updates).

    The versions are the engines' own account; a staleness above `max_staleness` would be a bug of
    the loop, and stops it rather than train on it.
    """
    v = torch.tensor(versions)
    staleness = int(learner_version - v.min())
    if staleness > max_staleness:
        raise RuntimeError(
            f"rl step {step + 1}: samples drawn with weights v{int(v.min())} while the learner holds "
            f"v{learner_version} (staleness {staleness} > rl.async.max_staleness={max_staleness})"
        )
    return v < learner_version, staleness


def wait_until_alive(actor: Any, timeout_s: float = RESTART_TIMEOUT_S) -> dict[str, Any]:
    """Block until a restarting actor answers `ping` (returned); ActorDiedError (restarts used up) propagates."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return ray.get(actor.ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
        except ray.exceptions.ActorUnavailableError:  # "the actor is restarting": Ray does not queue calls
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class RLActors:
    """Rollout engines, policy learner group, reference, annotator and (r2m) head learner."""

    def __init__(
        self,
        cfg: RunConfig,
        policy_dir: Path,
        rm_ckpt: Path | None,
        d_policy: int,
        pad_id: int,
        restarts: dict[str, int],
    ) -> None:
        rl = cfg.rl
        self.cfg, self.rl = cfg, rl
        self.restarts = restarts  # in-place restarts per role, counted by the caller across attempts
        self.pids: dict[str, list[int]] = {}  # role -> pid of each actor's current incarnation
        self.latest: dict[str, Any] = {"ref": None, "version": 0}  # the weights every engine must serve
        self.head_version = 0  # the head version the annotator must hold (0 = its initial head)
        self.policy_version = 0  # the version of the learner's weights: the last one sent to the engines
        self.detector: list[list[float]] | None = None  # the hacking monitor the annotator must hold
        self.learner: PolicyLearnerGroup | None = None
        self.reference = self.annotator = self.head_learner = None
        # placed by rl.placement (one placement group per role) or, by default, by Ray's scheduler
        self.plan = PlacementPlan(rl)
        self.rollouts: list[Any] = []
        try:
            self._start(cfg, policy_dir, rm_ckpt, d_policy, pad_id)
        except BaseException:
            self.shutdown()  # what did start must not outlive a failed start
            raise

    def _start(self, cfg: RunConfig, policy_dir: Path, rm_ckpt: Path | None, d_policy: int, pad_id: int) -> None:
        rl, seed = cfg.rl, cfg.seed
        self.rollouts = [
            RolloutActor.options(**self.plan.options("rollout", i), max_restarts=rl.rollout.max_restarts).remote(
                str(policy_dir), rl.rollout.model_dump_json(), seed + i
            )
            for i in range(rl.rollout.num_actors)
        ]
        deadlines = {
            "start": ("rl.startup_timeout_s", rl.startup_timeout_s),
            "call": ("rl.wait_timeout_s", rl.wait_timeout_s),
        }
        self.learner = PolicyLearnerGroup(
            rl.policy, policy_dir, seed, lambda r: self.plan.options("policy", r), deadlines
        )
        self.reference = ReferenceActor.options(
            **self.plan.options("reference", 0),
            max_restarts=rl.reference_max_restarts,
            max_task_retries=rl.reference_max_restarts,  # stateless: Ray may simply run the call again
        ).remote(str(policy_dir), pad_id)
        reward, token = rl.reward, None
        if reward.mode == "remote":  # URL and token resolved here, from the driver's environment
            from r2m_ray.serving.reward_client import read_token

            reward = reward.model_copy(deep=True)
            reward.remote.url = rl.reward.remote_url()
            token = read_token(reward.remote.token_env, "rl.reward.remote.token_env")
        reward_json = reward.model_dump_json()
        self.annotator = RewardAnnotator.options(
            **self.plan.options("reward", 0), max_restarts=rl.reward.max_restarts
        ).remote(str(rm_ckpt or ""), reward_json, d_policy, cfg.data.max_length, seed, remote_token=token)
        if rl.reward.mode == "r2m":
            self.head_learner = RewardHeadLearner.options(**self.plan.options("reward", 1)).remote(
                str(rm_ckpt), reward_json, d_policy, seed
            )

    def roles(self) -> dict[str, list[Any]]:
        assert self.learner is not None
        roles = {
            "rollout": self.rollouts,
            "policy": self.learner.actors,
            "reference": [self.reference],
            "reward": [self.annotator],
        }
        if self.head_learner is not None:
            roles["reward"].append(self.head_learner)
        return roles

    def wait_ready(self, run_path: Path) -> dict[str, list[str]]:
        """Wait for every engine (model load, first compile), open the collective group if configured,
        write actors.json (node and pid of each actor); returns each role's node ids."""
        started = [r.ping.remote() for r in self.rollouts] + [self.annotator.head_version.remote()]
        get_all(
            started, "actor start-up (rollout engines, annotator)", self.rl.startup_timeout_s, "rl.startup_timeout_s"
        )
        if self.rl.rollout.weight_sync == "collective":
            assert self.learner is not None
            ro = self.rl.rollout  # each engine's tensor-parallel workers all join the group
            self.learner.init_weight_transfer(self.rollouts, ro.num_gpus_per_actor, ro.tensor_parallel_size)
        roles = self.roles()
        processes = {role: actor_processes(actors) for role, actors in roles.items()}
        self.pids.update({role: [p["pid"] for p in procs] for role, procs in processes.items()})
        # replaced in one step: operators (and tests) may be reading it
        atomic_write_text(run_path / "actors.json", json.dumps(processes, indent=1) + "\n")
        return {role: actor_nodes(actors) for role, actors in roles.items()}

    def _new_incarnation(self, role: str, index: int, actor: Any, counter: str) -> bool:
        """Wait for a failed actor; True if Ray restarted it (a new pid, counted once), False if it never died."""
        try:
            pid = wait_until_alive(actor)["pid"]
        except ACTOR_LOST as err:
            raise ActorLost(f"{role} actor {index} is gone and Ray will not restart it ({type(err).__name__})") from err
        if pid == self.pids[role][index]:
            return False
        self.restarts[counter] = self.restarts.get(counter, 0) + 1
        self.pids[role][index] = pid
        return True

    def recover_rollout(
        self,
        i: int,
        err: BaseException,
        pending: PendingGenerate | None = None,
        resubmit: Callable[[], None] | None = None,
    ) -> None:
        """Engine i failed a call: wait for its restart (its __init__ loads the initial weights), load
        the weights the call was sent with, `resubmit()` it, and leave the engine on the latest weights.

        A call sent before a weight sync and collected after it (the async loop's prefetched
        generate) is regenerated with its own, older weights; if the driver already met the new
        incarnation at that sync (`pending.pids` differ), it only needs those weights reloaded.
        """
        log.warning("rollout actor %d failed a call (%s); waiting for it to come back", i, type(err).__name__)
        latest = self.latest["version"]
        if pending is not None and pending.pids is not None and self.pids["rollout"][i] != pending.pids[i]:
            engine_version = latest  # restored to the latest weights when the driver met it
        else:
            if not self._new_incarnation("rollout", i, self.rollouts[i], "rollout"):
                raise ActorLost(
                    f"rollout actor {i} is alive but its call failed: an input's owner died ({err})"
                ) from err
            if self.rl.rollout.weight_sync == "collective":
                # a new engine cannot join the running transfer group: restart the stage (all engines, one new group)
                raise ActorLost(
                    f"rollout actor {i} restarted; weight_sync=collective re-forms its group from a checkpoint"
                )
            engine_version = 0
        want = latest if pending is None or pending.version is None else pending.version
        if want != engine_version:
            ref = self.latest["ref"] if want == latest else pending.weights_ref if pending is not None else None
            if ref is None:
                raise ActorLost(f"rollout actor {i} restarted and the weights v{want} of its lost call are gone")
            load = self.rollouts[i].update_weights.remote(ref, want, True)
            get_one(load, f"rollout actor {i} (weight reload v{want})", self.rl.wait_timeout_s)
        if resubmit is not None:
            resubmit()
        if want != latest:  # behind the regenerated call: back to what the next generate and sync expect
            load = self.rollouts[i].update_weights.remote(self.latest["ref"], latest)
            get_one(load, f"rollout actor {i} (weight reload v{latest})", self.rl.wait_timeout_s)

    def recover_annotator(self, err: BaseException) -> None:
        """Wait for Ray to restart the annotator (frozen RM + initial head), then restore the head."""
        log.warning("reward annotator failed a call (%s); waiting for it to come back", type(err).__name__)
        if not self._new_incarnation("reward", 0, self.annotator, "annotator"):
            raise ActorLost(f"the annotator is alive but its call failed: an input's owner died ({err})") from err
        if self.head_learner is not None and self.head_version > 0:
            try:
                load = self.annotator.load_head.remote(self.head_learner.head_state.remote(), self.head_version)
                get_one(load, "annotator.load_head (restore)", self.rl.wait_timeout_s)
            except ACTOR_LOST as lost:
                raise ActorLost(f"head learner lost while restoring the annotator's head ({lost})") from lost
        if self.detector is not None:
            get_one(self.annotator.set_detector.remote(self.detector), "annotator.set_detector", self.rl.wait_timeout_s)

    def annotator_call(self, method: str, *args: Any) -> Any:
        """One annotator call, repeated on the restarted actor if it died (its answers are deterministic)."""
        while True:
            try:
                return get_one(
                    getattr(self.annotator, method).remote(*args), f"annotator.{method}", self.rl.wait_timeout_s
                )
            except ACTOR_LOST as err:
                self.recover_annotator(err)

    def experience(self, samples: dict[str, list], t: int, pad_id: int) -> tuple:
        """Step t's experience of the samples: the policy's forward (old log-probs, h as refs, and the
        behaviour weights of stale rows) ‖ the reference's log-probs
        → (batch, old_logp, ref_logp, hidden_refs, async_stats)."""
        rl, learner = self.rl, self.learner
        assert learner is not None
        batch = sequence_batch(samples["prompt_ids"], samples["response_ids"], pad_id)
        ref_logp_ref = self.reference.token_logprobs.remote(
            batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        )
        stale, staleness = stale_rows(samples["weights_version"], self.policy_version, rl.async_.max_staleness, t)
        temperature = rl.rollout.temperature if bool(stale.any()) else None  # π_{t,τ} for the behaviour weights
        exp = get_all(learner.experience_async(batch, temperature), "policy learner (experience)", rl.wait_timeout_s)
        old_logp = torch.cat([e["old_logp"] for e in exp])
        async_stats = {"staleness": staleness, "stale_fraction": float(stale.float().mean())}
        if temperature is not None:
            batch["behaviour_weight"], weight_stats = behaviour_weights(
                torch.cat([e["sampler_logp"] for e in exp]),
                behaviour_logp_batch(samples["prompt_ids"], samples["response_logprobs"]),
                batch["response_mask"],
                stale,
                rl.async_.behaviour_weight_cap,
            )
            async_stats.update(weight_stats)
        ref_logp = get_one(ref_logp_ref, "reference actor", rl.wait_timeout_s)
        return batch, old_logp, ref_logp, [e["hidden_ref"] for e in exp], async_stats

    def sync_weights(self, version: int) -> None:
        """Policy weights → every engine: one broadcast (collective) or one put + a reload per engine."""
        assert self.learner is not None
        self.policy_version = version
        if self.rl.rollout.weight_sync == "collective":
            try:
                self.learner.send_weights(version)
            except ACTOR_LOST as err:
                raise ActorLost(f"weight broadcast failed ({type(err).__name__})") from err
            return
        self.latest.update(ref=self.learner.state_dict_ref(), version=version)
        syncs = [r.update_weights.remote(self.latest["ref"], version) for r in self.rollouts]
        for i, ref in enumerate(syncs):
            try:
                get_one(ref, f"rollout actor {i} (weight sync)", self.rl.wait_timeout_s)
            except ACTOR_LOST as err:
                self.recover_rollout(i, err)  # restores `latest`, i.e. this very sync

    def save(self, path: Path) -> None:
        """The actors' part of a resume checkpoint: every policy rank, and the head learner."""
        assert self.learner is not None
        self.learner.save_checkpoint(path / "policy")
        if self.head_learner is not None:
            get_all(
                [self.head_learner.save_checkpoint.remote(str(path / "head"))], "head learner", self.rl.wait_timeout_s
            )

    def restore(self, path: Path, version: int, detector: list[list[float]] | None = None) -> None:
        """Load a verified checkpoint into fresh actors: policy ranks, head learner → annotator, engines,
        and the annotator's hacking monitor."""
        assert self.learner is not None
        self.learner.load_checkpoint(path / "policy")
        if self.head_learner is not None:
            get_all(
                [self.head_learner.load_checkpoint.remote(str(path / "head"))], "head learner", self.rl.wait_timeout_s
            )
            if version > 0:  # the loop labels the annotator's head with the step that trained it
                self.head_version = version
                self.annotator_call("load_head", self.head_learner.head_state.remote(), version)
        if detector is not None:
            self.detector = detector
            self.annotator_call("set_detector", detector)
        if version > 0:
            self.sync_weights(version)

    def count_silent_restarts(self) -> None:
        """Ray restarts the reference and re-runs its call without the driver noticing: count it by pid."""
        if "reference" not in self.pids or self.reference is None:
            return
        try:
            pid = ray.get(self.reference.ping.remote(), timeout=60)["pid"]
        except ray.exceptions.RayError:  # gone for good: the attempt is over anyway
            return
        if pid != self.pids["reference"][0]:
            self.restarts["reference"] = self.restarts.get("reference", 0) + 1
            self.pids["reference"][0] = pid

    def shutdown(self) -> None:
        """Kill every actor and remove the placement groups."""
        for actor in [*self.rollouts, self.reference, self.annotator, self.head_learner]:
            if actor is not None:
                ray.kill(actor)
        if self.learner is not None:
            self.learner.shutdown()
        self.plan.remove()
