"""R2M actors on real in-process Ray: RewardAnnotator (frozen RM + cached RTE + head) and RewardHeadLearner."""

from __future__ import annotations

import pytest
import ray
import torch

from r2m_ray.actors.reward_annotator import RewardAnnotator
from r2m_ray.actors.reward_head_learner import RewardHeadLearner, self_labelled_groups
from r2m_ray.algos.r2m import omega
from r2m_ray.data.collate import pad_ids
from r2m_ray.data.tokenize import encode_prompt_response
from r2m_ray.models.r2m_head import R2MHead, concat_feedback
from r2m_ray.models.registry import load_causal_lm, load_tokenizer
from r2m_ray.models.reward_model import RewardModel

pytestmark = pytest.mark.slow

K = 4  # samples per prompt; 3 prompts → 3 groups, 12 rows
PROMPTS = ["add 3 4", "sort 5 2 9", "reverse a b c"]
RESPONSES = [
    ["7", "8", "7 7", "12"],
    ["2 5 9", "9 5 2", "2 9", "5"],
    ["c b a", "a b c", "c a", "b"],
]
T_MID, T_TOTAL = 5, 10  # ω(5, 10) = max(½, Ω=0.6) = 0.6: feedback has weight 0.4
OUT_BIAS = "phi.3.bias"  # φ's output bias (MLP head): GREBT is shift-invariant, so it is never trained


def _reward_json(small_cfg, mode: str = "r2m", loss: dict | None = None, **r2m) -> str:
    cfg = small_cfg.rl.reward.model_copy(deep=True)
    cfg.mode = mode
    for key, value in r2m.items():
        setattr(cfg.r2m, key, value)
    for key, value in (loss or {}).items():
        setattr(cfg.r2m.loss, key, value)
    return cfg.model_dump_json()


def _kill(*actors) -> None:
    for actor in actors:
        ray.kill(actor)


