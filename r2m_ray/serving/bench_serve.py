"""`r2m-ray bench serve CONFIG [eval.checkpoints=[DIR]]`: concurrent clients against the reward server.

Starts the server (a fresh bearer token for the bench; the RM of `eval.checkpoints`, or one
trained in the bench's run directory from the config), scores a fixed pool of requests once
serially for reference, then runs `clients` threads for `seconds` on loopback. Each thread sends
the pool's requests round-robin. Every answer is checked against the reference: the
same number of rewards and the same values (abs 1e-4: padding beside other clients' rows rounds
differently). So a lost, swapped or duplicated answer shows up as a mismatch. Writes JSON:
requests/s, sequences/s, latency p50/p90/p99, status codes, mismatches, and the replicas' batch
counters (requests merged per forward).
"""

from __future__ import annotations

import os
import platform
import secrets
import statistics
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from r2m_ray.bench import rl_bench_models, write_bench_report
from r2m_ray.config import RunConfig
from r2m_ray.rundir import ExistPolicy, RunDir


def request_pool(cfg: RunConfig, world: dict[str, Path], size: int, per_request: int) -> list[dict[str, Any]]:
    """`size` /score bodies of `per_request` conversations each: the world's test pairs, both replies."""
    from r2m_ray.data.preference import load_preferences

    data = load_preferences(str(world["test_id"]), cfg.data, split="test_id").dataset
    conversations = []
    for row in data:
        for reply in (row["chosen"], row["rejected"]):
            conversations.append([*row["prompt_messages"], {"role": "assistant", "content": reply}])
    if len(conversations) < size * per_request:
        raise ValueError(f"bench serve: {len(conversations)} conversations, {size}×{per_request} needed")
    return [{"messages": conversations[i * per_request : (i + 1) * per_request]} for i in range(size)]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation, as numpy's default."""
    import numpy as np

    return float(np.quantile(values, q)) if values else float("nan")


def bench_serve(
    cfg: RunConfig,
    out: str | None = None,
    run_dir: str | None = None,
    exist: ExistPolicy = "new",
    clients: int = 8,
    seconds: float = 20.0,
    pool: int = 32,
    per_request: int = 4,
    kill_replica_after: float | None = None,
    retries: int = 5,
) -> dict[str, Any]:
    """Load-test the reward server on loopback; write and return the JSON report.

    `kill_replica_after` S: S seconds into the load one replica is killed (Serve starts a new one);
    clients retry a refused, reset or 5xx request up to `retries` times, and the report counts the
    retries, the requests still failed after them, and how long the replacement took."""
    import httpx

    from r2m_ray.pipelines.full_run import run_world
    from r2m_ray.serving.reward_server import start_reward_server, stop_reward_server

    if clients < 1 or seconds <= 0:
        raise ValueError(f"bench serve: clients={clients}, seconds={seconds}: give at least 1 client and > 0 s")
    if kill_replica_after is not None and not 0 < kill_replica_after < seconds:
        raise ValueError(f"bench serve: --kill-replica-after {kill_replica_after} must lie inside the {seconds} s load")
    if kill_replica_after is not None and cfg.serve.num_replicas < 2:
        raise ValueError("bench serve: --kill-replica-after needs serve.num_replicas >= 2 (one keeps serving)")
    run = RunDir.create(cfg.model_copy(update={"name": f"bench-serve-{cfg.name}"}), run_dir, exist)
    if cfg.eval.checkpoints:
        world = run_world(cfg, run)
    else:  # the config's own RM, trained here as `bench rl` does
        world, _, rm = rl_bench_models(cfg, run)
        cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"checkpoints": [str(rm)]})})
    bodies = request_pool(cfg, world, pool, per_request)
    token = secrets.token_hex(24)
    os.environ[cfg.serve.token_env] = token
    headers = {"Authorization": f"Bearer {token}"}
    url = start_reward_server(cfg)
    try:
        with httpx.Client(timeout=cfg.serve.request_timeout_s) as client:
            reference = [client.post(f"{url}/score", json=b, headers=headers).json()["rewards"] for b in bodies]
            before = replica_counters(client, url, headers, most_replicas(cfg))
        latencies: list[float] = []
        statuses: Counter[int] = Counter()
        failures: Counter[str] = Counter()  # attempts that failed and were retried, by cause
        mismatches = errors = 0
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def attempt(c: Any, body: dict[str, Any]) -> tuple[Any, str | None]:
            """One request, retried on a refused/reset connection or a 5xx; (last response, last failure)."""
            problem = None
            for a in range(retries + 1):
                try:
                    r = c.post(f"{url}/score", json=body, headers=headers)
                except httpx.HTTPError as err:
                    problem, r = type(err).__name__, None
                else:
                    if r.status_code < 500:
                        return r, None
                    problem = str(r.status_code)
                if a < retries:
                    with lock:
                        failures[problem] += 1
                    time.sleep(0.2 * 2**a)
            return r, problem

        def worker(k: int) -> None:
            nonlocal mismatches, errors
            n = 0
            with httpx.Client(timeout=cfg.serve.request_timeout_s) as c:
                while time.monotonic() < stop_at:
                    i = (k * 7 + n) % len(bodies)
                    n += 1
                    tick = time.perf_counter()
                    r, problem = attempt(c, bodies[i])
                    took = time.perf_counter() - tick
                    if r is None:
                        with lock:
                            errors += 1
                        continue
                    wrong = r.status_code == 200 and not same(r.json()["rewards"], reference[i])
                    with lock:
                        statuses[r.status_code] += 1
                        latencies.append(took)
                        mismatches += wrong

        t0 = time.perf_counter()
        threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        fault = kill_one_replica(t0, kill_replica_after, cfg.serve.num_replicas) if kill_replica_after else None
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        settle_replicas()  # a replica the load made Serve start answers /info once it runs
        with httpx.Client(timeout=cfg.serve.request_timeout_s) as client:
            after = replica_counters(client, url, headers, most_replicas(cfg))
    finally:
        stop_reward_server()
        os.environ.pop(cfg.serve.token_env, None)
    ok = statuses.get(200, 0)

    def delta(key: str) -> int:  # per replica: one first seen after the serial pass started from 0
        return sum(a[key] - before.get(r, {}).get(key, 0) for r, a in after.items())

    batches, merged = delta("batches"), delta("requests")
    report = {
        "benchmark": "serve",
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "checkpoints": cfg.eval.checkpoints,
        "clients": clients,
        "seconds": seconds,
        "wall_seconds": wall,
        "conversations_per_request": per_request,
        "serve": cfg.serve.model_dump(mode="json", exclude={"token_env"}),
        "requests": sum(statuses.values()),
        "requests_ok": ok,
        "requests_per_second": ok / wall,
        "sequences_per_second": ok * per_request / wall,
        "latency_ms": {f"p{int(q * 100)}": 1000 * percentile(latencies, q) for q in (0.5, 0.9, 0.99)}
        | {"mean": 1000 * statistics.fmean(latencies) if latencies else float("nan")},
        "status_codes": {str(k): v for k, v in sorted(statuses.items())},
        "connection_errors": errors,
        "retried_attempts": dict(failures),
        "mismatched_answers": mismatches,
        "replica_killed": fault,
        "batches": batches,
        "requests_per_batch": merged / batches if batches else float("nan"),
        "largest_batch_requests": max(a["largest_batch_requests"] for a in after.values()),
        "replicas_seen": len(after),
    }
    return write_bench_report(report, out, run, "bench_serve.json")


