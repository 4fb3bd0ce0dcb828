"""One typed config tree for every stage, loaded from YAML plus dotted overrides.

`load_config("jobs/quickstart.yaml", ["rm.grm.alpha=0.05"])` returns a validated
`RunConfig`. Unknown keys and wrong types raise `ConfigError` naming the dotted key,
so a typo never turns into a silently ignored setting.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from r2m_ray.config_base import OptimConfig, Section
from r2m_ray.data.config import DataConfig
from r2m_ray.models.config import ModelConfig
from r2m_ray.rl_config import RLConfig
from r2m_ray.world.config import WorldConfig

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the dotted key."""


class RayConfig(Section):
    """Where the actors run. address=None: in-process Ray on loopback (or RAY_ADDRESS)."""

    address: str | None = None
    num_cpus: int | None = Field(default=None, ge=1)
    namespace: str = "r2m-ray"
    log_to_driver: bool = True


class DeepSpeedConfig(Section):
    """A data-parallel learner group: `ranks` Ray actors, one DeepSpeed rank each."""

    ranks: int = Field(default=1, ge=1)
    zero_stage: int = Field(default=2, ge=0, le=3)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    num_gpus_per_rank: float = Field(default=0.0, ge=0)
    num_cpus_per_rank: float = Field(default=1.0, gt=0)
    torch_threads: int | None = Field(default=None, ge=1)
    bf16: bool = False


class GRMConfig(Section):
    """GRM hidden-state regulariser (ALGORITHMS.md §1). regulariser='none' is plain BT."""

    regulariser: Literal["none", "sft", "sft_plain", "dpo", "dpo_noref"] = "none"
    alpha: float = Field(default=0.01, ge=0, le=1)
    beta: float = Field(default=0.1, gt=0)


class PrioritizerConfig(Section):
    """Prompt-free prioritisation (ALGORITHMS.md §2)."""

    enabled: bool = False
    mode: Literal["reweight", "resample"] = "reweight"
    tau: float = Field(default=1.0, gt=0)
    # batch_std: Δr2 divided by its batch std before τ (ours; priorities then keep their sharpness
    # as the reward scale grows); none: the raw reward-scale gap, as ALGORITHMS.md §2 writes it
    normalize: Literal["none", "batch_std"] = "none"
    # steps trained with uniform weights before the priorities are used (the value head is untrained
    # at first, so its gaps are noise); the prioritiser is not asked to score during the warm-up
    warmup_steps: int = Field(default=0, ge=0)
    num_prompts: int = Field(default=4, ge=2)
    refresh_every: int = Field(default=10, ge=1)
    pool_factor: int = Field(default=2, ge=1)
    # reference: w_i ∝ π_ref(y_c|x_i)·π_ref(y_r|x_i) from the frozen starting model's LM head (the
    # paper's importance weights, algos/decomposition.importance_weights); uniform: w_i = 1/M
    weights: Literal["uniform", "reference"] = "uniform"
    num_cpus: float = Field(default=1.0, gt=0)


