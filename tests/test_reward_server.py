"""`r2m-ray serve`: a trained RM behind Ray Serve on loopback — the rewards the checkpoint gives, the
token on every request, a clear 4xx for each bad request, batching under concurrent clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from r2m_ray.config import ConfigError, load_config
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow

TOKEN = "test-token-0123456789abcdef"
PROMPTS = [
    [{"role": "user", "content": "What is 3 plus 4?"}],
    [{"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Count to three."}],
]
REPLIES = ["7", "Blue, I think.", "one two three"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_cfg(tmp, ckpt, port: int, *extra: str):
    overrides = small_overrides(tmp) + [f"eval.checkpoints=[{ckpt}]", f"serve.port={port}", *extra]
    return load_config(ROOT / "jobs" / "quickstart.yaml", overrides)


@pytest.fixture(scope="module")
def server(trained, tmp_path_factory):
    """One server on the session's Ray: 1 replica, batches of up to 8 requests gathered for 0.2 s."""
    from r2m_ray.serving.reward_server import start_reward_server, stop_reward_server

    tmp, base = trained
    ckpt = base / "checkpoints" / "rm-0"
    cfg = serve_cfg(
        tmp_path_factory.mktemp("serve"),
        ckpt,
        free_port(),
        "serve.batch_wait_timeout_s=0.2",
        "serve.max_items_per_request=16",
        "serve.max_request_bytes=4096",
        "serve.num_cpus_per_replica=0.5",
    )
    os.environ[cfg.serve.token_env] = TOKEN
    try:
        url = start_reward_server(cfg)
        yield url, ckpt, cfg
    finally:
        stop_reward_server()
        os.environ.pop(cfg.serve.token_env, None)


def auth(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def by_hand(ckpt, sequences: list[list[int]]) -> list[float]:
    """The checkpoint's rewards, one unpadded sequence at a time."""
    from r2m_ray.models.reward_model import RewardModel

    model = RewardModel.from_pretrained(ckpt).eval()
    with torch.no_grad():
        return [float(model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).rewards) for s in sequences]


def test_rewards_are_the_checkpoints_in_both_forms(server):
    from r2m_ray.actors.reward_annotator import rm_tokenizer_dir
    from r2m_ray.data.tokenize import encode_prompt_response, render_prompt
    from r2m_ray.models.registry import load_tokenizer

    url, ckpt, cfg = server
    tok = load_tokenizer(rm_tokenizer_dir(ckpt))
    # chat form: the RM's own template, encoded as the RL annotator and the RM stage encode a pair
    chats = [[*p, {"role": "assistant", "content": r}] for p, r in zip(PROMPTS, REPLIES)]
    got = httpx.post(f"{url}/score", json={"messages": chats}, headers=auth(), timeout=60)
    assert got.status_code == 200, got.text
    max_len = cfg.data.max_length
    encoded = [encode_prompt_response(tok, p, r, max_len, max_len - 1).input_ids for p, r in zip(PROMPTS, REPLIES)]
    want = by_hand(ckpt, encoded)
    assert got.json()["rewards"] == pytest.approx(want, abs=1e-5) and got.json()["nonfinite"] == []
    assert got.json()["scores"] == got.json()["rewards"]  # OpenRLHF reads either key
    # an RL policy's bare eos is a real sample: scored on request, as the local frozen RM scores it
    empty = {"messages": [[*PROMPTS[0], {"role": "assistant", "content": ""}]], "allow_empty": True}
    got_empty = httpx.post(f"{url}/score", json=empty, headers=auth(), timeout=60).json()["rewards"]
    bare = encode_prompt_response(tok, PROMPTS[0], "", max_len, max_len - 1).input_ids
    assert got_empty == pytest.approx(by_hand(ckpt, [bare]), abs=1e-5)
    # OpenRLHF's form: the full text, tokenised as it is, bos and eos added: the same tokens here
    texts = [render_prompt(tok, p) + r for p, r in zip(PROMPTS, REPLIES)]
    got = httpx.post(f"{url}/get_reward", json={"query": texts}, headers=auth(), timeout=60)
    assert got.status_code == 200, got.text
    plain = [[tok.bos_token_id, *tok(t, add_special_tokens=False)["input_ids"], tok.eos_token_id] for t in texts]
    assert got.json()["rewards"] == pytest.approx(by_hand(ckpt, plain), abs=1e-5)
    assert len(set(got.json()["rewards"])) == 3  # three different answers, not one broadcast number


