"""adaLN-modulated normalisation and the gated residual: the memory-bound seams of a DiT block.

The functions here are the references that define each op; the modules call them on the torch
backend and fused kernels elsewhere, with identical results up to rounding.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backend import check_backend, resolve_backend


def _per_token(m: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, 1, C] so modulation broadcasts over tokens; [B, 1, C] and [B, N, C] pass through."""
    return m.unsqueeze(1) if m.dim() == 2 else m


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """DiT's modulate: x * (1 + scale) + shift, with per-sample or per-token shift/scale."""
    return x * (1 + _per_token(scale)) + _per_token(shift)


def modulated_layer_norm_ref(x, shift, scale, weight=None, bias=None, eps: float = 1e-6):
    """LN(x) * (1 + scale) + shift, statistics in fp32, output in x's dtype."""
    y = F.layer_norm(x.float(), x.shape[-1:], None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return modulate(y, _per_token(shift).float(), _per_token(scale).float()).to(x.dtype)


def gated_residual_ref(x, h, gate):
    """x + gate * h."""
    return x + _per_token(gate) * h


def gated_residual_modulated_norm_ref(x, h, gate, shift, scale, weight=None, bias=None, eps: float = 1e-6):
    """(x + gate * h, LN(x + gate * h) * (1 + scale) + shift)."""
    x_out = gated_residual_ref(x, h, gate)
    return x_out, modulated_layer_norm_ref(x_out, shift, scale, weight, bias, eps)


class ModulatedLayerNorm(nn.Module):
    """``LN(x) * (1 + scale) + shift``: DiT's ``modulate(norm(x), shift, scale)`` as one layer."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = False, backend: str = "auto"):
        super().__init__()
        self.dim, self.eps, self.backend = dim, eps, check_backend(backend)
        self.weight: Optional[nn.Parameter] = nn.Parameter(torch.ones(dim)) if elementwise_affine else None
        self.bias: Optional[nn.Parameter] = nn.Parameter(torch.zeros(dim)) if elementwise_affine else None

    def forward(self, x, shift, scale):
        resolve_backend(self.backend)
        return modulated_layer_norm_ref(x, shift, scale, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}, backend={self.backend}"


class GatedResidual(nn.Module):
    """``x + gate * h``: adaLN-Zero's gated residual (gate starts at zero, so the block starts as identity)."""

    def __init__(self, backend: str = "auto"):
        super().__init__()
        self.backend = check_backend(backend)

    def forward(self, x, h, gate):
        return gated_residual_ref(x, h, gate)


class GatedResidualModulatedNorm(ModulatedLayerNorm):
    """The seam between a DiT block's attention and MLP halves: returns
    ``(x + gate * h, LN(x + gate * h) * (1 + scale) + shift)``."""

    def forward(self, x, h, gate, shift, scale):
        resolve_backend(self.backend)
        return gated_residual_modulated_norm_ref(x, h, gate, shift, scale, self.weight, self.bias, self.eps)
