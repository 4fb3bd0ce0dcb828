"""The commands the docs tell people to run must be valid, checked without running them.

Every `r2m-ray ...` command in README.md and docs/*.md (code blocks and inline code, also after
`ray job submit ... --` and through `jobs/submit_local.sh`), and the Makefile's own, is parsed
by the real argument parser, split like the CLI splits it, and its config loaded with its overrides
by `load_config`: a config file that does not exist, an unknown key, a wrong type or an unknown
command fails here. Checks the CLI makes before any work (one compare spec, eval/export need
checkpoints, the rl stage alone needs a reward checkpoint) are repeated. `make X` must name a
Makefile target and `submit_local.sh X` a stage the script accepts. No Ray, no model, no training.

Placeholders are substituted, never skipped: `$PWD` is the repository; the directory of
`--resume DIR` (a run that does not exist here) is a stand-in run directory holding the resolved
jobs/quickstart.yaml. Paths inside override values (`runs/X/checkpoints/rm-0`, `DIR`) are kept:
load_config does not open them. A command named without arguments (`r2m-ray compare`,
`r2m-ray eval bon` in a heading) is a mention: only its name is checked.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from r2m_ray.cli import COMMANDS, _parser, _split_args
from r2m_ray.config import ConfigError, dump_config, load_config
from tests.conftest import ROOT

DOCS = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
REFERENCE_DOCS = DOCS  # whose repository paths and test names must exist
SUBMIT_SCRIPT = "jobs/submit_local.sh"
# Commands deliberately not checked, with the reason; each must still be in the docs (no stale entries).
SKIPPED: dict[str, str] = {
    "run …": "docs/results.md: `time r2m-ray run …` in a table cell, the command elided",
}
# Lower bounds, so the checks cannot pass on an extraction that found (next to) nothing.
MIN_R2M_COMMANDS = 50
MIN_MAKE = 3
MIN_SUBMIT = 3
MIN_RESUME = 2


@dataclass
class Found:
    # (where, argv after `r2m-ray`, inline: in prose `code`, where a bare name is a mention)
    r2m: list[tuple[str, list[str], bool]] = field(default_factory=list)
    make: list[tuple[str, str]] = field(default_factory=list)  # (where, target)
    submit: list[tuple[str, list[str]]] = field(default_factory=list)  # (where, args of the script)


def _split(text: str) -> list[str]:
    text = text.replace("$PWD", str(ROOT)).replace("${PWD}", str(ROOT))
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose: plain words are enough
        return text.split()


def _until_separator(tokens: list[str]) -> list[str]:
    for i, t in enumerate(tokens):
        if t in {";", "&&", "||", "|", ">", "2>&1", "&"}:
            return tokens[:i]
    return tokens


def snippets(text: str) -> list[tuple[int, str, bool]]:
    """(line, text, in_code_block): fenced code lines with `\\` continuations joined, then inline code."""
    out: list[tuple[int, str, bool]] = []
    prose: list[tuple[int, str]] = []
    fenced, pending, start = False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose.append((n, line))
            continue
        if not pending:
            start = n
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line, True))
        pending = ""
    # Inline code may wrap across lines: scan the prose as one string, keeping line numbers.
    joined = "\n".join(line for _, line in prose)
    for m in re.finditer(r"`([^`]+)`", joined):
        line_no = prose[joined.count("\n", 0, m.start())][0]
        out.append((line_no, m.group(1).replace("\n", " "), False))
    return out


def extract(path: str, text: str | None = None) -> Found:
    found = Found()
    text = (ROOT / path).read_text() if text is None else text
    for line_no, snippet, in_code in snippets(text):
        tokens = _split(snippet)
        where = f"{path}:{line_no}: {snippet.strip()}"
        for i, tok in enumerate(tokens):
            if tok == "r2m-ray" or tok.endswith("/r2m-ray"):
                argv = _until_separator(tokens[i + 1 :])
                if argv:  # a bare `r2m-ray` names the program, not a command
                    found.r2m.append((where, argv, not in_code))
            elif tok == "make" and i + 1 < len(tokens) and (in_code or i == 0):
                if not tokens[i + 1].startswith("-"):
                    found.make.append((where, tokens[i + 1]))
            elif tok.endswith("submit_local.sh"):
                found.submit.append((where, _until_separator(tokens[i + 1 :])))
    return found


def makefile_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def makefile_commands() -> list[tuple[str, list[str], bool]]:
    """The r2m-ray commands in the Makefile's recipes."""
    out = []
    for n, line in enumerate((ROOT / "Makefile").read_text().splitlines(), 1):
        if line.startswith("\t") and "/r2m-ray " in line:
            tokens = _split(line.strip())
            i = next(i for i, t in enumerate(tokens) if t.endswith("/r2m-ray"))
            out.append((f"Makefile:{n}: {line.strip()}", _until_separator(tokens[i + 1 :]), False))
    return out


