"""Multi-head self-attention (torch SDPA, one backend of it, or the flash-attn package) and the transformer MLP
(optionally with bias + tanh-GELU in fc1's matmul epilogue), with DiT/timm state-dict keys.

Both switches are module attributes (``Attention.backend``, ``Mlp.epilogue``), set model-wide by
``set_attention_backend`` / ``set_mlp_epilogue``: they change which kernels run, never the weights.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

# model.attention -> the one SDPA backend it allows ("auto": SDPA's own choice per call; "flash_attn": the package)
SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
ATTENTION_BACKENDS = ("auto", *SDPA_BACKENDS, "flash_attn")
MLP_EPILOGUES = ("off", "addmm")


def flash_attn_func():
    """The flash-attn package's ``flash_attn_func`` (q, k, v as [B, N, H, D], fp16/bf16, CUDA)."""
    try:
        from flash_attn import flash_attn_func as fn
    except ImportError as e:
        raise ImportError(f"model.attention=flash_attn needs the flash-attn package ({e}); install it with "
                          "`pip install flash-attn --no-build-isolation`, or use model.attention=flash "
                          "(SDPA's own flash kernel)") from None
    return fn


class Attention(nn.Module):
    """Self-attention over tokens; optional QK-norm (LayerNorm over each head's query and key).

    ``backend`` (model.attention): ``auto`` lets SDPA choose; ``flash``/``efficient``/``cudnn``/``math`` allow
    that SDPA backend only (``torch.nn.attention.sdpa_kernel``); ``flash_attn`` calls the flash-attn package.
    """

    backend: str = "auto"

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim)
        if self.backend == "flash_attn":  # the package takes [B, N, H, D]: no transposes
            q, k, v = qkv.unbind(2)
            q, k = self.q_norm(q).to(v.dtype), self.k_norm(k).to(v.dtype)  # LayerNorm under autocast is fp32
            return self.proj(flash_attn_func()(q, k, v).reshape(B, N, C))
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.backend == "auto":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            with sdpa_kernel(SDPA_BACKENDS[self.backend]):
                out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class _LinearGeluTanh(torch.autograd.Function):
    """GELU_tanh(x @ W.T + b) for 2-D x, in one matmul with a bias + GELU epilogue on CUDA.

    ``torch._addmm_activation(use_gelu=True)`` is cuBLASLt's GELU epilogue (the tanh approximation) on CUDA, but
    exact GELU on CPU and without a derivative: on CPU the forward is addmm then tanh-GELU (the same function,
    unfused), and the backward, which needs the pre-activation the fused forward does not return, recomputes it
    with one more addmm (the price of not storing it)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, weight, bias)
        if x.is_cuda:
            return torch._addmm_activation(bias, x, weight.t(), use_gelu=True)
        return F.gelu(torch.addmm(bias, x, weight.t()), approximate="tanh")

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, bias = ctx.saved_tensors
        pre = torch.addmm(bias, x, weight.t())
        g = torch.ops.aten.gelu_backward(grad, pre, approximate="tanh")
        gx = g @ weight if ctx.needs_input_grad[0] else None
        gw = g.t() @ x if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``F.gelu(F.linear(x, weight, bias), approximate="tanh")`` through ``_LinearGeluTanh`` (any leading dims).
    Under autocast the operands are cast to the autocast dtype first, as F.linear would be."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev):
        dtype = torch.get_autocast_dtype(dev)
        x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
    else:
        weight, bias = weight.to(x.dtype), bias.to(x.dtype)
    lead = x.shape[:-1]
    with torch.autocast(dev, enabled=False):
        out = _LinearGeluTanh.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*lead, weight.shape[0])


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2, as in DiT. ``epilogue`` (model.mlp_epilogue): ``off``, or ``addmm`` for bias +
    GELU in fc1's matmul (``linear_gelu_tanh``); the weights and the function are the same."""

    epilogue: str = "off"

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.epilogue == "addmm":
            return self.fc2(linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias))
        return self.fc2(self.act(self.fc1(x)))


def _set_on_every(model: nn.Module, kind: type, attr: str, value: str, choices, what: str) -> int:
    """Set ``attr = value`` on every ``kind`` module of ``model`` (a switch the trainer applies once); returns how
    many there are."""
    if value not in choices:
        raise ValueError(f"{what} {value!r} is unknown; choose one of {list(choices)}")
    mods = [m for m in model.modules() if isinstance(m, kind)]
    for m in mods:
        setattr(m, attr, value)
    return len(mods)


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Set ``backend`` on every ``Attention`` in ``model``; returns how many there are."""
    return _set_on_every(model, Attention, "backend", backend, ATTENTION_BACKENDS, "attention backend")


def set_mlp_epilogue(model: nn.Module, epilogue: str) -> int:
    """Set ``epilogue`` on every ``Mlp`` in ``model``; returns how many there are."""
    return _set_on_every(model, Mlp, "epilogue", epilogue, MLP_EPILOGUES, "MLP epilogue")
