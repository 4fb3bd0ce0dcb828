"""`r2m-ray bench serve` at a tiny size: concurrent clients, every answer checked, the JSON written."""

from __future__ import annotations

import json
import socket

import pytest

from r2m_ray.config import load_config
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow


def test_bench_serve_reports_throughput_latency_and_no_wrong_answers(trained, tmp_path):
    from r2m_ray.serving.bench_serve import bench_serve

    _, base = trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = small_overrides(tmp_path) + [
        f"eval.checkpoints=[{base / 'checkpoints' / 'rm-0'}]",
        f"serve.port={port}",
        "serve.num_cpus_per_replica=0.5",
        "serve.batch_wait_timeout_s=0.05",
    ]
    cfg = load_config(ROOT / "jobs" / "quickstart.yaml", overrides)
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