class LoRAConfig(Section):
    """Low-rank adapters on the RM backbone (peft); merged into the weights when saved."""

    enabled: bool = False
    r: int = Field(default=16, ge=1)
    alpha: float = Field(default=32.0, gt=0)
    dropout: float = Field(default=0.05, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class RMConfig(Section):
    """Reward-model stage: loss, GRM, baselines, prioritiser, learner group."""

    method: str = "bt"
    loss: Literal["bt", "margin", "label_smoothing"] = "bt"
    margin: float = 0.5
    margin_column: str | None = None
    label_smoothing: float = Field(default=0.1, ge=0, lt=0.5)
    freeze_backbone: bool = False
    # recompute each layer's activations in backward: more compute, far less memory (LoRA keeps
    # extra activations per adapted matrix; measured numbers in docs/results.md)
    gradient_checkpointing: bool = False
    # pad-free packing of each pair batch (data/packing.py) in the learner and the prioritiser:
    # the same losses on about half the tokens of a padded batch of short pairs; off = padded [2B, T]
    packing: bool = True
    ensemble: int = Field(default=1, ge=1)
    ensemble_reduce: Literal["mean", "min"] = "mean"
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    # train on the first N training pairs only (the data-size axis of a sweep; eval splits stay whole)
    train_pairs: int | None = Field(default=None, ge=2)
    eval_batch_size: int = Field(default=64, ge=1)
    log_every: int = Field(default=10, ge=1)
    # also write each trained member as an HF *ForSequenceClassification dir (checkpoints/rm-<m>-hf)
    export_hf: bool = False
    grm: GRMConfig = GRMConfig()
    prioritizer: PrioritizerConfig = PrioritizerConfig()
    lora: LoRAConfig = LoRAConfig()
    optim: OptimConfig = OptimConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    # deadlines of the driver's waits (docs/operations.md, "Deadlines"): a hung rank, prioritiser or
    # reference ends the member's attempt like a dead one, and the member trains again from its start
    # (same seed, same result) at most max_restarts times
    wait_timeout_s: float = Field(default=1800.0, gt=0)  # each training step, score, refresh, save
    startup_timeout_s: float = Field(default=1800.0, gt=0)  # the ranks' and the prioritiser's model load
    max_restarts: int = Field(default=1, ge=0)

    @model_validator(mode="after")
    def _lora_limits(self) -> RMConfig:
        if self.lora.enabled:
            if self.freeze_backbone:
                raise ValueError("rm.lora.enabled and rm.freeze_backbone: choose one (LoRA trains adapters)")
            if self.deepspeed.zero_stage == 3:
                raise ValueError("rm.lora.enabled needs rm.deepspeed.zero_stage <= 2 (adapters are merged at save)")
            if self.prioritizer.enabled:
                raise ValueError("rm.lora.enabled with rm.prioritizer.enabled is not supported")
        return self


class SFTConfig(Section):
    """Supervised warm-up of the policy on the world's sft split."""

    epochs: int = Field(default=2, ge=1)
    batch_size: int = Field(default=32, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=20)
    eval_prompts: int = Field(default=128, ge=1)
    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0)


class BestOfNConfig(Section):
    """`r2m-ray eval bon`: n samples per prompt from the policy, the RM picks the best."""

    n: int = Field(default=16, ge=1)  # samples per prompt; curves at n = 1, 2, 4, … , n
    prompts: int = Field(default=32, ge=1)  # the first this many usable prompts of data.prompts
    temperature: float = Field(default=1.0, gt=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=64, ge=1)
    policy: str | None = None  # the sampling policy; default rl.policy_checkpoint, else the model preset
    judge: str | None = None  # a second, independently trained RM that scores the picked responses


class DecompositionCheckConfig(Section):
    """`eval decomposition`: the prompt-free gap estimator against the world's exact truth."""

    num_prompts: list[int] = [2, 4, 8]  # M values compared (cross prompts per pair, own included)
    splits: list[Literal["train", "test_id", "test_ood"]] = ["test_id", "test_ood"]
    batch_size: int | None = Field(default=None, ge=2)  # pairs per batch (the cross prompts' pool); None: rm.batch_size
    seed: int = 0

    @field_validator("num_prompts")
    @classmethod
    def _at_least_two(cls, value: list[int]) -> list[int]:
        if not value or any(m < 2 for m in value):
            raise ValueError("eval.decomposition.num_prompts: each M must be >= 2 (the pair's own prompt and another)")
        return value


class EvalConfig(Section):
    """`r2m-ray eval`, `eval bon`, `eval feedback` and `export`: which trained models or run to use."""

    checkpoints: list[str] = []
    export_dir: str | None = None
    bon: BestOfNConfig = BestOfNConfig()
    rl_run: str | None = None  # `eval feedback`: a finished RL run directory on the world's prompts
    decomposition: DecompositionCheckConfig = DecompositionCheckConfig()


class ServeAutoscalingConfig(Section):
    """Ray Serve's replica autoscaling (its AutoscalingConfig): replicas follow the requests in flight."""

    min_replicas: int = Field(default=1, ge=1)
    max_replicas: int = Field(default=4, ge=1)
    target_ongoing_requests: float = Field(default=4.0, gt=0)  # per replica
    upscale_delay_s: float = Field(default=30.0, ge=0)
    downscale_delay_s: float = Field(default=600.0, ge=0)
    metrics_interval_s: float = Field(default=10.0, gt=0)
    look_back_period_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _bounds(self) -> ServeAutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"serve.autoscaling: min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        return self


