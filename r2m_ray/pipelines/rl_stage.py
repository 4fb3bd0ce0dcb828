"""RL stage driver (R2M, ALGORITHMS.md §3–4), read top to bottom.

Per step t of T:
  generate    n prompts × K samples on the RolloutActors (streamed with ray.wait)
  experience  ONE policy forward: old log-probs + hidden states h (ObjectRefs, never fetched
              here); reference per-token log-probs for the KL, concurrently
  annotate    RewardAnnotator: frozen RM → RTE (cached) ⊕ R2M head(h, ω(t)) → rewards
  advantages  GRPO (group-normalised) or RLOO (leave-one-out) over each prompt's K samples
  policy      k epochs of the clipped ratio loss + KL; the last epoch refreshes h → h'
  sync        policy weights → every RolloutActor (object store, or a broadcast from rank 0)
  head        RewardHeadLearner: one GREBT update on h' with the annotation-time winners/losers;
              it and its load into the annotator overlap the next step's generate (actor
              calls keep their order, so the next annotate sees the new head)
and logs, on the step's own samples: the reward the policy optimised, the frozen RM's reward,
gold and its parts, per-token and per-sequence KL, within-group order agreement with gold,
the share of reward-hacked samples (rl_measure.py); RM accuracy on gold-labelled held-out
pairs with and without policy feedback every rl.eval_every steps; wall time per phase; and
at the end the final policy's gold win rate against the starting policy on held-out prompts.

rl.async.max_staleness=1 (one-step-off): step t+1's generate starts as soon as step t's samples
are in, on the engines' weights of then (step t−1's update), and runs while step t computes
experience, rewards and its policy epochs; the weight sync after step t reaches each engine
after that generate (an actor runs its calls in order). The policy loss reweights the stale
samples by min(π_{t,τ}/μ, C) (algos/policy_loss.py); the experience forward, and so R2M's
feedback h, is the current policy's. Each step logs the staleness the engines report.

rl.reward.mode: `frozen` (the RM), `r2m` (the RM + the R2M head on policy feedback), `gold`
(the world's gold reward: the upper bound), `remote` (a served RM), `function` (a Python function).
rl.reward.r2m.labels=oracle picks GREBT's winner/loser by gold instead of the annotation-time rewards.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset

from r2m_ray.actors.policy_learner import PolicyLearnerGroup
from r2m_ray.actors.reward_head_learner import self_labelled_groups
from r2m_ray.algos.policy_loss import group_advantages
from r2m_ray.atomic_write import atomic_write_text
from r2m_ray.config import RunConfig
from r2m_ray.data.tokenize import load_prompts, tokenize_prompts
from r2m_ray.eval.rl_metrics import label_accuracy, sequence_kl
from r2m_ray.models.registry import hidden_size, load_tokenizer
from r2m_ray.pipelines.group_filter import Draw, fill_informative, filter_totals
from r2m_ray.pipelines.preflight import preflight_rl
from r2m_ray.pipelines.rl_actors import (
    ACTOR_LOST,
    STAGE_LOST,
    ActorLost,
    PendingGenerate,
    RLActors,
    collect_generate,
    get_all,
    get_one,
    sequence_batch,
    submit_generate,
)
from r2m_ray.pipelines.rl_measure import (
    RLEvalData,
    best_per_owner,
    detector_metrics,
    gold_step_metrics,
    heldout_gold,
    optimal_rows,
    plot_gold_vs_proxy,
    split_eval_data,
    win_rate,
)
from r2m_ray.placement import role_demands
from r2m_ray.ray_setup import check_demands
from r2m_ray.rl_checkpoint import CheckpointStore, DriverState
from r2m_ray.run_inputs import sha256_path
from r2m_ray.rundir import RunDir
from r2m_ray.serving.reward_function import reward_digest, reward_source, row_columns
from r2m_ray.world.gold import gold_rewards

log = logging.getLogger(__name__)
PHASES = ("generate", "experience", "annotate", "policy", "sync", "head", "eval")


def run_rl_stage(
    cfg: RunConfig,
    run: RunDir,
    policy_dir: Path,
    rm_ckpt: Path | None,
    world_paths: dict[str, Path],
    resume: bool = False,
) -> dict[str, Any]:
    """The online stage; returns its summary.

    `resume`: continue from the newest checkpoint under rl.checkpoint.dir (verified first).
    An actor Ray cannot restart in place restarts the stage from the last checkpoint, at most
    rl.max_stage_restarts times.
    """
    rl = cfg.rl
    external = rl.reward.external()  # a server's RM or a reward function: no checkpoint here
    rm_ckpt = None if external else rm_ckpt
    preflight_rl(cfg, policy_dir, rm_ckpt)  # before any actor: a bad model fails here, by name
    tokenizer = load_tokenizer(policy_dir)
    pad_id = tokenizer.pad_token_id
    prompt_src = cfg.data.prompts or str(world_paths["rl_prompts"])
    prompts = tokenize_prompts(load_prompts(prompt_src, cfg.data), tokenizer, cfg.data)
    if len(prompts) < rl.prompts_per_step:
        raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step} but only {len(prompts)} usable prompts")
    if cfg.data.prompts is not None and (rl.reward.mode == "gold" or rl.reward.r2m.labels == "oracle"):
        raise ValueError(
            "rl.reward.mode=gold and rl.reward.r2m.labels=oracle need the world's gold reward: "
            "they work on the world's prompts only (leave data.prompts unset)"
        )
    prompts, evals = split_eval_data(cfg, world_paths, tokenizer, prompts)
    check_demands("rl", role_demands(rl))  # every role, alone on a node and all together: no actor waits forever
    d_policy = hidden_size(policy_dir)
    # the starting policy and RM are hashed once; a resume refuses them if they changed at the same path
    rm_digest = reward_digest(rl.reward, rm_ckpt)
    inputs = {"policy checkpoint": sha256_path(policy_dir), "reward-model checkpoint": rm_digest}
    store = CheckpointStore(
        Path(rl.checkpoint.dir or run.path / "checkpoints" / "rl"), rl.checkpoint.keep_last, run.run_id, inputs
    )
    store.recover()
    ckpt, state, resumed_from = None, DriverState(step=0), None
    if resume:
        ckpt = store.latest()
        if ckpt is None:
            log.warning("resume: no RL checkpoint under %s; the RL stage starts from step 0", store.root)
        else:
            state = store.verify(ckpt, cfg)  # every file re-hashed, config compared: before any actor starts
            resumed_from = state.step
            log.info("resume: RL stage continues after step %d from %s", state.step, ckpt)
        run.rewind("rl", state.step)
    restarts = {"rollout": 0, "annotator": 0, "reference": 0, **state.actor_restarts}
    stage_restarts = state.stage_restarts

    # one attempt: start every actor, restore the checkpoint (if any), run the remaining steps.
    # An actor lost for good ends the attempt; the next one starts from the last checkpoint.
    while True:
        actors = None
        try:
            tick = time.perf_counter()
            actors = RLActors(cfg, policy_dir, rm_ckpt, d_policy, pad_id, restarts)
            # actor construction is asynchronous: wait for every engine here so that start-up
            # (model load, vLLM's first compile) is reported apart from the first step's generate
            placement = actors.wait_ready(run.path)
            if ckpt is not None:
                actors.restore(ckpt, state.step, state.detector)
            state.startup_seconds += time.perf_counter() - tick
            state.stage_restarts, state.actor_restarts = stage_restarts, restarts
            train_steps(cfg, run, actors, store, state, prompts, evals, pad_id)
            assert actors.learner is not None
            actors.learner.save(run.path / "checkpoints" / "policy", tokenizer_dir=policy_dir)
            break
        except (ActorLost, *STAGE_LOST) as err:
            if stage_restarts >= rl.max_stage_restarts:
                raise ActorLost(
                    f"rl stage stopped: an actor was lost for good after {stage_restarts} stage restart(s) "
                    f"(rl.max_stage_restarts={rl.max_stage_restarts}): {err}"
                ) from err
            stage_restarts += 1
            ckpt = store.latest()
            state = store.verify(ckpt, cfg) if ckpt is not None else DriverState(step=0)
            dropped = run.rewind("rl", state.step)
            log.warning(
                "rl stage restart %d/%d after %s: from %s (step %d; %d logged rows dropped)",
                stage_restarts,
                rl.max_stage_restarts,
                err,
                ckpt or "the start",
                state.step,
                dropped,
            )
        finally:
            if actors is not None:
                actors.count_silent_restarts()
                actors.shutdown()

    history = state.history
    if not history:
        raise FloatingPointError(f"rl stage: every one of the {rl.steps} steps was skipped ({state.skipped})")
    if cfg.data.prompts is None:  # gold rewards exist for the world's prompts only
        plot_gold_vs_proxy(history, run.path / "plots")
    summary = {
        "mode": rl.reward.mode,
        "algo": rl.policy.algo,
        "policy_start": str(policy_dir),  # what the run started from (eval feedback reads them back)
        "reward_checkpoint": reward_source(rl.reward, rm_ckpt),
        "steps": rl.steps,
        "max_staleness": rl.async_.max_staleness,
        "gold_reward": {"initial": history[0].get("gold_reward"), "final": history[-1].get("gold_reward")},
        "proxy_reward": {"initial": history[0]["proxy_reward"], "final": history[-1]["proxy_reward"]},
        "kl": {"final": history[-1]["kl"]},
        "kl_seq": {"final": history[-1]["kl_seq"]},
        "frozen_rm_reward": {"initial": history[0]["frozen_rm_reward"], "final": history[-1]["frozen_rm_reward"]},
        # at t = 0 ω = 1, so the reward has no feedback path: one "before" number for both
        "rm_accuracy": {"before": state.acc_before, "after": history[-1]["rm_accuracy_feedback"]},
        "rm_accuracy_no_feedback": {"before": state.acc_before, "after": history[-1]["rm_accuracy_no_feedback"]},
        "winrate_vs_start": state.winrate,
        "tokens_per_second": state.tokens_total / max(state.seconds, 1e-9),
        "phase_seconds": {p: sum(h["phase_seconds"][p] for h in history) for p in PHASES},
        "seconds": state.seconds,
        "startup_seconds": state.startup_seconds,
        "checkpoint_seconds": state.checkpoint_seconds,
        "skipped": state.skipped,
        "filter": filter_totals(history) if rl.filter.zero_variance_groups else None,
        "actor_restarts": restarts,
        "stage_restarts": stage_restarts,
        "resumed_from_step": resumed_from,
        "placement": placement,
    }
    run.update_summary("rl", summary)
    return summary


def train_steps(
    cfg: RunConfig,
    run: RunDir,
    actors: RLActors,
    store: CheckpointStore,
    state: DriverState,
    prompts: Dataset,
    evals: RLEvalData,
    pad_id: int,
) -> None:
    """Steps state.step … rl.steps−1 with the given actors; `state` is updated in place and saved
    with every checkpoint."""
    rl, seed = cfg.rl, cfg.seed
    K, T, mode, r2m = rl.rollout.samples_per_prompt, rl.steps, rl.reward.mode, rl.reward.r2m
    learner, reference, head_learner = actors.learner, actors.reference, actors.head_learner
    assert learner is not None and reference is not None
    has_gold = cfg.data.prompts is None
    heldout = evals.heldout
    feedback_path = mode == "r2m" and not r2m.iterative  # the reward reads policy hidden states
    monitor = rl.hacking_monitor and heldout is not None  # the hidden-state detector of reward hacking
    heldout_batch = sequence_batch(*evals.heldout_rows, pad_id) if evals.heldout_rows is not None else None
    async_rollout = rl.async_.max_staleness > 0

    def rm_accuracy_refs(t: int) -> dict[str, tuple] | None:
        """Held-out RM accuracy at ω(t), left running: without feedback, and (when the reward reads it)
        with the current policy's hidden states of the held-out pairs → {name: (ref, call args)}. The
        same states recalibrate the hacking monitor."""
        if heldout is None:
            return None
        args = (heldout["prompt_messages"], heldout["chosen"], heldout["rejected"])
        calls = {"no_feedback": (*args, None, t, T)}
        with_feedback = feedback_path and t > 0  # at t = 0, ω = 1: the feedback path has no weight
        if with_feedback or monitor:
            assert heldout_batch is not None
            exp = get_all(
                learner.experience_async(heldout_batch), "policy learner (held-out feedback)", rl.wait_timeout_s
            )
            hidden = [e["hidden_ref"] for e in exp]
            if with_feedback:
                calls["feedback"] = (*args, hidden, t, T)
        refs = {name: (actors.annotator.pairwise_accuracy.remote(*a), a) for name, a in calls.items()}
        if monitor:  # after the accuracy calls: annotate sees the new detector from the next step on
            refs["detector"] = (actors.annotator.fit_detector.remote(*args, hidden), (*args, hidden))
        return refs

    def collect_accuracy(refs: dict[str, tuple] | None) -> dict[str, float | None]:
        out: dict[str, Any] = {"rm_accuracy_feedback": None, "rm_accuracy_no_feedback": None}
        for name, (ref, call_args) in (refs or {}).items():
            method, key = (
                ("fit_detector", "detector_calibration")
                if name == "detector"
                else ("pairwise_accuracy", f"rm_accuracy_{name}")
            )
            try:
                out[key] = get_one(ref, f"annotator.{method}", rl.wait_timeout_s)
            except ACTOR_LOST as err:  # a restarted annotator lost its detector too: calibrate again
                actors.recover_annotator(err)
                out[key] = actors.annotator_call(method, *call_args)
        if "detector_calibration" in out:  # kept by the driver (checkpoints, restarts), not logged
            state.detector = actors.detector = out["detector_calibration"].pop("prototypes")
        if refs and "feedback" not in refs:  # the reward has no feedback path: one number for both
            out["rm_accuracy_feedback"] = out["rm_accuracy_no_feedback"]
        return out

    def finish_step(t: int, metrics: dict[str, Any], head_refs: list, acc_refs: Any) -> None:
        """Log step t once its head update and RM evaluation (left running) are done."""
        tick = time.perf_counter()
        metrics["step"] = t + 1
        metrics["head"] = get_all(head_refs[:1], "head learner", rl.wait_timeout_s)[0] if head_refs else {}
        try:
            for ref in head_refs[1:]:  # the annotator's load_head; raises a failed load
                get_one(ref, "annotator.load_head", rl.wait_timeout_s)
        except ACTOR_LOST as err:
            actors.recover_annotator(err)  # the restarted annotator gets the latest head
        metrics["phase_seconds"]["head"] += time.perf_counter() - tick
        tick = time.perf_counter()
        metrics.update(collect_accuracy(acc_refs))
        metrics["phase_seconds"]["eval"] += time.perf_counter() - tick
        metrics["tokens_per_second"] = metrics["n_tokens"] / max(sum(metrics["phase_seconds"].values()), 1e-9)
        state.history.append(metrics)
        run.log("rl", t + 1, metrics)
        log.info(
            "rl step %d/%d reward %.3f frozen RM %.3f gold %s seq KL %.3f len %.1f (%.1fs)",
            t + 1,
            T,
            metrics["proxy_reward"],
            metrics["frozen_rm_reward"],
            f"{metrics.get('gold_reward', float('nan')):.3f}",
            metrics["kl_seq"],
            metrics["response_length"],
            sum(metrics["phase_seconds"].values()),
        )

    def skip_step(t: int, reason: str, detail: str, phase: dict[str, float]) -> None:
        """Count and log a skipped step; stop the run after rl.max_nonfinite_steps in a row."""
        state.skipped[reason] = state.skipped.get(reason, 0) + 1
        state.nonfinite_in_a_row += 1
        run.log("rl", t + 1, {"skipped": reason, "detail": detail, "phase_seconds": phase})
        log.warning("rl step %d/%d skipped (%s): %s", t + 1, T, reason, detail)
        if state.nonfinite_in_a_row >= rl.max_nonfinite_steps:
            raise FloatingPointError(
                f"rl stage stopped at step {t + 1}: {state.nonfinite_in_a_row} steps in a row skipped for NaN/inf "
                f"(last: {detail}; rl.max_nonfinite_steps={rl.max_nonfinite_steps}); check the reward model "
                "checkpoint and rl.policy.optim.lr"
            )

    def save_checkpoint(t: int, elapsed: float) -> None:
        """Everything step t+1 needs, written atomically (rl_checkpoint.py)."""
        tick = time.perf_counter()
        state.step, state.seconds = t + 1, elapsed
        staging = store.staging(t + 1)
        actors.save(staging)
        atomic_write_text(staging / "driver.json", state.to_json())
        store.commit(staging, t + 1, cfg)
        state.checkpoint_seconds += time.perf_counter() - tick

    if state.step == 0 and state.acc_before is None and heldout is not None:
        state.acc_before = collect_accuracy(rm_accuracy_refs(0))["rm_accuracy_no_feedback"]
    winrate_ids = evals.winrate_prompts["prompt_input_ids"] if evals.winrate_prompts is not None else None
    if winrate_ids is not None and state.step == 0 and state.winrate_start_gold is None:  # engines: the start
        state.winrate_start_gold = heldout_gold(actors, evals.winrate_prompts, cfg)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()

    def step_prompts(t: int) -> tuple[list[int], Dataset]:
        """Step t's prompts: a function of t, so a resume repeats them."""
        idx = [order[(t * rl.prompts_per_step + i) % len(order)] for i in range(rl.prompts_per_step)]
        return idx, prompts.select(idx)

    def submit(t: int, rows: Dataset | None = None) -> PendingGenerate:
        """Start step t's generate (its sampling seed is a function of t) on the engines' current weights;
        `rows`: step t's prompts when the caller has them already."""
        ids = (rows if rows is not None else step_prompts(t)[1])["prompt_input_ids"]
        weights = (actors.latest["version"], actors.latest["ref"])
        return submit_generate(actors.rollouts, ids, cfg, t, actors.pids["rollout"], weights)

    def collect(pending: PendingGenerate) -> dict[str, list]:
        return collect_generate(pending, actors.rollouts, cfg, actors.recover_rollout)

    def annotate(rows: Dataset, samples: dict[str, list], hidden_refs: list, t: int) -> Draw:
        """The annotator's rewards of the samples; the reward optimised is gold itself in mode `gold`."""
        msgs = [rows["prompt_messages"][i] for i in samples["prompt_index"]]
        feedback_refs = hidden_refs if mode == "r2m" or monitor else None
        columns = row_columns(rows, samples["prompt_index"]) if mode == "function" else None
        ann = actors.annotator_call("annotate", msgs, samples["text"], feedback_refs, t, T, columns)
        rewards = ann["rewards"]
        if mode == "gold":
            texts = [m[-1]["content"] for m in msgs]
            rewards = torch.tensor(gold_rewards(texts, samples["text"], cfg.world), dtype=torch.float64).float()
        return Draw(rows, samples, ann, rewards)

    def draw_more(t: int, r: int, n: int, phase: dict[str, float]) -> Draw:
        """Refill round r of step t: n prompts drawn (a function of t and r, so a resume repeats them),
        generated, experienced and annotated on the current weights."""
        pick = torch.Generator().manual_seed(seed * 1_000_003 + t * 1_009 + r)
        more = prompts.select(torch.randperm(len(prompts), generator=pick)[:n].tolist())
        tick = time.perf_counter()
        weights = (actors.latest["version"], actors.latest["ref"])
        pending = submit_generate(
            actors.rollouts, more["prompt_input_ids"], cfg, t + r * 1_000_000, actors.pids["rollout"], weights
        )
        samples = collect(pending)
        phase["generate"] += time.perf_counter() - tick
        tick = time.perf_counter()
        _, _, _, hidden_refs, _ = actors.experience(samples, t, pad_id)
        phase["experience"] += time.perf_counter() - tick
        tick = time.perf_counter()
        out = annotate(more, samples, hidden_refs, t)
        phase["annotate"] += time.perf_counter() - tick
        return out

    if async_rollout and rl.rollout.weight_sync == "object_store" and actors.latest["ref"] is None:
        # the starting weights as an object: a restarted engine may have to regenerate with them
        actors.latest.update(ref=learner.state_dict_ref(), version=actors.policy_version)
    unfinished: tuple | None = None  # (t, metrics, head refs, accuracy ref) of the previous step
    in_flight: PendingGenerate | None = None  # async: the next step's generate, running during this step
    seconds_before, t_start = state.seconds, time.perf_counter()
    every = rl.checkpoint.every
    for t in range(state.step, T):
        phase: dict[str, float] = {}
        tick = time.perf_counter()
        # 1. generate. Synchronous: now, with the weights this step trains. Async (max_staleness=1):
        # it was started during step t−1 on the engines' weights then, those of step t−1; a resume
        # finds those samples in the checkpoint (state.pending), as the engines now hold newer ones
        idx, rows = step_prompts(t)
        if state.pending is not None:
            samples, state.pending = state.pending, None
        else:
            samples = collect(in_flight if in_flight is not None else submit(t, rows))
        in_flight = submit(t + 1) if async_rollout and t + 1 < T else None
        phase["generate"] = time.perf_counter() - tick
        if unfinished is not None:  # the last step's head update and evaluation ran during generate
            finish_step(*unfinished)
            unfinished = None
        tick = time.perf_counter()
        # 2. experience: one policy forward (old log-probs + h as refs) ‖ reference log-probs
        batch, old_logp, ref_logp, hidden_refs, async_stats = actors.experience(samples, t, pad_id)
        phase["experience"], tick = time.perf_counter() - tick, time.perf_counter()
        # 3. annotate (the annotator runs the previous step's load_head first: actor calls keep order)
        draw = annotate(rows, samples, hidden_refs, t)
        phase["annotate"] = time.perf_counter() - tick
        filter_stats = None
        if rl.filter.zero_variance_groups and not draw.ann["nonfinite"]:
            # DAPO: tied groups out, groups of new prompts in; their time is added to each phase
            n_rounds = rl.filter.max_refill_rounds
            draw, filter_stats = fill_informative(draw, K, len(idx), n_rounds, partial(draw_more, t, phase=phase))
            if filter_stats["tied_groups"]:  # a new batch: its own forward, as the policy trains on it
                tick = time.perf_counter()
                batch, old_logp, ref_logp, hidden_refs, async_stats = actors.experience(draw.samples, t, pad_id)
                phase["experience"] += time.perf_counter() - tick
        tick = time.perf_counter()
        rows, samples, ann, rewards = draw.rows, draw.samples, draw.ann, draw.rewards
        msgs = [rows["prompt_messages"][i] for i in samples["prompt_index"]]
        n_tokens = int(batch["response_mask"].sum())
        state.tokens_total += n_tokens
        texts = [m[-1]["content"] for m in msgs]
        if has_gold:  # the frozen RM also scores each prompt's gold-optimal answers (the hacking line)
            owners, opt_msgs, opt_texts = optimal_rows(rows["prompt"], cfg)
            opt_rewards = actors.annotator_call("frozen_rm_rewards", opt_msgs, opt_texts)
            best = best_per_owner(opt_rewards, owners, len(rows))[torch.tensor(samples["prompt_index"])]
            gold, hacked, gold_metrics = gold_step_metrics(
                texts, samples["text"], None if mode == "gold" else ann["rewards"], ann["frozen_rewards"], best, K, cfg
            )
        phase["annotate"] += time.perf_counter() - tick
        tick = time.perf_counter()
        if ann["nonfinite"]:  # nothing is learned from this batch: no policy, head or weight update
            detail = f"{ann['nonfinite']}/{len(rewards)} rewards are NaN/inf (rows {ann['nonfinite_rows']})"
            skip_step(t, "nonfinite_rewards", detail, phase)
            continue
        # 4-5. advantages and k policy epochs (the last refreshes h → h')
        batch.update(advantages=group_advantages(rewards, K, rl.policy.algo), old_logp=old_logp, ref_logp=ref_logp)
        per_rank = get_all(learner.train_async(batch, rl.policy.epochs), "policy learner (train)", rl.wait_timeout_s)
        new_hidden_refs = [s.pop("hidden_ref") for s in per_rank]
        policy_stats = PolicyLearnerGroup.reduce_metrics(per_rank)
        phase["policy"], tick = time.perf_counter() - tick, time.perf_counter()
        state.skipped["nonfinite_loss_microbatches"] = state.skipped.get("nonfinite_loss_microbatches", 0) + int(
            policy_stats.get("nonfinite_skipped", 0)
        )
        if "loss" not in policy_stats:  # every micro-batch was skipped: the weights did not move
            skip_step(t, "nonfinite_loss", "every policy micro-batch had a NaN/inf loss", phase)
            continue
        state.nonfinite_in_a_row = 0
        # 6. sync: policy weights to every engine
        actors.sync_weights(t + 1)
        phase["sync"], tick = time.perf_counter() - tick, time.perf_counter()
        # 7. GREBT head update on h', winners/losers from the annotation-time rewards (or, as the
        # oracle control, from gold). Not awaited: it runs while the next step generates; the
        # annotator loads the new head before it annotates again (actor calls keep their order).
        # Its wait, if any, is counted as "head" time when the next step collects it.
        head_refs = []
        if head_learner is not None:
            labels = gold if r2m.labels == "oracle" else rewards
            winner, loser, informative = self_labelled_groups(labels, K)
            keep = informative if r2m.skip_tied_groups else None
            if has_gold:
                gold_metrics["grebt_label_accuracy"] = label_accuracy(gold.view(-1, K), winner, loser, keep)
            head_refs.append(head_learner.update.remote(ann["rte"], new_hidden_refs, K, winner, loser, t, T, keep))
            head_refs.append(actors.annotator.load_head.remote(head_learner.head_state.remote(), t + 1))
            actors.head_version = t + 1
        phase["head"] = time.perf_counter() - tick
        # 8. metrics; logged when the head update and evaluation are done (next step or the end)
        response_mask = batch["response_mask"]
        metrics = {
            "proxy_reward": float(rewards.mean()),  # the reward the policy optimised
            "frozen_rm_reward": float(ann["frozen_rewards"].mean()),
            "kl": policy_stats.get("kl", float("nan")),  # per token, over the training epochs
            "kl_seq": sequence_kl(old_logp, ref_logp, response_mask, "k3"),  # the sampling policy's
            "kl_seq_k1": sequence_kl(old_logp, ref_logp, response_mask, "k1"),
            "entropy": policy_stats.get("entropy"),
            "response_length": n_tokens / len(samples["text"]),
            "omega": ann.get("omega"),
            "phase_seconds": phase,
            "n_tokens": n_tokens,
            "policy": policy_stats,
            **async_stats,
        }
        if filter_stats is not None:
            metrics["filter"] = filter_stats
        if has_gold:
            metrics.update(gold_metrics)
        if ann["hacking_flags"] is not None:
            metrics.update(detector_metrics(ann["hacking_flags"], hacked if has_gold else None))
        evaluate = (t + 1) % rl.eval_every == 0 or t + 1 == T
        tick = time.perf_counter()  # the held-out evaluation: a policy forward over its pairs, then left running
        unfinished = (t, metrics, head_refs, rm_accuracy_refs(t + 1) if evaluate else None)
        phase["eval"] = time.perf_counter() - tick
        # 9. checkpoint: the step is finished first (its head update is part of the state)
        if every and ((t + 1) % every == 0 or t + 1 == T):
            finish_step(*unfinished)
            unfinished = None
            if in_flight is not None:  # the next step's samples, drawn with weights no checkpoint holds
                state.pending, in_flight = collect(in_flight), None
            save_checkpoint(t, seconds_before + time.perf_counter() - t_start)
    if unfinished is not None:
        finish_step(*unfinished)
    if winrate_ids is not None and state.winrate_start_gold is not None and state.winrate is None:
        final_gold = heldout_gold(actors, evals.winrate_prompts, cfg)
        start, final = torch.tensor(state.winrate_start_gold), torch.tensor(final_gold)
        state.winrate = {
            "win_rate": win_rate(final, start),
            "gold_start": float(start.mean()),
            "gold_final": float(final.mean()),
            "prompts": len(final_gold),
            # [P][K] gold of each sample, for paired per-prompt analyses (and to recompute the rate)
            "gold_start_per_prompt": state.winrate_start_gold,
            "gold_final_per_prompt": final_gold,
        }
    state.step, state.seconds = T, seconds_before + time.perf_counter() - t_start
