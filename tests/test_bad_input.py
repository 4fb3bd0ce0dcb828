"""Bad input, as an operator meets it: through the `r2m-ray` command, before any actor starts.

Every case must end in ONE message `r2m-ray: error: …` naming the problem (the key, the file,
the column, the tensor) and exit code 2 — never a traceback, never a silent default.
docs/operations.md lists the same cases. Cases that need files build them in tmp_path;
none starts Ray or a model engine (the checks run before the stages do).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import save_file

from r2m_ray.cli import main
from tests.conftest import model_cache

ROOT = Path(__file__).resolve().parents[1]
QUICK = str(ROOT / "jobs" / "quickstart.yaml")


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, "\n".join(err)


def assert_clear_error(code: int, err: str, *needles: str) -> None:
    """Exit 2 and one `r2m-ray: error:` message (several problems may follow it, one per line)."""
    starts = [i for i, ln in enumerate(err.splitlines()) if ln.startswith("r2m-ray: error:")]
    assert code == 2, err
    assert len(starts) == 1, err
    assert "Traceback" not in err
    message = "\n".join(err.splitlines()[starts[0] :])
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"


# --------------------------------------------------------------------------- configs

CONFIG_CASES = {
    "unknown top-level key": (["rl", QUICK, "foo=1"], ["foo"]),
    "unknown nested key": (["rl", QUICK, "rl.reward.r2m.d_atn=4"], ["rl.reward.r2m.d_atn"]),
    "wrong type": (["rl", QUICK, "rl.steps=abc"], ["rl.steps"]),
    "negative steps": (["rl", QUICK, "rl.steps=0"], ["rl.steps"]),
    "omega out of range": (["rl", QUICK, "rl.reward.r2m.omega_floor=1.5"], ["rl.reward.r2m.omega_floor"]),
    "alpha out of range": (["rl", QUICK, "rl.reward.r2m.loss.alpha=-0.1"], ["rl.reward.r2m.loss.alpha"]),
    "K < 2 for GRPO/RLOO": (["rl", QUICK, "rl.rollout.samples_per_prompt=1"], ["rl.rollout.samples_per_prompt"]),
    "unknown algorithm": (["rl", QUICK, "rl.policy.algo=ppo"], ["rl.policy.algo"]),
    "collective sync without vLLM": (
        ["rl", QUICK, "rl.rollout.backend=hf", "rl.rollout.weight_sync=collective"],
        ["weight_sync"],
    ),
    "both GREBT terms off": (
        ["rl", QUICK, "rl.reward.r2m.loss.bt=false", "rl.reward.r2m.loss.gre=false"],
        ["bt and gre"],
    ),
    "GRM alpha out of range": (["rm", QUICK, "rm.grm.alpha=2"], ["rm.grm.alpha"]),
    "unknown stage": (["run", QUICK, "stages=[world,foo]"], ["stages"]),
    "ZeRO stage out of range": (["rm", QUICK, "rm.deepspeed.zero_stage=4"], ["rm.deepspeed.zero_stage"]),
    "override without a value": (["rl", QUICK, "rl.steps="], ["rl.steps"]),
    "missing config file": (["rl", "/nonexistent/job.yaml"], ["/nonexistent/job.yaml"]),
    "path preset without a path": (["rm", QUICK, "model.preset=path"], ["model:", "path is required"]),
    "tensor parallel without its GPUs": (
        ["rl", QUICK, "rl.rollout.tensor_parallel_size=2"],
        ["rl.rollout.tensor_parallel_size=2", "num_gpus_per_actor=2"],
    ),
    "bf16 on the HF rollout backend": (["rl", QUICK, "rl.rollout.backend=hf", "rl.rollout.dtype=bfloat16"], ["dtype"]),
    "checkpoints kept < 1": (["rl", QUICK, "rl.checkpoint.keep_last=0"], ["rl.checkpoint.keep_last"]),
    "resume a directory that is not a run": (["run", "--resume", "/nonexistent/run"], ["/nonexistent/run"]),
    "NaN learning rate": (["rm", QUICK, "rm.optim.lr=nan"], ["rm.optim.lr", "finite"]),
    "infinite learning rate": (["rl", QUICK, "rl.policy.optim.lr=inf"], ["rl.policy.optim.lr", "finite"]),
    "infinite deadline": (["rm", QUICK, "rm.wait_timeout_s=.inf"], ["rm.wait_timeout_s", "finite"]),
    "override value that is not YAML": (["rm", QUICK, "data.extra_eval=[a,"], ["data.extra_eval", "not valid YAML"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_config(capsys, case):
    argv, needles = CONFIG_CASES[case]
    assert_clear_error(*run_cli(capsys, *argv), *needles)


def test_config_file_that_is_not_a_mapping(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- rl\n- steps\n")
    assert_clear_error(*run_cli(capsys, "rl", str(bad)), str(bad))


def test_config_file_with_a_yaml_syntax_error(capsys, tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("rl:\n  steps: [1, 2\n")
    assert_clear_error(*run_cli(capsys, "rl", str(bad)), str(bad))


# --------------------------------------------------------------------------- datasets


def small(tmp_path: Path) -> list[str]:
    return [f"output_dir={tmp_path / 'runs'}", f"model.cache_dir={model_cache(tmp_path)}"]


def rm_on(tmp_path: Path, train: Path, *extra: str) -> list[str]:
    """An rm command on a user's preference file, with the RM reading the world's test splits."""
    return ["rm", QUICK, f"data.train={train}", *small(tmp_path), *extra]


def test_missing_dataset_file(capsys, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_clear_error(*run_cli(capsys, *rm_on(tmp_path, missing)), str(missing))


def test_empty_dataset_file(capsys, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert_clear_error(*run_cli(capsys, *rm_on(tmp_path, empty)), str(empty))


def test_dataset_with_the_wrong_schema(capsys, tmp_path):
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    assert_clear_error(*run_cli(capsys, *rm_on(tmp_path, wrong)), "question")


def test_dataset_with_a_corrupt_line(capsys, tmp_path):
    bad = tmp_path / "corrupt.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}) + "\n{not json\n")
    assert_clear_error(*run_cli(capsys, *rm_on(tmp_path, bad)), str(bad))


def test_dataset_whose_rows_are_all_invalid(capsys, tmp_path):
    bad = tmp_path / "all_empty.jsonl"
    rows = [{"prompt": f"p{i}", "chosen": "", "rejected": "b"} for i in range(4)]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert_clear_error(*run_cli(capsys, *rm_on(tmp_path, bad)), str(bad))


def test_empty_prompt_file_for_rl(capsys, tmp_path):
    empty = tmp_path / "prompts.jsonl"
    empty.write_text("")
    argv = ["rl", QUICK, f"data.prompts={empty}", *small(tmp_path), *checkpoint_args(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), str(empty))


# --------------------------------------------------------------------------- model paths and checkpoints


def test_model_path_that_does_not_exist(capsys, tmp_path):
    argv = ["rm", QUICK, "model.preset=path", f"model.path={tmp_path / 'none'}", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "model.path")


def test_model_dir_without_config_json(capsys, tmp_path):
    (tmp_path / "empty_model").mkdir()
    argv = ["rm", QUICK, "model.preset=path", f"model.path={tmp_path / 'empty_model'}", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "config.json")


def checkpoint_args(tmp_path: Path, policy: Path | None = None, rm: Path | None = None) -> list[str]:
    return [
        f"rl.policy_checkpoint={policy or tmp_path / 'no_policy'}",
        f"rl.reward.checkpoint={rm or tmp_path / 'no_rm'}",
    ]


def test_rl_policy_checkpoint_missing(capsys, tmp_path):
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint")


def test_rl_reward_checkpoint_is_not_a_reward_model(capsys, tmp_path, tiny_model_dir):
    # a policy directory where a reward model is expected
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=tiny_model_dir, rm=tiny_model_dir)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.reward.checkpoint", "reward_model.json")


def test_checkpoint_with_corrupt_safetensors(capsys, tmp_path, tiny_model_dir):
    import shutil

    broken = tmp_path / "broken_policy"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=broken, rm=broken)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", "model.safetensors")


def test_checkpoint_without_weights(capsys, tmp_path, tiny_model_dir):
    import shutil

    bare = tmp_path / "no_weights"
    shutil.copytree(tiny_model_dir, bare)
    (bare / "model.safetensors").unlink()
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=bare, rm=bare)]
    assert_clear_error(*run_cli(capsys, *argv), "rl.policy_checkpoint", "safetensors")


def tiny_llama(path: Path, tokenizer_from: Path, head_dim: int, pad: bool = True) -> Path:
    """A random tiny Llama dir with the given head_dim; optionally a tokenizer without a pad token."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(tokenizer_from))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=2 * head_dim,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=128,
    )
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    if not pad:
        tc = json.loads((path / "tokenizer_config.json").read_text())
        tc.pop("pad_token", None)
        (path / "tokenizer_config.json").write_text(json.dumps(tc))
        special = path / "special_tokens_map.json"
        if special.exists():
            sm = json.loads(special.read_text())
            sm.pop("pad_token", None)
            special.write_text(json.dumps(sm))
    return path


