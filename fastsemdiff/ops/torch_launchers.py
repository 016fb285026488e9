"""The launcher contract of ``kernels/modulated_layer_norm.py`` computed in plain PyTorch.

A fused op runs these instead of its kernels where ``fastsemdiff.ops.dispatch`` picks torch for its call
(``backend="cuda"`` with an input the CUDA kernels do not take and no Triton installed; an fp64 input; a row
wider than the Triton kernels hold), or the kernels failed their first-use check (``fastsemdiff.ops.guard``).
The forward is the op's reference itself (``fastsemdiff.ops.modulated_norm_reference``), so results equal
the torch backend's; the backward is the analytic gradient in fp32 (the custom op's backward runs below
autograd, so it cannot differentiate the reference), checked against autograd in the tests.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .modulated_norm_reference import gated_residual_ref, modulated_layer_norm_ref


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _groups(t: Tensor, tokens_per_mod_row: int) -> Tensor:
    """``[M, C]`` -> ``[M // tokens_per_mod_row, tokens_per_mod_row, C]`` (a view)."""
    return t.reshape(-1, tokens_per_mod_row, t.shape[-1])


def modulated_norm_fwd(x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, eps: float = 1e-6, tokens_per_mod_row: int = 1,
                       rms: bool = False, h: Optional[Tensor] = None, gate: Optional[Tensor] = None
                       ) -> tuple[Optional[Tensor], Tensor, Tensor, Tensor]:
    """``(x_out, y, mean, rstd)`` as the Triton launcher returns them (``x_out`` None without ``h``)."""
    M, C = x.shape
    t = tokens_per_mod_row
    x_out = None
    if h is not None:
        x_out = gated_residual_ref(_groups(x, t), _groups(h, t), gate).to(x.dtype).reshape(M, C)
    src = x_out if x_out is not None else x
    y = modulated_layer_norm_ref(_groups(src, t), shift, scale, weight, bias, eps, rms).reshape(M, C)
    xf = src.to(_acc(src.dtype))
    if rms:
        mean = xf.new_zeros(M)
        var = xf.pow(2).mean(-1)
    else:
        var, mean = torch.var_mean(xf, dim=-1, correction=0)
    rstd = torch.rsqrt(var + eps)
    return x_out, y.contiguous(), mean.float(), rstd.float()


def modulated_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor,
                       weight: Optional[Tensor] = None, bias: Optional[Tensor] = None, tokens_per_mod_row: int = 1,
                       rms: bool = False, dx_out: Optional[Tensor] = None, h: Optional[Tensor] = None,
                       gate: Optional[Tensor] = None):
    """``(dx, dh, dgate, dshift, dscale, dweight, dbias)`` as the Triton launcher returns them.

    With ``xhat = (x - mean) * rstd`` (no centring for RMSNorm), ``n = xhat * w + b`` and
    ``y = n * (1 + scale) + shift``: ``dn = dy * (1 + scale)``, ``dxhat = dn * w``, and
    ``dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))`` (without the ``mean(dxhat)`` term
    for RMSNorm); the residual op adds ``dx_out`` and gives ``dh = dx * gate``, ``dgate = sum(dx * h)``.
    """
    M, C = x.shape
    t = tokens_per_mod_row
    acc = _acc(x.dtype)
    xhat = (x.to(acc) - mean.to(acc)[:, None]) * rstd.to(acc)[:, None]
    w = None if weight is None else weight.to(acc)
    n = xhat if w is None else xhat * w
    if bias is not None:
        n = n + bias.to(acc)
    dyg = _groups(dy.to(acc), t)
    dn = dyg * (1 + scale.to(acc)[:, None])
    dshift = dyg.sum(1).to(scale.dtype)
    dscale = (dyg * _groups(n, t)).sum(1).to(scale.dtype)
    dn = dn.reshape(M, C)
    dweight = None if weight is None else (dn * xhat).sum(0).to(weight.dtype)
    dbias = None if bias is None else dn.sum(0).to(bias.dtype)
    dxhat = dn if w is None else dn * w
    proj = (dxhat * xhat).mean(-1, keepdim=True)
    centred = dxhat if rms else dxhat - dxhat.mean(-1, keepdim=True)
    dx = rstd.to(acc)[:, None] * (centred - xhat * proj)
    dh = dgate = None
    if h is not None:
        dx = dx + dx_out.to(acc)
        dxg = _groups(dx, t)
        dh = (dxg * gate.to(acc)[:, None]).reshape(M, C).to(x.dtype)
        dgate = (dxg * _groups(h.to(acc), t)).sum(1).to(gate.dtype)
    return dx.to(x.dtype), dh, dgate, dshift, dscale, dweight, dbias
