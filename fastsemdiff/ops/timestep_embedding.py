"""The sinusoidal timestep embedding as a custom op (``fastsemdiff::timestep_embedding``) with autograd."""
from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.library.custom_op("fastsemdiff::timestep_embedding", mutates_args=())
def timestep_embedding_op(t: Tensor, dim: int, max_period: float, backend: str) -> Tensor:
    if backend == "cuda":
        from . import _cuda

        if _cuda.available() and t.is_cuda:
            return _cuda.load().timestep_embedding(t, dim, max_period)
    elif backend != "triton":
        raise ValueError(f"timestep_embedding: unknown fused backend {backend!r}; choose 'triton' or 'cuda'")
    from fastsemdiff.kernels.timestep_embedding import timestep_embedding_fwd

    return timestep_embedding_fwd(t, dim, max_period)


@timestep_embedding_op.register_fake
def _(t, dim, max_period, backend):
    return t.new_empty(t.shape[0], dim, dtype=torch.float32)


def _setup(ctx, inputs, output):
    t, dim, max_period, _ = inputs
    ctx.save_for_backward(t)
    ctx.dim, ctx.max_period = dim, max_period


def _backward(ctx, grad):
    """d/dt [cos(t f), sin(t f)] = [-f sin(t f), f cos(t f)] (rarely needed: t seldom requires grad)."""
    (t,) = ctx.saved_tensors
    half = ctx.dim // 2
    f = torch.exp(-math.log(ctx.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * f
    dt = (f * (grad[:, half:2 * half] * torch.cos(arg) - grad[:, :half] * torch.sin(arg))).sum(-1)
    return dt.to(t.dtype), None, None, None


timestep_embedding_op.register_autograd(_backward, setup_context=_setup)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, backend: str = "triton") -> Tensor:
    """``t`` [B] -> fp32 ``[B, dim]`` on the fused kernel; see ``fastsemdiff.nn.timestep_embedding``."""
    return timestep_embedding_op(t, int(dim), float(max_period), backend)
