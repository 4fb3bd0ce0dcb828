"""RM stage driver: preference pairs → reward model, read top to bottom.

1. load + tokenise train / eval pairs (skips counted and logged);
2. `dpo` only: reference log-probs from the ReferenceActor, cached on disk;
3. per ensemble member: start the RMLearner group (DeepSpeed ranks; within
   `keep_learners()` the previous member's ranks build the new model instead) and, if
   enabled, the Prioritizer; loop: score the NEXT batch on the prioritiser while
   the learners train on this one; refresh the prioritiser every refresh_every.
   Every wait has a deadline (rm.wait_timeout_s, rm.startup_timeout_s); a hung or
   dead actor ends the member's attempt and it trains again from its start (the
   same seed gives the same model), at most rm.max_restarts times;
4. save each member (safetensors), evaluate ID / OOD / extra sets, write summary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from datasets import Dataset
from tqdm.auto import tqdm

from r2m_ray.actors.distributed import LearnerHung
from r2m_ray.actors.prioritizer import Prioritizer
from r2m_ray.actors.reference import ReferenceActor
from r2m_ray.actors.rm_learner import RMLearnerGroup
from r2m_ray.algos.decomposition import sample_by_priority
from r2m_ray.atomic_write import atomic_write_text, fsync_dir
from r2m_ray.config import RMConfig, RunConfig
from r2m_ray.data.preference import load_preferences
from r2m_ray.data.split import hashed_split
from r2m_ray.data.tokenize import PreferenceCollator, tokenize_preferences
from r2m_ray.eval.decomposition_check import truth_correlations
from r2m_ray.eval.plots import plot_rm_training
from r2m_ray.eval.rm_accuracy import accuracy_report, score_pairs
from r2m_ray.models.registry import load_tokenizer
from r2m_ray.models.reward_model import RewardModel
from r2m_ray.pipelines.preflight import check_sequence_fits
from r2m_ray.pipelines.waits import ActorLost, get_all, get_one
from r2m_ray.placement import actor_processes_async
from r2m_ray.ray_setup import check_demands, init_ray
from r2m_ray.run_inputs import sha256_path
from r2m_ray.rundir import RunDir
from r2m_ray.world.config import WorldConfig
from r2m_ray.world.prompt_free_truth import pair_truth

log = logging.getLogger(__name__)
# a member's attempt is lost (and trained again) when an actor dies, hangs past its deadline or
# takes its objects with it
MEMBER_LOST = (ActorLost, LearnerHung, ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)
ENCODED = ["chosen_input_ids", "chosen_response_mask", "rejected_input_ids", "rejected_response_mask"]


TRUTH_COLUMNS = {"truth_free_gap": "free_gap", "truth_feature_gap": "feature_gap"}
TRUTH_KEYS = ("delta_r2_corr_free_gold", "delta_r2_corr_feature")


def load_split(
    source: str, cfg: RunConfig, split: str, tokenizer: Any, run: RunDir, world: WorldConfig | None = None
) -> Dataset:
    """Load + tokenise one preference source; its skip report goes to the summary.

    `world`: the source is this synthetic world's; its exact prompt-free gold gap and planted
    feature gap of every pair come along as the columns of TRUTH_COLUMNS (world/prompt_free_truth.py).

    A comparison trains many RMs on the same files in one process: a file already loaded with the
    same tokenizer and settings, unchanged since (size and mtime), is taken from memory; its skip
    report still goes to this run's summary."""
    memo = _split_key(source, cfg, split, tokenizer, world)
    if memo is not None and memo in _SPLITS:
        ds, report = _SPLITS[memo]
        report.log()
        run.update_summary("data", {split: report.to_dict()})
        return ds
    data = load_preferences(source, cfg.data, split=split)
    if world is not None:
        ds = data.dataset
        prompts = [m[-1]["content"] for m in ds["prompt_messages"]]
        truth = pair_truth(prompts, ds["chosen"], ds["rejected"], world)
        for column, key in TRUTH_COLUMNS.items():
            ds = ds.add_column(column, [float(v) for v in truth[key]])
        data.dataset = ds
    tokenized = tokenize_preferences(data, tokenizer, cfg.data)
    tokenized.report.log()
    run.update_summary("data", {split: tokenized.report.to_dict()})
    if len(tokenized.dataset) == 0:
        raise ValueError(f"data.{split}: no usable preference pairs in {source} (see the skip report above)")
    if memo is not None:
        while len(_SPLITS) >= 8:  # a comparison uses 3 splits; keep memory bounded for long-lived drivers
            del _SPLITS[next(iter(_SPLITS))]
        _SPLITS[memo] = (tokenized.dataset, tokenized.report)
    return tokenized.dataset


