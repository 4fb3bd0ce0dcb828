"""`r2m-ray compare` on a tiny two-method RM table: every cell is the seeds' numbers it claims to be."""

from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
import yaml

from r2m_ray.cli import main
from r2m_ray.config import ConfigError, load_config
from r2m_ray.models.registry import hidden_size
from r2m_ray.pipelines.bon_eval import score
from r2m_ray.pipelines.compare import run_compare
from r2m_ray.pipelines.full_run import base_model_dir
from tests.conftest import ROOT, small_overrides

pytestmark = pytest.mark.slow

T_975_DF1 = 12.706204736174707  # the two-sided 95% t quantile with one degree of freedom (2 seeds)


def test_rm_compare_table_and_paired_differences(ray_session, tmp_path):
    spec = {
        "base": str(ROOT / "jobs" / "quickstart.yaml"),
        "overrides": small_overrides(tmp_path)
        + ["stages=[world, rm]", "rm.max_steps=8", "eval.bon.n=4", "eval.bon.prompts=6", "eval.bon.max_new_tokens=8"],
        "seeds": [0, 1],
        "output": str(tmp_path / "results.md"),
        "section": "tiny_rm",
        "variants": {"bt": [], "smoothed": ["rm.loss=label_smoothing", "rm.label_smoothing=0.2"]},
        "bon": True,
        "figures": str(tmp_path / "figures"),
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    (tmp_path / "results.md").write_text(
        "# Results\n\nkept above\n\n<!-- tiny_rm:begin -->\nold\n<!-- tiny_rm:end -->\nkept below\n"
    )
    assert main(["compare", str(path), "--run-dir", str(tmp_path / "run")]) == 0
    rows = json.loads((tmp_path / "run" / "compare.json").read_text())
    assert [r["seed"] for r in rows["bt"]] == [r["seed"] for r in rows["smoothed"]] == [0, 1]
    assert [r["method"] for r in rows["smoothed"]] == ["smoothed", "smoothed"]
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("# Results\n\nkept above\n") and text.endswith("<!-- tiny_rm:end -->\nkept below\n")
    assert "\nold\n" not in text and f"`r2m-ray compare {path}`" in text
    lines = [line.strip("| ").split(" | ") for line in text.splitlines() if line.startswith("| ")]
    # the main table (the best-of-n table's rows also have 7 cells, but 3 of them with ±)
    table = {cells[0]: cells for cells in lines if len(cells) == 7 and sum("±" in c for c in cells) == 4}
    for name in ("bt", "smoothed"):  # mean ± sample std over the 2 seeds, in %
        ood = [100 * r["accuracy"]["ood"] for r in rows[name]]
        assert table[name][2] == f"{statistics.fmean(ood):.1f} ± {statistics.stdev(ood):.1f}"
        assert table[name][5] == f"{statistics.median(r['train_seconds'] for r in rows[name]):.1f}"
        assert table[name][6] == "2"
    # the paired row: the mean of the per-seed differences, its t-interval and the detectable effect
    d = [100 * (a["accuracy"]["ood"] - b["accuracy"]["ood"]) for a, b in zip(rows["smoothed"], rows["bt"])]
    half = T_975_DF1 * statistics.stdev(d) / math.sqrt(2)
    paired = [cells for cells in lines if cells[0] == "smoothed" and len(cells) == 5]
    assert len(paired) == 1 and set(table) == {"bt", "smoothed"}
    assert paired[0][2].startswith(f"{statistics.fmean(d):+.1f} ± {half:.1f} (")
    ratio = statistics.median(a["train_seconds"] / b["train_seconds"] for a, b in zip(rows["smoothed"], rows["bt"]))
    assert paired[0][4] == f"{ratio:.2f}"

    # best-of-n: every RM picked among the same 6 × 4 samples, so n = 1 (a random sample) is the same
    # mean gold for all, and no RM's pick beats gold picking for itself
    bon = json.loads((tmp_path / "run" / "summary.json").read_text())["bon"]
    ceiling = bon["gold_picks"]
    assert ceiling["n"] == [1, 2, 4] and ceiling["gold"] == sorted(ceiling["gold"])
    runs = rows["bt"] + rows["smoothed"]
    for r in runs:
        assert r["bon"]["n"] == [1, 2, 4] and r["bon"]["gold"][0] == pytest.approx(ceiling["gold"][0])
        assert all(g <= c + 1e-12 for g, c in zip(r["bon"]["gold"], ceiling["gold"]))
        assert r["bon"]["proxy"] == sorted(r["bon"]["proxy"])  # the picker's own reward rises with n
    assert len({tuple(r["bon"]["gold"]) for r in runs}) > 1  # the four RMs did not all pick alike
    bon_rows = {
        cells[0]: cells
        for cells in lines
        if len(cells) == 7 and sum("±" in c for c in cells) == 3 and cells[0] in ("bt", "smoothed")
    }
    gold_n4 = [r["bon"]["gold"][-1] for r in rows["bt"]]
    assert bon_rows["bt"][3] == f"{statistics.fmean(gold_n4):.3f} ± {statistics.stdev(gold_n4):.3f}"
    d = [a["bon"]["gold"][-1] - b["bon"]["gold"][-1] for a, b in zip(rows["smoothed"], rows["bt"])]
    bon_paired = [cells for cells in lines if cells[:2] == ["smoothed", "bt"]]
    assert bon_paired[0][3].startswith(
        f"{statistics.fmean(d):+.3f} ± {T_975_DF1 * statistics.stdev(d) / math.sqrt(2):.3f} ("
    )
    assert (tmp_path / "figures" / "tiny_rm_bon.png").stat().st_size > 0
    assert (tmp_path / "figures" / "tiny_rm_id_vs_ood.png").stat().st_size > 0

    # best-of-n scored all four RMs in one annotator: after load_frozen_rm it scores as a fresh one does
    pairs = [json.loads(x) for x in (tmp_path / "run" / "world" / "test_id.jsonl").read_text().splitlines()[:16]]
    msgs, texts = [[{"role": "user", "content": r["prompt"]}] for r in pairs], [r["chosen"] for r in pairs]
    cfg = load_config(spec["base"], spec["overrides"])
    d_policy = hidden_size(base_model_dir(cfg))
    first, second = rows["bt"][0]["checkpoints"][0], rows["smoothed"][1]["checkpoints"][0]
    swapped, fresh = score([first, second], cfg, d_policy, msgs, texts), score([second], cfg, d_policy, msgs, texts)
    torch.testing.assert_close(swapped[1], fresh[0], atol=1e-6, rtol=0)
    assert (swapped[0] - swapped[1]).abs().max() > 1e-4  # the second RM really replaced the first

    # --report-only rebuilds the same section from the run directory, training nothing
    (tmp_path / "results.md").write_text("# Results\n\n<!-- tiny_rm:begin -->\nstale\n<!-- tiny_rm:end -->\n")
    trained = sorted(p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*-seed*/summary.json"))
    assert main(["compare", str(path), "--run-dir", str(tmp_path / "run"), "--report-only"]) == 0
    assert (tmp_path / "results.md").read_text() == "# Results\n\n" + text[
        text.index("<!-- tiny_rm:begin -->") :
    ].replace("kept below\n", "")
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "run").glob("*-seed*/summary.json")) == trained
    with pytest.raises(ConfigError, match="compare.json does not exist"):
        run_compare(path, str(tmp_path / "empty"), report_only=True)


