"""The kernels a user would reach for instead of ours, as functions of the adaLN benchmark's arguments.

Optional: neither package is a dependency of fastsemdiff. Each peer is built where its package imports and a
GPU is present; otherwise :func:`absent` says why (the benchmark reports the case as skipped with that reason).

* ``liger`` (``pip install liger-kernel``): Liger-Kernel's LayerNorm (its Triton kernels, weight 1 and bias 0
  needing no gradient, so its backward skips them), then the modulate ``y * (1 + scale) + shift`` under
  torch.compile: what DiT with Liger's norm runs. For the modulated RMSNorm (``mrms``): Liger's
  ``liger_modulated_rms_norm`` (one fused kernel, in the versions that have it: 0.8.5 does).
* ``quack`` (``pip install quack-kernels``, CuTe DSL kernels for Hopper and newer): QuACK's LayerNorm
  (``quack.rmsnorm.layernorm_fwd`` / ``layernorm_bwd``, which take a float32 weight: ones, its gradient
  computed and dropped), then the compiled modulate; for ``mrms`` QuACK's ``rmsnorm`` then the compiled
  modulate. Neither package fuses the gated residual + LayerNorm (``grmln``): no peer there.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Callable, Optional

import torch

PEERS = ("liger", "quack")
_compiled_modulate = None


def absent(peer: str, op: str) -> Optional[str]:
    """Why ``peer`` cannot run ``op`` here, or None when it can."""
    if op == "grmln":
        return f"{peer} has no gated residual + LayerNorm kernel"
    package = {"liger": "liger_kernel", "quack": "quack"}[peer]
    if importlib.util.find_spec(package) is None:
        return f"{peer} is not installed (pip install {'liger-kernel' if peer == 'liger' else 'quack-kernels'})"
    if not torch.cuda.is_available():
        return f"{peer}: its kernels run on GPUs only"
    module = {"liger": "liger_kernel.transformers.functional", "quack": "quack.rmsnorm"}[peer]
    try:
        functional = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - installed but does not import here
        return f"{peer} does not import ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
    if peer == "liger" and op == "mrms" and not hasattr(functional, "liger_modulated_rms_norm"):
        return "this liger-kernel has no liger_modulated_rms_norm"
    if peer == "quack" and torch.cuda.get_device_capability()[0] < 9:
        return "quack's kernels need sm_90 or newer"
    return None


def _modulate(y: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return y * (1 + scale[:, None]) + shift[:, None]


def modulate_compiled() -> Callable:
    global _compiled_modulate
    if _compiled_modulate is None:
        _compiled_modulate = torch.compile(_modulate, fullgraph=True, dynamic=False)
    return _compiled_modulate


class _QuackLayerNorm(torch.autograd.Function):
    """QuACK's LayerNorm forward and backward (its own functions) with a weight of ones."""

    @staticmethod
    def forward(ctx, x2d, weight, eps):
        from quack.rmsnorm import layernorm_fwd

        y, rstd, mean = layernorm_fwd(x2d, weight, None, eps, return_rstd=True, return_mean=True)
        ctx.save_for_backward(x2d, weight, rstd, mean)
        return y

    @staticmethod
    def backward(ctx, dy):
        from quack.rmsnorm import layernorm_bwd

        x2d, weight, rstd, mean = ctx.saved_tensors
        dx, _, _ = layernorm_bwd(x2d, weight, dy.contiguous(), rstd, mean, has_bias=False)
        return dx, None, None


def disagreement(fn: Callable, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, rms: bool) -> Optional[str]:
    """Why ``fn``'s forward is not the op (against fastsemdiff's reference in fp32, 5% of the output's largest
    value allowed: far above bf16 rounding, far below a wrong formula), or None: a peer timed for another
    computation would make its row meaningless."""
    from fastsemdiff.nn import modulated_layer_norm_ref

    with torch.no_grad():
        got = fn(x, shift, scale).float()
        ref = modulated_layer_norm_ref(x.float(), shift.float(), scale.float(), rms=rms)
    err, top = (got - ref).abs().max().item(), ref.abs().max().item()
    if err <= 0.05 * top:
        return None
    return f"its output differs from the reference by {err:.3g} (largest value {top:.3g})"


def function(peer: str, op: str, C: int, dtype: torch.dtype, eps: float = 1e-6) -> Callable:
    """``fn(x, shift, scale) -> y`` for ``x [B, N, C]`` and per-sample ``shift``/``scale [B, C]``."""
    device = torch.device("cuda")
    modulate = modulate_compiled()
    if peer == "liger":
        from liger_kernel.transformers import functional as F

        if op == "mrms":
            return lambda x, shift, scale: F.liger_modulated_rms_norm(x, None, scale, shift, eps)
        w, b = torch.ones(C, device=device, dtype=dtype), torch.zeros(C, device=device, dtype=dtype)
        return lambda x, shift, scale: modulate(F.liger_layer_norm(x, w, b, eps), shift, scale)
    if op == "mrms":
        from quack import rmsnorm

        return lambda x, shift, scale: modulate(rmsnorm(x.reshape(-1, C), None, eps=eps).view(x.shape), shift, scale)
    ones = torch.ones(C, device=device, dtype=torch.float32)
    return lambda x, shift, scale: modulate(
        _QuackLayerNorm.apply(x.reshape(-1, C), ones, eps).view(x.shape), shift, scale)
