"""`r2m-ray bench serve` at a tiny size: concurrent clients, every answer checked, the JSON written."""

from __future__ import annotations

import json
import socket

import pytest

from r2m_ray.config import load_config
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow


def serve_config(trained, tmp_path, *overrides: str):
    """The quickstart config serving the session's RM on a free loopback port, plus `overrides`."""
    _, base = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ckpt = f"eval.checkpoints=[{base / 'checkpoints' / 'rm-0'}]"
    return load_config(
        ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp_path) + [ckpt, f"serve.port={port}", *overrides]
    )


def test_bench_serve_reports_throughput_latency_and_no_wrong_answers(trained, tmp_path):
    from r2m_ray.serving.bench_serve import bench_serve

    cfg = serve_config(
        trained,
        tmp_path,
        "serve.num_cpus_per_replica=0.5",
        "serve.batch_wait_timeout_s=0.05",
    )
    report = bench_serve(cfg, str(tmp_path / "serve.json"), str(tmp_path / "bench"), clients=4, seconds=3.0, pool=8)
    assert json.loads((tmp_path / "serve.json").read_text())["requests_ok"] == report["requests_ok"]
    assert report["requests_ok"] == report["requests"] > 0 and report["status_codes"] == {"200": report["requests"]}
    assert report["mismatched_answers"] == 0 and report["connection_errors"] == 0
    assert report["requests_per_second"] == pytest.approx(report["requests_ok"] / report["wall_seconds"])
    assert report["sequences_per_second"] == pytest.approx(4 * report["requests_per_second"])
    lat = report["latency_ms"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
    # 4 clients at once: the replica merged requests (1 ≤ requests per batch ≤ serve.max_batch_size)
    assert report["batches"] > 0 and 1 <= report["requests_per_batch"] <= 8 and report["replicas_seen"] == 1
    assert report["largest_batch_requests"] >= 2


def test_a_replica_killed_under_load_is_replaced_and_clients_see_retries_not_wrong_rewards(trained, tmp_path):
    """2 replicas, 6 clients for 10 s; 3 s in, one replica is killed for good. Serve starts another;
    the requests it held are retried by the clients, and every answer still equals the reference."""
    from r2m_ray.serving.bench_serve import bench_serve, serve_replicas

    cfg = serve_config(
        trained,
        tmp_path,
        "serve.num_replicas=2",
        "serve.num_cpus_per_replica=0.5",
        "serve.batch_wait_timeout_s=0.2",  # requests wait in the replica: the kill catches some in flight
    )
    report = bench_serve(cfg, None, str(tmp_path / "bench"), clients=6, seconds=10.0, pool=8, kill_replica_after=3.0)
    fault = report["replica_killed"]
    # the kill came after the 3 s the bench waits for (how much after depends on the machine's load)
    assert fault["replica"] != fault["replacement"] and fault["replaced_after_seconds"] > 0
    assert fault["at_seconds"] >= 3.0
    assert sum(report["retried_attempts"].values()) >= 1, report  # the clients saw the loss ...
    assert report["connection_errors"] == 0 and report["status_codes"] == {
        "200": report["requests"]
    }  # ... and got through
    assert report["mismatched_answers"] == 0 and report["requests_ok"] > 0
    assert serve_replicas() == set()  # the bench stopped Serve: no replica left behind


def test_autoscaling_adds_a_replica_under_load(trained, tmp_path):
    """serve.autoscaling: 1 replica at rest, 6 clients in flight against a target of 1 request per
    replica: Serve starts the second replica while the load runs, and every answer stays right."""
    from r2m_ray.serving.bench_serve import bench_serve

    cfg = serve_config(
        trained,
        tmp_path,
        "serve.num_cpus_per_replica=0.5",
        "serve.autoscaling={min_replicas: 1, max_replicas: 2, target_ongoing_requests: 1, upscale_delay_s: 0, "
        "metrics_interval_s: 0.5, look_back_period_s: 1}",
    )
    report = bench_serve(cfg, None, str(tmp_path / "bench"), clients=6, seconds=12.0, pool=8)
    assert report["replicas_seen"] == 2, report  # the /info of a second replica answered during the run
    assert report["mismatched_answers"] == 0 and report["status_codes"] == {"200": report["requests"]}
