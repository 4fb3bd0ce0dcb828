"""`r2m-ray` command line: world | sft | rm | eval | export | run | bench.

Every command takes an optional YAML config (default: the packaged default) and
dotted overrides, e.g. `r2m-ray rm jobs/quickstart.yaml rm.grm.regulariser=sft`.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path

from r2m_ray.config import ConfigError, RunConfig, load_config
from r2m_ray.rundir import ExistPolicy

COMMANDS = {
    "world": "write the synthetic world's splits and print its calibration",
    "sft": "world + SFT warm-up of the policy",
    "rm": "world (if needed) + reward-model stage",
    "rl": "RL stage (R2M / frozen RM, GRPO / RLOO): rl.policy_checkpoint=... rl.reward.checkpoint=...",
    "run": "the config's `stages` in order (the packaged default and jobs/quickstart.yaml: world → sft → rm → rl)",
    "eval": "accuracy of trained reward model(s): eval.checkpoints=[...]; "
    "`eval bon`: best-of-n curves with one RM (eval.checkpoints=[rm] eval.bon.n=16 data.prompts=...); "
    "`eval feedback eval.rl_run=RUN_DIR`: policy hidden-state similarity and the hacking detector on an RL run; "
    "`eval decomposition eval.checkpoints=[rm]`: the prompt-free gap Δr2 against the world's exact truth",
    "export": "export a reward model for AutoModelForSequenceClassification: "
    "eval.checkpoints=[dir] eval.export_dir=out",
    "compare": "methods × seeds → results tables: RM methods (`r2m-ray compare jobs/rm_compare.yaml`) or RL arms "
    "over paired seeds (`r2m-ray compare jobs/overopt_compare.yaml`; --report-only --run-dir DIR rebuilds the tables)",
    "serve": "serve trained reward model(s) over HTTP with Ray Serve: eval.checkpoints=[DIR, ...], the bearer "
    "token in $R2M_RAY_SERVE_TOKEN (serve.token_env); POST /get_reward {query: [...]} or /score {messages: [...]}",
    "bench": "benchmarks writing JSON: `r2m-ray bench rm|rl [CONFIG] [overrides]`; "
    "`r2m-ray bench peer rm|rl [CONFIG]`: the same work beside TRL (pip install -e '.[peer]'); "
    "`r2m-ray bench serve [CONFIG] [eval.checkpoints=[DIR]]`: concurrent clients against `r2m-ray serve`",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r2m-ray", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_text in COMMANDS.items():
        s = sub.add_parser(name, help=help_text)
        if name == "bench":
            s.add_argument(
                "what",
                choices=["rm", "rl", "peer", "serve"],
                help="which benchmark (`peer rm|rl`: beside TRL on the same work; `serve`: clients against the server)",
            )
            s.add_argument("--clients", type=int, default=8, help="bench serve: concurrent clients")
            s.add_argument("--seconds", type=float, default=20.0, help="bench serve: how long the clients send")
            s.add_argument(
                "--kill-replica-after",
                type=float,
                default=None,
                help="bench serve: kill one replica this many seconds into the load (needs serve.num_replicas >= 2)",
            )
            s.add_argument("--out", default=None, help="JSON output path (default: bench_<what>.json in the run dir)")
            s.add_argument("--repeats", type=int, default=3, help="bench peer: runs of each side (the median is kept)")
        s.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.sub=value ...]")
        if name == "serve":  # writes no run directory
            continue
        s.add_argument("--run-dir", default=None, help="run directory (default: <output_dir>/<name>-<time>)")
        if name == "compare":
            s.add_argument(
                "--report-only", action="store_true", help="rebuild the tables from --run-dir's finished runs"
            )
        else:
            s.add_argument(
                "--force",
                action="store_true",
                help="--run-dir already holds a run: move it aside to <dir>.old-<time> (never deleted) and start anew",
            )
        if name in ("sft", "rm", "rl", "run"):
            s.add_argument(
                "--resume",
                default=None,
                metavar="RUN_DIR",
                help="continue an interrupted run in RUN_DIR: finished stages are skipped, RL continues from its "
                "newest checkpoint (config: RUN_DIR/config.yaml unless one is given)",
            )
    return p


FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # EFBIG: a file size limit (ulimit -f) was hit
DENIED = (errno.EACCES, errno.EPERM, errno.EROFS)


def describe_os_error(err: OSError, writes_to: str | None = None) -> tuple[str, int]:
    """One line naming the file (else the directory the command writes to) and what to do, and the
    exit code (2 when the input is at fault)."""
    named = " -> ".join(str(f) for f in (err.filename, err.filename2) if f)
    where = named or (f"a file under {writes_to}" if writes_to else "a file")
    if err.errno in FULL:
        return (
            f"writing {where}: {err.strerror}; the disk is full or a size limit was hit. Free space, then "
            "continue with `r2m-ray run --resume RUN_DIR` (finished stages and checkpoints are kept)",
            1,
        )
    if err.errno in DENIED:
        return f"{where}: {err.strerror}; the user running r2m-ray may not use it (check its permissions)", 2
    return f"{where}: {err.strerror}", 2


def _split_args(args: list[str]) -> tuple[str | None, list[str]]:
    config = None
    overrides = []
    for a in args:
        if "=" in a:
            key = a.split("=", 1)[0].strip()
            if any(o.split("=", 1)[0].strip() == key for o in overrides):  # which one was meant is a guess
                raise ConfigError(f"override {key} is given twice on the command line; give each key once")
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise ConfigError(f"unexpected argument '{a}': give one config file, then key=value overrides")
    return config, overrides


def _cmd_eval(cfg: RunConfig, run_dir: str | None, exist: ExistPolicy) -> dict:
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.pipelines.full_run import run_world
    from r2m_ray.pipelines.rm_stage import evaluate, load_split
    from r2m_ray.rundir import RunDir

    if not cfg.eval.checkpoints:
        raise ConfigError("eval.checkpoints: give at least one reward-model checkpoint directory")
    for c in cfg.eval.checkpoints:
        if not (Path(c) / "config.json").is_file() and not any(Path(c).glob("*.safetensors")):
            raise ConfigError(f"eval.checkpoints: {c} is not a reward-model checkpoint directory")
    run = RunDir.create(cfg, run_dir, exist)
    world = run_world(cfg, run) if cfg.data.test_id is None else {}
    tokenizer = load_tokenizer(Path(cfg.eval.checkpoints[0]))
    evals = {}
    for key, name in (("test_id", "id"), ("test_ood", "ood")):
        src = getattr(cfg.data, key) or (str(world[key]) if key in world else None)
        if src:
            evals[name] = load_split(src, cfg, key, tokenizer, run)
    for extra in cfg.data.extra_eval:
        evals[Path(extra).stem] = load_split(extra, cfg, "extra_eval", tokenizer, run)
    results = evaluate(cfg, run, [Path(c) for c in cfg.eval.checkpoints], evals, tokenizer.pad_token_id)
    summary = run.update_summary(None, {"accuracy": {k: v["accuracy"] for k, v in results.items()}, "eval": results})
    run.close()
    return summary


def _cmd_bon(cfg: RunConfig, run_dir: str | None, exist: ExistPolicy) -> dict:
    from r2m_ray.pipelines.bon_eval import run_best_of_n
    from r2m_ray.pipelines.full_run import base_model_dir, needs_world, run_world
    from r2m_ray.rundir import RunDir

    run = RunDir.create(cfg, run_dir, exist)
    world = run_world(cfg, run) if needs_world(cfg, ["rl"]) else {}  # bon reads prompts as the RL stage does
    policy = cfg.eval.bon.policy or cfg.rl.policy_checkpoint
    result = run_best_of_n(cfg, run, Path(policy) if policy else base_model_dir(cfg), world)
    run.close()
    return result


def _cmd_export(cfg: RunConfig) -> dict:
    from r2m_ray.models.export import export_sequence_classification
    from r2m_ray.models.registry import load_tokenizer
    from r2m_ray.models.reward_model import RewardModel

    if len(cfg.eval.checkpoints) != 1 or not cfg.eval.export_dir:
        raise ConfigError("export needs eval.checkpoints=[ONE_DIR] and eval.export_dir=OUT_DIR")
    src = Path(cfg.eval.checkpoints[0])
    out = export_sequence_classification(
        RewardModel.from_pretrained(src), load_tokenizer(src), Path(cfg.eval.export_dir)
    )
    return {"export_dir": str(out)}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `r2m-ray` console script."""
    logging.basicConfig(
        level=os.environ.get("R2M_RAY_LOG", "INFO"), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = _parser().parse_args(argv)
    writes_to = getattr(ns, "run_dir", None)
    try:
        if ns.command == "compare":
            from r2m_ray.pipelines.compare import run_compare

            if len(ns.args) != 1:
                raise ConfigError("compare takes exactly one spec file, e.g. jobs/rm_compare.yaml")
            result = run_compare(
                Path(ns.args[0]), ns.run_dir, command="r2m-ray compare " + " ".join(ns.args), report_only=ns.report_only
            )
            print(result["table"])
            return 0
        bon = ns.command == "eval" and ns.args[:1] == ["bon"]
        feedback = ns.command == "eval" and ns.args[:1] == ["feedback"]
        decomposition = ns.command == "eval" and ns.args[:1] == ["decomposition"]
        peer = ns.command == "bench" and ns.what == "peer"
        if peer and ns.args[:1] not in (["rm"], ["rl"]):
            raise ConfigError("bench peer: say which side, `r2m-ray bench peer rm|rl [CONFIG] [overrides]`")
        config, overrides = _split_args(ns.args[1:] if bon or feedback or decomposition or peer else ns.args)
        resume = getattr(ns, "resume", None)
        exist: ExistPolicy = "force" if getattr(ns, "force", False) else "new"
        if resume is not None and exist == "force":
            raise ConfigError("give --resume (continue the run) or --force (move it aside and start anew), not both")
        if resume is not None:
            if ns.run_dir is not None and Path(ns.run_dir).resolve() != Path(resume).resolve():
                raise ConfigError("give --resume RUN_DIR or --run-dir, not two different directories")
            if not Path(resume, "config.yaml").is_file():
                raise ConfigError(f"--resume {resume}: not a run directory (no config.yaml)")
            ns.run_dir = resume
            config = config or str(Path(resume, "config.yaml"))
        cfg = load_config(config, overrides)
        writes_to = getattr(ns, "run_dir", None) or cfg.output_dir  # named when a write fails without a file name
        if ns.command == "serve":
            from r2m_ray.serving.reward_server import serve_until_stopped

            serve_until_stopped(cfg)
            return 0
        if ns.command == "world":
            from r2m_ray.pipelines.full_run import run_world
            from r2m_ray.rundir import RunDir

            run = RunDir.create(cfg, ns.run_dir, exist)
            run_world(cfg, run)
            print(f"world written to {run.path / 'world'}")
            run.close()
            return 0
        if ns.command in ("sft", "rm", "rl", "run"):
            from r2m_ray.pipelines.full_run import print_summary, run_pipeline

            stages = {"sft": ["world", "sft"], "rm": ["rm"], "rl": ["rl"], "run": None}[ns.command]
            run = run_pipeline(cfg, stages, ns.run_dir, resume=resume is not None, force=exist == "force")
            print_summary(run.summary)
            return 0
        if bon:
            print(json.dumps(_cmd_bon(cfg, ns.run_dir, exist)["curves"], indent=2))
            return 0
        if feedback:
            from r2m_ray.pipelines.feedback_analysis import run_feedback_analysis
            from r2m_ray.rundir import RunDir

            run = RunDir.create(cfg.model_copy(update={"name": "feedback"}), ns.run_dir, exist)
            result = run_feedback_analysis(cfg, run)
            run.close()
            brief = {
                name: {"gold": r["gold_reward"], "hacked_rate": r["hacked_rate"], "last_layer": r["layers"][-1]}
                for name, r in result["policies"].items()
            }
            print(json.dumps(brief, indent=2, default=float))
            return 0
        if decomposition:
            from r2m_ray.eval.decomposition_check import check_decomposition, family_table, report_table
            from r2m_ray.rundir import RunDir

            run = RunDir.create(cfg.model_copy(update={"name": "decomposition"}), ns.run_dir, exist)
            report = check_decomposition(cfg, run)
            run.close()
            print(report_table(report))
            split = next(iter(report["splits"]))
            print(family_table(report, split, next(iter(report["splits"][split]))))
            print(f"run_dir: {run.path}")
            return 0
        if ns.command == "eval":
            summary = _cmd_eval(cfg, ns.run_dir, exist)
            print(json.dumps(summary["accuracy"], indent=2))
            return 0
        if ns.command == "export":
            print(json.dumps(_cmd_export(cfg), indent=2))
            return 0
        if peer:
            from r2m_ray.bench_peer import bench_peer_rl, bench_peer_rm

            if ns.repeats < 1:
                raise ConfigError(f"--repeats {ns.repeats}: give at least 1")
            bench_peer = bench_peer_rm if ns.args[0] == "rm" else bench_peer_rl
            print(json.dumps(bench_peer(cfg, ns.out, ns.run_dir, exist, ns.repeats), indent=2))
            return 0
        if ns.command == "bench" and ns.what == "serve":
            from r2m_ray.serving.bench_serve import bench_serve

            print(
                json.dumps(
                    bench_serve(
                        cfg, ns.out, ns.run_dir, exist, ns.clients, ns.seconds, kill_replica_after=ns.kill_replica_after
                    ),
                    indent=2,
                )
            )
            return 0
        if ns.command == "bench":
            from r2m_ray.bench import bench_rl, bench_rm

            result = (bench_rm if ns.what == "rm" else bench_rl)(cfg, ns.out, ns.run_dir, exist)
            print(json.dumps(result, indent=2))
            return 0
    except (ConfigError, ValueError, FileNotFoundError) as err:
        # bad input: one clear line, no traceback (R2M_RAY_DEBUG=1 shows it)
        if os.environ.get("R2M_RAY_DEBUG"):
            raise
        print(f"r2m-ray: error: {err}", file=sys.stderr)
        return 2
    except FloatingPointError as err:  # NaN/inf beyond what the run may skip: say why it stopped
        if os.environ.get("R2M_RAY_DEBUG"):
            raise
        print(f"r2m-ray: error: {err}", file=sys.stderr)
        return 1
    except Exception as err:  # an actor that died: say which, not a 60-line Ray traceback
        import ray

        from r2m_ray.pipelines.waits import ActorLost
        from r2m_ray.serving.reward_client import RemoteRewardError

        if isinstance(err, (ActorLost, RemoteRewardError)) and not os.environ.get("R2M_RAY_DEBUG"):
            print(f"r2m-ray: error: {err}", file=sys.stderr)
            return 1
        if isinstance(err, OSError) and err.strerror and not os.environ.get("R2M_RAY_DEBUG"):
            message, code = describe_os_error(err, writes_to)
            print(f"r2m-ray: error: {message}", file=sys.stderr)
            return code
        if not isinstance(err, ray.exceptions.RayError) or os.environ.get("R2M_RAY_DEBUG"):
            raise
        first = str(err).strip().splitlines()
        print(
            f"r2m-ray: error: a Ray actor failed ({type(err).__name__}): {first[0] if first else ''}\n"
            f"  (set R2M_RAY_DEBUG=1 for the full traceback; actor logs are under the Ray session dir)",
            file=sys.stderr,
        )
        return 1
    return 1


if __name__ == "__main__":
    sys.exit(main())