class ServeConfig(Section):
    """`r2m-ray serve`: a trained RM over HTTP (Ray Serve), docs/operations.md "Serving a reward model"."""

    host: str = "127.0.0.1"  # loopback unless the operator opens it on purpose
    port: int = Field(default=8000, ge=1, le=65535)
    token_env: str = "R2M_RAY_SERVE_TOKEN"  # the bearer token is read from this variable, never from a file
    num_replicas: int = Field(default=1, ge=1)
    autoscaling: ServeAutoscalingConfig | None = None  # set: replicas between its bounds; num_replicas unused
    num_cpus_per_replica: float = Field(default=1.0, gt=0)
    torch_threads: int = Field(default=1, ge=1)
    max_batch_size: int = Field(default=8, ge=1)  # requests merged into one forward batch
    batch_wait_timeout_s: float = Field(default=0.01, ge=0)
    max_ongoing_requests: int = Field(default=16, ge=1)  # per replica
    max_queued_requests: int = Field(default=64, ge=1)  # beyond it: 503 (backpressure), not an unbounded queue
    max_items_per_request: int = Field(default=256, ge=1)
    max_request_bytes: int = Field(default=4 * 2**20, ge=1024)
    request_timeout_s: float = Field(default=120.0, gt=0)


class RunConfig(Section):
    """The root of the tree: one run directory, one seed, every stage's section."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    stages: list[Literal["world", "sft", "rm", "rl"]] = ["world", "sft", "rm"]
    world: WorldConfig = WorldConfig()
    model: ModelConfig = ModelConfig()
    policy_model: ModelConfig | None = None
    data: DataConfig = DataConfig()
    sft: SFTConfig = SFTConfig()
    rm: RMConfig = RMConfig()
    rl: RLConfig = RLConfig()
    ray: RayConfig = RayConfig()
    eval: EvalConfig = EvalConfig()
    serve: ServeConfig = ServeConfig()

    @model_validator(mode="after")
    def _check_grm_needs_lm_head(self) -> RunConfig:
        if self.rm.freeze_backbone and self.rm.grm.regulariser != "none":
            raise ValueError("rm.grm.regulariser needs a trainable backbone; set rm.freeze_backbone=false")
        return self

    @model_validator(mode="after")
    def _check_world_prompts_cover_the_win_rate(self) -> RunConfig:
        # the world's RL prompts minus the win-rate hold-out must fill a step (else the RL stage
        # would stop after the world, SFT and RM had been built)
        rl, have = self.rl, self.world.splits.rl_prompts
        if "rl" in self.stages and self.data.prompts is None and rl.winrate_prompts:
            if have < rl.winrate_prompts + rl.prompts_per_step:
                raise ValueError(
                    f"rl.winrate_prompts={rl.winrate_prompts} held out of world.splits.rl_prompts={have} leaves "
                    f"fewer than rl.prompts_per_step={rl.prompts_per_step} to train on; lower rl.winrate_prompts "
                    "or raise world.splits.rl_prompts"
                )
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set tree[a][b][c] = value for 'a.b.c', creating intermediate dicts."""
    node = tree
    keys = dotted.split(".")
    for key in keys[:-1]:
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: '{key}' is a value, not a section")
        node = child
    node[keys[-1]] = value


class StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in seen:
                problem = f"duplicate key {key!r} (line {line}; first given on line {seen[key]})"
                raise yaml.constructor.ConstructorError(None, None, problem, key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml_file(path: Path) -> Any:
    """A YAML file with the errors an operator can act on: the file, the line, the duplicate key."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = path.read_bytes()[: err.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} on line {line})") from None
    if not text.strip():
        raise ConfigError(f"{path}: the file is empty (write {{}} to take every default)")
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.constructor.ConstructorError as err:
        if (err.problem or "").startswith("duplicate key"):
            raise ConfigError(f"{path}: {err.problem}; give each key once") from None
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """Parse 'a.b=value' strings; values are YAML scalars/lists ('0.1', 'true', '[1,2]').

    A later override of a key wins (a compare arm's over its base); a value that is not YAML is refused."""
    parsed: list[tuple[str, Any]] = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as err:
            problem = str(err).splitlines()[0]
            raise ConfigError(f"override {key}: value {raw!r} is not valid YAML ({problem})") from None
        parsed.append((key, value))
    return parsed


def _format_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        lines.append(f"{loc}: {msg}" + ("" if e["type"] == "extra_forbidden" else f" (got {got!r})"))
    return "invalid config:\n  " + "\n  ".join(lines)


def config_from_dict(tree: dict[str, Any]) -> RunConfig:
    """Validate a plain dict into a RunConfig, with errors that name dotted keys."""
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load YAML (default: the packaged default) and apply dotted overrides."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    tree = load_yaml_file(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(tree).__name__}")
    tree = copy.deepcopy(tree)
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    return config_from_dict(tree)


def dump_config(cfg: RunConfig) -> str:
    """The resolved config as YAML (what a run directory records)."""
    return yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