def same(got: list[float | None], want: list[float | None], tol: float = 1e-4) -> bool:
    """Equal lengths and values within `tol` (None only where the reference has None)."""
    if len(got) != len(want):
        return False
    return all(
        (g is None and w is None) or (g is not None and w is not None and abs(g - w) <= tol) for g, w in zip(got, want)
    )


def replica_counters(client: Any, url: str, headers: dict[str, str], replicas: int, tries: int = 50) -> dict[str, Any]:
    """Each replica's batch counters from /info (requests land on replicas at random: ask until
    every replica has answered, at most `tries` times)."""
    seen: dict[str, Any] = {}
    for _ in range(tries):
        info = client.get(f"{url}/info", headers=headers).json()
        seen[info["replica"]] = info["counters"]
        if len(seen) >= replicas:
            break
    return seen


def most_replicas(cfg: RunConfig) -> int:
    s = cfg.serve
    return s.autoscaling.max_replicas if s.autoscaling else s.num_replicas


def serve_replicas() -> set[str]:
    """The names of the reward server's live replica actors."""
    import ray

    from r2m_ray.serving.reward_server import APP_NAME

    names = ray.util.list_named_actors(all_namespaces=True)
    return {a["name"] for a in names if a["name"].startswith("SERVE_REPLICA::") and f"{APP_NAME}#" in a["name"]}


def settle_replicas(timeout_s: float = 90.0) -> int:
    """Wait, at most timeout_s, until no replica of the reward server is still starting (an
    autoscaling decision or a replacement made under load); returns the replicas running."""
    from ray import serve

    from r2m_ray.serving.reward_server import APP_NAME

    deadline = time.monotonic() + timeout_s
    while True:
        app = serve.status().applications.get(APP_NAME)
        states: Counter[str] = Counter()
        for d in app.deployments.values() if app is not None else []:
            states.update(d.replica_states)
        if not any(states.get(k) for k in ("STARTING", "UPDATING", "RECOVERING")) or time.monotonic() > deadline:
            return states.get("RUNNING", 0)
        time.sleep(0.5)


def running_replicas() -> int:
    from ray import serve

    from r2m_ray.serving.reward_server import APP_NAME

    app = serve.status().applications.get(APP_NAME)
    return 0 if app is None else sum(d.replica_states.get("RUNNING", 0) for d in app.deployments.values())


def kill_one_replica(t0: float, after: float, replicas: int, timeout: float = 120.0) -> dict[str, Any]:
    """At `after` s past `t0`, kill one replica without restart (as a lost node would); wait until Serve
    runs `replicas` again with a new one. Returns what happened and when."""
    import ray

    time.sleep(max(0.0, after - (time.perf_counter() - t0)))
    before = serve_replicas()
    victim = sorted(before)[0]
    ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
    killed_at = time.perf_counter() - t0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = serve_replicas()
        if victim not in now and len(now - before) >= 1 and running_replicas() >= replicas:
            return {
                "replica": victim,
                "at_seconds": killed_at,
                "replaced_after_seconds": time.perf_counter() - t0 - killed_at,
                "replacement": sorted(now - before)[0],
            }
        time.sleep(0.1)
    raise TimeoutError(f"bench serve: Serve did not replace the killed replica {victim} within {timeout:.0f} s")