@pytest.fixture(scope="module")
def rm_ckpt(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("r2m_rm") / "rm"
    RewardModel.from_backbone_dir(tiny_model_dir, seed=0).save_pretrained(out, tokenizer=load_tokenizer(tiny_model_dir))
    return str(out)


@pytest.fixture(scope="module")
def rows():
    msgs = [[{"role": "user", "content": p}] for p in PROMPTS for _ in range(K)]
    return msgs, [r for group in RESPONSES for r in group]


@pytest.fixture(scope="module")
def direct(rm_ckpt, rows, small_cfg):
    """The frozen RM's rewards and RTEs computed in this process, one batch, no actor involved."""
    rm = RewardModel.from_pretrained(rm_ckpt).eval()
    tok = load_tokenizer(rm_ckpt)
    max_len = small_cfg.data.max_length
    seqs = [encode_prompt_response(tok, m, r, max_len, max_len - 1).input_ids for m, r in zip(*rows)]
    ids, attn = pad_ids(seqs, tok.pad_token_id)
    with torch.no_grad():
        out = rm(ids, attn)
    return {"rewards": out.rewards, "rte": out.last_hidden.float(), "rm": rm}


@pytest.fixture(scope="module")
def feedback(tiny_model_dir, rows, small_cfg, ray_session):
    """Policy hidden states as the policy learner ships them: bf16 chunks of rows, put once.

    Two chunks padded differently (left, then right, different lengths) exercise the concatenation.
    `h` is the last layer (annotation-time feedback); `h2` the layer below stands in for the
    refreshed h' of the last policy epoch: real, and different from h.
    """
    policy = load_causal_lm(tiny_model_dir).eval()
    tok = load_tokenizer(tiny_model_dir)
    data = small_cfg.data
    seqs = [encode_prompt_response(tok, m, r, data.max_length, data.max_prompt_length).input_ids for m, r in zip(*rows)]
    chunks = {"h": [], "h2": []}
    for sl, side in ((slice(0, 5), "left"), (slice(5, 12), "right")):
        ids, attn = pad_ids(seqs[sl], tok.pad_token_id, side=side)
        with torch.no_grad():
            states = policy(input_ids=ids, attention_mask=attn, output_hidden_states=True).hidden_states
        chunks["h"].append({"hidden": states[-1].to(torch.bfloat16), "mask": attn})
        chunks["h2"].append({"hidden": states[-2].to(torch.bfloat16), "mask": attn})
    return {
        "d_policy": policy.config.hidden_size,
        "chunks": chunks,
        "h_refs": [ray.put(c) for c in chunks["h"]],
        "h2_refs": [ray.put(c) for c in chunks["h2"]],
    }


@pytest.fixture(scope="module")
def annotator(ray_session, small_cfg, rm_ckpt, feedback):
    """One r2m annotator shared by the tests (each leaves its head as it found it: version 0)."""
    ann = RewardAnnotator.remote(rm_ckpt, _reward_json(small_cfg), feedback["d_policy"], small_cfg.data.max_length, 0)
    yield ann
    ray.kill(ann)


def test_annotator_is_the_frozen_rm_at_t0_and_uses_feedback_later(
    ray_session, small_cfg, rm_ckpt, rows, direct, feedback, annotator
):
    msgs, responses = rows
    max_len, d_p = small_cfg.data.max_length, feedback["d_policy"]
    ann = annotator
    assert ray.get(ann.head_version.remote()) == 0
    frozen = RewardAnnotator.remote(rm_ckpt, _reward_json(small_cfg, "frozen"), d_p, max_len, 0, cache_size=8)
    try:
        out0 = ray.get(ann.annotate.remote(msgs, responses, feedback["h_refs"], 0, T_TOTAL))
        assert out0["omega"] == 1.0
        assert out0["cache_hits"] + out0["rte_computed"] == 12  # all computed, unless another test came first
        assert out0["rewards"].dtype == torch.float32 and out0["rewards"].shape == (12,)
        assert (out0["rewards"] - direct["rewards"]).abs().max() <= 1e-6
        assert (out0["rte"] - direct["rte"]).abs().max() <= 1e-5

        # frozen mode never looks at hidden states: a junk ref and t > 0 change nothing
        out_f = ray.get(frozen.annotate.remote(msgs, responses, [ray.put("junk")], T_MID, T_TOTAL))
        assert out_f["omega"] == 1.0
        assert torch.equal(out_f["rewards"], out0["rewards"])

        # t > 0: same cached RTEs, feedback mixed in with weight 1 − ω = 0.4
        out5 = ray.get(ann.annotate.remote(msgs, responses, feedback["h_refs"], T_MID, T_TOTAL))
        assert out5["omega"] == pytest.approx(omega(T_MID, T_TOTAL, 0.6))
        assert out5["omega"] == pytest.approx(0.6)
        assert out5["cache_hits"] == 12 and out5["rte_computed"] == 0
        assert torch.equal(out5["rte"], out0["rte"])
        assert (out5["rewards"] - out0["rewards"]).abs().max() > 1e-3
        # the same numbers by hand: a head with the same seed on the concatenated chunks
        r2m = small_cfg.rl.reward.r2m
        head = R2MHead(direct["rm"].value_head, direct["rm"].hidden_size, d_p, r2m.d_attn, r2m.n_heads, seed=0)
        h, mask = concat_feedback(feedback["chunks"]["h"])
        with torch.no_grad():
            expected = head(out5["rte"], h, mask, 0.6)
        torch.testing.assert_close(out5["rewards"], expected, atol=1e-5, rtol=1e-5)

        # accuracy on pairs (even rows chosen, odd rows rejected) = the RM's, computed by hand
        acc = ray.get(ann.pairwise_accuracy.remote(msgs[::2], responses[::2], responses[1::2], None, 0, T_TOTAL))
        r_c, r_r = direct["rewards"][::2], direct["rewards"][1::2]
        assert acc == pytest.approx(float(((r_c > r_r).float() + 0.5 * (r_c == r_r).float()).mean()))

        # held-out accuracy WITH policy feedback (chosen rows, then rejected rows, each pair within one
        # prompt): the head at ω(t) on the RTEs and those rows' hidden states, by hand
        c_idx, r_idx = [0, 1, 4, 5, 8, 9], [2, 3, 6, 7, 10, 11]
        order = c_idx + r_idx
        ref = ray.put({"hidden": h[order].to(torch.bfloat16), "mask": mask[order]})
        pairs = ([msgs[i] for i in c_idx], [responses[i] for i in c_idx], [responses[i] for i in r_idx])
        acc_fb = ray.get(ann.pairwise_accuracy.remote(*pairs, [ref], T_MID, T_TOTAL))
        with torch.no_grad():
            r_fb = head(out5["rte"][order], h[order], mask[order], 0.6)
        assert (r_fb - direct["rewards"][order]).abs().max() > 1e-3  # the feedback path really changes scores
        assert acc_fb == pytest.approx(
            float(((r_fb[:6] > r_fb[6:]).float() + 0.5 * (r_fb[:6] == r_fb[6:]).float()).mean())
        )
        # annotate also returns the frozen RM's own rewards of the same rows
        torch.testing.assert_close(out5["frozen_rewards"], direct["rewards"], atol=1e-6, rtol=0)

        # bad input: a NaN in row 7's real tokens gives a NaN reward for row 7 only, counted and
        # named (the driver then skips the step); r2m without feedback is refused
        bad = [c.copy() for c in feedback["chunks"]["h"]]
        bad[1] = {"hidden": bad[1]["hidden"].clone(), "mask": bad[1]["mask"]}
        bad[1]["hidden"][2, 0, 0] = float("nan")  # chunk 2 starts at row 5; right-padded, so position 0 is real
        out_bad = ray.get(ann.annotate.remote(msgs, responses, [ray.put(c) for c in bad], T_MID, T_TOTAL))
        assert out_bad["nonfinite"] == 1 and out_bad["nonfinite_rows"] == [7]
        finite = torch.ones(len(responses), dtype=torch.bool)
        finite[7] = False
        assert torch.isfinite(out_bad["rewards"][finite]).all() and not torch.isfinite(out_bad["rewards"][7])
        with pytest.raises(ray.exceptions.RayTaskError, match="hidden_refs"):
            ray.get(ann.annotate.remote(msgs, responses, None, T_MID, T_TOTAL))

        # LRU cache with cap 8: 12 rows leave the last 8; those are hits, the first 4 were evicted
        info = ray.get(frozen.cache_info.remote())
        assert info["size"] == 8 and info["evictions"] == 4
        again = ray.get(frozen.annotate.remote(msgs[4:], responses[4:], None, 0, T_TOTAL))
        assert again["cache_hits"] == 8 and torch.equal(again["rte"], out_f["rte"][4:])
        assert ray.get(frozen.annotate.remote(msgs[:4], responses[:4], None, 0, T_TOTAL))["cache_hits"] == 0
    finally:
        _kill(frozen)


def test_head_learner_trains_only_the_head_and_annotator_follows(
    ray_session, small_cfg, rm_ckpt, rows, direct, feedback, annotator
):
    msgs, responses = rows
    d_p = feedback["d_policy"]
    cfg_json = _reward_json(small_cfg, lr=3e-3)
    ann = annotator
    learner = RewardHeadLearner.remote(rm_ckpt, cfg_json, d_p, 0)
    start = ray.get(learner.head_state.remote())
    try:
        digest0 = ray.get(ann.frozen_rm_digest.remote())
        assert start.keys() == ray.get(ann.head_state.remote()).keys()
        assert all(torch.equal(v, ray.get(ann.head_state.remote())[k]) for k, v in start.items())  # same init
        assert {k.split(".")[0] for k in start} == {"cross_attn", "phi"}

        ann5 = ray.get(ann.annotate.remote(msgs, responses, feedback["h_refs"], T_MID, T_TOTAL))
        winner, loser, informative = self_labelled_groups(ann5["rewards"], K)
        assert informative.all()
        assert torch.equal(winner, ann5["rewards"].view(-1, K).argmax(1))
        before = ray.get(learner.score.remote(ann5["rte"], feedback["h_refs"], T_MID, T_TOTAL))
        torch.testing.assert_close(before, ann5["rewards"], atol=1e-5, rtol=1e-5)
        untrained_h2 = ray.get(learner.score.remote(ann5["rte"], feedback["h2_refs"], T_MID, T_TOTAL))

        args = (ann5["rte"], feedback["h2_refs"], K, winner, loser, T_MID, T_TOTAL)
        stats = [ray.get(learner.update.remote(*args)) for _ in range(8)]
        losses = [s["loss"] for s in stats]
        assert stats[0]["loss"] == pytest.approx(0.7 * stats[0]["bt"] + 0.3 * stats[0]["gre"], rel=1e-5)
        assert losses[-1] < losses[0] - 0.05, losses
        assert stats[-1]["loss_after"] < losses[-1]
        assert stats[-1]["version"] == 8 and stats[-1]["steps"] == 1 and stats[0]["grad_norm"] > 0

        trained = ray.get(learner.head_state.remote())
        assert trained.keys() == start.keys()
        for key in start:  # every W_* and φ weight moved; φ's output bias (no gradient) did not
            assert torch.equal(trained[key], start[key]) == (key == OUT_BIAS), key

        # sync: the annotator's rewards now match the learner's own scoring; its RM is untouched
        assert ray.get(ann.load_head.remote(learner.head_state.remote(), 8)) == 8
        assert ray.get(ann.head_version.remote()) == 8
        synced = ray.get(ann.annotate.remote(msgs, responses, feedback["h2_refs"], T_MID, T_TOTAL))
        mine = ray.get(learner.score.remote(ann5["rte"], feedback["h2_refs"], T_MID, T_TOTAL))
        torch.testing.assert_close(synced["rewards"], mine, atol=1e-5, rtol=1e-5)
        assert (synced["rewards"] - untrained_h2).abs().max() > 1e-3  # the update did change the rewards
        assert synced["head_version"] == 8
        assert ray.get(ann.frozen_rm_digest.remote()) == digest0
        frozen_now = ray.get(ann.frozen_rm_rewards.remote(msgs, responses))
        assert (frozen_now - direct["rewards"]).abs().max() <= 1e-6
    finally:
        ray.get(ann.load_head.remote(start, 0))  # hand the shared annotator back untrained
        _kill(learner)


def test_head_learner_ablations(ray_session, small_cfg, rm_ckpt, rows, direct, feedback):
    """w/o train, w/ noise, w/o BT, w/o GRE, iterative head; two switches share an actor to save start-ups."""
    msgs, responses = rows
    d_p, max_len = feedback["d_policy"], small_cfg.data.max_length
    rte, h2 = direct["rte"], feedback["h2_refs"]
    winner, loser, _ = self_labelled_groups(direct["rewards"], K)
    configs = {
        "policy": _reward_json(small_cfg, lr=3e-3),
        "noise_no_bt": _reward_json(small_cfg, lr=3e-3, feedback="noise", loss={"bt": False}),
        "iterative_no_gre": _reward_json(small_cfg, lr=3e-3, iterative=True, loss={"gre": False}),
        "no_train": _reward_json(small_cfg, lr=3e-3, train=False),
    }
    learners = {name: RewardHeadLearner.remote(rm_ckpt, cj, d_p, 0) for name, cj in configs.items()}
    iter_ann = RewardAnnotator.remote(rm_ckpt, configs["iterative_no_gre"], d_p, max_len, 0)
    try:
        args = (rte, h2, K, winner, loser, T_MID, T_TOTAL)
        # w/ noise: scores differ from policy feedback (same init), reproducibly for a given step
        s_policy = ray.get(learners["policy"].score.remote(rte, h2, T_MID, T_TOTAL))
        s_noise = ray.get(learners["noise_no_bt"].score.remote(rte, h2, T_MID, T_TOTAL))
        assert (s_noise - s_policy).abs().max() > 1e-4
        assert torch.equal(s_noise, ray.get(learners["noise_no_bt"].score.remote(rte, h2, T_MID, T_TOTAL)))
        stats = {name: ray.get(lrn.update.remote(*args)) for name, lrn in learners.items()}
        assert stats["policy"]["loss"] == pytest.approx(0.7 * stats["policy"]["bt"] + 0.3 * stats["policy"]["gre"])
        # w/o BT: the loss is the GRE term alone, and the noisy head still steps
        assert stats["noise_no_bt"]["loss"] == pytest.approx(stats["noise_no_bt"]["gre"], rel=1e-6)
        assert stats["noise_no_bt"]["loss"] != pytest.approx(
            0.7 * stats["noise_no_bt"]["bt"] + 0.3 * stats["noise_no_bt"]["gre"]
        )
        assert stats["noise_no_bt"]["steps"] == 1

        # iterative + w/o GRE: ω = 1 and no feedback, so r = φ(RTE) = the RM's rewards and the
        # loss is BT on them, by hand: −mean log σ(r_w − r_l)
        it = stats["iterative_no_gre"]
        r = direct["rewards"].view(-1, K)
        rows_g = torch.arange(r.shape[0])
        hand_bt = float(-torch.nn.functional.logsigmoid(r[rows_g, winner] - r[rows_g, loser]).mean())
        assert it["omega"] == 1.0 and it["steps"] == 1
        assert it["loss"] == pytest.approx(it["bt"], rel=1e-6)
        assert it["bt"] == pytest.approx(hand_bt, rel=1e-4)

        # w/o train: answers (the same loss as the trained one at the shared init), never changes
        init_state = ray.get(learners["no_train"].head_state.remote())
        assert stats["no_train"]["steps"] == 0 and stats["no_train"]["version"] == 0
        assert stats["no_train"]["loss"] == pytest.approx(stats["policy"]["loss"], rel=1e-5)
        ray.get(learners["no_train"].update.remote(*args))
        after = ray.get(learners["no_train"].head_state.remote())
        assert all(torch.equal(v, init_state[k]) for k, v in after.items())
        moved = ray.get(learners["policy"].head_state.remote())
        assert all(torch.equal(v, init_state[k]) == (k == OUT_BIAS) for k, v in moved.items())

        # the iterative head learnt φ only (no feedback → no gradient into the cross-attention)
        it_state = ray.get(learners["iterative_no_gre"].head_state.remote())
        for key, value in it_state.items():
            assert torch.equal(value, init_state[key]) == (key.startswith("cross_attn") or key == OUT_BIAS), key
        it_learner = learners["iterative_no_gre"]
        assert torch.equal(
            ray.get(it_learner.score.remote(rte, h2, T_MID, T_TOTAL)),
            ray.get(it_learner.score.remote(rte, None, T_MID, T_TOTAL)),
        )
        # ... and its annotator scores with ω = 1, no feedback needed, with the trained φ
        ray.get(iter_ann.load_head.remote(it_learner.head_state.remote(), 1))
        out = ray.get(iter_ann.annotate.remote(msgs, responses, None, T_MID, T_TOTAL))
        assert out["omega"] == 1.0
        torch.testing.assert_close(out["rewards"], ray.get(it_learner.score.remote(out["rte"], None, 0, 1)))
        assert (out["rewards"] - direct["rewards"]).abs().max() > 1e-4  # φ was trained
    finally:
        _kill(iter_ann, *learners.values())


def test_head_learner_steps_per_update_and_informative_groups(ray_session, small_cfg, rm_ckpt, direct, feedback):
    """rl.reward.r2m.steps_per_update reaches the learner; only informative groups enter GREBT."""
    from r2m_ray.algos.r2m import grebt_loss

    rte, h2 = direct["rte"], feedback["h2_refs"]
    winner, loser, _ = self_labelled_groups(direct["rewards"], K)
    learner = RewardHeadLearner.remote(
        rm_ckpt, _reward_json(small_cfg, lr=3e-3, steps_per_update=3), feedback["d_policy"], 0
    )
    try:
        only_first = torch.tensor([True, False, False])
        r = ray.get(learner.score.remote(rte, h2, T_MID, T_TOTAL)).view(-1, K)
        hand, _ = grebt_loss(r[:1], winner[:1], loser[:1], 0.3)
        stats = ray.get(learner.update.remote(rte, h2, K, winner, loser, T_MID, T_TOTAL, only_first))
        assert stats["groups"] == 1 and stats["steps"] == 3 and stats["version"] == 1
        assert stats["loss"] == pytest.approx(float(hand), rel=1e-5)  # group 0 alone, at the pre-update weights
        none = ray.get(
            learner.update.remote(rte, h2, K, winner, loser, T_MID, T_TOTAL, torch.zeros(3, dtype=torch.bool))
        )
        assert none["groups"] == 0 and none["steps"] == 0 and none["loss"] is None and none["version"] == 1
        everything = ray.get(learner.update.remote(rte, h2, K, winner, loser, T_MID, T_TOTAL))
        assert everything["groups"] == 3 and everything["steps"] == 3 and everything["version"] == 2
    finally:
        _kill(learner)
