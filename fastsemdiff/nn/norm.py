"""adaLN-modulated normalisation and the gated residual: the memory-bound seams of a DiT block.

The modules call the references that define each op (they live with their op, in
``fastsemdiff.ops.modulated_norm``, and are re-exported here) on the torch backend and the fused kernels
elsewhere, with identical results up to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.dispatch import check_backend, resolve_backend
from ..ops.guard import check_mode
from ..ops.modulated_norm_reference import (gated_residual_modulated_norm_ref, gated_residual_ref,  # noqa: F401
                                           modulate, modulated_layer_norm_ref)


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
