"""What every DeepSpeed learner group needs: how ranks meet and how the process group starts.

Shared by the RM learner and the policy learner groups.
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
import uuid
from typing import Any

import torch


def rendezvous_for(master_addr: str, master_port: int) -> str:
    """How ranks meet: a file on one node (loopback), TCP env:// across nodes.

    torch's TCPStore listens on every interface whatever host it is given; a group whose
    ranks all sit on this node meets through a FileStore instead, and gloo is pinned to
    the loopback device, so a local run opens no port beyond 127.0.0.1.
    """
    if ipaddress.ip_address(master_addr).is_loopback:
        return f"file://{tempfile.gettempdir()}/r2m-ray-rdzv-{uuid.uuid4().hex}"
    return f"tcp://{master_addr}:{master_port}"


def init_distributed(rank: int, world_size: int, rendezvous: str, backend: str) -> str:
    """Let DeepSpeed create the process group (gloo on CPU, NCCL on GPU)."""
    import deepspeed

    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"})
    if rendezvous.startswith("file://"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
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