_SPLITS: dict[tuple, tuple[Dataset, Any]] = {}  # load_split's memory: key → (tokenised pairs, skip report)


def _split_key(source: str, cfg: RunConfig, split: str, tokenizer: Any, world: WorldConfig | None) -> tuple | None:
    """What load_split's result depends on, for a local file (None: another kind of source, not kept)."""
    path = Path(source)
    if not path.is_file():
        return None
    stat = path.stat()
    settings = cfg.data.model_dump_json(), world.model_dump_json() if world else None
    vocab = tokenizer.name_or_path, len(tokenizer), getattr(tokenizer, "chat_template", None)
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns, split, vocab, settings


def load_hashed_split(source: str, cfg: RunConfig, tokenizer: Any, run: RunDir) -> tuple[Dataset, Dataset]:
    """data.train split into (train, test) by prompt hash (data/split.py); the record goes to data_split.json."""
    data = load_preferences(source, cfg.data, split="train")
    test_index, record = hashed_split(data.dataset, cfg.data.test_fraction or 0.0, cfg.data.split_salt, source)
    tokenized = tokenize_preferences(data, tokenizer, cfg.data)  # one skip report for the whole source
    tokenized.report.log()
    run.update_summary("data", {"train": tokenized.report.to_dict()})
    is_test = [i in test_index for i in tokenized.dataset["source_index"]]
    parts = {
        name: tokenized.dataset.select([i for i, t in enumerate(is_test) if t == want])
        for name, want in (("train", False), ("test", True))
    }
    record["tokenized_pairs"] = {name: len(ds) for name, ds in parts.items()}  # after length checks
    atomic_write_text(run.path / "data_split.json", json.dumps(record, indent=1) + "\n")
    for name, ds in parts.items():
        if len(ds) == 0:
            raise ValueError(f"data.test_fraction: no usable {name} pairs left in {source} after tokenisation")
    log.info("hashed split of %s: %d train / %d test pairs", source, len(parts["train"]), len(parts["test"]))
    return parts["train"], parts["test"]


_KEPT: dict[tuple, RMLearnerGroup] = {}  # learner groups kept for the next RM, by RMLearnerGroup.shape
_KEEPING = [0]  # how many keep_learners() blocks are open


@contextmanager
def keep_learners() -> Iterator[None]:
    """Within this block a member's learner group is kept when it finishes, and the next member
    of the same rm.deepspeed shape is built in its ranks (a new model and engine, the same
    processes and process group) instead of new ranks: ~10 s of process start and DeepSpeed
    set-up saved per RM of a comparison. The weights equal a fresh group's (tested). Blocks nest;
    leaving the outermost shuts the kept groups down."""
    _KEEPING[0] += 1
    try:
        yield
    finally:
        _KEEPING[0] -= 1
        if _KEEPING[0] == 0:
            release_learners()


def release_learners() -> None:
    """Shut down every kept learner group (their CPUs go back to Ray)."""
    while _KEPT:
        _KEPT.popitem()[1].shutdown()


def learner_group(cfg_json: str, rm: RMConfig, model_dir: Path, seed: int) -> tuple[RMLearnerGroup, bool]:
    """The member's learner group: a kept one of its shape rebuilt, else new ranks; and whether kept."""
    group = _KEPT.pop(RMLearnerGroup.shape_of(rm), None)
    release_learners()  # ranks of another shape must not hold CPUs this group needs
    if group is None:
        return RMLearnerGroup(cfg_json, rm, model_dir, seed), False
    try:
        group.rebuild(cfg_json, rm, model_dir, seed)
    except BaseException:
        group.shutdown()  # a dead or hung kept rank: the member's attempt is lost, the next gets new ranks
        raise
    return group, True