def test_group_reference_pairs_each_variant_with_its_own_group():
    """A data-size sweep (variants GROUP/METHOD): n500/grm is paired with n500/bt, n6000/grm with n6000/bt."""
    from pydantic import ValidationError

    from r2m_ray.pipelines.compare import CompareSpec, results_table

    names = ["n500/bt", "n500/grm", "n6000/bt", "n6000/grm"]
    spec = CompareSpec(base="x.yaml", variants={n: [] for n in names}, group_reference="bt")
    assert spec.pairing() == {
        "n500/bt": "n500/bt",
        "n500/grm": "n500/bt",
        "n6000/bt": "n6000/bt",
        "n6000/grm": "n6000/bt",
    }
    ood = {"n500/bt": [0.30, 0.34], "n500/grm": [0.32, 0.36], "n6000/bt": [0.40, 0.44], "n6000/grm": [0.39, 0.43]}

    def run(name: str, seed: int) -> dict:
        acc = ood[name][seed]
        return {"seed": seed, "accuracy": {"id": 0.8, "ood": acc}, "gold_accuracy": {"id": 0.7, "ood": acc}}

    table = results_table({n: [run(n, s) for s in (0, 1)] for n in names}, None, spec.pairing())
    paired = {line.split(" | ")[0][2:]: line for line in table.splitlines()[len(names) + 3 :] if line.startswith("| n")}
    assert set(paired) == {"n500/grm", "n6000/grm"}  # the references are not paired with themselves
    # OOD acc: +2 points in every n500 seed, −1 in every n6000 seed (zero spread: ± 0.0)
    assert paired["n500/grm"].split(" | ")[2] == "+2.0 ± 0.0 (0.0)"
    assert paired["n6000/grm"].split(" | ")[2] == "-1.0 ± 0.0 (0.0)"
    assert "its group's reference (`GROUP/bt`)" in table
    with pytest.raises(ValidationError, match="has no n6000/bt"):
        CompareSpec(base="x.yaml", variants={"n500/bt": [], "n6000/grm": []}, group_reference="bt")


