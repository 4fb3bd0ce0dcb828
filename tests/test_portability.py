"""Nothing in the repository may read from this development machine's layout: the code, tests,
jobs and cluster configs must work on a fresh clone whose only data is the repository's data/."""

from __future__ import annotations

import re

from tests.conftest import ROOT

# Absolute paths into a developer's checkout or home (the repo itself is always reached relatively).
FOREIGN = re.compile(r"(?<![\w.])/(work|home|Users|root)/[\w.-]+")
# Paths inside the rayproject container images the KubeRay configs run, not on anyone's machine.
IN_IMAGE = {"/home/ray"}
SCANNED = ["r2m_ray", "tests", "jobs", "cluster", ".ci", "Makefile", "pyproject.toml"]
SUFFIXES = {".py", ".yaml", ".yml", ".sh", ".toml", ".cfg", ""}


def scanned_files() -> list:
    files = []
    for name in SCANNED:
        p = ROOT / name
        files += [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES]
    return [f for f in files if "__pycache__" not in f.parts and f.name != "test_portability.py"]


def test_no_absolute_paths_outside_the_repository():
    files = scanned_files()
    assert len(files) > 50  # the scan really walked the tree
    hits = []
    for f in files:
        try:
            text = f.read_text()
        except UnicodeDecodeError:
            continue
        hits += [
            f"{f.relative_to(ROOT)}:{i}: {m.group(0)}"
            for i, line in enumerate(text.splitlines(), 1)
            for m in FOREIGN.finditer(line)
            if m.group(0) not in IN_IMAGE
        ]
    assert not hits, "absolute paths outside the repository:\n" + "\n".join(hits)


def test_the_real_data_sets_are_in_the_repository():
    for name in [
        "hh_rlhf_harmless_base_test.jsonl.gz",
        "alpaca_eval_instructions.jsonl",
        "LICENSE.hh_rlhf",
        "LICENSE.alpaca_eval",
    ]:
        assert (ROOT / "data" / name).stat().st_size > 0, name
