"""Process group, device and model wrapping (FSDP2, DDP or none) for the trainer."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .config import ConfigError


@dataclass
class Runtime:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    parallel: str  # fsdp | ddp | single
    dtype: Optional[torch.dtype]  # low-precision compute dtype, or None for fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(parallel: str, precision: str, threads: int) -> Runtime:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU), or run alone."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if parallel == "auto":
        parallel = "fsdp" if world > 1 else "single"
    if parallel == "single" and world > 1:
        raise ConfigError(f"train.parallel=single cannot run under torchrun with {world} processes; use "
                          "train.parallel=fsdp or ddp, or run one process")
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if parallel != "single" and not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:  # plain `python -m`: a one-process group so FSDP/DDP still apply
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    return Runtime(rank, world, local_rank, device, parallel, dtype)


def wrap(model: nn.Module, rt: Runtime, compile_blocks: bool) -> nn.Module:
    """Compile each transformer block (optional), then shard per block (FSDP2) or replicate (DDP)."""
    blocks = [*model.encoder.blocks, *model.denoiser.blocks]
    if compile_blocks:
        for block in blocks:
            block.compile()
    if rt.parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(rt.device.type, (rt.world_size,))
        mp = MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32) if rt.dtype else None
        kwargs = {"mesh": mesh, **({"mp_policy": mp} if mp else {})}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return model
    if rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "encoder") else model


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
