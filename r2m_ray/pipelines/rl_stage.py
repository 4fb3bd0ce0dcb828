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
and logs proxy reward, gold reward, their gap, KL, length, entropy, RM accuracy on
gold-labelled held-out pairs, and wall time per phase.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from r2m_ray.actors.policy_learner import PolicyLearnerGroup
from r2m_ray.actors.reference import ReferenceActor
from r2m_ray.actors.reward_annotator import RewardAnnotator
from r2m_ray.actors.reward_head_learner import RewardHeadLearner
from r2m_ray.actors.rollout import RolloutActor
from r2m_ray.algos.policy_loss import grpo_advantages, rloo_advantages
from r2m_ray.algos.r2m import self_labelled_pairs
from r2m_ray.config import RunConfig
from r2m_ray.data.collate import pad_ids
from r2m_ray.data.preference import load_preferences
from r2m_ray.data.tokenize import load_prompts, tokenize_prompts
from r2m_ray.eval.plots import plot_curve
from r2m_ray.models.registry import load_tokenizer
from r2m_ray.pipelines.preflight import preflight_rl
from r2m_ray.placement import PlacementPlan, actor_nodes, actor_processes
from r2m_ray.ray_setup import check_resources
from r2m_ray.rundir import RunDir
from r2m_ray.world import gold_rewards

log = logging.getLogger(__name__)
PHASES = ("generate", "experience", "annotate", "policy", "sync", "head")


ACTOR_LOST = (ray.exceptions.ActorDiedError, ray.exceptions.ActorUnavailableError)
RESTART_TIMEOUT_S = 600  # a restarted engine reloads its model (and may recompile) before it answers


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


def generate(
    rollouts: list,
    prompt_ids: list[list[int]],
    cfg: RunConfig,
    step: int,
    recover: Callable[[int], None] | None = None,
) -> dict[str, list]:
    """Spread prompts over the rollout actors; collect as each finishes (ray.wait); prompt order kept.

    When an engine dies mid-call, `recover(i)` waits for Ray to restart actor i and restores
    its weights, and the same chunk is sent again with the same seed: the step's samples are
    the ones it would have had, none lost and none twice.
    """
    ro = cfg.rl.rollout
    chunks = [list(range(i, len(prompt_ids), len(rollouts))) for i in range(len(rollouts))]

    def submit(i: int) -> ray.ObjectRef:
        return rollouts[i].generate.remote(
            [prompt_ids[j] for j in chunks[i]],
            ro.samples_per_prompt,
            ro.temperature,
            ro.top_p,
            ro.max_new_tokens,
            cfg.seed * 100_003 + step,
        )

    pending = {submit(i): i for i in range(len(rollouts)) if chunks[i]}
    rows: list[tuple[int, int, dict]] = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except ACTOR_LOST:
            if recover is None:
                raise
            recover(i)
            pending[submit(i)] = i
            continue
        for j in range(len(out["prompt_index"])):
            row = {k: v[j] for k, v in out.items()}
            rows.append((chunks[i][row["prompt_index"]], row["sample_index"], row))
    rows.sort(key=lambda r: (r[0], r[1]))  # groups of K consecutive rows, one group per prompt
    return {k: [r[2][k] if k != "prompt_index" else r[0] for r in rows] for k in rows[0][2]}