def add_reference_logprobs(
    ds: Dataset, model_dir: Path, pad_id: int, cache_dir: Path, chunk: int = 64, rm: RMConfig | None = None
) -> Dataset:
    """Columns ref_logp_c / ref_logp_r from the frozen backbone, computed once per (model, data).

    Keyed by the model's contents (not its path: a checkpoint rewritten in place must not reuse
    the old log-probs) and the dataset's content fingerprint."""
    key = hashlib.sha256(f"{sha256_path(model_dir)}|{ds._fingerprint}".encode()).hexdigest()[:16]
    cache = cache_dir / f"ref_logps-{key}.parquet"
    if cache.is_file():
        cached = Dataset.from_parquet(str(cache))
        log.info("reference log-probs from cache %s", cache)
    else:
        release_learners()  # kept idle ranks must not hold the CPUs the reference actor needs
        ref = ReferenceActor.remote(str(model_dir), pad_id)
        futures = []
        for start in range(0, len(ds), chunk):
            rows = ds.select(range(start, min(start + chunk, len(ds))))
            futures.append(
                (
                    ref.logprobs.remote(rows["chosen_input_ids"], rows["chosen_response_mask"]),
                    ref.logprobs.remote(rows["rejected_input_ids"], rows["rejected_response_mask"]),
                )
            )
        rm = rm or RMConfig()  # its deadlines
        lc, lr = [], []
        try:
            for i, (fc, fr) in enumerate(futures):  # the first call also loads the model
                timeout = rm.wait_timeout_s + (rm.startup_timeout_s if i == 0 else 0.0)
                lc.append(get_one(fc, "reference actor (log-probs)", timeout, "rm.wait_timeout_s"))
                lr.append(get_one(fr, "reference actor (log-probs)", timeout, "rm.wait_timeout_s"))
        finally:
            ray.kill(ref)
        cached = Dataset.from_dict({"ref_logp_c": torch.cat(lc).tolist(), "ref_logp_r": torch.cat(lr).tolist()})
        cache_dir.mkdir(parents=True, exist_ok=True)
        partial = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")  # a cut-short cache must never be read
        cached.to_parquet(str(partial))
        os.replace(partial, cache)
        fsync_dir(cache_dir)
    return ds.add_column("ref_logp_c", cached["ref_logp_c"]).add_column("ref_logp_r", cached["ref_logp_r"])


def index_stream(n: int, seed: int) -> Iterator[int]:
    """Row indices: a fresh seeded permutation every epoch, forever."""
    g = torch.Generator().manual_seed(seed)
    while True:
        yield from torch.randperm(n, generator=g).tolist()


def world_truth(train: Dataset) -> dict[str, torch.Tensor] | None:
    """The truth columns of a world's training pairs as tensors (None for other data)."""
    if not set(TRUTH_COLUMNS) <= set(train.column_names):
        return None
    return {key: torch.tensor(train[column], dtype=torch.float64) for column, key in TRUTH_COLUMNS.items()}


def take(stream: Iterator[int], k: int) -> list[int]:
    return [next(stream) for _ in range(k)]


def encoded_rows(ds: Dataset, idx: list[int]) -> dict[str, list]:
    """The token columns of some rows, as the prioritiser wants them."""
    rows = ds.select(idx)
    return {c: rows[c] for c in ENCODED}