def test_token_is_required_and_info_names_the_model(server):
    from r2m_ray.run_inputs import sha256_path

    url, ckpt, _ = server
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}  # no token: says nothing of the model
    body = {"query": ["x"]}
    for headers in ({}, {"Authorization": TOKEN}, auth("wrong-token-0123456789"), {"Authorization": "Basic abc"}):
        r = httpx.post(f"{url}/get_reward", json=body, headers=headers, timeout=30)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", (headers, r.text)
        assert httpx.get(f"{url}/info", headers=headers, timeout=30).status_code == 401
    info = httpx.get(f"{url}/info", headers=auth(), timeout=30).json()
    assert info["checkpoints"] == [{"path": str(ckpt.resolve()), "sha256": sha256_path(ckpt.resolve())}]
    assert info["value_head"] == "mlp" and info["backbone"]["model_type"] == "llama"
    assert info["limits"] == {"max_items_per_request": 16, "max_request_bytes": 4096}


@pytest.mark.parametrize(
    ("path", "content", "status", "detail"),
    [
        ("/get_reward", b"{not json", 400, "the body is not valid JSON"),
        ("/get_reward", json.dumps({"queries": ["x"]}).encode(), 400, 'an object with a "query" list'),
        ("/get_reward", json.dumps({"query": []}).encode(), 400, '"query" must be a non-empty list'),
        ("/get_reward", json.dumps({"query": ["a"] * 17}).encode(), 413, '"query" has 17 items; at most 16'),
        ("/get_reward", json.dumps({"query": ["a" * 5000]}).encode(), 413, "at most 4096 (serve.max_request_bytes)"),
        ("/get_reward", json.dumps({"query": ["ok", "  "]}).encode(), 422, "query[1] must be a non-empty string"),
        ("/get_reward", json.dumps({"query": ["ab " * 200]}).encode(), 422, "query[0] has"),
        ("/score", json.dumps({"messages": [[{"role": "user", "content": "hi"}]]}).encode(), 400, "messages[0] must"),
        (
            "/score",
            json.dumps(
                {"messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]]}
            ).encode(),
            422,
            "messages[0]: the last message must be a non-empty assistant reply",
        ),
        (
            "/score",
            json.dumps(
                {
                    "messages": [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]],
                    "allow_empty": "yes",
                }
            ).encode(),
            400,
            '"allow_empty" must be true or false',
        ),
    ],
)
def test_bad_requests_get_a_clear_4xx(server, path, content, status, detail):
    url, _, _ = server
    r = httpx.post(f"{url}{path}", content=content, headers={**auth(), "Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    assert detail in r.json()["detail"]


def test_concurrent_clients_get_their_own_answers_in_merged_batches(server):
    """12 clients at once, each with its own pair of replies: every answer is that client's (no lost,
    swapped or duplicated rewards) and the replica merged concurrent requests into shared batches."""
    url, ckpt, _ = server
    requests = [
        {"messages": [[*PROMPTS[i % 3], {"role": "assistant", "content": f"answer {i} and {j}"}] for j in range(2)]}
        for i in range(12)
    ]
    serial = [httpx.post(f"{url}/score", json=q, headers=auth(), timeout=60).json()["rewards"] for q in requests]
    before = httpx.get(f"{url}/info", headers=auth(), timeout=30).json()["counters"]

    def call(q: dict) -> list[float]:
        r = httpx.post(f"{url}/score", json=q, headers=auth(), timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["rewards"]

    with ThreadPoolExecutor(max_workers=12) as pool:
        parallel = list(pool.map(call, requests))
    assert [len(p) for p in parallel] == [2] * 12  # padded beside other clients' rows: the same rewards
    assert sum(parallel, []) == pytest.approx(sum(serial, []), abs=1e-5)
    after = httpx.get(f"{url}/info", headers=auth(), timeout=30).json()["counters"]
    assert after["requests"] - before["requests"] == 12 and after["sequences"] - before["sequences"] == 24
    assert after["batches"] - before["batches"] < 12 and after["largest_batch_requests"] >= 2


def test_start_refuses_a_missing_or_short_token_and_a_bad_checkpoint(trained, tmp_path, monkeypatch):
    from r2m_ray.serving.reward_server import start_reward_server

    _, base = trained
    cfg = serve_cfg(tmp_path, base / "checkpoints" / "rm-0", free_port(), "serve.token_env=R2M_TEST_NO_SUCH_TOKEN")
    monkeypatch.delenv("R2M_TEST_NO_SUCH_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="environment variable R2M_TEST_NO_SUCH_TOKEN"):
        start_reward_server(cfg)
    monkeypatch.setenv("R2M_TEST_NO_SUCH_TOKEN", "short")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        start_reward_server(cfg)
    monkeypatch.setenv("R2M_TEST_NO_SUCH_TOKEN", TOKEN)
    bad = serve_cfg(tmp_path, tmp_path / "nowhere", free_port(), "serve.token_env=R2M_TEST_NO_SUCH_TOKEN")
    with pytest.raises(FileNotFoundError, match=r"eval.checkpoints\[0\]: directory .*nowhere.* does not exist"):
        start_reward_server(bad)


def test_the_serve_command_answers_with_the_token_and_stops_on_sigterm(trained, tmp_path):
    """What a user runs: `r2m-ray serve CONFIG eval.checkpoints=[rm]`, its own Ray, SIGTERM to stop."""
    _, base = trained
    port = free_port()
    overrides = small_overrides(tmp_path) + [
        f"eval.checkpoints=[{base / 'checkpoints' / 'rm-0'}]",
        f"serve.port={port}",
    ]
    env = {**os.environ, "R2M_RAY_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "RAY_ADDRESS": ""}
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2m_ray.cli", "serve", str(ROOT / "jobs" / "quickstart.yaml"), *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline, lines = time.monotonic() + 240, []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.startswith("serving 1 reward model(s) at http://127.0.0.1:") or proc.poll() is not None:
                break
        assert f"at http://127.0.0.1:{port} " in lines[-1], "".join(lines[-30:])
        chat = {"messages": [[*PROMPTS[0], {"role": "assistant", "content": REPLIES[0]}]]}
        ok = httpx.post(f"http://127.0.0.1:{port}/score", json=chat, headers=auth(), timeout=60)
        assert ok.status_code == 200 and len(ok.json()["rewards"]) == 1, ok.text
        refused = httpx.post(f"http://127.0.0.1:{port}/score", json=chat, timeout=60)
        assert refused.status_code == 401
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def rl_rows(run_dir) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["stage"] == "rl"]


def test_rl_stage_with_the_served_rm_gets_the_frozen_rms_rewards(server, trained, frozen_rl_run, tmp_path):
    """rl.reward.mode=remote against the server holding the same RM as the session's mode=frozen run:
    the same samples (same seed, same policy) get the same rewards, so the two runs train alike step
    by step."""
    from r2m_ray.pipelines.full_run import run_pipeline
    from tests.conftest import FROZEN_RL, rl_config

    url, _, _ = server
    tmp, base = trained
    remote = (*FROZEN_RL, "rl.reward.mode=remote", f"rl.reward.remote.url={url}")  # the later mode wins
    runs = {"frozen": frozen_rl_run}
    runs["remote"] = run_pipeline(rl_config(tmp_path, base, *remote), run_dir=tmp_path / "remote").path
    frozen, remote = rl_rows(runs["frozen"]), rl_rows(runs["remote"])
    assert [r["step"] for r in remote] == [r["step"] for r in frozen] == [1, 2]
    for a, b in zip(remote, frozen):
        for key in ("proxy_reward", "frozen_rm_reward", "gold_reward", "agreement_gold"):
            assert a[key] == pytest.approx(b[key], abs=1e-4), (a["step"], key)
        assert a["policy"]["loss"] == pytest.approx(b["policy"]["loss"], abs=1e-4)
        assert a.get("detector_flag_rate") == b.get("detector_flag_rate")  # monitor fitted on the server's rewards
    summary = json.loads((runs["remote"] / "summary.json").read_text())["rl"]
    assert summary["mode"] == "remote" and summary["reward_checkpoint"] == url
    assert summary["rm_accuracy"]["before"] == pytest.approx(
        json.loads((runs["frozen"] / "summary.json").read_text())["rl"]["rm_accuracy"]["before"], abs=1 / 32
    )


def test_remote_reward_stops_with_a_clear_error_before_any_actor(server, trained, tmp_path, monkeypatch):
    from r2m_ray.pipelines.full_run import run_pipeline
    from tests.conftest import rl_config

    url, _, _ = server
    tmp, base = trained
    monkeypatch.delenv("R2M_RAY_REWARD_URL", raising=False)
    with pytest.raises(ValueError, match=r"URL \(http://host:port\) in rl.reward.remote.url or .* R2M_RAY_REWARD_URL"):
        run_pipeline(rl_config(tmp_path, base, "rl.reward.mode=remote"), run_dir=tmp_path / "no-url")
    nowhere = f"http://127.0.0.1:{free_port()}"
    cfg = rl_config(
        tmp_path, base, "rl.reward.mode=remote", f"rl.reward.remote.url={nowhere}", "rl.reward.remote.retries=0"
    )
    with pytest.raises(RuntimeError, match=rf"reward server {nowhere}/info: ConnectError.*after 0 retries"):
        run_pipeline(cfg, run_dir=tmp_path / "nowhere")
    monkeypatch.setenv("R2M_RAY_SERVE_TOKEN", "another-token-0123456789")
    cfg = rl_config(tmp_path, base, "rl.reward.mode=remote", f"rl.reward.remote.url={url}")
    with pytest.raises(RuntimeError, match=rf"reward server {url}/info answered 401: invalid bearer token"):
        run_pipeline(cfg, run_dir=tmp_path / "wrong-token")
    monkeypatch.delenv("R2M_RAY_SERVE_TOKEN")
    with pytest.raises(ValueError, match=r"environment variable R2M_RAY_SERVE_TOKEN \(rl.reward.remote.token_env\)"):
        run_pipeline(cfg, run_dir=tmp_path / "no-token")


def test_trl_grpo_trains_on_the_served_rm_over_http(server, trained, tmp_path):
    """A real client: TRL's GRPOTrainer (its own process) with `ServedReward` as its only reward
    trains 2 steps on world prompts; every reward it got is the checkpoint's own, and the policy moved."""
    from r2m_ray.actors.reward_annotator import rm_tokenizer_dir
    from r2m_ray.data.prompts import load_prompts
    from r2m_ray.data.tokenize import encode_prompt_response
    from r2m_ray.models.registry import load_tokenizer

    url, ckpt, cfg = server
    _, base = trained
    prompts = load_prompts(str(base / "world" / "rl_prompts.jsonl"), cfg.data)["prompt_messages"][:8]
    spec = {"policy_dir": str(base / "checkpoints" / "sft"), "prompts": prompts, "steps": 2}
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    env = {**os.environ, "R2M_RAY_REWARD_URL": url, "R2M_RAY_SERVE_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1"}
    script = ROOT / "tests" / "trl_served_grpo.py"
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "spec.json"), str(tmp_path / "out.json")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    calls = out["calls"]
    assert len(calls) == 2 and all(len(c["rewards"]) == 4 for c in calls)  # one generation of 2 prompts × 2 per step
    tok = load_tokenizer(rm_tokenizer_dir(ckpt))
    max_len = cfg.data.max_length
    rows = [(p, c) for call in calls for p, c in zip(call["prompts"], call["completions"])]
    encoded = [encode_prompt_response(tok, p, c, max_len, max_len - 1).input_ids for p, c in rows]
    got = [r for call in calls for r in call["rewards"]]
    assert got == pytest.approx(by_hand(ckpt, encoded), abs=1e-5)
    assert len(set(got)) > 1  # sampled completions differ, so do their rewards
    logged = [h["reward"] for h in out["log_history"] if "reward" in h]
    assert logged == pytest.approx([sum(c["rewards"]) / 4 for c in calls], abs=1e-5)  # TRL trained on these
    assert out["max_weight_change"] > 0
