"""The sinusoidal timestep embedding as a custom op (``fastsemdiff::timestep_embedding``) with autograd.

``backend="auto"`` layers run the torch reference for it (``fastsemdiff.ops.dispatch.AUTO_MEASURED``): the
op computes one small ``[B, 256]`` table per step, and on the one GPU measured (H200, bench/RESULTS.md) the
compiled reference was as fast as the CUDA kernel and faster than the Triton one. ``backend="triton"`` /
``"cuda"`` run them.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from . import validation


def timestep_embedding_ref(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """The reference: sinusoidal embedding of (scaled) times t [B] -> [B, dim] in fp32, cos of the first half, sin
    of the second (``fastsemdiff.nn.timestep_embedding``, the torch backend of ``TimestepEmbedder``)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], 1)], dim=-1)
    return emb


def _reference(t: Tensor, dim: int, max_period: float) -> Tensor:
    return timestep_embedding_ref(t, dim, max_period)


def _kernel(backend: str, t: Tensor):
    """The forward that runs this call, as ``fastsemdiff.ops.dispatch`` picks it for ``t``: the CUDA kernel,
    the Triton kernel, or the reference."""
    from . import dispatch

    name = dispatch.launch_backend(backend, "timestep_embedding", t)
    if name == "cuda":
        from . import _cuda

        return name, lambda t, dim, max_period: _cuda.load().timestep_embedding(t, dim, max_period)
    if name == "triton":
        from fastsemdiff.kernels.timestep_embedding import timestep_embedding_fwd

        return name, timestep_embedding_fwd
    return name, _reference


def _check(kernel, t_dtype: torch.dtype, dim: int, max_period: float, device: torch.device) -> list:
    """The kernel against the reference on four times in [0, 1000) (the backward is torch code either way)."""
    from .guard import compare_all

    t = (torch.rand(4, generator=torch.Generator().manual_seed(20261201), dtype=torch.float64) * 1000).to(t_dtype)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / max(half, 1))
    arg = t.double()[:, None] * freqs[None]
    exact = torch.cat([torch.cos(arg), torch.sin(arg), arg.new_zeros(4, dim % 2)], dim=-1).to(device)
    t = t.to(device)
    return compare_all(["emb"], [kernel(t, dim, max_period)], [exact], [_reference(t, dim, max_period)])


@torch.library.custom_op("fastsemdiff::timestep_embedding", mutates_args=())
def timestep_embedding_op(t: Tensor, dim: int, max_period: float, backend: str, check: str = "warn") -> Tensor:
    validation.timestep_embedding("fastsemdiff::timestep_embedding", t, dim, max_period)
    name, kernel = _kernel(backend, t)
    if name != "torch":
        from . import guard

        key = ("timestep_embedding", name, str(t.device), t.dtype, dim, max_period)
        what = f"timestep_embedding ({name}, t {str(t.dtype).replace('torch.', '')}, dim={dim})"
        if not guard.passes(key, check, t.device, lambda: _check(kernel, t.dtype, dim, max_period, t.device), what):
            kernel = _reference
    return kernel(t, dim, max_period)


@timestep_embedding_op.register_fake
def _(t, dim, max_period, backend, check="warn"):
    return t.new_empty(t.shape[0], dim, dtype=torch.float32)


def _setup(ctx, inputs, output):
    t, dim, max_period, _, _ = inputs
    ctx.save_for_backward(t)
    ctx.dim, ctx.max_period = dim, max_period


def _backward(ctx, grad):
    """d/dt [cos(t f), sin(t f)] = [-f sin(t f), f cos(t f)] (rarely needed: t seldom requires grad)."""
    (t,) = ctx.saved_tensors
    half = ctx.dim // 2
    f = torch.exp(-math.log(ctx.max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    arg = t.float()[:, None] * f
    dt = (f * (grad[:, half:2 * half] * torch.cos(arg) - grad[:, :half] * torch.sin(arg))).sum(-1)
    return dt.to(t.dtype), None, None, None, None


timestep_embedding_op.register_autograd(_backward, setup_context=_setup)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, backend: str = "triton",
                       check: str = "warn") -> Tensor:
    """``t`` [B] -> fp32 ``[B, dim]`` on the fused kernel; see ``timestep_embedding_ref``.
    ``check``: the kernel's first-use check on a GPU (``fastsemdiff.ops.guard``)."""
    from .guard import check_mode

    return timestep_embedding_op(t, int(dim), float(max_period), backend, check_mode(check))