def train_member(cfg: RunConfig, run: RunDir, train: Dataset, model_dir: Path, pad_id: int, member: int) -> Path:
    """Train one reward model (one ensemble member) and save it; returns its checkpoint dir.

    A lost attempt (MEMBER_LOST) is trained again from its start, at most rm.max_restarts times."""
    rm = cfg.rm
    for attempt in range(rm.max_restarts + 1):
        try:
            return _train_member_once(cfg, run, train, model_dir, pad_id, member)
        except MEMBER_LOST as err:
            if attempt == rm.max_restarts:
                raise ActorLost(f"rm member {member}: {err} (rm.max_restarts={rm.max_restarts} spent)") from err
            restarts = run.summary.get("member_restarts", 0) + 1
            run.update_summary(None, {"member_restarts": restarts})
            dropped = run.rewind(f"rm/member{member}", 0)  # the new attempt logs its steps again
            log.warning(
                "rm member %d: %s; training it again from its start (%d metric rows dropped)", member, err, dropped
            )
    raise AssertionError("unreachable")


def record_actors(run: RunDir, member: int, group: RMLearnerGroup, prio: Any, rm: RMConfig) -> None:
    """actors.json: node and pid of the member's learner ranks (and prioritiser), rewritten by every
    attempt, so an operator (or a test) can find the processes of the attempt that is running."""
    roles = {"rm_learner": group.actors, **({"prioritizer": [prio]} if prio is not None else {})}
    refs = {role: actor_processes_async(actors) for role, actors in roles.items()}
    timeout, key = rm.startup_timeout_s, "rm.startup_timeout_s"
    processes = {role: get_all(r, f"{role} (pid)", timeout, key) for role, r in refs.items()}
    record = {"stage": f"rm/member{member}", **processes}
    atomic_write_text(run.path / "actors.json", json.dumps(record, indent=1) + "\n")


