"""`jobs/submit_local.sh`: a real `ray job submit` to a throwaway loopback head, end to end.

While the script runs, the test samples the process tree of the script it started (gcs, raylet, dashboard,
agents, the job's driver and its actors) with psutil: every listening socket must be on loopback,
and the job API must refuse a request without the token. After the script returns, none of
those processes may be left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow

SCRIPT = ROOT / "jobs" / "submit_local.sh"
SCRIPT_TIMEOUT_S = 600


def _is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback (::ffff:127.0.0.1, as gRPC binds)."""
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def _tree(root_pid: int) -> list[psutil.Process]:
    """The live descendants of root_pid (empty once it is gone)."""
    try:
        return psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return []


def _alive(pid: int, create_time: float) -> bool:
    """The same process (pid and start time) still exists and is not a zombie."""
    try:
        p = psutil.Process(pid)
        return p.create_time() == create_time and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _unauthenticated_status(address: str) -> int | None:
    """HTTP status of a job-list request that carries no token (None if unreachable)."""
    try:
        with urllib.request.urlopen(f"{address}/api/jobs/", timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


# Long by design: a Ray head of its own (the script's, on loopback with token auth) runs the whole
# quickstart as a submitted job; it cannot share the session's Ray or trained checkpoints, because
# what it tests is that start, that submission and that clean-up. Bounded below by SCRIPT_TIMEOUT_S.
@pytest.mark.timeout(SCRIPT_TIMEOUT_S + 180)
def test_submit_local_runs_quickstart_job_on_loopback_and_cleans_up(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    log_path = tmp_path / "submit.log"
    args = ["run", "jobs/quickstart.yaml", *small_overrides(tmp_path), "--run-dir", str(run_dir)]
    # The script's own bound on the job, below this test's bound on the script.
    env = {**os.environ, "R2M_SUBMIT_JOB_TIMEOUT": "420", "R2M_SUBMIT_HEAD_TIMEOUT": "120"}

    seen: dict[tuple[int, float], str] = {}  # (pid, create_time) -> process name
    listening: set[tuple[str, str, int]] = set()  # (process name, ip, port)
    unauth_status: int | None = None
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(["bash", str(SCRIPT), *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            while proc.poll() is None:
                if time.monotonic() - t0 > SCRIPT_TIMEOUT_S:
                    proc.terminate()  # the script's trap stops its head
                    proc.wait(timeout=120)
                    pytest.fail(f"submit_local.sh exceeded {SCRIPT_TIMEOUT_S}s; log:\n{log_path.read_text()[-4000:]}")
                for p in _tree(proc.pid):
                    try:
                        seen.setdefault((p.pid, p.create_time()), p.name())
                        for conn in p.net_connections(kind="inet"):
                            if conn.status == psutil.CONN_LISTEN:
                                listening.add((p.name(), conn.laddr.ip, conn.laddr.port))
                    except psutil.Error:
                        continue  # exited between listing and inspection
                if unauth_status is None:
                    m = re.search(r"job API (http://127\.0\.0\.1:\d+)", log_path.read_text())
                    if m and "submitting" in log_path.read_text():
                        unauth_status = _unauthenticated_status(m.group(1))
                time.sleep(2.0)
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=120)
    elapsed = time.monotonic() - t0
    out = log_path.read_text()

    assert proc.returncode == 0, f"exit {proc.returncode} after {elapsed:.0f}s; log tail:\n{out[-6000:]}"
    assert re.search(r"final status: SUCCEEDED", out), out[-3000:]
    assert re.search(r"Job 'r2m-[\w-]+' succeeded", out), "the tailed job log does not report success"

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rl"]["steps"] == 2
    assert summary["stages"] == ["world", "sft", "rm", "rl"]
    for key in ("accuracy", "pairs_per_second", "steps", "method", "sft", "world", "rl"):  # every stage reported
        assert key in summary, key

    # Token authentication was on: the job API refused a request without the token.
    assert unauth_status == 401, f"unauthenticated GET /api/jobs/ returned {unauth_status}"

    # Every socket the head's tree listened on (sampled over the whole job) was on loopback,
    # and the sampling did see the head's servers (gcs_server, raylet, the driver's actors).
    names = {name for name, _, _ in listening}
    assert {"gcs_server", "raylet"} <= names, f"sampled listeners: {sorted(listening)}"
    public = sorted(x for x in listening if not _is_loopback(x[1]))
    assert not public, f"non-loopback listening sockets: {public}"

    # Nothing the script started is left: the head, every process seen in its tree (sampled every
    # 2 s: the long-lived ones, which are the ones that could outlive the script), its temp dir.
    head_pid = int(re.search(r"head pid (\d+)", out).group(1))
    assert not psutil.pid_exists(head_pid) or psutil.Process(head_pid).status() == psutil.STATUS_ZOMBIE
    assert any(pid == head_pid for pid, _ in seen), "the head was not sampled as the script's child"
    assert len(seen) > 5
    left = [(pid, name) for (pid, ct), name in seen.items() if _alive(pid, ct)]
    assert not left, f"processes left running after the script returned: {left}"
    head_tmp = re.search(r"temp dir (\S+),", out).group(1)
    assert not Path(head_tmp).exists()
