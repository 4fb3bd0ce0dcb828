"""RM-stage actors on real in-process Ray: DeepSpeed learner ranks, prioritiser, reference."""

from __future__ import annotations

import ipaddress
import json
import os

import pytest
import ray
import torch

from r2m_ray.actors.prioritizer import Prioritizer, split_prompt_response
from r2m_ray.actors.rm_learner import RMLearnerGroup
from r2m_ray.algos.decomposition import priorities, prompt_free_gap
from r2m_ray.data.preference import load_preferences
from r2m_ray.data.tokenize import PreferenceCollator, tokenize_preferences
from r2m_ray.models.registry import load_tokenizer
from r2m_ray.models.reward_model import RewardModel
from r2m_ray.pipelines.rm_stage import encoded_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def train_ds(small_cfg, world_paths, tiny_model_dir):
    tok = load_tokenizer(tiny_model_dir)
    return tokenize_preferences(
        load_preferences(str(world_paths["train"]), small_cfg.data), tok, small_cfg.data
    ).dataset


def _cfg_json(cfg) -> str:
    return json.dumps(cfg.model_dump(mode="json"))


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_two_deepspeed_ranks_stay_identical_and_learn(ray_session, small_cfg, tiny_model_dir, train_ds, zero_stage):
    cfg = small_cfg.model_copy(deep=True)
    cfg.rm.deepspeed.ranks = 2
    cfg.rm.deepspeed.zero_stage = zero_stage
    cfg.rm.grm.regulariser = "sft"
    cfg.rm.optim.lr = 1e-3
    cfg.rm.optim.warmup_steps = 1
    tok = load_tokenizer(tiny_model_dir)
    group = RMLearnerGroup(_cfg_json(cfg), cfg.rm, tiny_model_dir, seed=0)
    try:
        assert [i["rank"] for i in group.init_info] == [0, 1]
        assert all(i["backend"] == "gloo" for i in group.init_info)
        before = group.checksums()[0]
        batch = PreferenceCollator(tok.pad_token_id)(list(train_ds.select(range(16))))
        losses = []
        for _ in range(12):  # the same batch: the loss must fall
            m = RMLearnerGroup.reduce_metrics(ray.get(group.train_step_async(batch)))
            losses.append(m["loss"])
        assert m["pairs"] == 16 and "reg_loss" in m
        assert losses[-1] < 0.7 * losses[0], losses
        sums = group.checksums()
        assert sums[0] == pytest.approx(sums[1], rel=1e-6)  # data parallel: ranks identical
        assert abs(sums[0] - before) > 1e-3  # and the weights really moved
    finally:
        group.shutdown()


def test_prioritizer_actor_matches_direct_computation(ray_session, small_cfg, tiny_model_dir, train_ds):
    tok = load_tokenizer(tiny_model_dir)
    model = RewardModel.from_backbone_dir(tiny_model_dir, value_head="linear", seed=3).eval()
    cfg = small_cfg.model_copy(deep=True)
    cfg.model.value_head = "linear"
    cfg.rm.prioritizer.num_prompts = 3
    cfg.rm.prioritizer.tau = 0.5
    prio = Prioritizer.remote(_cfg_json(cfg), str(tiny_model_dir), tok.pad_token_id, cfg.data.max_length, 0)
    state = ray.put({k: v.clone() for k, v in model.state_dict().items()})
    assert ray.get(prio.refresh.remote(state, 7)) == 7
    enc = encoded_rows(train_ds, list(range(12)))
    out = ray.get(prio.score.remote(enc))
    assert out["version"] == 7 and out["sequences_scored"] == 12 * 3 * 2
    idx = out["prompt_index"]
    assert (idx[:, 0] == torch.arange(12)).all()  # own prompt first
    assert all(len(set(r.tolist())) == 3 for r in idx)  # distinct prompts per pair
    # recompute Δr2 here, one sequence at a time, with the same weights
    d = torch.zeros(12, 3)
    with torch.no_grad():
        for k in range(12):
            _, yc = split_prompt_response(enc["chosen_input_ids"][k], enc["chosen_response_mask"][k])
            _, yr = split_prompt_response(enc["rejected_input_ids"][k], enc["rejected_response_mask"][k])
            for j, i in enumerate(idx[k].tolist()):
                x, _ = split_prompt_response(enc["chosen_input_ids"][i], enc["chosen_response_mask"][i])
                rc = model(torch.tensor([x + yc]), torch.ones(1, len(x + yc), dtype=torch.long)).rewards
                rr = model(torch.tensor([x + yr]), torch.ones(1, len(x + yr), dtype=torch.long)).rewards
                d[k, j] = (rc - rr).item()
    expected = prompt_free_gap(d)
    assert torch.allclose(out["delta_r2"], expected, atol=2e-4)
    assert torch.allclose(out["priorities"], priorities(expected, tau=0.5), atol=1e-3)
    assert out["priorities"].mean().item() == pytest.approx(1.0, abs=1e-5)
    ray.kill(prio)


