"""PolicyLearner on real in-process Ray + real DeepSpeed: experience, training sign, ranks, reference."""

from __future__ import annotations

import math
import time

import pytest
import ray
import torch

from r2m_ray.actors.policy_learner import PolicyLearnerGroup, micro_batch_slices, response_token_logprobs
from r2m_ray.actors.reference import ReferenceActor
from r2m_ray.algos.policy_loss import entropy_from_logits, grpo_advantages, kl_penalty, masked_mean, rloo_advantages
from r2m_ray.data.collate import pad_ids
from r2m_ray.eval.flops import DecoderShape
from r2m_ray.models.registry import load_causal_lm, load_tokenizer
from r2m_ray.rl_config import PolicyConfig, PolicyOptimConfig

pytestmark = pytest.mark.slow

ROWS = 8  # 2 prompts × K=4


def make_sequences(vocab: int, rows: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
    """Random prompt+response token lists (non-special ids) and their response masks."""
    g = torch.Generator().manual_seed(seed)
    seqs, masks = [], []
    for _ in range(rows):
        p, r = (int(torch.randint(lo, hi, (1,), generator=g)) for lo, hi in ((3, 7), (2, 7)))
        seqs.append(torch.randint(8, vocab, (p + r,), generator=g).tolist())
        masks.append([0] * p + [1] * r)
    return seqs, masks


def as_batch(seqs: list[list[int]], masks: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    ids, attn = pad_ids(seqs, pad_id)
    resp, _ = pad_ids(masks, 0)
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp}


@ray.remote
def describe_feedback(hidden_refs: list) -> dict:
    """A consumer elsewhere in the cluster: resolves the learner's refs itself."""
    parts = ray.get(hidden_refs)
    h = torch.cat([p["hidden"] for p in parts])
    return {
        "dtype": str(h.dtype),
        "shape": tuple(h.shape),
        "hidden": h.float(),
        "mask": torch.cat([p["mask"] for p in parts]),
    }


def hidden_of(refs: list) -> torch.Tensor:
    return torch.cat([p["hidden"] for p in ray.get(refs)]).float()


def experience(group: PolicyLearnerGroup, batch: dict) -> tuple[torch.Tensor, list, list[dict]]:
    out = ray.get(group.experience_async(batch))
    return torch.cat([e["old_logp"] for e in out]), [e["hidden_ref"] for e in out], out


def train(group: PolicyLearnerGroup, batch: dict, old_logp, ref_logp, adv, epochs: int = 1) -> tuple[dict, list]:
    per_rank = ray.get(
        group.train_async({**batch, "old_logp": old_logp, "ref_logp": ref_logp, "advantages": adv}, epochs)
    )
    refs = [m.pop("hidden_ref") for m in per_rank]
    return PolicyLearnerGroup.reduce_metrics(per_rank), refs


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def batch(tok):
    return as_batch(*make_sequences(len(tok), ROWS, seed=0), tok.pad_token_id)


def policy_cfg(**kw) -> PolicyConfig:
    base = {"micro_batch_size": 4, "kl_coef": 0.05, "kl_estimator": "k3", "optim": PolicyOptimConfig(lr=5e-4)}
    return PolicyConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def learner(ray_session, tiny_model_dir, batch):
    """One ZeRO-2 rank, plus its experience on the untrained weights (taken before any test trains)."""
    group = PolicyLearnerGroup(policy_cfg(), tiny_model_dir, seed=0)
    initial = experience(group, batch)
    yield group, initial
    group.shutdown()


@pytest.fixture(scope="module")
def hf_out(tiny_model_dir, batch):
    model = load_causal_lm(tiny_model_dir).eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        base = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return model, out, base


def test_token_logprobs_helper_hand_computed():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [0.0, 0.0]]])  # p(tok 0 | pos 1) = 3/4
    ids = torch.tensor([[1, 1, 0]])
    out = response_token_logprobs(logits, ids, torch.tensor([[0, 1, 1]]))
    assert torch.allclose(out, torch.tensor([[0.0, math.log(0.5), math.log(0.75)]]))
    with pytest.raises(ValueError, match="position 0"):
        response_token_logprobs(logits, ids, torch.tensor([[1, 1, 1]]))
    assert [s.stop - s.start for s in micro_batch_slices(7, 3)] == [2, 3, 2]


