"""Collective weight sync: learner rank 0 broadcasts the policy straight into the vLLM workers.

`rl.rollout.weight_sync: collective` selects it (the default, `object_store`, is in
weight_sync.py). It is built on vLLM's own weight-transfer API
(`vllm.distributed.weight_transfer`): a trainer engine on the learner, a worker engine
inside every rollout engine, and a four-call control plane (init once; then start →
update → finish per sync) that `RolloutSyncClient` carries to the RolloutActors.

Backends, picked by `collective_backend`:
- `nccl` (GPU rollouts): vLLM's `NCCLWeightTransferEngine` / `NCCLTrainerWeightTransferEngine`
  unchanged, as OpenRLHF and verl do it: a NCCL group {learner rank 0, every engine worker}.
- `gloo` (CPU rollouts): the same engines with the NCCL communicator swapped for a gloo
  group (`GlooBroadcastGroup`), registered with vLLM's factories under "gloo". The control
  plane, rank layout and the worker's layerwise reload are vLLM's, so the CPU test
  exercises the whole path except the NCCL transport itself.

Why bother on one box: the object-store path copies the state dict into plasma and every
engine copies it out again; a broadcast streams tensor by tensor with no full extra copy.

Rank layout of the transfer group: 0 = learner rank 0 (the sender); the workers of rollout
engine i take ranks 1 + i·w … 1 + i·w + w − 1, where w = workers per engine (TP × PP).
A local group meets through a FileStore (no port opened, as for the learner groups).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, ClassVar

import ray
import torch
from vllm.distributed.weight_transfer.base import (
    ParamMeta,
    TrainerInitInfo,
    WeightSource,
    WeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.nccl_engine import (
    NCCLTrainerInitInfo,
    NCCLTrainerWeightTransferEngine,
    NCCLWeightTransferEngine,
)

TIMEOUT = timedelta(minutes=10)  # a sync waits for every engine to finish generating first


def collective_backend(num_gpus_per_actor: float) -> str:
    """The transport of the collective path: NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if num_gpus_per_actor > 0 else "gloo"


class GlooBroadcastGroup:
    """A gloo group outside torch's default group, with the one call the engines use.

    The learner's DeepSpeed group is torch's default group; this one must not touch it,
    so the backend is built directly on a store (FileStore for file://, TCPStore for tcp://).
    """

    def __init__(self, rendezvous: str, rank: int, world_size: int) -> None:
        from torch.distributed import FileStore, PrefixStore, TCPStore
        from torch.distributed.distributed_c10d import ProcessGroupGloo

        if rendezvous.startswith("file://"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # every member is on this node
            store = FileStore(rendezvous[len("file://") :], world_size)
        elif rendezvous.startswith("tcp://"):
            host, port = rendezvous[len("tcp://") :].rsplit(":", 1)
            store = TCPStore(host, int(port), world_size, is_master=rank == 0, timeout=TIMEOUT)
        else:
            raise ValueError(f"weight transfer rendezvous must be file:// or tcp://, got {rendezvous!r}")
        self.rank = rank
        self.pg = ProcessGroupGloo(PrefixStore("r2m-weight-transfer", store), rank, world_size, TIMEOUT)

    def broadcast(self, tensor: torch.Tensor, src: int, stream: Any = None) -> None:
        """In place: every rank ends with rank `src`'s tensor (same signature as PyNcclCommunicator's)."""
        from torch.distributed import BroadcastOptions

        opts = BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        """Drop the group (peers must have finished their last broadcast)."""
        self.pg = None


# ---------------------------------------------------------------- worker side (inside vLLM)


@dataclass(kw_only=True)
class GlooWeightTransferInitInfo(WeightTransferInitInfo):
    """Worker init info: where to meet and the first rank of this engine's workers."""

    rendezvous: str
    rank_offset: int
    world_size: int


class GlooWeightTransferEngine(NCCLWeightTransferEngine):
    """vLLM's dense engine over gloo: one-by-one broadcast, vLLM's layerwise reload."""

    init_info_cls = GlooWeightTransferInitInfo

    def init_transfer_engine(self, init_info: GlooWeightTransferInitInfo) -> None:  # type: ignore[override]
        pc = self.parallel_config
        rank = init_info.rank_offset + pc.data_parallel_index * pc.world_size + pc.rank
        self.packed = False
        self.model_update_group = GlooBroadcastGroup(init_info.rendezvous, rank, init_info.world_size)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # the base class ends with torch.accelerator.synchronize(), which has no device to sync here
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: Any) -> None:
        if self.model_update_group is None:
            raise RuntimeError("weight transfer: init_weight_transfer_engine was not called on this engine")
        for name, dtype_name, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype_name), device=self.device)
            self.model_update_group.broadcast(weight, src=0)
            self.model.load_weights([(name, weight)])