def test_prioritizer_reference_weights_come_from_the_starting_model(ray_session, small_cfg, tiny_model_dir, train_ds):
    """weights=reference: w_i = softmax_i(log π_ref(y_c|x_i) + log π_ref(y_r|x_i)) of the model the run
    started from, not of the refreshed one; Δr2 solves the weighted equation; batch_std priorities."""
    tok = load_tokenizer(tiny_model_dir)
    model = RewardModel.from_backbone_dir(tiny_model_dir, value_head="linear", seed=3).eval()
    with torch.no_grad():  # the "trained" snapshot differs from the start, LM head included
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = small_cfg.model_copy(deep=True)
    cfg.model.value_head = "linear"
    cfg.rm.prioritizer.num_prompts = 3
    cfg.rm.prioritizer.weights = "reference"
    cfg.rm.prioritizer.normalize = "batch_std"
    prio = Prioritizer.remote(_cfg_json(cfg), str(tiny_model_dir), tok.pad_token_id, cfg.data.max_length, 0)
    ray.get(prio.refresh.remote(ray.put({k: v.clone() for k, v in model.state_dict().items()}), 1))
    enc = encoded_rows(train_ds, list(range(8)))
    out = ray.get(prio.score.remote(enc))
    idx = out["prompt_index"]
    start = RewardModel.from_backbone_dir(tiny_model_dir).eval()
    d, logp = torch.zeros(8, 3), torch.zeros(8, 3, 2)
    with torch.no_grad():
        for k in range(8):
            _, yc = split_prompt_response(enc["chosen_input_ids"][k], enc["chosen_response_mask"][k])
            _, yr = split_prompt_response(enc["rejected_input_ids"][k], enc["rejected_response_mask"][k])
            for j, i in enumerate(idx[k].tolist()):
                x, _ = split_prompt_response(enc["chosen_input_ids"][i], enc["chosen_response_mask"][i])
                for side, y in enumerate((yc, yr)):
                    ids = torch.tensor([x + y])
                    attn = torch.ones_like(ids)
                    mask = torch.tensor([[0] * len(x) + [1] * len(y)])
                    logp[k, j, side] = start(ids, attn, response_mask=mask).seq_logps[0]
                    r = model(ids, attn).rewards[0]
                    d[k, j] += r if side == 0 else -r
    w = torch.softmax(logp.sum(-1).double(), dim=1)
    assert torch.allclose(out["weights"].double(), w, atol=1e-4)
    assert not torch.allclose(w, torch.full_like(w, 1 / 3), atol=1e-2)  # not uniform: the weights matter here
    expected = prompt_free_gap(d, w)
    assert torch.allclose(out["delta_r2"], expected, atol=2e-4)
    assert torch.allclose(out["priorities"], priorities(expected, 1.0, "batch_std"), atol=1e-3)
    ray.kill(prio)


def test_reference_logprobs_computed_once_and_correct(ray_session, tiny_model_dir, train_ds, tmp_path):
    from r2m_ray.pipelines.rm_stage import add_reference_logprobs

    tok = load_tokenizer(tiny_model_dir)
    ds = train_ds.select(range(40))
    out = add_reference_logprobs(ds, tiny_model_dir, tok.pad_token_id, tmp_path, chunk=16)
    cached = list(tmp_path.glob("ref_logps-*.parquet"))
    assert len(cached) == 1
    model = RewardModel.from_backbone_dir(tiny_model_dir).eval()
    batch = PreferenceCollator(tok.pad_token_id)(list(ds.select(range(4))))
    with torch.no_grad():
        lp = model(
            batch["chosen_input_ids"], batch["chosen_attention_mask"], response_mask=batch["chosen_response_mask"]
        ).seq_logps
    assert torch.allclose(torch.tensor(out["ref_logp_c"][:4]), lp, atol=1e-3)
    assert all(v < 0 for v in out["ref_logp_r"])
    # second call: read from the cache (mtime unchanged), same values
    mtime = cached[0].stat().st_mtime_ns
    again = add_reference_logprobs(ds, tiny_model_dir, tok.pad_token_id, tmp_path)
    assert cached[0].stat().st_mtime_ns == mtime
    assert again["ref_logp_c"] == out["ref_logp_c"]
    # keyed by the model's contents: the same files elsewhere reuse it, a changed model does not
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "model-copy")
    add_reference_logprobs(ds, copy, tok.pad_token_id, tmp_path)
    assert list(tmp_path.glob("ref_logps-*.parquet")) == cached
    with open(copy / "config.json", "a") as f:
        f.write("\n")  # rewritten in place at the same path
    add_reference_logprobs(ds, copy, tok.pad_token_id, tmp_path)
    assert len(list(tmp_path.glob("ref_logps-*.parquet"))) == 2
    assert not list(tmp_path.glob(".ref_logps-*"))  # no temp file left


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    return (mapped or addr).is_loopback


def test_ray_listens_on_loopback_only(ray_session):
    """Every socket that this session's own Ray listens on is on loopback: the processes walked are
    the descendants of this pytest process (the in-process head: gcs_server, raylet, its workers
    and the actors the tests started), never the rest of the machine."""
    import psutil

    listening, bad = set(), []
    for proc in psutil.Process(os.getpid()).children(recursive=True):
        try:
            conns, name = proc.net_connections(kind="inet"), proc.name()
        except psutil.Error:
            continue  # exited between the walk and the look
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN:
                listening.add(name)
                if not _is_loopback(conn.laddr.ip):
                    bad.append((conn.laddr, name))
    assert {"gcs_server", "raylet"} <= listening, f"this session's Ray was not found listening: {listening}"
    assert not bad, f"Ray sockets not on loopback: {bad}"