def _train_member_once(cfg: RunConfig, run: RunDir, train: Dataset, model_dir: Path, pad_id: int, member: int) -> Path:
    rm = cfg.rm
    seed = cfg.seed + 1000 * member
    cfg_json = json.dumps(cfg.model_dump(mode="json", by_alias=True))
    ds = rm.deepspeed
    demands = {"deepspeed": [{"CPU": ds.num_cpus_per_rank, "GPU": ds.num_gpus_per_rank}] * ds.ranks}
    if rm.prioritizer.enabled:  # it scores the coming batches while the learners train: both at once
        demands["prioritizer"] = [{"CPU": rm.prioritizer.num_cpus}]
    check_demands("rm", demands)
    steps = rm.epochs * (len(train) // rm.batch_size)
    steps = min(steps, rm.max_steps) if rm.max_steps else steps
    if steps < 1:
        raise ValueError(f"rm.batch_size={rm.batch_size} is larger than the {len(train)} training pairs")
    t_group = time.perf_counter()
    group, reused = learner_group(cfg_json, rm, model_dir, seed)
    t_group = time.perf_counter() - t_group
    prio, bar, kept = None, tqdm(total=steps, desc=f"rm member {member}", leave=False), False
    try:
        collate = PreferenceCollator(pad_token_id=pad_id, padding_side="right")
        stream = index_stream(len(train), seed)
        resample = rm.prioritizer.enabled and rm.prioritizer.mode == "resample"
        draw = rm.batch_size * (rm.prioritizer.pool_factor if resample else 1)
        warmup = rm.prioritizer.warmup_steps  # uniform weights until then: the prioritiser is not asked

        def ask(step: int, idx: list[int]) -> Any:
            """The prioritiser's scores of step `step`'s candidate rows, asked now (None: none wanted)."""
            return prio.score.remote(encoded_rows(train, idx)) if prio and step > warmup else None

        truth = world_truth(train)  # the world's exact prompt-free gaps, when the pairs are the world's
        if rm.prioritizer.enabled:
            prio = Prioritizer.options(num_cpus=rm.prioritizer.num_cpus).remote(
                cfg_json, str(model_dir), pad_id, cfg.data.max_length, seed, max(1, int(rm.prioritizer.num_cpus))
            )
            first = prio.refresh.remote(group.state_dict_ref(), 0)
            get_one(first, "prioritizer (start-up and first refresh)", rm.startup_timeout_s, "rm.startup_timeout_s")
        record_actors(run, member, group, prio, rm)
        next_idx = take(stream, draw)
        next_scores = ask(1, next_idx)
        sample_gen = torch.Generator().manual_seed(seed + 1)
        t_start, history = time.perf_counter(), []
        ready = None  # without the prioritiser, the next batch is collated while the learners train
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            idx, weights, scores = next_idx, None, None
            if next_scores is not None:
                scores = get_one(next_scores, "prioritizer.score", rm.wait_timeout_s, "rm.wait_timeout_s")
            t_wait = time.perf_counter() - t0
            if step < steps:  # score the next batch while the learners train on this one
                next_idx = take(stream, draw)
                next_scores = ask(step + 1, next_idx)
            if scores is not None and truth is not None:  # how well Δr2 tracks the world's truth, per step
                metrics_truth = truth_correlations(scores["delta_r2"], truth, idx)
            else:
                metrics_truth = {}
            if scores is not None and rm.prioritizer.mode == "resample":
                pick = sample_by_priority(scores["priorities"], rm.batch_size, sample_gen).tolist()
                idx = [idx[i] for i in pick]
            elif scores is not None:
                weights = scores["priorities"]
            elif len(idx) > rm.batch_size:  # resample's warm-up: the first batch_size candidates, uniformly
                idx = idx[: rm.batch_size]
            # a dict of columns (train[idx]) costs a third of select() + rows
            batch = ready if ready is not None else collate(train[idx])
            if weights is not None:
                batch["weight"] = weights.float()
            refs = group.train_step_async(batch)
            ready = collate(train[next_idx]) if prio is None and step < steps else None
            per_rank = get_all(refs, "rm learner (train_step)", rm.wait_timeout_s, "rm.wait_timeout_s")
            metrics = RMLearnerGroup.reduce_metrics(per_rank)
            if prio and step % rm.prioritizer.refresh_every == 0:
                prio.refresh.remote(group.state_dict_ref(), step)  # ordered after the pending score
            metrics["step_seconds"] = time.perf_counter() - t0
            metrics["prioritizer_wait_seconds"] = t_wait
            if scores is not None:
                metrics["delta_r2_mean"] = float(scores["delta_r2"].mean())
                metrics["priority_max"] = float(scores["priorities"].max())
                metrics.update(metrics_truth)
                if scores["weights"] is not None:  # how much of the weight the pair's own prompt takes
                    metrics["importance_weight_own"] = float(scores["weights"][:, 0].mean())
            history.append(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if step % rm.log_every == 0 or step == steps:
                run.log(f"rm/member{member}", step, metrics)
                log.info(
                    "rm member %d step %d/%d loss %.4f acc %.3f",
                    member,
                    step,
                    steps,
                    metrics["loss"],
                    metrics["accuracy"],
                )
        elapsed = time.perf_counter() - t_start
        ckpt = run.path / "checkpoints" / f"rm-{member}"
        group.save(ckpt, tokenizer_dir=model_dir)
        if _KEEPING[0]:
            _KEPT[group.shape()], kept = group, True
    finally:  # a lost or failed attempt must not hold its CPUs into the next one
        bar.close()  # (an open bar would leave its line under the error message)
        if prio:
            ray.kill(prio)
        if not kept:
            group.shutdown()
    summary = {
        "pairs_per_second": steps * rm.batch_size / elapsed,
        "steps": steps,
        "train_seconds": elapsed,
        "learner_start_seconds": t_group,  # new ranks, or a kept group's rebuild (learner_reused)
        "learner_reused": reused,
    }
    checked = [h for h in history if "delta_r2_corr_free_gold" in h]
    if checked:  # the mean over the prioritised steps of Δr2's correlation with the world's truth
        summary["delta_r2_validation"] = {
            key: float(np.nanmean([h[key] for h in checked])) for key in TRUTH_KEYS if key in checked[0]
        } | {"steps": len(checked)}
    run.update_summary(None, summary)
    plot_rm_training(history, run.path / "plots" / f"rm_training_member{member}.png")
    return ckpt


def evaluate(cfg: RunConfig, run: RunDir, ckpts: list[Path], evals: dict[str, Dataset], pad_id: int) -> dict[str, Any]:
    """Accuracy of the (ensemble of) trained models on every eval set."""
    models = [RewardModel.from_pretrained(p) for p in ckpts]
    collate = PreferenceCollator(pad_token_id=pad_id, padding_side="right")
    results = {}
    for name, ds in evals.items():
        r_c, r_r = score_pairs(models, ds, collate, cfg.rm.eval_batch_size, cfg.rm.ensemble_reduce, desc=f"eval {name}")
        results[name] = accuracy_report(r_c, r_r, ds)
        log.info("rm accuracy %s: %.4f (n=%d)", name, results[name]["accuracy"], results[name]["n"])
    return results


def run_rm_stage(cfg: RunConfig, run: RunDir, model_dir: Path, world_paths: dict[str, Path] | None) -> dict[str, Any]:
    """The whole RM stage; returns the summary."""
    world_paths = world_paths or {}
    tokenizer = load_tokenizer(model_dir)
    pad_id = tokenizer.pad_token_id
    check_sequence_fits(model_dir, cfg.data.max_length, "data.max_length", "the longest pair")

    def source(key: str) -> str | None:
        value = getattr(cfg.data, key)
        if value is None and key in world_paths:
            return str(world_paths[key])
        return value

    if source("train") is None:
        raise ValueError("data.train is not set and no synthetic world was built in this run")
    evals = {}
    if cfg.data.test_fraction is not None:  # one source, split by prompt hash: its test part is "id"
        train, evals["id"] = load_hashed_split(source("train"), cfg, tokenizer, run)
    else:
        synthetic = cfg.data.train is None and "train" in world_paths  # the world's own pairs: truth known
        train = load_split(source("train"), cfg, "train", tokenizer, run, cfg.world if synthetic else None)
    if cfg.rm.train_pairs is not None:  # a data-size sweep: the same first pairs for every method and seed
        if cfg.rm.train_pairs > len(train):
            raise ValueError(f"rm.train_pairs={cfg.rm.train_pairs} but the training set has {len(train)} usable pairs")
        train = train.select(range(cfg.rm.train_pairs))
        run.update_summary("data", {"train_pairs_used": cfg.rm.train_pairs})
    for key, name in (("test_id", "id"), ("test_ood", "ood")):
        if key == "test_id" and "id" in evals:
            continue
        if source(key) is not None:
            evals[name] = load_split(source(key), cfg, key, tokenizer, run)
    for i, extra in enumerate(cfg.data.extra_eval):
        evals[Path(extra).stem or f"extra{i}"] = load_split(extra, cfg, f"extra_eval.{i}", tokenizer, run)
    init_ray(cfg.ray)  # after the data checks: bad input fails before any actor starts
    if cfg.rm.grm.regulariser == "dpo":
        cache = Path(cfg.model.cache_dir).expanduser() / "ref_cache"
        train = add_reference_logprobs(train, model_dir, pad_id, cache, rm=cfg.rm)
    with keep_learners():  # an ensemble's members train in the same ranks, one after another
        ckpts = [train_member(cfg, run, train, model_dir, pad_id, m) for m in range(cfg.rm.ensemble)]
    results = evaluate(cfg, run, ckpts, evals, pad_id)
    exports = []
    if cfg.rm.export_hf:  # AutoModelForSequenceClassification dirs (linear head: no remote code)
        from r2m_ray.models.export import export_sequence_classification

        for ckpt in ckpts:
            out = ckpt.parent / f"{ckpt.name}-hf"
            exports.append(str(export_sequence_classification(RewardModel.from_pretrained(ckpt), tokenizer, out)))
    summary = run.update_summary(
        None,
        {
            "method": cfg.rm.method,
            "accuracy": {name: r["accuracy"] for name, r in results.items()},
            "gold_accuracy": {name: r["gold_accuracy"] for name, r in results.items() if "gold_accuracy" in r},
            "eval": results,
            "checkpoints": [str(p) for p in ckpts],
            "exports": exports,
        },
    )
    run.log("rm/eval", summary["steps"], {"accuracy": summary["accuracy"]})
    return summary