def submit_stages() -> set[str]:
    m = re.search(r'^COMMANDS="([^"]*)"', (ROOT / SUBMIT_SCRIPT).read_text(), re.M)
    assert m, f"{SUBMIT_SCRIPT}: no COMMANDS=... line to read the accepted stages from"
    return set(m.group(1).split())


def submit_job_argv(args: list[str], stages: set[str]) -> list[str]:
    """The r2m-ray argv submit_local.sh submits for `args` (its own dispatch), or an assertion."""
    if not args:
        return ["run", "jobs/quickstart.yaml"]
    if args[0] in stages:
        return args
    assert "=" in args[0] or args[0].startswith("-"), (
        f"{args[0]!r} is not a stage {SUBMIT_SCRIPT} accepts ({sorted(stages)}) nor an extra argument for `run`"
    )
    return ["run", "jobs/quickstart.yaml", *args]


def stand_in_run_dir(tmp: Path) -> Path:
    """A run directory for `--resume DIR` placeholders: config.yaml = the resolved quickstart."""
    run = tmp / "stand-in-run"
    if not (run / "config.yaml").is_file():
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.yaml").write_text(dump_config(load_config(ROOT / "jobs" / "quickstart.yaml")))
    return run


def check_r2m_command(argv: list[str], tmp: Path, inline: bool = False) -> str:
    """Parse and validate one r2m-ray argv the way `r2m_ray.cli.main` does before it runs anything.

    Returns what was checked ("config", "spec" or "name": an inline mention without arguments);
    raises AssertionError / ConfigError.
    """
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = _parser().parse_args(argv)
    except SystemExit:
        raise AssertionError(f"r2m-ray {' '.join(argv)}: the parser refuses it: {err.getvalue().strip()}") from None
    if ns.command == "compare":
        from r2m_ray.pipelines.compare import load_spec

        if inline and not ns.args and not ns.report_only and ns.run_dir is None:
            return "name"  # `r2m-ray compare` named in prose
        if len(ns.args) != 1:
            raise ConfigError("compare takes exactly one spec file")
        if ns.report_only and ns.run_dir is None:
            raise ConfigError("--report-only needs --run-dir")
        spec = load_spec(Path(ns.args[0]))
        load_config(spec.base, spec.overrides)
        for name, overrides in {**spec.variants, **spec.reward_models}.items():
            try:
                load_config(spec.base, spec.overrides + overrides)
            except ConfigError as e:
                raise ConfigError(f"{ns.args[0]}: variant or reward model {name!r}: {e}") from None
        return "spec"
    sub = ns.args[:1] if ns.command == "eval" and ns.args[:1] in (["bon"], ["feedback"], ["decomposition"]) else []
    if ns.command == "bench" and ns.what == "peer" and ns.args:  # bare `bench peer` in prose: a mention
        assert ns.args[:1] in (["rm"], ["rl"]), "bench peer needs a side: rm or rl"
        sub = ns.args[:1]
    config, overrides = _split_args(ns.args[len(sub) :])
    resume = getattr(ns, "resume", None)
    if inline and config is None and not overrides and resume is None and getattr(ns, "run_dir", None) is None:
        return "name"  # `r2m-ray eval feedback`, `r2m-ray run` named in prose
    if resume is not None:
        assert not getattr(ns, "force", False), "--resume and --force together are refused"
        assert ns.run_dir is None or ns.run_dir == resume, "--resume and a different --run-dir are refused"
        config = config or str(stand_in_run_dir(tmp) / "config.yaml")
    if config is not None:
        assert Path(config).is_file(), f"config file {config} does not exist"
    cfg = load_config(config, overrides)
    stages = {"sft": ["world", "sft"], "rm": ["rm"], "rl": ["rl"], "run": list(cfg.stages)}.get(ns.command, [])
    if "rl" in stages and "rm" not in stages and cfg.rl.reward.mode != "remote":  # remote: a server's RM
        assert cfg.rl.reward.checkpoint, "rl.reward.checkpoint is not set and no rm stage runs: the rl stage fails"
    if ns.command == "eval" and sub == ["feedback"]:
        assert cfg.eval.rl_run, "eval feedback needs eval.rl_run=RUN_DIR"
    elif ns.command == "eval" and sub in (["bon"], ["decomposition"]):
        assert len(cfg.eval.checkpoints) == 1, f"eval {sub[0]} needs eval.checkpoints=[ONE reward-model dir]"
    elif ns.command == "eval":
        assert cfg.eval.checkpoints, "eval needs eval.checkpoints=[...]"
    elif ns.command == "serve":
        assert cfg.eval.checkpoints, "serve needs eval.checkpoints=[...]"
    elif ns.command == "export":
        assert len(cfg.eval.checkpoints) == 1 and cfg.eval.export_dir, (
            "export needs eval.checkpoints=[ONE] and eval.export_dir"
        )
    return "config"


