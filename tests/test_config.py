"""The config tree: YAML + dotted overrides, errors that name the key."""

from pathlib import Path

import pytest

from r2m_ray.config import ConfigError, RunConfig, dump_config, load_config, parse_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_default_and_quickstart_load():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    quick = load_config(ROOT / "jobs" / "quickstart.yaml")
    assert quick.model.preset == "tiny"


def test_dotted_overrides_are_typed():
    cfg = load_config(
        None,
        [
            "rm.grm.alpha=0.05",
            "rm.grm.regulariser=dpo",
            "rm.deepspeed.ranks=2",
            "world.bias.kind=phrase",
            "data.extra_eval=[a.jsonl, b.jsonl]",
        ],
    )
    assert cfg.rm.grm.alpha == pytest.approx(0.05)
    assert cfg.rm.grm.regulariser == "dpo"
    assert cfg.rm.deepspeed.ranks == 2
    assert cfg.data.extra_eval == ["a.jsonl", "b.jsonl"]


@pytest.mark.parametrize(
    "override, key",
    [
        ("rm.grm.alphaa=0.1", "rm.grm.alphaa"),
        ("rm.grm.alpha=abc", "rm.grm.alpha"),
        ("rm.grm.regulariser=l2", "rm.grm.regulariser"),
        ("rm.deepspeed.zero_stage=4", "rm.deepspeed.zero_stage"),
        ("rm.prioritizer.tau=0", "rm.prioritizer.tau"),
        ("nonsense=1", "nonsense"),
    ],
)
def test_bad_override_names_key(override, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert key in str(err.value)


def test_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["rm.grm.alpha"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


def test_cross_field_rule_and_roundtrip(tmp_path):
    with pytest.raises(ConfigError, match="freeze_backbone"):
        load_config(None, ["rm.freeze_backbone=true", "rm.grm.regulariser=sft"])
    cfg = load_config(None, ["rm.grm.alpha=0.2"])
    dumped = tmp_path / "c.yaml"
    dumped.write_text(dump_config(cfg))
    assert load_config(dumped) == cfg


def test_compare_spec_names_are_checked(tmp_path):
    import yaml

    from r2m_ray.pipelines.compare import load_spec

    good = {"base": "quickstart.yaml", "variants": {"a": [], "b": []}, "reward_models": {"biased": []}}
    cases = [
        ({"arm_reward_model": {"c": "biased"}}, "'c' is not a variant"),
        ({"arm_reward_model": {"a": "nope"}}, "arm_reward_model.a: 'nope'"),
        ({"reference": "z"}, "reference: 'z'"),
        ({"arm_seeds": {"a": [7]}}, r"arm_seeds.a: \[7\] are not in seeds"),
        ({"arm_seeds": {"q": [0]}}, "arm_seeds: 'q' is not a variant"),
        ({"seedz": [1]}, "seedz"),
    ]
    for extra, message in cases:
        path = tmp_path / "spec.yaml"
        path.write_text(yaml.safe_dump({**good, **extra}))
        with pytest.raises(ConfigError, match=message):
            load_spec(path)
    path.write_text(yaml.safe_dump(good))
    assert load_spec(path).reward_models == {"biased": []}


def test_world_prompts_must_cover_the_win_rate_hold_out():
    """Refused when the config loads, not after the world, SFT and RM stages have run."""
    with pytest.raises(ConfigError, match=r"rl.winrate_prompts=64 held out of world.splits.rl_prompts=64 leaves"):
        load_config(ROOT / "jobs" / "quickstart.yaml", ["world.splits.rl_prompts=64", "rl.winrate_prompts=64"])
    # user prompts have no gold and no hold-out: the world's count does not matter then
    load_config(
        ROOT / "jobs" / "quickstart.yaml",
        ["world.splits.rl_prompts=64", "rl.winrate_prompts=64", "data.prompts=p.jsonl"],
    )