def test_experience_matches_hf_forward(learner, batch, hf_out):
    _, (old_logp, hidden_refs, per_rank) = learner
    model, out, base = hf_out
    ids, attn, resp = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    # hand-rolled: log_softmax of the logit before each token, gathered at the token
    full = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = torch.nn.functional.pad(full * resp[:, 1:], (1, 0))
    assert old_logp.dtype == torch.float32 and old_logp.shape == ids.shape
    assert (old_logp[resp == 0] == 0).all() and (old_logp[resp == 1] < 0).all()
    assert torch.allclose(old_logp, expected, atol=1e-5)
    ent = entropy_from_logits(out.logits[:, :-1])[resp[:, 1:].bool()].mean()
    assert per_rank[0]["entropy"] == pytest.approx(float(ent), rel=1e-4)
    # the async loop's sampler log-probs: log softmax(logits/τ) at the same positions (weights still untrained)
    at_tau = ray.get(learner[0].experience_async(batch, sampler_temperature=0.7))
    scaled = torch.log_softmax(out.logits[:, :-1].float() / 0.7, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(at_tau[0]["sampler_logp"], torch.nn.functional.pad(scaled * resp[:, 1:], (1, 0)), atol=1e-5)
    assert torch.equal(at_tau[0]["old_logp"], old_logp) and "sampler_logp" not in per_rank[0]
    # transformers 5 ties hidden_states[-1] to the post-norm last_hidden_state (what the LM head reads)
    assert torch.equal(out.hidden_states[-1], base)
    assert torch.allclose(model.lm_head(base), out.logits, atol=1e-5)
    # h resolves in another task, never passing through this process
    info = ray.get(describe_feedback.remote(hidden_refs))
    d = model.config.hidden_size
    assert info["dtype"] == "torch.bfloat16" and info["shape"] == (*ids.shape, d)
    assert torch.equal(info["mask"], attn)
    real = attn.bool()
    assert torch.allclose(info["hidden"][real], base[real], rtol=1e-2, atol=1e-2)
    assert (info["hidden"][~real] == 0).all()


def test_reference_token_logprobs_equal_untrained_learner(learner, batch, tok, tiny_model_dir):
    _, (old_logp, _, _) = learner
    ref = ReferenceActor.remote(str(tiny_model_dir), tok.pad_token_id)
    try:
        from_tensors = ray.get(
            ref.token_logprobs.remote(batch["input_ids"], batch["attention_mask"], batch["response_mask"])
        )
        seqs, masks = make_sequences(len(tok), ROWS, seed=0)
        from_lists = ray.get(ref.token_logprobs.remote(seqs, None, masks))
    finally:
        ray.kill(ref)
    assert from_tensors.shape == old_logp.shape
    assert torch.allclose(from_tensors, old_logp, atol=1e-5)
    assert torch.allclose(from_lists, old_logp, atol=1e-5)


def test_first_micro_batch_has_ratio_one_and_refreshes_h(learner, batch):
    group, _ = learner
    half = {k: v[:4] for k, v in batch.items()}  # exactly one micro-batch
    old_logp, h_refs, _ = experience(group, half)
    stats, new_refs = train(group, half, old_logp, old_logp, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert stats["clip_fraction"] == 0.0
    assert stats["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-9) and stats["kl"] == pytest.approx(0.0, abs=1e-9)
    assert stats["optimizer_steps"] >= 1 and math.isfinite(stats["grad_norm"])
    # epoch 1's forward runs on the same weights as experience: h' equals h
    assert torch.allclose(hidden_of(new_refs), hidden_of(h_refs), atol=1e-2)


def test_advantage_sign_moves_logprobs_and_kl_grows(learner, batch):
    group, _ = learner
    resp = batch["response_mask"]
    adv = torch.tensor([1.0, -1.0] * (ROWS // 2))
    start, _, _ = experience(group, batch)
    ref_logp = start.clone()  # the reference = the weights at the start: KL starts at 0
    kls = []
    old = start
    for _ in range(4):
        stats, _ = train(group, batch, old, ref_logp, adv)
        kls.append(stats["kl"])
        old, _, _ = experience(group, batch)
    moved = old.sum(1) - start.sum(1)
    assert (moved[adv > 0] > 0).all(), moved
    assert (moved[adv < 0] < 0).all(), moved
    assert kls[0] < 1e-3 and kls[-1] > 3 * kls[0] and kls[-1] > 1e-4, kls
    kl_now = masked_mean(kl_penalty(old, ref_logp, "k3"), resp)
    assert kl_now > 1e-3


def test_behaviour_weights_reach_the_loss_in_the_engine(learner, batch):
    """The async loop's per-token weights scale the policy gradient inside the engine: w = 0 leaves
    only the KL's, which is ~0 at ρ = 1 (the micro-batch's first step on these weights)."""
    group, _ = learner
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    half = {k: v[:4] for k, v in batch.items()}  # one micro-batch
    norms = {}
    for w in (0.0, 1.0):
        old, _, _ = experience(group, half)
        stats, _ = train(group, {**half, "behaviour_weight": torch.full(half["input_ids"].shape, w)}, old, old, adv)
        norms[w] = stats["grad_norm"]
    assert norms[1.0] > 1e-3 and norms[0.0] < 1e-3 * norms[1.0], norms


def test_group_waits_have_deadlines_and_a_failed_start_frees_its_ranks(ray_session, learner, tiny_model_dir, tmp_path):
    from r2m_ray.actors.distributed import LearnerHung

    group, _ = learner
    group.deadlines = {"call": ("rl.wait_timeout_s", 0.001)}  # no checkpoint save is that fast
    try:
        with pytest.raises(
            LearnerHung,
            match=r"PolicyLearner ranks\): save_checkpoint did not return within rl\.wait_timeout_s=0\.001 s",
        ):
            group.save_checkpoint(tmp_path / "ckpt")
    finally:
        group.deadlines = {}
    free = ray.available_resources().get("CPU", 0.0)
    with pytest.raises(LearnerHung, match=r"start-up did not return within rl\.startup_timeout_s=0\.001 s"):
        PolicyLearnerGroup(policy_cfg(), tiny_model_dir, seed=0, deadlines={"start": ("rl.startup_timeout_s", 0.001)})
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0.0) < free and time.monotonic() < deadline:
        time.sleep(0.2)  # the killed rank's CPU comes back once Ray has reaped it
    assert ray.available_resources().get("CPU", 0.0) >= free


def hand_flops(model_dir, batch: dict) -> float:
    """6·N·Σ T_s + 12·L·d·Σ T_s² + 6·V·d·R for one forward+backward over the batch (eval/flops.py)."""
    shape = DecoderShape.of(load_causal_lm(model_dir))
    lengths = batch["attention_mask"].sum(1).tolist()
    head_positions = int(batch["response_mask"][:, 1:].sum())  # the tokens after position 0 that are predicted
    return (
        6 * shape.params * sum(lengths)
        + 12 * shape.layers * shape.hidden * sum(t * t for t in lengths)
        + 6 * shape.vocab * shape.hidden * head_positions
    )


def test_two_epochs_refresh_h_from_moved_weights(learner, batch, tiny_model_dir):
    group, _ = learner
    adv = torch.tensor([1.0, -1.0] * (ROWS // 2))
    old_logp, _, _ = experience(group, batch)
    steps_before = train(group, batch, old_logp, old_logp, adv)[0]["optimizer_steps"]
    old_logp, h_refs, _ = experience(group, batch)
    stats, new_refs = train(group, batch, old_logp, old_logp, adv, epochs=2)
    assert stats["optimizer_steps"] == steps_before + 2 * 2  # 2 epochs × 2 micro-batches
    # MFU's numerator: 2 epochs of the FLOPs of every real token, the LM head on response positions only
    assert stats["train_flops"] == pytest.approx(2 * hand_flops(tiny_model_dir, batch), rel=1e-12)
    assert stats["train_seconds"] > 0
    real = batch["attention_mask"].bool()
    diff = (hidden_of(new_refs) - hidden_of(h_refs))[real].abs().max()
    assert diff > 5e-2, diff  # the last epoch saw the weights after epoch 1
    assert stats["clip_fraction"] > 0 or stats["approx_kl"] > 0


def test_nonfinite_loss_skips_the_micro_batch_and_leaves_weights(learner, batch):
    group, _ = learner
    old_logp, _, _ = experience(group, batch)
    before = group.checksums()[0]
    steps_before = train(group, batch, old_logp, old_logp, torch.zeros(ROWS))[0]["optimizer_steps"]
    after_zero_adv = group.checksums()[0]
    adv = torch.ones(ROWS)
    adv[0] = float("nan")  # poisons the first micro-batch's loss only
    stats, _ = train(group, batch, old_logp, old_logp, adv)
    assert stats["nonfinite_skipped"] == 1 and stats["optimizer_steps"] == steps_before + 1
    assert math.isfinite(stats["loss"]) and group.checksums()[0] != after_zero_adv
    adv[:] = float("nan")
    moved = group.checksums()[0]
    stats, _ = train(group, batch, old_logp, old_logp, adv)
    assert stats["nonfinite_skipped"] == 2 and "loss" not in stats  # both micro-batches skipped
    assert group.checksums()[0] == moved, "a skipped step must not touch the weights"
    assert before != moved


def test_nonfinite_grad_norm_stops_the_learner(ray_session, tiny_model_dir, batch):
    """Advantages of 1e30 keep the loss finite (|loss| ~ 1e30 < 3.4e38) while the squared gradients
    overflow float32: the step has been applied with an inf norm, so the learner must refuse to go on.
    A group of its own: the step ruins its weights."""
    group = PolicyLearnerGroup(policy_cfg(), tiny_model_dir, seed=0)
    try:
        half = {k: v[:4] for k, v in batch.items()}  # one micro-batch: the first optimiser step
        old_logp, _, _ = experience(group, half)
        with pytest.raises(FloatingPointError, match="rank 0: non-finite gradient norm at optimiser step 1;"):
            train(group, half, old_logp, old_logp, torch.tensor([1e30, -1e30, 1e30, -1e30]))
        # the same call with ordinary advantages trains: the stop is the norm's, not the batch's
        fresh = PolicyLearnerGroup(policy_cfg(), tiny_model_dir, seed=0)
        try:
            stats, _ = train(fresh, half, old_logp, old_logp, torch.tensor([1.0, -1.0, 1.0, -1.0]))
            assert math.isfinite(stats["grad_norm"]) and stats["optimizer_steps"] == 1
        finally:
            fresh.shutdown()
    finally:
        group.shutdown()


@pytest.mark.parametrize("algo", ["grpo", "rloo"])
def test_train_runs_with_group_advantages(learner, batch, algo):
    group, _ = learner
    rewards = torch.tensor([[0.1, 0.9, 0.4, 0.2], [1.0, -1.0, 0.0, 0.5]])
    adv = (grpo_advantages if algo == "grpo" else rloo_advantages)(rewards).reshape(-1)
    old_logp, _, _ = experience(group, batch)
    stats, refs = train(group, batch, old_logp, old_logp, adv)
    assert stats["rows"] == ROWS and len(refs) == 1
    for k in ("loss", "pg_loss", "kl", "clip_fraction", "approx_kl", "entropy", "grad_norm"):
        assert math.isfinite(stats[k]), (k, stats)
    assert stats["entropy"] > 0


def test_two_rank_zero2_ranks_identical_and_hf_keys(ray_session, learner, tiny_model_dir, batch, hf_out):
    _, (initial, _, _) = learner
    group = PolicyLearnerGroup(policy_cfg(ranks=2, micro_batch_size=2), tiny_model_dir, seed=0)
    try:
        old_logp, h_refs, _ = experience(group, batch)
        assert torch.allclose(old_logp, initial, atol=1e-5)  # rows come back in order
        assert len(h_refs) == 2 and [tuple(p["hidden"].shape[:1]) for p in ray.get(h_refs)] == [(4,), (4,)]
        before = group.checksums()[0]
        adv = torch.tensor([1.0, -1.0] * (ROWS // 2))
        for _ in range(2):
            stats, _ = train(group, batch, old_logp, initial, adv)
            old_logp, _, _ = experience(group, batch)
        assert stats["rows"] == ROWS
        # the group's FLOPs are the sum of its ranks' (each trained half the rows)
        assert stats["train_flops"] == pytest.approx(hand_flops(tiny_model_dir, batch), rel=1e-12)
        sums = group.checksums()
        assert sums[0] == pytest.approx(sums[1], rel=1e-9)
        assert abs(sums[0] - before) > 1e-3
        state = ray.get(group.state_dict_ref())
        hf_state = hf_out[0].state_dict()
        assert list(state) == list(hf_state)
        assert all(state[k].shape == v.shape and state[k].device.type == "cpu" for k, v in hf_state.items())
    finally:
        group.shutdown()


def test_two_rank_zero3_gathers_state_and_saves(ray_session, learner, tiny_model_dir, batch, hf_out, tmp_path):
    _, (initial, _, _) = learner
    group = PolicyLearnerGroup(policy_cfg(ranks=2, micro_batch_size=2, zero_stage=3), tiny_model_dir, seed=0)
    try:
        old_logp, _, _ = experience(group, batch)
        assert torch.allclose(old_logp, initial, atol=1e-5)
        state = ray.get(group.state_dict_ref(), timeout=120)
        hf_state = hf_out[0].state_dict()
        assert list(state) == list(hf_state)
        assert all(torch.equal(state[k], v) for k, v in hf_state.items())  # untrained: the HF weights
        train(group, batch, old_logp, initial, torch.tensor([1.0, -1.0] * (ROWS // 2)))
        sums = group.checksums()
        assert sums[0] == pytest.approx(sums[1], rel=1e-9)
        trained = ray.get(group.state_dict_ref(), timeout=120)
        saved = load_causal_lm(group.save(tmp_path / "policy", tokenizer_dir=tiny_model_dir)).state_dict()
        assert all(torch.equal(saved[k], v) for k, v in trained.items())
        assert not all(torch.equal(trained[k], v) for k, v in hf_state.items())
        assert (tmp_path / "policy" / "model.safetensors").is_file()
    finally:
        group.shutdown()
