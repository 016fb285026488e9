"""adaLN-modulated normalisation and the gated residual: the memory-bound seams of a DiT block.

The functions here are the references that define each op; the modules call them on the torch
backend and fused kernels elsewhere, with identical results up to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.dispatch import check_backend, resolve_backend
from ..ops.guard import check_mode


def _per_token(m: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, C] so modulation broadcasts over tokens; [B, 1, C] and [B, N, C] pass through."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's modulate: x * (1 + scale) + shift, with per-sample or per-token shift/scale."""
    return x * (1 + _per_token(scale)) + _per_token(shift)


def modulated_layer_norm_ref(x, shift, scale, weight=None, bias=None, eps: float = 1e-6, rms: bool = False):
    """norm(x) [* weight + bias] * (1 + scale) + shift with norm = LayerNorm (or RMSNorm with ``rms``),
    statistics in fp32 (fp64 for fp64 inputs), output in x's dtype."""
    acc = torch.promote_types(x.dtype, torch.float32)
    w = None if weight is None else weight.to(acc)
    if rms:
        y = F.rms_norm(x.to(acc), x.shape[-1:], w, eps)
        y = y if bias is None else y + bias.to(acc)
    else:
        y = F.layer_norm(x.to(acc), x.shape[-1:], w, None if bias is None else bias.to(acc), eps)
    return modulate(y, _per_token(shift).to(acc), _per_token(scale).to(acc)).to(x.dtype)


def gated_residual_ref(x, h, gate):
    """x + gate * h."""
    return x + _per_token(gate) * h


def gated_residual_modulated_norm_ref(x, h, gate, shift, scale, weight=None, bias=None, eps: float = 1e-6,
                                      rms: bool = False, stored_dtype=None):
    """(x + gate * h, norm(x + gate * h) * (1 + scale) + shift), the sum in x's dtype.

    The norm reads the sum as stored: rounded to ``stored_dtype`` (default x's dtype). An fp64 run that is the
    exact reference of a low-precision call passes that call's dtype, so it normalises the same stored value
    (the rounding passes gradients through unchanged): normalising the unrounded sum instead differs from
    every implementation by the sum's rounding, and makes the accuracy rule fail correct kernels at random.
    The returned x_out is the exact sum in x's dtype either way."""
    x_out = gated_residual_ref(x, h, gate).to(x.dtype)
    normed = x_out
    if stored_dtype is not None and stored_dtype != x.dtype:
        normed = x_out + (x_out.to(stored_dtype).to(x.dtype) - x_out).detach()
    return x_out, modulated_layer_norm_ref(normed, shift, scale, weight, bias, eps, rms)


class ModulatedLayerNorm(nn.Module):
    """``LN(x) * (1 + scale) + shift``: DiT's ``modulate(norm(x), shift, scale)`` as one layer.

    ``rms=True`` normalises by the root mean square instead (LightningDiT's RMSNorm block). ``backend``
    (``auto`` | ``torch`` | ``triton`` | ``cuda``): which kernels run each call is decided by
    ``fastsemdiff.ops.dispatch`` (a fused one runs forward and backward on ``[B, N, C]`` inputs). ``fused_check``
    (``warn`` | ``error`` | ``off``): what a fused kernel that fails its first-use check on a GPU does
    (``fastsemdiff.ops.guard``).
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, backend: str = "auto",
                 rms: bool = False, fused_check: str = "warn"):
        super().__init__()
        self.dim, self.eps, self.backend, self.rms = dim, eps, check_backend(backend), rms
        self.fused_check = check_mode(fused_check)
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias: Optional[nn.Parameter] = (nn.Parameter(torch.zeros(dim)) if elementwise_affine and not rms
                                             else None)

    def _fused(self, x: torch.Tensor, op: str) -> Optional[str]:
        """The fused backend for this input, or None for the reference path."""
        backend = resolve_backend(self.backend, op, x)
        return None if backend == "torch" else backend

    def forward(self, x, shift, scale):
        fused = self._fused(x, "modulated_layer_norm")
        if fused:
            return ops.modulated_layer_norm(x, shift, scale, self.weight, self.bias, self.eps, self.rms, fused,
                                            self.fused_check)
        return modulated_layer_norm_ref(x, shift, scale, self.weight, self.bias, self.eps, self.rms)

    def extra_repr(self) -> str:
        return (f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}, rms={self.rms}, "
                f"backend={self.backend}, fused_check={self.fused_check}")


class GatedResidual(nn.Module):
    """``x + gate * h``: adaLN-Zero's gated residual (gate starts at zero, so the block starts as identity).
    Plain torch: alone it is one elementwise op, which torch.compile fuses with its neighbours; the fused
    kernels take it where it meets a norm (``GatedResidualModulatedNorm``)."""

    def forward(self, x, h, gate):
        return gated_residual_ref(x, h, gate)


class GatedResidualModulatedNorm(ModulatedLayerNorm):
    """The seam between a DiT block's attention and MLP halves: returns
    ``(x + gate * h, LN(x + gate * h) * (1 + scale) + shift)``."""

    def forward(self, x, h, gate, shift, scale):
        fused = self._fused(x, "gated_residual_modulated_norm")
        if fused:
            return ops.gated_residual_modulated_norm(x, h, gate, shift, scale, self.weight, self.bias, self.eps,
                                                     self.rms, fused, self.fused_check)
        return gated_residual_modulated_norm_ref(x, h, gate, shift, scale, self.weight, self.bias, self.eps,
                                                 self.rms)
