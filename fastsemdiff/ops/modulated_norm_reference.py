"""What the modulated norm and the gated residual + modulated norm mean, in plain PyTorch.

The references of the two ops of ``fastsemdiff.ops.modulated_norm``, in a module of their own because three
users need them without needing each other: the op (its first-use check compares the kernels with them), its
torch launchers (``fastsemdiff.ops.torch_launchers``: their forward is the reference itself) and the layers'
torch backend (``fastsemdiff.nn.norm`` re-exports them). The op imports its launchers, so the launchers cannot
take the references from the op without an import circle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


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
