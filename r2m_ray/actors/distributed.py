"""What every DeepSpeed learner group needs: how ranks meet and how the process group starts.

Shared by the RM learner and the policy learner: the rendezvous, the DeepSpeed set-up,
the rank-side base (`LearnerRank`) and the driver-side group handle (`LearnerGroup`).
"""

from __future__ import annotations

import fcntl
import ipaddress
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def rendezvous_for(master_addr: str, master_port: int) -> str:
    """How ranks meet: a file on one node (loopback), TCP env:// across nodes.

    torch's TCPStore listens on every interface whatever host it is given; a group whose
    ranks all sit on this node meets through a FileStore instead, and gloo is pinned to
    the loopback device, so a local run opens no port beyond 127.0.0.1.
    """
    if ipaddress.ip_address(master_addr).is_loopback:
        return f"file://{tempfile.gettempdir()}/r2m-ray-rdzv-{uuid.uuid4().hex}"
    return f"tcp://{master_addr}:{master_port}"


def load_cpu_comm_op() -> Path | None:
    """Build or load DeepSpeed's CPU shared-memory comm op; returns its build directory.

    torch guards a JIT build with a bare `lock` file that a killed builder leaves behind, and
    every later DeepSpeed start then waits on it forever (a fresh suite hung 20 min in
    RMLearner.init so). Our ranks first take an flock, which the kernel drops when its holder
    dies: whoever holds it is the only one of ours building, so a `lock` found then is stale.
    (A foreign DeepSpeed building in the same cache at that instant would lose its lock: set
    TORCH_EXTENSIONS_DIR to keep caches apart.)
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory

    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return None
    build_dir = Path(_get_build_directory(builder.name, verbose=False))
    with open(build_dir / "r2m-build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        stale = build_dir / "lock"
        if stale.exists():
            log.warning("removing %s, left by a DeepSpeed op build that was killed mid-way", stale)
            stale.unlink()
        builder.load(verbose=False)  # cached in the builder class: DeepSpeed's own load reuses it
    return build_dir


def init_distributed(rank: int, world_size: int, rendezvous: str, backend: str) -> str:
    """Let DeepSpeed create the process group (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    if rendezvous.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        load_cpu_comm_op()
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, init_method=rendezvous, rank=rank, world_size=world_size
    )
    return backend


def deepspeed_config(zero_stage: int, grad_clip: float, micro_batch: int, bf16: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON config for one learner group."""
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": grad_clip,
        "zero_optimization": {"stage": zero_stage},
        # torch's AdamW is passed as a client optimizer: DeepSpeed's fused/CPU Adam
        # would compile for minutes on a CPU box and is no faster here.
        "zero_allow_untested_optimizer": True,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the configured lr, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def gathered_state_dict(module: torch.nn.Module, zero3: bool) -> dict[str, torch.Tensor]:
    """Full CPU copies of a module's weights; under ZeRO-3 a gather every rank must join."""
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def weights_only_checkpoint_engine() -> Any:
    """DeepSpeed's torch checkpoint engine, loading with `torch.load(weights_only=True)`.

    DeepSpeed's own engine unpickles arbitrary objects; its checkpoints need only tensors,
    containers and three of its plain classes, which are allowed by name.
    """
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location: Any = None) -> Any:
            with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
                return torch.load(path, map_location=map_location, weights_only=True)

    return WeightsOnlyCheckpointEngine()


def save_rng(path: Path) -> None:
    """This process's torch RNG state (safetensors)."""
    from safetensors.torch import save_file

    save_file({"torch_cpu": torch.get_rng_state()}, str(path))


def load_rng(path: Path) -> None:
    """Restore the torch RNG state written by `save_rng`."""
    from safetensors.torch import load_file

    torch.set_rng_state(load_file(str(path))["torch_cpu"])


