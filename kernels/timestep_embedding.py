"""The sinusoidal timestep embedding, ``[cos(t * f_j), sin(t * f_j)]`` with ``f_j = max_period^(-j / half)``.

One program per time step writes the whole fp32 row (any ``dim``; an odd ``dim`` ends in a zero column),
so the embedding is one launch instead of torch's arange/exp/outer/cos/sin/cat chain. The frequencies are a
small fp32 table torch computes once per device (as the reference does), not ``tl.exp`` in the kernel: on a
GPU that lowers to the approximate ``ex2.approx.f32``, whose few-ulp error, multiplied by t up to 1000 before
the sine, tripled the embedding's error (tests/test_timestep_codegen.py reads the PTX for it).
Launcher only; the custom op lives in ``fastsemdiff.ops.timestep_embedding``.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import modulated_layer_norm as _mln  # shares its interpreter flag and test hooks


@triton.jit
def _timestep_embedding_kernel(T, FREQS, OUT, stride_t, half, dim, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    t = tl.load(T + row * stride_t).to(tl.float32)
    is_sin = cols >= half
    j = tl.where(is_sin, cols - half, cols)
    used = cols < 2 * half
    arg = t * tl.load(FREQS + j, mask=used, other=0.0)
    emb = tl.where(is_sin, tl.sin(arg), tl.cos(arg))
    emb = tl.where(used, emb, 0.0)
    tl.store(OUT + row * dim + cols, emb, mask=cols < dim)


_FREQS: dict = {}  # (device, half, max_period) -> fp32 [half]


def frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    """fp32 ``max_period^(-j / half)``, computed by torch exactly as the reference computes it on that device
    (so the kernel's arguments ``t * f`` carry the reference's frequencies, not a GPU's approximate exp2);
    cached per device, since the table does not depend on t."""
    key = (device, half, max_period)
    freqs = _FREQS.get(key)
    if freqs is None:
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device) / max(half, 1))
        _FREQS[key] = freqs
    return freqs


def timestep_embedding_fwd(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """``t`` [B] (any float dtype) -> fp32 [B, dim], as ``fastsemdiff.nn.timestep_embedding``."""
    if t.device.type == "cpu" and not _mln.INTERPRETED:
        raise RuntimeError("the Triton timestep-embedding kernel got a CPU tensor outside the Triton interpreter: "
                           "set TRITON_INTERPRET=1 before fastsemdiff.kernels is imported, or use backend='torch'")
    if t.dim() != 1:
        raise ValueError(f"timestep_embedding: t must be [B], got {tuple(t.shape)}")
    if dim < 1:
        raise ValueError(f"timestep_embedding: dim must be positive, got {dim}")
    out = _mln._new((t.shape[0], dim), torch.float32, t.device)
    half = dim // 2
    block = _mln._pow2(dim)
    if t.shape[0] == 0:
        return out
    freqs = frequencies(half, max_period, t.device) if half else out  # dim 1: no frequency is read
    _timestep_embedding_kernel[(t.shape[0],)](
        t, freqs, out, t.stride(0), half, dim,
        BLOCK_D=block, num_warps=_mln.num_warps_for(block, out.element_size(), 4 if dim <= 1024 else 8),
    )
    return out
