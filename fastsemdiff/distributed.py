"""Process group, device and model wrapping (FSDP2, DDP or none) for the trainer."""
from __future__ import annotations

import contextlib
import os
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

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
    parallel: str  # fsdp | hsdp | ddp | single
    dtype: Optional[torch.dtype]  # low-precision compute dtype, or None for fp32

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHARDED = ("fsdp", "hsdp")


def init_process_group(backend: str, **kwargs) -> None:
    """``dist.init_process_group``, with torch._dynamo imported first.

    Importing torch._dynamo while a process group exists (torch.compile, diffusers and others import it lazily)
    keeps that group alive past ``destroy_process_group`` (torch 2.11 and 2.14): its gloo worker threads then
    outlive the interpreter, free the last collective's tensors during shutdown and abort the process
    ("terminate called without an active exception", exit -6) at random. Imported before, it holds nothing."""
    import torch._dynamo  # noqa: F401  (the import is the point)

    dist.init_process_group(backend, **kwargs)


def setup(parallel: str, precision: str, threads: int) -> Runtime:
    """Join the process group torchrun describes (nccl on GPU, gloo on CPU), or run alone."""
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if parallel == "auto":
        parallel = "fsdp" if world > 1 else "single"
    if parallel == "single" and world > 1:
        raise ConfigError(f"train.parallel=single cannot run under torchrun with {world} processes; use "
                          "train.parallel=fsdp, hsdp or ddp, or run one process")
    if parallel == "hsdp":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        if world % local_world:
            raise ConfigError(f"train.parallel=hsdp needs the same number of processes on every node: {world} "
                              f"processes do not split into nodes of {local_world}; give every node the same "
                              "--nproc_per_node")
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if parallel != "single" and not dist.is_initialized():
        # gloo beside nccl on GPUs: asynchronous checkpoint saving coordinates its ranks over a CPU group
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        if "RANK" in os.environ:
            init_process_group(backend, device_id=device if cuda else None)
        else:  # plain `python -m`: a one-process group so FSDP/DDP still apply
            init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    if not cuda:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // local_world))
    if precision == "auto":
        precision = "bf16" if cuda else "fp32"
    dtype = torch.bfloat16 if precision == "bf16" else None
    return Runtime(rank, world, local_rank, device, parallel, dtype)


def device_mesh(rt: Runtime):
    """FSDP's mesh: 1-D over every rank, or for HSDP 2-D (``replicate`` across nodes, ``shard`` within one),
    so the all-gathers and reduce-scatters stay on a node's fast links and only one all-reduce of the
    gradient shards crosses nodes."""
    from torch.distributed.device_mesh import init_device_mesh

    if rt.parallel == "hsdp":
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(rt.world_size)))
        return init_device_mesh(rt.device.type, (rt.world_size // per_node, per_node),
                                mesh_dim_names=("replicate", "shard"))
    return init_device_mesh(rt.device.type, (rt.world_size,))


@dataclass
class Wrapped:
    """``step``: what the training step calls (maybe compiled); ``module``: the same model uncompiled (for
    state dicts, gradient-sync switches and the parameters)."""

    step: nn.Module
    module: nn.Module


def wrap(model: nn.Module, rt: Runtime, compile_scope: Optional[str] = None,
         activation_checkpointing: bool = False, compile_mode: str = "default") -> Wrapped:
    """Checkpoint and compile each transformer block (optional), shard per block (FSDP2/HSDP) or replicate
    (DDP), and with ``compile_scope="model"`` compile the whole loss instead of the blocks; ``compile_mode`` is
    torch.compile's mode (train.compile_mode)."""
    mode = None if compile_mode == "default" else compile_mode
    blocks = [*model.encoder.blocks, *model.denoiser.blocks]
    for block in blocks:
        block.checkpoint_activations = activation_checkpointing
    if compile_scope == "blocks":
        for block in blocks:
            block.compile(mode=mode)
    wrapped = model
    if rt.parallel in SHARDED:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # cast_forward_inputs=False: the images stay fp32, so x_t, alpha, sigma and the prediction target are
        # computed in fp32 as under single-process autocast; the trainer's autocast casts what meets the
        # bf16 parameters (FSDP's cast would round the images to bf16 before the loss sees them).
        mp = (MixedPrecisionPolicy(param_dtype=rt.dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
              if rt.dtype else None)
        kwargs = {"mesh": device_mesh(rt), **({"mp_policy": mp} if mp else {})}
        for block in blocks:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
    elif rt.parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[rt.device] if rt.device.type == "cuda" else None)
    return Wrapped(torch.compile(wrapped, mode=mode) if compile_scope == "model" else wrapped, wrapped)


def no_gradient_sync(module: nn.Module, skip: bool):
    """For all micro-batches of a step but the last: keep the gradients local (DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``), so only the last backward communicates."""
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(not skip)
        return contextlib.nullcontext()
    if skip and hasattr(module, "no_sync"):
        return module.no_sync()
    return contextlib.nullcontext()


def fsdp_units(model: nn.Module) -> dict[str, int]:
    """Each FSDP unit (by module name, "" for the root) and the number of parameters it gathers, read from
    FSDP2's own parameter groups."""
    from torch.distributed.fsdp import FSDPModule

    units = {}
    for name, module in model.named_modules():
        if isinstance(module, FSDPModule):
            group = module._get_fsdp_state()._fsdp_param_group
            units[name] = sum(p.sharded_param.numel() for p in group.fsdp_params) if group else 0
    return units


def run_command(prog: str, work: Callable[[], object], user_errors: tuple[type[Exception], ...]) -> None:
    """The body of a command that may run under torchrun: ``work()``, with an error the user can act on
    printed as ``prog: error: ...`` (exit 2, no traceback), and the process group destroyed however it ends."""
    try:
        work()
    except user_errors as e:
        print(f"{prog}: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    finally:
        cleanup()


def cleanup() -> None:
    """Destroy the process group, which joins its worker threads while the interpreter is still alive."""
    if dist.is_initialized():
        dist.destroy_process_group()


def gloo_threads() -> list[str]:
    """The names of this process's gloo worker threads (Linux; empty where /proc is not readable)."""
    tasks = Path("/proc/self/task")
    names = []
    for task in tasks.iterdir() if tasks.is_dir() else ():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:
            continue
    return sorted(n for n in names if "gloo" in n)


def exit_if_gloo_outlives_the_group() -> None:
    """For a command's ``__main__`` after success: where something still holds the process group after
    ``destroy_process_group`` (FSDP's and DCP's state can, in torch 2.11 and 2.14), gloo's threads outlive
    it, free their last work's tensors during interpreter shutdown and abort the process at random
    ("terminate called without an active exception", exit -6). Then flush, run the exit handlers, and
    leave without the interpreter's final teardown; otherwise return and exit normally."""
    if not any("runloop" in name for name in gloo_threads()):
        return
    import atexit

    sys.stdout.flush()
    sys.stderr.flush()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