class LearnerRank:
    """What every learner actor (one DeepSpeed rank) shares: its rank and rank 0's address."""

    def __init__(self, rank: int, world_size: int, torch_threads: int) -> None:
        torch.set_num_threads(torch_threads)
        self.rank = rank
        self.world_size = world_size
        self.engine: Any = None
        self.zero3 = False  # set by init from the learner's config (ZeRO-3 gathers need every rank)

    def address(self) -> tuple[str, int]:
        """This node's address and a free port on it (asked of rank 0, which hosts the group)."""
        from r2m_ray.ray_setup import free_port, node_ip

        ip = node_ip()
        return ip, free_port(ip)

    def checksum(self) -> float:
        """Sum of |weights| over the full model: the test that ranks stay identical."""
        return float(sum(v.double().abs().sum() for v in gathered_state_dict(self.engine.module, self.zero3).values()))

    def on_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows on the engine's device: the GPU Ray gave the actor, else the CPU (no copy)."""
        return {k: v.to(self.engine.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    def counters(self) -> dict[str, int]:
        """Training counters a resume must restore (subclasses add theirs)."""
        return {}

    def set_counters(self, counters: dict[str, int]) -> None:
        for key, value in counters.items():
            setattr(self, key, int(value))

    def save_checkpoint(self, path: str) -> str:
        """Every rank: DeepSpeed writes weights, optimizer partition and scheduler; + this rank's RNG."""
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        self.engine.save_checkpoint(
            path, tag="deepspeed", client_state={"counters": self.counters()}, save_latest=False
        )
        save_rng(Path(path) / f"rng_rank{self.rank}.safetensors")
        return path

    def load_checkpoint(self, path: str) -> dict[str, int]:
        """Every rank: restore what `save_checkpoint` wrote (the group must have the same ranks and ZeRO stage)."""
        self.engine.checkpoint_engine = weights_only_checkpoint_engine()
        loaded, client = self.engine.load_checkpoint(
            path, tag="deepspeed", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint for rank {self.rank} under {path}")
        self.set_counters(client.get("counters", {}))
        load_rng(Path(path) / f"rng_rank{self.rank}.safetensors")
        return self.counters()


class LearnerHung(TimeoutError):
    """A learner group call did not return within its deadline (a hung rank or collective)."""


class LearnerGroup:
    """Driver-side handle of `ranks` learner actors forming one DeepSpeed group.

    Rank 0 is created first: it names the node and port the group meets on. Every
    actor's `init(cfg_json, model_dir, rendezvous, seed)` then runs concurrently.
    `deadlines` bound the group's own waits: {"start": (config key, seconds), "call": (…)} for
    start-up and for every later call (a missing entry: no deadline); a missed one raises
    LearnerHung naming the role, the call and the key.
    """

    def __init__(
        self,
        actor_cls: Any,
        role: str,
        ranks: int,
        zero_stage: int,
        resources: tuple[float, float],
        torch_threads: int | None,
        init_args: tuple[str, str, int],
        rank_options: Callable[[int], dict[str, Any]] | None = None,
        deadlines: dict[str, tuple[str, float]] | None = None,
    ) -> None:
        from r2m_ray.ray_setup import check_resources

        num_cpus, num_gpus = resources
        check_resources(role, ranks, num_cpus, num_gpus)
        threads = torch_threads or max(1, int(num_cpus))
        # rank_options(r): .options of rank r (its placement-group bundle); default: plain resources
        opts = rank_options or (lambda r: {"num_cpus": num_cpus, "num_gpus": num_gpus})
        self.role, self.deadlines = role, dict(deadlines or {})
        self.world_size, self.zero_stage = ranks, zero_stage
        self.actors = [actor_cls.options(**opts(0)).remote(0, ranks, threads)]
        self.rendezvous, self.extra_rendezvous = "", []  # other groups' files this handle must clean up
        try:
            master_addr, master_port = self._get(self.actors[0].address.remote(), "start-up", start=True)
            self.actors += [actor_cls.options(**opts(r)).remote(r, ranks, threads) for r in range(1, ranks)]
            self.rendezvous = rendezvous_for(master_addr, master_port)
            cfg_json, model_dir, seed = init_args
            inits = [a.init.remote(cfg_json, model_dir, self.rendezvous, seed) for a in self.actors]
            self.init_info = self._get(inits, "init (model load, DeepSpeed)", start=True)
        except BaseException:
            self.shutdown()  # ranks that did start must not hold their resources past a failed start
            raise

    def _get(self, refs: Any, what: str, start: bool = False) -> Any:
        """ray.get under the group's start-up or call deadline."""
        import ray

        key, timeout = self.deadlines.get("start" if start else "call", (None, None))
        try:
            return ray.get(refs, timeout=timeout)
        except ray.exceptions.GetTimeoutError:
            raise LearnerHung(f"{self.role}: {what} did not return within {key}={timeout:g} s (hung)") from None

    def row_bounds(self, n: int, what: str) -> list[int]:
        """Contiguous row ranges, one per rank (bounds[i]:bounds[i+1])."""
        if n < self.world_size:
            raise ValueError(f"batch of {n} {what} cannot be split over {self.world_size} ranks")
        return torch.linspace(0, n, self.world_size + 1).round().long().tolist()

    def put_slices(self, batch: dict[str, torch.Tensor], bounds: list[int]) -> list[Any]:
        """One ObjectRef per rank: its rows of every field, put once and passed by ref."""
        import ray

        return [ray.put({k: v[bounds[i] : bounds[i + 1]] for k, v in batch.items()}) for i in range(self.world_size)]

    def _on_all_ranks(self, method: str, *args: Any) -> list[Any]:
        """Under ZeRO-3 gathering weights is a collective: every rank must take part."""
        actors = self.actors if self.zero_stage == 3 else self.actors[:1]
        return [getattr(a, method).remote(*args) for a in actors]

    def state_dict_ref(self) -> Any:
        """A ref to rank 0's full weights (the object store holds one copy)."""
        return self._on_all_ranks("state_dict")[0]

    def checksums(self) -> list[float]:
        """Per-rank weight checksums, every rank calling (a collective under ZeRO-3)."""
        return self._get([a.checksum.remote() for a in self.actors], "checksum")

    def save(self, path: Any, tokenizer_dir: Any = None) -> Any:
        """Write the model at `path` (rank 0; every rank joins the gather under ZeRO-3); returns it."""
        self._get(self._on_all_ranks("save", str(path), str(tokenizer_dir) if tokenizer_dir else None), "save")
        return path

    def save_checkpoint(self, path: Path) -> None:
        """Every rank writes its part of a resume checkpoint under `path` (a directory shared by all)."""
        path.mkdir(parents=True, exist_ok=True)
        self._get([a.save_checkpoint.remote(str(path)) for a in self.actors], "save_checkpoint")

    def load_checkpoint(self, path: Path) -> list[dict[str, int]]:
        """Every rank restores its part of a resume checkpoint; returns each rank's counters."""
        return self._get([a.load_checkpoint.remote(str(path)) for a in self.actors], "load_checkpoint")

    def shutdown(self) -> None:
        """Kill the actors and remove the group's rendezvous files."""
        import ray

        for a in self.actors:
            ray.kill(a)
        for rdzv in [self.rendezvous, *self.extra_rendezvous]:
            if rdzv.startswith("file://"):
                Path(rdzv[len("file://") :]).unlink(missing_ok=True)