def sequence_batch(prompt_ids: list[list[int]], response_ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded prompt+response ids with attention and response masks."""
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    ids, attn = pad_ids(seqs, pad_id, side="right")
    resp, _ = pad_ids([[0] * len(p) + [1] * len(r) for p, r in zip(prompt_ids, response_ids)], 0, side="right")
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


def heldout_pairs(cfg: RunConfig, world_paths: dict[str, Path], n: int) -> dict[str, list] | None:
    """Gold-labelled held-out pairs (the world's test_id), oriented so 'chosen' is gold-better."""
    if n == 0 or "test_id" not in world_paths:
        return None
    ds = load_preferences(str(world_paths["test_id"]), cfg.data, split="rl_heldout").dataset
    ds = ds.filter(lambda r: r["gold_chosen"] != r["gold_rejected"]).select(range(min(n, len(ds))))
    better_c = [gc > gr for gc, gr in zip(ds["gold_chosen"], ds["gold_rejected"])]
    return {
        "prompt_messages": ds["prompt_messages"],
        "chosen": [c if b else r for c, r, b in zip(ds["chosen"], ds["rejected"], better_c)],
        "rejected": [r if b else c for c, r, b in zip(ds["chosen"], ds["rejected"], better_c)],
    }


def advantages(rewards: torch.Tensor, k: int, algo: str) -> torch.Tensor:
    """Per-sequence advantages from rewards grouped K per prompt."""
    grouped = rewards.view(-1, k)
    adv = grpo_advantages(grouped) if algo == "grpo" else rloo_advantages(grouped)
    return adv.reshape(-1)


def run_rl_stage(
    cfg: RunConfig, run: RunDir, policy_dir: Path, rm_ckpt: Path, world_paths: dict[str, Path]
) -> dict[str, Any]:
    """The online stage; returns its summary."""
    rl, seed = cfg.rl, cfg.seed
    preflight_rl(cfg, policy_dir, rm_ckpt)  # before any actor: a bad model fails here, by name
    tokenizer = load_tokenizer(policy_dir)
    pad_id = tokenizer.pad_token_id
    prompt_src = cfg.data.prompts or str(world_paths["rl_prompts"])
    prompts = tokenize_prompts(load_prompts(prompt_src, cfg.data), tokenizer, cfg.data)
    if len(prompts) < rl.prompts_per_step:
        raise ValueError(f"rl.prompts_per_step={rl.prompts_per_step} but only {len(prompts)} usable prompts")
    has_gold = cfg.data.prompts is None
    K, T = rl.rollout.samples_per_prompt, rl.steps
    mode = rl.reward.mode
    check_resources(
        "rl.rollout (RolloutActor)", rl.rollout.num_actors, rl.rollout.num_cpus_per_actor, rl.rollout.num_gpus_per_actor
    )
    d_policy = json.loads((policy_dir / "config.json").read_text())["hidden_size"]

    # actors: rollout engines, policy learner group, reference, annotator, head learner; placed
    # by rl.placement (one placement group per role) or, by default, by Ray's scheduler
    plan = PlacementPlan(rl)
    rollouts = [
        RolloutActor.options(**plan.options("rollout", i), max_restarts=rl.rollout.max_restarts).remote(
            str(policy_dir), rl.rollout.model_dump_json(), seed + i
        )
        for i in range(rl.rollout.num_actors)
    ]
    latest: dict[str, Any] = {"ref": None, "version": 0}  # the weights every engine must serve
    restarts = {"rollout": 0, "annotator": 0}
    pids: dict[str, list[int]] = {}  # role -> pid of each actor's current incarnation
    head_loaded = {"version": 0}  # the head version the annotator must hold (0 = its initial head)

    def recover_rollout(i: int) -> None:
        """Wait for Ray to restart engine i (its __init__ loads the initial weights), then restore the latest."""
        log.warning("rollout actor %d failed a call; waiting for it to come back", i)
        if rl.rollout.weight_sync == "collective":
            raise RuntimeError(
                "a rollout actor died and rl.rollout.weight_sync=collective cannot re-admit a restarted engine "
                "into the transfer group yet; use weight_sync=object_store for restartable engines"
            )
        pid = wait_until_alive(rollouts[i])["pid"]
        if pid != pids["rollout"][i]:  # counted once per new incarnation, however many calls failed
            restarts["rollout"] += 1
            pids["rollout"][i] = pid
        if latest["version"] > 0:
            ray.get(rollouts[i].update_weights.remote(latest["ref"], latest["version"]))

    # everything started from here on is stopped in `finally`, also when a step fails
    learner = reference = annotator = head_learner = None
    try:
        learner = PolicyLearnerGroup(rl.policy, policy_dir, seed, lambda r: plan.options("policy", r))
        reference = ReferenceActor.options(**plan.options("reference", 0)).remote(str(policy_dir), pad_id)
        reward_json = rl.reward.model_dump_json()
        annotator = RewardAnnotator.options(**plan.options("reward", 0), max_restarts=rl.reward.max_restarts).remote(
            str(rm_ckpt), reward_json, d_policy, cfg.data.max_length, seed
        )
        if mode == "r2m":
            head_learner = RewardHeadLearner.options(**plan.options("reward", 1)).remote(
                str(rm_ckpt), reward_json, d_policy, seed
            )
        heldout = heldout_pairs(cfg, world_paths, rl.heldout_pairs)

        def recover_annotator() -> None:
            """Wait for Ray to restart the annotator (frozen RM + initial head), then restore the head."""
            log.warning("reward annotator failed a call; waiting for it to come back")
            pid = wait_until_alive(annotator)["pid"]
            if pid != pids["reward"][0]:
                restarts["annotator"] += 1
                pids["reward"][0] = pid
            if head_learner is not None and head_loaded["version"] > 0:
                ray.get(annotator.load_head.remote(head_learner.head_state.remote(), head_loaded["version"]))

        def annotator_call(method: str, *args: Any) -> Any:
            """One annotator call, repeated on the restarted actor if it died (its answers are deterministic)."""
            while True:
                try:
                    return ray.get(getattr(annotator, method).remote(*args))
                except ACTOR_LOST:
                    recover_annotator()

        def rm_accuracy_ref(t: int) -> ray.ObjectRef | None:
            if heldout is None:
                return None
            return annotator.pairwise_accuracy.remote(
                heldout["prompt_messages"], heldout["chosen"], heldout["rejected"], None, t, T
            )

        def finish_step(t: int, metrics: dict[str, Any], head_refs: list, acc_ref: Any) -> None:
            """Log step t once its head update and RM evaluation (left running) are done."""
            tick = time.perf_counter()
            metrics["step"] = t + 1
            metrics["head"] = ray.get(head_refs[0]) if head_refs else {}
            try:
                ray.get(head_refs[1:])  # the annotator's load_head; raises a failed load
            except ACTOR_LOST:
                recover_annotator()  # the restarted annotator gets the latest head
            metrics["phase_seconds"]["head"] += time.perf_counter() - tick
            metrics["tokens_per_second"] = metrics["n_tokens"] / max(sum(metrics["phase_seconds"].values()), 1e-9)
            try:
                metrics["rm_accuracy"] = ray.get(acc_ref) if acc_ref is not None else None
            except ACTOR_LOST:
                recover_annotator()
                metrics["rm_accuracy"] = ray.get(rm_accuracy_ref(t + 1))
            history.append(metrics)
            run.log("rl", t + 1, metrics)
            log.info(
                "rl step %d/%d proxy %.3f gold %s kl %.4f len %.1f (%.1fs)",
                t + 1,
                T,
                metrics["proxy_reward"],
                f"{metrics.get('gold_reward', float('nan')):.3f}",
                metrics["kl"],
                metrics["response_length"],
                sum(metrics["phase_seconds"].values()),
            )

        skipped = {"nonfinite_rewards": 0, "nonfinite_loss": 0, "nonfinite_loss_microbatches": 0}
        nonfinite_in_a_row = 0

        def skip_step(t: int, reason: str, detail: str, phase: dict[str, float]) -> None:
            """Count and log a skipped step; stop the run after rl.max_nonfinite_steps in a row."""
            nonlocal nonfinite_in_a_row
            skipped[reason] += 1
            nonfinite_in_a_row += 1
            run.log("rl", t + 1, {"skipped": reason, "detail": detail, "phase_seconds": phase})
            log.warning("rl step %d/%d skipped (%s): %s", t + 1, T, reason, detail)
            if nonfinite_in_a_row >= rl.max_nonfinite_steps:
                raise FloatingPointError(
                    f"rl stage stopped at step {t + 1}: {nonfinite_in_a_row} steps in a row skipped for NaN/inf "
                    f"(last: {detail}; rl.max_nonfinite_steps={rl.max_nonfinite_steps}); check the reward model "
                    "checkpoint and rl.policy.optim.lr"
                )

        # actor construction is asynchronous: wait for every engine here so that start-up
        # (model load, vLLM's first compile) is reported apart from step 1's generate time
        t_ready = time.perf_counter()
        ray.get([r.ping.remote() for r in rollouts] + [annotator.head_version.remote()])
        if rl.rollout.weight_sync == "collective":
            learner.init_weight_transfer(rollouts, rl.rollout.num_gpus_per_actor)
        startup_seconds = time.perf_counter() - t_ready
        roles = {"rollout": rollouts, "policy": learner.actors, "reference": [reference], "reward": [annotator]}
        if head_learner is not None:
            roles["reward"].append(head_learner)
        placement = {role: actor_nodes(actors) for role, actors in roles.items()}  # node id of each actor
        # where each actor runs, for operators (and the kill tests): node id and process id
        processes = {role: actor_processes(actors) for role, actors in roles.items()}
        pids.update({role: [p["pid"] for p in procs] for role, procs in processes.items()})
        (run.path / "actors.json").write_text(json.dumps(processes, indent=1) + "\n")
        acc_before = ray.get(rm_accuracy_ref(0)) if heldout is not None else None
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
        history: list[dict[str, Any]] = []
        unfinished: tuple | None = None  # (t, metrics, head ref, accuracy ref) of the previous step
        t_start, tokens_total = time.perf_counter(), 0
        for t in range(T):
            phase: dict[str, float] = {}
            tick = time.perf_counter()
            # 1. generate
            idx = [order[(t * rl.prompts_per_step + i) % len(order)] for i in range(rl.prompts_per_step)]
            rows = prompts.select(idx)
            samples = generate(rollouts, rows["prompt_input_ids"], cfg, t, recover_rollout)
            phase["generate"] = time.perf_counter() - tick
            if unfinished is not None:  # the last step's head update and evaluation ran during generate
                finish_step(*unfinished)
                unfinished = None
            tick = time.perf_counter()
            msgs = [rows["prompt_messages"][i] for i in samples["prompt_index"]]
            batch = sequence_batch(samples["prompt_ids"], samples["response_ids"], pad_id)
            n_tokens = int(batch["response_mask"].sum())
            tokens_total += n_tokens
            # 2. experience: one policy forward (old log-probs + h as refs) ‖ reference log-probs
            ref_logp_ref = reference.token_logprobs.remote(
                batch["input_ids"], batch["attention_mask"], batch["response_mask"]
            )
            exp = ray.get(learner.experience_async(batch))
            old_logp = torch.cat([e["old_logp"] for e in exp])
            hidden_refs = [e["hidden_ref"] for e in exp]
            ref_logp = ray.get(ref_logp_ref)
            phase["experience"], tick = time.perf_counter() - tick, time.perf_counter()
            # 3. annotate (the annotator runs the previous step's load_head first: actor calls keep order)
            ann = annotator_call("annotate", msgs, samples["text"], hidden_refs if mode == "r2m" else None, t, T)
            rewards = ann["rewards"]
            phase["annotate"], tick = time.perf_counter() - tick, time.perf_counter()
            if ann["nonfinite"]:  # nothing is learned from this batch: no policy, head or weight update
                skip_step(
                    t,
                    "nonfinite_rewards",
                    f"{ann['nonfinite']}/{len(rewards)} rewards are NaN/inf (rows {ann['nonfinite_rows']})",
                    phase,
                )
                continue
            # 4-5. advantages and k policy epochs (the last refreshes h → h')
            batch.update(advantages=advantages(rewards, K, rl.policy.algo), old_logp=old_logp, ref_logp=ref_logp)
            per_rank = ray.get(learner.train_async(batch, rl.policy.epochs))
            new_hidden_refs = [s.pop("hidden_ref") for s in per_rank]
            policy_stats = PolicyLearnerGroup.reduce_metrics(per_rank)
            phase["policy"], tick = time.perf_counter() - tick, time.perf_counter()
            skipped["nonfinite_loss_microbatches"] += policy_stats.get("nonfinite_skipped", 0)
            if "loss" not in policy_stats:  # every micro-batch was skipped: the weights did not move
                skip_step(t, "nonfinite_loss", "every policy micro-batch had a NaN/inf loss", phase)
                continue
            nonfinite_in_a_row = 0
            # 6. sync: policy weights to every engine
            if rl.rollout.weight_sync == "collective":
                learner.send_weights(t + 1)  # rank 0 → every engine, one broadcast
            else:
                latest.update(ref=learner.state_dict_ref(), version=t + 1)
                syncs = [r.update_weights.remote(latest["ref"], t + 1) for r in rollouts]
                for i, ref in enumerate(syncs):
                    try:
                        ray.get(ref)
                    except ACTOR_LOST:
                        recover_rollout(i)  # restores `latest`, i.e. this very sync
            phase["sync"], tick = time.perf_counter() - tick, time.perf_counter()
            # 7. GREBT head update on h', winners/losers from the annotation-time rewards. Not
            # awaited: it runs while the next step generates; the annotator loads the new head
            # before it annotates again (actor calls keep their order). Its wait, if any, is
            # counted as "head" time when the next step collects it.
            head_refs = []
            if head_learner is not None:
                winner, loser = self_labelled_pairs(rewards.view(-1, K))
                head_refs.append(head_learner.update.remote(ann["rte"], new_hidden_refs, K, winner, loser, t, T))
                head_refs.append(annotator.load_head.remote(head_learner.head_state.remote(), t + 1))
                head_loaded["version"] = t + 1
            phase["head"] = time.perf_counter() - tick
            # 8. metrics; logged when the head update and evaluation are done (next step or the end)
            gold = (
                torch.tensor(gold_rewards([m[-1]["content"] for m in msgs], samples["text"], cfg.world))
                if has_gold
                else None
            )
            metrics = {
                "proxy_reward": float(rewards.mean()),
                "kl": policy_stats.get("kl", float("nan")),
                "entropy": policy_stats.get("entropy"),
                "response_length": n_tokens / len(samples["text"]),
                "omega": ann.get("omega"),
                "phase_seconds": phase,
                "n_tokens": n_tokens,
                "policy": policy_stats,
            }
            if gold is not None:
                metrics["gold_reward"] = float(gold.mean())
                metrics["proxy_gold_gap"] = metrics["proxy_reward"] - metrics["gold_reward"]
            evaluate = (t + 1) % rl.eval_every == 0 or t + 1 == T
            unfinished = (t, metrics, head_refs, rm_accuracy_ref(t + 1) if evaluate else None)
        if unfinished is not None:
            finish_step(*unfinished)
        if not history:
            raise FloatingPointError(f"rl stage: every one of the {T} steps was skipped ({skipped})")
        elapsed = time.perf_counter() - t_start
        steps = [h["step"] for h in history]  # skipped steps have no metrics to plot
        if has_gold:
            plot_curve(
                steps,
                {"proxy": [h["proxy_reward"] for h in history], "gold": [h["gold_reward"] for h in history]},
                run.path / "plots" / "rl_gold_vs_proxy_step.png",
                "gold vs proxy reward",
                "RL step",
            )
            plot_curve(
                [h["kl"] for h in history],
                {"proxy": [h["proxy_reward"] for h in history], "gold": [h["gold_reward"] for h in history]},
                run.path / "plots" / "rl_gold_vs_proxy_kl.png",
                "gold vs proxy reward",
                "KL to reference",
            )
        learner.save(run.path / "checkpoints" / "policy", tokenizer_dir=policy_dir)
        summary = {
            "mode": mode,
            "algo": rl.policy.algo,
            "steps": T,
            "gold_reward": {"initial": history[0].get("gold_reward"), "final": history[-1].get("gold_reward")},
            "proxy_reward": {"initial": history[0]["proxy_reward"], "final": history[-1]["proxy_reward"]},
            "kl": {"final": history[-1]["kl"]},
            "rm_accuracy": {"before": acc_before, "after": history[-1]["rm_accuracy"]},
            "tokens_per_second": tokens_total / elapsed,
            "phase_seconds": {p: sum(h["phase_seconds"][p] for h in history) for p in PHASES},
            "seconds": elapsed,
            "startup_seconds": startup_seconds,
            "skipped": skipped,
            "actor_restarts": restarts,
            "placement": placement,
        }
        run.update_summary("rl", summary)
    finally:
        for actor in [*rollouts, reference, annotator, head_learner]:
            if actor is not None:
                ray.kill(actor)
        if learner is not None:
            learner.shutdown()
        plan.remove()
    return summary