def test_a_grid_spec_expands_into_paired_variants():
    """`grid:` is a factorial sweep: every combination of the axes' levels is a variant named
    label/label/…, with the levels' overrides in axis order, paired with its cell's BT. The two
    shipped full-grid specs expand to 104 variants whose configs all load."""
    from pydantic import ValidationError

    from r2m_ray.pipelines.compare import CompareSpec, load_spec

    axes = {"n": {"n500": ["rm.train_pairs=500"], "nall": []}, "m": {"bt": [], "grm": ["rm.grm.alpha=0.3"]}}
    spec = CompareSpec(base="x.yaml", variants={"extra": ["seed=9"]}, grid=axes)
    assert spec.variants == {
        "extra": ["seed=9"],
        "n500/bt": ["rm.train_pairs=500"],
        "n500/grm": ["rm.train_pairs=500", "rm.grm.alpha=0.3"],
        "nall/bt": [],
        "nall/grm": ["rm.grm.alpha=0.3"],
    }
    assert CompareSpec(base="x.yaml", grid=axes, group_reference="bt").pairing()["nall/grm"] == "nall/bt"
    with pytest.raises(ValidationError, match="also named under variants"):
        CompareSpec(base="x.yaml", variants={"a/b": []}, grid={"x": {"a": []}, "y": {"b": []}})
    with pytest.raises(ValidationError, match="without '/'"):
        CompareSpec(base="x.yaml", grid={"x": {"a/b": []}})
    with pytest.raises(ValidationError, match="variants: none given"):
        CompareSpec(base="x.yaml")
    for world in ("length", "phrase"):
        path = ROOT / "jobs" / f"grm_grid_{world}.yaml"
        grid = load_spec(path)
        assert len(grid.variants) == 4 * 2 * 13 and grid.bon
        pairing = grid.pairing()
        assert pairing["n1000/e3/grm_dpo_noref_a0.3_b0.1"] == "n1000/e3/bt"
        cfg = load_config(grid.base, grid.overrides + grid.variants["n1000/e3/grm_dpo_noref_a0.3_b0.1"])
        assert (cfg.rm.train_pairs, cfg.rm.epochs, cfg.rm.grm.regulariser) == (1000, 3, "dpo_noref")
        assert (cfg.rm.grm.alpha, cfg.rm.grm.beta) == (0.3, 0.1)
        assert (cfg.world.bias.kind == "phrase") == (world == "phrase")
        for overrides in grid.variants.values():  # every variant's config is valid before hours of training
            load_config(grid.base, grid.overrides + overrides)
