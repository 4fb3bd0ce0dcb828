"""Shared fixtures: a real in-process Ray on loopback, a small world, a tiny model, and what the
tests train once per session (an SFT policy, a BT reward model, a short R2M run), with the tiers.

Tiers (tests/README.md): a test that uses a Ray-backed fixture, or is marked `slow`, is in the
full tier only; every other test is in `make test-fast`, where it may start no Ray cluster (and so
no DeepSpeed rank and no vLLM engine, which only run in Ray actors): the `fast_tier_guard` below
makes such a start an error naming the test.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

ROOT = Path(__file__).resolve().parents[1]
MODEL_CACHE_ENV = "R2M_TEST_MODEL_CACHE"
_OWN_CACHE = pytest.StashKey[Path]()  # the cache this session made (and removes at its end)


def pytest_configure(config: pytest.Config) -> None:
    """One tiny-model cache for the session and the subprocesses it starts (they inherit the
    variable): the tiny preset is keyed by its corpus, so tests of one world build it once."""
    if MODEL_CACHE_ENV not in os.environ:
        import tempfile

        os.environ[MODEL_CACHE_ENV] = tempfile.mkdtemp(prefix="r2m-test-models-")
        config.stash[_OWN_CACHE] = Path(os.environ[MODEL_CACHE_ENV])


def pytest_unconfigure(config: pytest.Config) -> None:
    own = config.stash.get(_OWN_CACHE, None)
    if own is not None:
        import shutil

        shutil.rmtree(own, ignore_errors=True)
        os.environ.pop(MODEL_CACHE_ENV, None)


def model_cache(tmp: Path) -> Path:
    """The session's tiny-model cache (tmp/models when run outside pytest, e.g. a script by hand)."""
    return Path(os.environ.get(MODEL_CACHE_ENV, tmp / "models"))


# A world small enough that a test trains on it in seconds.
SMALL_WORLD = [
    "world.splits.sft=512",
    "world.splits.train=768",
    "world.splits.test_id=192",
    "world.splits.test_ood=192",
    "world.splits.rl_prompts=64",
]


# An RL stage small enough for a test: 2 steps of 4 prompts × 4 samples on one engine.
SMALL_RL = [
    "rl.steps=2",
    "rl.prompts_per_step=4",
    "rl.rollout.samples_per_prompt=4",
    "rl.rollout.num_actors=1",
    "rl.rollout.max_new_tokens=8",
    "rl.heldout_pairs=32",
    "rl.winrate_prompts=8",
    "rl.policy.micro_batch_size=16",
    "rl.reward.r2m.d_attn=32",
    "rl.rollout.enforce_eager=true",
]


def hh_transcript_problems(path: Path) -> dict[str, list[int]]:
    """Source rows of an HH-RLHF transcript file that cannot become a pair, found independently of the
    loader: a chosen final turn (after the last "\n\nAssistant:") that is empty, or chosen and
    rejected dialogues that differ before their final turns."""
    import gzip
    import json

    def split(text: str) -> tuple[str, str]:
        head, _, final = text.rpartition("\n\nAssistant:")
        return head, final.strip()

    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for line in f]
    empty = [i for i, r in enumerate(rows) if not split(r["chosen"])[1]]
    differ = [i for i, r in enumerate(rows) if i not in empty and split(r["chosen"])[0] != split(r["rejected"])[0]]
    return {"empty_chosen": empty, "prompt_mismatch": differ}


def small_overrides(tmp: Path) -> list[str]:
    """Overrides that make any job config a seconds-long test run."""
    return (
        SMALL_WORLD
        + SMALL_RL
        + [
            f"output_dir={tmp}",
            f"model.cache_dir={model_cache(tmp)}",
            "sft.epochs=1",
            "sft.eval_prompts=32",
            "rm.batch_size=16",
            "rm.log_every=5",
            "rm.eval_batch_size=64",
        ]
    )