# ---------------------------------------------------------------- trainer side (learner rank 0)


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """Trainer init info for the gloo backend (the NCCL one carries master_address/port)."""

    backend: ClassVar[str] = "gloo"

    rendezvous: str
    world_size: int


class GlooTrainerWeightTransferEngine(NCCLTrainerWeightTransferEngine):
    """vLLM's dense trainer engine over gloo; send_weights (start → update ‖ broadcast → finish) is vLLM's."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(  # type: ignore[override]
        cls, init_info: GlooTrainerInitInfo, *, client: Any, source: WeightSource | None = None
    ) -> GlooTrainerWeightTransferEngine:
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, packed=False)
        if not engine.is_sender:
            return engine
        worker_info = {"rendezvous": init_info.rendezvous, "rank_offset": 1, "world_size": init_info.world_size}
        # the workers block in their rendezvous until rank 0 joins: start them first, join, then wait
        pending = client.init_weight_transfer_engine_async(worker_info)
        engine.model_update_group = GlooBroadcastGroup(init_info.rendezvous, 0, init_info.world_size)
        ray.get(pending)
        return engine

    def _broadcast(self, source: WeightSource, meta: list[ParamMeta]) -> None:
        if not self.is_sender:
            for _ in source:  # non-senders only keep step with the gather collectives
                pass
            return
        for _name, tensor in self._checked_iter(source, meta):
            self.model_update_group.broadcast(tensor.contiguous(), src=0)


def register_gloo_backend() -> None:
    """Make "gloo" known to vLLM's worker and trainer factories (idempotent; call before vllm.LLM)."""
    if "gloo" not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)
    if "gloo" not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine("gloo", GlooTrainerWeightTransferEngine)


# ---------------------------------------------------------------- the two ends' glue


class LearnerWeightSource(WeightSource):
    """The learner's HF-named parameters in float32 (the engines hold fp32 on CPU).

    Under ZeRO-3 each parameter is gathered as it is sent, so every rank must iterate in
    lockstep (vLLM's non-sender trainer ranks do exactly that) and no rank ever holds
    the full model at once.
    """

    def __init__(self, module: torch.nn.Module, zero3: bool, dtype: torch.dtype = torch.float32) -> None:
        self.module, self.zero3, self.dtype = module, zero3, dtype

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, self.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self._named()]

    def __iter__(self):  # type: ignore[override]
        for name, param in self._named():
            if self.zero3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    yield name, param.detach().to(self.dtype).clone()
            else:
                yield name, param.detach().to(self.dtype)

    def _named(self) -> list[tuple[str, torch.nn.Parameter]]:
        # named_parameters lists a tied lm_head once (as the embedding), as vLLM expects
        return list(self.module.named_parameters())


class RolloutSyncClient:
    """vLLM's four-call weight-sync control plane over our RolloutActors.

    Differs from vLLM's RayVLLMWeightSyncClient in one respect: our engines are
    independent, so each gets its own rank offset (1 + i·w) in the transfer group.
    """

    def __init__(self, rollouts: list[Any], workers_per_engine: int = 1) -> None:
        self.rollouts = rollouts
        self.workers_per_engine = workers_per_engine
        self.version = 0

    def init_weight_transfer_engine_async(self, init_info: dict[str, Any]) -> list[ray.ObjectRef]:
        """Start every engine's rendezvous; the sender joins, then waits on the refs."""
        base = int(init_info["rank_offset"])
        return [
            r.transfer_init.remote({**init_info, "rank_offset": base + i * self.workers_per_engine})
            for i, r in enumerate(self.rollouts)
        ]

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        ray.get(self.init_weight_transfer_engine_async(init_info))

    def check(self, meta: list[ParamMeta]) -> None:
        """Every engine checks names and shapes BEFORE the broadcast: a mismatch found
        mid-broadcast would leave the sender waiting on peers that have given up."""
        info = {"names": [m.name for m in meta], "shapes": [list(m.shape) for m in meta]}
        ray.get([r.transfer_check.remote(info, self.version) for r in self.rollouts])

    def start_weight_update(self) -> None:
        ray.get([r.transfer_start.remote() for r in self.rollouts])

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        ray.get([r.transfer_update.remote(update_info) for r in self.rollouts])

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        ray.get([r.transfer_finish.remote(self.version) for r in self.rollouts])


def trainer_init_info(backend: str, rendezvous: str, world_size: int, rank: int) -> TrainerInitInfo:
    """The trainer init info of a backend; NCCL meets over TCP (its store), gloo may use a file."""
    if backend == "gloo":
        return GlooTrainerInitInfo(rendezvous=rendezvous, world_size=world_size, rank=rank)
    if not rendezvous.startswith("tcp://"):
        raise ValueError("the nccl weight transfer meets over tcp://host:port")
    host, port = rendezvous[len("tcp://") :].rsplit(":", 1)
    return NCCLTrainerInitInfo(master_address=host, master_port=int(port), world_size=world_size, rank=rank)