def test_head_dim_below_what_vllm_cpu_supports(capsys, tmp_path, tiny_model_dir):
    small_heads = tiny_llama(tmp_path / "hd16", tiny_model_dir, head_dim=16)
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=small_heads, rm=tmp_path / "no_rm")]
    assert_clear_error(*run_cli(capsys, *argv), "head_dim", "rl.rollout.backend=hf")


def test_tokenizer_without_pad_token(capsys, tmp_path, tiny_model_dir):
    no_pad = tiny_llama(tmp_path / "nopad", tiny_model_dir, head_dim=32, pad=False)
    argv = ["rl", QUICK, *small(tmp_path), *checkpoint_args(tmp_path, policy=no_pad, rm=tmp_path / "no_rm")]
    assert_clear_error(*run_cli(capsys, *argv), "pad token")


def test_state_dict_with_wrong_shapes_is_refused_by_name():
    import torch

    from r2m_ray.actors.weight_sync import check_state_dict

    with pytest.raises(ValueError, match=r"wrong shape: w: got \(2, 2\), want \(3, 3\)"):
        check_state_dict({"w": torch.zeros(2, 2)}, {"w": (3, 3)})


def test_eval_of_a_missing_checkpoint(capsys, tmp_path):
    argv = ["eval", QUICK, f"eval.checkpoints=[{tmp_path / 'gone'}]", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), str(tmp_path / "gone"))


def test_export_without_export_dir(capsys, tmp_path):
    argv = ["export", QUICK, f"eval.checkpoints=[{tmp_path}]", *small(tmp_path)]
    assert_clear_error(*run_cli(capsys, *argv), "eval.export_dir")


def test_nonfinite_weights_in_a_checkpoint_are_named(tmp_path):
    import torch

    from r2m_ray.pipelines.preflight import check_weights_finite

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(2), "b": torch.tensor([1.0, float("nan")])}, str(path))
    with pytest.raises(
        ValueError, match=r"^rl.policy_checkpoint: non-finite values \(NaN/inf\) in model.safetensors:b$"
    ):
        check_weights_finite(tmp_path, "rl.policy_checkpoint")