# Fixtures that start Ray actors (or need what they trained): a test using one is in the slow tier.
RAY_FIXTURES = {"ray_session", "trained", "frozen_rl_run"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if RAY_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def fast_tier_guard(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test outside the slow tier must not start Ray (hence no DeepSpeed rank, no vLLM engine):
    ray.init raises, naming the test, and `ray.is_initialized()` is False, as it is in a fast-tier
    session, so the test behaves the same in `make test` and `make test-fast`."""
    if request.node.get_closest_marker("slow"):
        return
    import ray

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"{request.node.nodeid} starts Ray but is not marked slow (tests/README.md: tiers)")

    monkeypatch.setattr(ray, "init", refuse)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)


@pytest.fixture(scope="session")
def ray_session():
    """One real in-process Ray for the whole session (4 CPU slots on a 2-core box)."""
    import ray

    from r2m_ray.config import RayConfig
    from r2m_ray.ray_setup import init_ray

    init_ray(RayConfig(num_cpus=4, log_to_driver=False))
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_cfg(tmp_path_factory):
    """The quickstart config shrunk for tests; output and model cache in a temp dir."""
    from r2m_ray.config import load_config

    tmp = tmp_path_factory.mktemp("r2m")
    return load_config(ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp))


@pytest.fixture(scope="session")
def world_paths(small_cfg, tmp_path_factory):
    """The small world's splits written once for the session."""
    from r2m_ray.world import build_world, write_splits

    return write_splits(build_world(small_cfg.world), small_cfg.world, tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="session")
def tiny_model_dir(small_cfg):
    """A tiny random Llama + tokenizer trained on the world's text."""
    from r2m_ray.models.registry import prepare_model_dir
    from r2m_ray.world import corpus

    return prepare_model_dir(small_cfg.model, corpus=lambda: corpus(small_cfg.world))


@pytest.fixture(scope="session")
def launchers() -> dict[str, dict]:
    """cluster/*.yaml (Ray cluster-launcher configs) by file name, as written."""
    import yaml

    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((ROOT / "cluster").glob("*.yaml"))}


@pytest.fixture(scope="session")
def manifests() -> dict[str, list[dict]]:
    """cluster/kuberay/*.yaml by file name: the non-empty YAML documents of each."""
    import yaml

    paths = sorted((ROOT / "cluster" / "kuberay").glob("*.yaml"))
    return {p.name: [d for d in yaml.safe_load_all(p.read_text()) if d] for p in paths}


@pytest.fixture(scope="session")
def trained(ray_session, tmp_path_factory):
    """world → sft → rm once per session; the RL tests start from its checkpoints."""
    from r2m_ray.config import load_config
    from r2m_ray.pipelines.full_run import run_pipeline

    tmp = tmp_path_factory.mktemp("rl")
    cfg = load_config(
        ROOT / "jobs" / "quickstart.yaml", small_overrides(tmp) + ["rm.max_steps=20", "stages=[world, sft, rm]"]
    )
    run = run_pipeline(cfg, run_dir=tmp / "base")
    return tmp, run.path


@pytest.fixture(scope="session")
def frozen_rl_run(trained) -> Path:
    """One short RL run from the shared policy and RM with the frozen RM as the reward (GRPO, HF
    engine), once per session: test_one_rl_run's frozen case, and the reference that the served-RM
    test compares its remote-reward run with, step by step."""
    from r2m_ray.pipelines.full_run import run_pipeline

    tmp, base = trained
    cfg = rl_config(tmp, base, *FROZEN_RL)
    return run_pipeline(cfg, run_dir=tmp / "frozen-rl").path


FROZEN_RL = ("rl.policy.algo=grpo", "rl.reward.mode=frozen", "rl.reward.r2m.labels=self", "rl.rollout.backend=hf")


def rl_overrides(tmp: Path, base: Path, *overrides: str, rm: Path | None = None) -> list[str]:
    """Overrides of quickstart.yaml for a small RL-only run from the shared SFT policy and RM (or another RM).

    Each key once, the later layer winning (`overrides` over the small defaults): the list is also
    given to the `r2m-ray` command, which refuses a key given twice."""
    layered = small_overrides(tmp) + [
        "stages=[world, rl]",
        f"rl.policy_checkpoint={base / 'checkpoints' / 'sft'}",
        f"rl.reward.checkpoint={rm or base / 'checkpoints' / 'rm-0'}",
        *overrides,
    ]
    return list({o.split("=", 1)[0]: o for o in layered}.values())


def rl_config(tmp: Path, base: Path, *overrides: str, rm: Path | None = None):
    """The small RL-only config built from `rl_overrides`."""
    from r2m_ray.config import load_config

    return load_config(ROOT / "jobs" / "quickstart.yaml", rl_overrides(tmp, base, *overrides, rm=rm))
