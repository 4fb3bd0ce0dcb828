"""`r2m-ray serve CONFIG eval.checkpoints=[DIR, ...]`: trained reward model(s) over HTTP with Ray Serve.

Endpoints (JSON in, JSON out):
- `POST /get_reward` `{"query": [text, ...]}` → `{"rewards": [...], "scores": [...], "nonfinite": [...]}`:
  OpenRLHF's remote-RM convention. Each query is the whole prompt + response text (the policy's
  chat template already applied); it is tokenised as it is by the RM's tokenizer (bos prepended
  and eos appended when missing), so it must fit `data.max_length` tokens.
- `POST /score` `{"messages": [[{"role": ..., "content": ...}, ..., {"role": "assistant", ...}], ...]}`
  (optionally `"allow_empty": true`: an empty reply is scored, as an RL policy's bare eos must be)
  → the same answer: every conversation before its last (assistant) turn is rendered with the RM's
  OWN chat template and the reply appended, exactly as the RM stage and the RL annotator encode a
  (prompt, response), so a policy with another tokenizer gets the rewards this RM was trained for.
  An over-long prompt is cut from the left, as in training.
- `GET /health` → `{"status": "ok"}` (no token: for load balancers; it says nothing about the model).
- `GET /info` → the checkpoints and their SHA-256, backbone, value head, max_length, ensemble
  reduction, the limits and this replica's batching counters.

Every request but /health needs `Authorization: Bearer <token>` (401 without it or with another
token). The token is read from the environment variable `serve.token_env` when the server starts;
only its SHA-256 reaches the replicas. Bad requests get a 4xx naming the field and the item:
413 over `serve.max_request_bytes` or `serve.max_items_per_request`, 400 for malformed JSON or a
wrong shape, 422 for an empty reply or a sequence that cannot fit; 503 once
`serve.max_queued_requests` wait (Serve's backpressure: a bounded queue, not an unbounded one).
A reward that is NaN/inf is returned as null and its index listed in `nonfinite`, never dropped.

Batching: concurrent requests to a replica are merged (`serve.batch`, up to `serve.max_batch_size`
requests or `serve.batch_wait_timeout_s`) and scored in padded forwards of `rm.eval_batch_size`
sequences; several checkpoints are an ensemble reduced by `rm.ensemble_reduce`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from ray import serve

from r2m_ray.config import ConfigError, RunConfig
from r2m_ray.serving.reward_client import read_token

log = logging.getLogger(__name__)

APP_NAME = "r2m-reward"
app = FastAPI(title="r2m-ray reward model", docs_url=None, redoc_url=None, openapi_url=None)


def token_digest(token: str) -> str:
    """What the replicas keep of the bearer token."""
    return hashlib.sha256(token.encode()).hexdigest()


def _items(body: Any, field: str, limit: int) -> list[Any]:
    """body[field] as a non-empty list within the per-request limit (400 / 413 otherwise)."""
    if not isinstance(body, dict) or field not in body:
        raise HTTPException(400, f'the JSON body must be an object with a "{field}" list')
    items = body[field]
    if not isinstance(items, list) or not items:
        raise HTTPException(400, f'"{field}" must be a non-empty list')
    if len(items) > limit:
        raise HTTPException(
            413, f'"{field}" has {len(items)} items; at most {limit} per request (serve.max_items_per_request)'
        )
    return items


@serve.deployment(name="RewardServer")
@serve.ingress(app)
class RewardServer:
    """One replica: the RM(s) and their tokenizer; FastAPI routes; batched scoring."""

    def __init__(self, cfg_json: str, checkpoint_digests: dict[str, str], token_sha256: str) -> None:
        from r2m_ray.actors.reward_annotator import rm_tokenizer_dir
        from r2m_ray.data.tokenize import pad_token_id
        from r2m_ray.models.registry import load_tokenizer
        from r2m_ray.models.reward_model import RewardModel

        cfg = RunConfig.model_validate_json(cfg_json)
        self.serve_cfg, self.max_length = cfg.serve, cfg.data.max_length
        self.eval_batch_size, self.reduce = cfg.rm.eval_batch_size, cfg.rm.ensemble_reduce
        torch.set_num_threads(cfg.serve.torch_threads)
        self.digests, self.token_sha256 = checkpoint_digests, token_sha256
        paths = [Path(p) for p in checkpoint_digests]
        self.models = [RewardModel.from_pretrained(p).eval().requires_grad_(False) for p in paths]
        self.tokenizer = load_tokenizer(rm_tokenizer_dir(paths[0]))
        self.pad_id = pad_token_id(self.tokenizer)
        text = self.models[0].causal_lm.config.get_text_config()
        self.backbone = {
            "model_type": text.model_type,
            "hidden_size": text.hidden_size,
            "layers": text.num_hidden_layers,
            "vocab_size": text.vocab_size,
            "parameters": sum(p.numel() for p in self.models[0].parameters()),
        }
        self.counters = {"batches": 0, "requests": 0, "sequences": 0, "largest_batch_requests": 0}
        self._score.set_max_batch_size(cfg.serve.max_batch_size)
        self._score.set_batch_wait_timeout_s(cfg.serve.batch_wait_timeout_s)

    # ------------------------------------------------------------------ checks

    def _authorise(self, request: Request) -> None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not presented:
            raise HTTPException(
                401, "missing bearer token (Authorization: Bearer <token>)", {"WWW-Authenticate": "Bearer"}
            )
        if not hmac.compare_digest(token_digest(presented.strip()), self.token_sha256):
            raise HTTPException(401, "invalid bearer token", {"WWW-Authenticate": "Bearer"})

    async def _body(self, request: Request) -> Any:
        self._authorise(request)
        limit = self.serve_cfg.max_request_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise HTTPException(413, f"the body has {declared} bytes; at most {limit} (serve.max_request_bytes)")
        raw = await request.body()
        if len(raw) > limit:
            raise HTTPException(413, f"the body has {len(raw)} bytes; at most {limit} (serve.max_request_bytes)")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise HTTPException(400, f"the body is not valid JSON: {err}") from None

    # ---------------------------------------------------------------- encoding

    def _encode_query(self, i: int, text: Any) -> list[int]:
        if not isinstance(text, str) or not text.strip():
            raise HTTPException(422, f"query[{i}] must be a non-empty string")
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        bos, eos = self.tokenizer.bos_token_id, self.tokenizer.eos_token_id
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if eos is not None and ids[-1] != eos:
            ids = [*ids, eos]
        if len(ids) > self.max_length:
            raise HTTPException(
                422, f"query[{i}] has {len(ids)} RM tokens; at most {self.max_length} (data.max_length)"
            )
        return ids

    def _encode_chat(self, i: int, conversation: Any, allow_empty: bool = False) -> list[int]:
        from r2m_ray.data.schemas import RowProblem
        from r2m_ray.data.tokenize import encode_prompt_response

        ok = isinstance(conversation, list) and len(conversation) >= 2
        ok = ok and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in conversation)
        if not ok:
            raise HTTPException(400, f"messages[{i}] must be a list of >= 2 {{role, content}} messages")
        *prompt, reply = conversation
        if reply["role"] != "assistant" or not (allow_empty or reply["content"].strip()):
            raise HTTPException(
                422,
                f'messages[{i}]: the last message must be a non-empty assistant reply (or send "allow_empty": true)',
            )
        try:
            enc = encode_prompt_response(self.tokenizer, prompt, reply["content"], self.max_length, self.max_length - 1)
        except RowProblem as err:
            raise HTTPException(422, f"messages[{i}]: {err.detail}") from None
        if enc is None:
            raise HTTPException(
                422, f"messages[{i}]: the reply alone fills data.max_length={self.max_length} RM tokens"
            )
        return enc.input_ids

    # ----------------------------------------------------------------- scoring

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # both reset from serve.* in __init__
    async def _score(self, requests: list[list[list[int]]]) -> list[list[float]]:
        from r2m_ray.algos.bt import ensemble_reduce
        from r2m_ray.data.collate import pad_ids

        flat = [ids for request in requests for ids in request]
        rewards: list[float] = []
        with torch.no_grad():
            for start in range(0, len(flat), self.eval_batch_size):
                ids, attn = pad_ids(flat[start : start + self.eval_batch_size], self.pad_id)
                per_model = torch.stack([m(ids, attn, packed=True).rewards.float() for m in self.models])
                rewards += ensemble_reduce(per_model, self.reduce).tolist()
        c = self.counters
        c["batches"] += 1
        c["requests"] += len(requests)
        c["sequences"] += len(flat)
        c["largest_batch_requests"] = max(c["largest_batch_requests"], len(requests))
        out, start = [], 0
        for request in requests:
            out.append(rewards[start : start + len(request)])
            start += len(request)
        return out

    async def _answer(self, sequences: list[list[int]]) -> dict[str, Any]:
        rewards = await self._score(sequences)
        nonfinite = [i for i, r in enumerate(rewards) if not math.isfinite(r)]
        shown = [r if math.isfinite(r) else None for r in rewards]  # JSON has no NaN: null, and say which
        return {"rewards": shown, "scores": shown, "nonfinite": nonfinite}

    # ------------------------------------------------------------------ routes

    @app.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    async def info(self, request: Request) -> dict[str, Any]:
        self._authorise(request)
        s = self.serve_cfg
        return {
            "checkpoints": [{"path": p, "sha256": d} for p, d in self.digests.items()],
            "backbone": self.backbone,
            "value_head": self.models[0].head_kind,
            "ensemble_reduce": self.reduce,
            "max_length": self.max_length,
            "chat_template": bool(getattr(self.tokenizer, "chat_template", None)),
            "limits": {"max_items_per_request": s.max_items_per_request, "max_request_bytes": s.max_request_bytes},
            "replica": serve.get_replica_context().replica_id.unique_id,
            "counters": dict(self.counters),
        }

    @app.post("/get_reward")
    async def get_reward(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        queries = _items(body, "query", self.serve_cfg.max_items_per_request)
        return await self._answer([self._encode_query(i, q) for i, q in enumerate(queries)])

    @app.post("/score")
    async def score(self, request: Request) -> dict[str, Any]:
        body = await self._body(request)
        conversations = _items(body, "messages", self.serve_cfg.max_items_per_request)
        allow_empty = body.get("allow_empty", False)  # an RL policy may answer with eos alone: a real sample
        if not isinstance(allow_empty, bool):
            raise HTTPException(400, '"allow_empty" must be true or false')
        return await self._answer([self._encode_chat(i, c, allow_empty) for i, c in enumerate(conversations)])


def start_reward_server(cfg: RunConfig) -> str:
    """Check the checkpoints and the token, start Serve on `serve.host:port`, deploy; returns the URL."""
    from r2m_ray.pipelines.preflight import check_reward_checkpoint
    from r2m_ray.ray_setup import init_ray
    from r2m_ray.run_inputs import sha256_path

    if not cfg.eval.checkpoints:
        raise ConfigError("serve: give the reward model(s) to serve, eval.checkpoints=[DIR, ...]")
    try:
        token = read_token(cfg.serve.token_env)
    except ValueError as err:
        raise ConfigError(f"serve: {err}") from None
    digests = {}
    for i, path in enumerate(cfg.eval.checkpoints):
        checked = check_reward_checkpoint(path, f"eval.checkpoints[{i}]").resolve()
        digests[str(checked)] = sha256_path(checked)
    s = cfg.serve
    if s.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serve.host=%s: the reward server listens beyond loopback (the token is still required)", s.host)
    init_ray(cfg.ray)
    serve.start(http_options={"host": s.host, "port": s.port, "request_timeout_s": s.request_timeout_s})
    replicas: dict[str, Any] = (
        {"autoscaling_config": s.autoscaling.model_dump()} if s.autoscaling else {"num_replicas": s.num_replicas}
    )
    deployment = RewardServer.options(
        **replicas,
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.num_cpus_per_replica},
    )
    serve.run(deployment.bind(cfg.model_dump_json(), digests, token_digest(token)), name=APP_NAME, route_prefix="/")
    url = f"http://{s.host}:{s.port}"
    shown = f"{s.autoscaling.min_replicas}-{s.autoscaling.max_replicas}" if s.autoscaling else str(s.num_replicas)
    log.info("reward server: %s (%s replica(s), %d checkpoint(s))", url, shown, len(digests))
    return url


def stop_reward_server() -> None:
    """Remove the application and stop Serve's controller and proxies (this process's Ray stays up)."""
    serve.shutdown()


def serve_until_stopped(cfg: RunConfig) -> None:
    """`r2m-ray serve`: start, print the URL, block until SIGINT/SIGTERM, then stop cleanly."""
    import signal

    url = start_reward_server(cfg)
    print(
        f"serving {len(cfg.eval.checkpoints)} reward model(s) at {url} (POST /get_reward, /score; GET /info, /health)"
    )
    stop = asyncio.Event()
    loop = asyncio.new_event_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        loop.run_until_complete(stop.wait())
    finally:
        stop_reward_server()
        loop.close()