def all_commands() -> tuple[list[tuple[str, list[str], bool]], Found]:
    """Every r2m-ray argv to check (docs, submit_local.sh dispatch, Makefile) and the raw findings."""
    total = Found()
    for doc in DOCS:
        f = extract(doc)
        total.r2m += f.r2m
        total.make += f.make
        total.submit += f.submit
    stages = submit_stages()
    commands = list(total.r2m)
    commands += [(f"{where} (as submitted)", submit_job_argv(args, stages), False) for where, args in total.submit]
    commands += makefile_commands()
    return commands, total


@pytest.fixture
def in_repo(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' relative paths (jobs/quickstart.yaml) are from the repository root


def test_every_documented_r2m_ray_command_parses_and_its_config_loads(in_repo, tmp_path):
    assert {"README.md", "docs/operations.md", "docs/results.md"} <= set(DOCS)
    commands, _ = all_commands()
    checked: dict[str, int] = {"config": 0, "spec": 0, "name": 0}
    failures, skipped_seen, resumes = [], set(), 0
    for where, argv, inline in commands:
        text = " ".join(argv)
        if text in SKIPPED:
            skipped_seen.add(text)
            continue
        try:
            checked[check_r2m_command(argv, tmp_path, inline)] += 1
        except (AssertionError, ConfigError, ValueError) as err:
            failures.append(f"{where}\n    r2m-ray {text}\n    -> {err}")
            continue
        resumes += "--resume" in argv
    assert not failures, "documented commands that would fail:\n" + "\n".join(failures)
    assert skipped_seen == set(SKIPPED), f"SKIPPED entries no doc has any more: {set(SKIPPED) - skipped_seen}"
    assert checked["config"] + checked["spec"] >= MIN_R2M_COMMANDS, checked
    assert checked["spec"] >= 2, checked  # the compare specs were really loaded
    assert resumes >= MIN_RESUME, resumes  # the --resume stand-in was really exercised
    assert {argv[0] for _, argv, _ in commands} >= set(COMMANDS)  # every command is documented somewhere


def test_documented_make_targets_exist():
    _, found = all_commands()
    targets = makefile_targets()
    assert {"setup", "demo", "test"} <= targets  # the Makefile was really read
    missing = [f"{where} -> make {t}" for where, t in found.make if t not in targets]
    assert not missing, "make targets the Makefile does not have:\n" + "\n".join(missing)
    assert len(found.make) >= MIN_MAKE, found.make


def test_documented_submit_local_stages_are_accepted():
    _, found = all_commands()
    assert (ROOT / SUBMIT_SCRIPT).is_file()
    stages = submit_stages()
    # the script's list was really read; `serve` is a service that runs until stopped, not a batch job
    assert set(COMMANDS) - {"serve"} <= stages | {"compare"} and "rl" in stages
    bad = []
    for where, args in found.submit:
        try:
            submit_job_argv(args, stages)
        except AssertionError as err:
            bad.append(f"{where} -> {err}")
    assert not bad, "\n".join(bad)
    assert len(found.submit) >= MIN_SUBMIT, found.submit


# ------------------------------------------------------- the checker itself catches bad docs


@pytest.mark.parametrize(
    "doc",
    [
        "```bash\n.venv/bin/r2m-ray run jobs/no_such_config.yaml\n```",  # a config file that does not exist
        "```bash\nr2m-ray rm jobs/quickstart.yaml rm.no_such_key=1\n```",  # a bad key
        "```bash\nr2m-ray rm jobs/quickstart.yaml rm.epochs=abc\n```",  # a wrong type
        "Run `r2m-ray train jobs/quickstart.yaml` first.",  # an unknown command
        "```bash\nr2m-ray rl jobs/quickstart.yaml   # no reward checkpoint\n```",  # rl alone, nothing to train against
        "```bash\nr2m-ray compare jobs/no_such_spec.yaml\n```",  # a compare spec that does not exist
        "```bash\nr2m-ray export jobs/quickstart.yaml eval.checkpoints=[runs/X/checkpoints/rm-0]\n```",
    ],
)
def test_the_checker_rejects_a_bad_command(in_repo, tmp_path, doc):
    found = extract("doc.md", doc)
    assert len(found.r2m) == 1
    with pytest.raises((AssertionError, ConfigError)):
        check_r2m_command(found.r2m[0][1], tmp_path, found.r2m[0][2])


def test_the_checker_rejects_a_bad_make_target_or_submit_stage():
    found = extract(
        "doc.md", "`make demo` or\n```bash\nmake no-such-target\nbash jobs/submit_local.sh train x.yaml\n```"
    )
    assert sorted(t for _, t in found.make) == ["demo", "no-such-target"]
    assert "no-such-target" not in makefile_targets()
    with pytest.raises(AssertionError, match="not a stage"):
        submit_job_argv(found.submit[0][1], submit_stages())


def test_the_checker_accepts_continuations_comments_and_placeholders(in_repo, tmp_path):
    doc = (
        "```bash\n"
        'bash jobs/submit_local.sh rl jobs/quickstart.yaml rl.reward.checkpoint="$PWD/runs/X/checkpoints/rm-0" \\\n'
        "  --run-dir /tmp/r   # a comment\n"
        "RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 \\\n"
        "  --runtime-env jobs/runtime_env.yaml -- r2m-ray run jobs/quickstart.yaml\n"
        "r2m-ray run --resume runs/quickstart-… ray.address=auto\n"
        "```\nerrors read `r2m-ray: error: …`; see `r2m-ray eval feedback eval.rl_run=RUN_DIR`.\n"
    )
    found = extract("doc.md", doc)
    ((where, args),) = found.submit
    argv = submit_job_argv(args, submit_stages())
    assert argv[-2:] == ["--run-dir", "/tmp/r"] and argv[2] == f"rl.reward.checkpoint={ROOT}/runs/X/checkpoints/rm-0"
    assert [a for _, a, _ in found.r2m] == [
        ["run", "jobs/quickstart.yaml"],
        ["run", "--resume", "runs/quickstart-…", "ray.address=auto"],
        ["eval", "feedback", "eval.rl_run=RUN_DIR"],
    ]
    for a in [argv, *(a for _, a, _ in found.r2m)]:
        assert check_r2m_command(a, tmp_path) == "config"
    # a bare name is a mention in prose, but a command in a code block
    assert check_r2m_command(["compare"], tmp_path, inline=True) == "name"
    with pytest.raises(ConfigError, match="exactly one spec"):
        check_r2m_command(["compare"], tmp_path)
    with pytest.raises(AssertionError, match="rl.reward.checkpoint"):
        check_r2m_command(["rl"], tmp_path)


# ------------------------------------------------------- files and tests the docs name


def _repo_path_candidates(token: str, doc: Path) -> list[Path] | None:
    """Where a backticked/linked token would live in the repo, or None if it is not a repo path."""
    token = token.split("::")[0].split("#")[0].rstrip(".,;:)")
    if not token or any(c in token for c in "<>*…$ ") or token.startswith(("http", "~", "/", "-")):
        return None
    top = {"r2m_ray", "tests", "jobs", "docs", "cluster", "data", "pipelines", "models", "actors", "eval"}
    parts = token.split("/")
    is_file = re.search(r"\.(py|ya?ml|sh|md|toml|json|jsonl|gz|png)$", token) is not None
    if parts[0] not in top and not (is_file and len(parts) == 1 and doc.name != "README.md"):
        return None
    if not is_file and not token.endswith("/"):
        return None
    if "X" in parts or any(p.startswith("runs") for p in parts):
        return None
    if len(parts) == 1:  # a bare file name (`rayjob.yaml`): anywhere in the repository
        return [ROOT / token, doc.parent / token, *_repo_files().get(token, [])]
    return [ROOT / token, doc.parent / token, ROOT / "r2m_ray" / token]


def _repo_files() -> dict[str, list[Path]]:
    if not _REPO_FILES:
        for f in ROOT.rglob("*"):
            if f.is_file() and not {".git", ".venv", "__pycache__", ".pytest_cache", "runs"} & set(f.parts):
                _REPO_FILES.setdefault(f.name, []).append(f)
    return _REPO_FILES


_REPO_FILES: dict[str, list[Path]] = {}


# Files a run directory holds, named without their directory.
RUN_OUTPUTS = set(
    "config.yaml config.json metrics.jsonl summary.json actors.json driver.json manifest.json reward_model.json "
    "data_split.json run.json inputs.json feedback_analysis.json bon.json decomposition_check.json".split()
)


def test_files_and_tests_named_in_the_docs_exist():
    missing, checked = [], 0
    for doc_name in REFERENCE_DOCS:
        doc = ROOT / doc_name
        text = doc.read_text()
        tokens = re.findall(r"`([^`\n]+)`", text) + re.findall(r"\]\(([^)\s]+)\)", text)
        for token in tokens:
            for word in token.split():
                cands = _repo_path_candidates(word, doc)
                if cands is None or word.rstrip(".,;:)") in RUN_OUTPUTS:
                    continue
                checked += 1
                hit = next((c for c in cands if c.exists()), None)
                if hit is None:
                    missing.append(f"{doc_name}: {word}")
                elif "::" in word:  # tests/test_x.py::test_name must name a test in that file
                    name = word.split("::")[1].rstrip(".,;:)")
                    if not re.search(rf"^(async )?def {re.escape(name)}\(", hit.read_text(), re.M):
                        missing.append(f"{doc_name}: {word} (no such test)")
    assert not missing, "the docs name files or tests the repository does not have:\n" + "\n".join(missing)
    assert checked >= 30, checked


def test_docs_name_no_issue_letters():
    hits = [
        f"{doc}:{n}: {line.strip()}"
        for doc in REFERENCE_DOCS
        for n, line in enumerate((ROOT / doc).read_text().splitlines(), 1)
        if re.search(r"\bissues? [A-Z]\b", line)
    ]
    assert not hits, "internal issue letters in the docs:\n" + "\n".join(hits)
