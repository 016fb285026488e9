"""Attention backends at DiT's head dims, and the reference layers (attention, MLP) against the ceilings.

    pytest bench/ --benchmark-only -k "attention or layer" -s

Attention (GPU, bf16, [B, H, 256, d] as in DiT at 256 tokens): head dim 64 (DiT-S/B) and 72 (DiT-XL), forward
and forward+backward, for each SDPA backend forced alone (math, the reference; flash; memory-efficient;
cuDNN), SDPA's own choice (what ``fastsemdiff.nn.Attention`` gets), and flash-attn or xformers where importable.
The terminal summary's ratios name the fastest. CPU: SDPA's default against its math path at a small shape.

Layers: ``fastsemdiff.nn.Attention`` and ``Mlp`` forward, eager (and compiled on GPU), with their FLOPs and
minimum bytes (input, output, weights), so they sit on the roofline plot of ``bench/report.py``.
"""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastsemdiff.nn import Attention, Mlp

from benchutil import DEVICE, HAS_CUDA, bench_call, oom_skip

DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
# name -> (batch, heads, tokens, head dim)
GPU_ATTN = {"hd64-DiT-B": (128, 12, 256, 64), "hd72-DiT-XL": (128, 16, 256, 72)}
CPU_ATTN = {"cpu-hd64": (8, 6, 64, 64)}
ATTN_SHAPES = GPU_ATTN if HAS_CUDA else CPU_ATTN
SDPA = {"sdpa_math": SDPBackend.MATH, "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_default": None}
PEERS = {"flash_attn": "flash_attn", "xformers": "xformers"}
ATTN_IMPLS = [*SDPA, *PEERS]
GPU_ONLY_IMPLS = {"sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn", "xformers"}


def _attention_fn(impl: str):
    """(function of q, k, v, layout) where layout is "bhnd" (SDPA) or "bnhd" (flash-attn, xformers)."""
    if impl in SDPA:
        backend = SDPA[impl]
        if backend is None:
            return F.scaled_dot_product_attention, "bhnd"

        def sdpa(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return sdpa, "bhnd"
    if impl == "flash_attn":
        from flash_attn import flash_attn_func
        return flash_attn_func, "bnhd"
    import xformers.ops
    return xformers.ops.memory_efficient_attention, "bnhd"


@pytest.mark.parametrize("shape_name", list(ATTN_SHAPES))
@pytest.mark.parametrize("mode", ["forward", "forward_backward"])
@pytest.mark.parametrize("impl", ATTN_IMPLS)
def test_attention_backend(benchmark, copy_ceiling_gbs, matmul_ceiling_tflops, impl, mode, shape_name):
    if impl in GPU_ONLY_IMPLS and not HAS_CUDA:
        pytest.skip(f"GPU case ({impl}): no CUDA device on this machine")
    if impl in PEERS and importlib.util.find_spec(PEERS[impl]) is None:
        pytest.skip(f"{impl} is absent (not importable)")
    B, H, N, d = ATTN_SHAPES[shape_name]
    fn, layout = _attention_fn(impl)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    shape = (B, H, N, d) if layout == "bhnd" else (B, N, H, d)
    q, k, v = (torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g).requires_grad_(mode != "forward")
               for _ in range(3))
    dout = torch.randn(*shape, device=DEVICE, dtype=DTYPE, generator=g)
    if mode == "forward":
        def call():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def call():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), dout)
    try:
        call()
    except RuntimeError as e:  # a backend that does not take this shape, dtype or GPU
        if isinstance(e, torch.OutOfMemoryError):
            oom_skip(e, f"attention {impl} {shape_name}")
        pytest.skip(f"{impl} cannot run {shape_name} {mode} here: {str(e).splitlines()[0][:160]}")
    benchmark.group = f"attention-{mode}-{shape_name}"
    unit = B * H * N * d * q.element_size()
    fwd_flops = 4 * B * H * N * N * d  # q k^T and p v
    flops, nbytes = (fwd_flops, 4 * unit) if mode == "forward" else (int(3.5 * fwd_flops), 12 * unit)
    reps, rounds = (20, 10) if HAS_CUDA else (5, 5)
    per_call = bench_call(benchmark, call, reps, rounds, bytes_moved=nbytes, ceiling_gbs=copy_ceiling_gbs,
                          flops=flops, ceiling_tflops=matmul_ceiling_tflops, impl=impl, mode=mode,
                          shape=shape_name, head_dim=d, dtype=str(DTYPE))
    print(f"\n[bench] attention {mode} {shape_name} {impl}: {per_call * 1e6:.1f} us, "
          f"{flops / per_call / 1e12:.2f} TFLOP/s ({100 * flops / per_call / 1e12 / matmul_ceiling_tflops:.0f}% of "
          f"the matmul)")


# name -> (batch, tokens, width, heads)
GPU_LAYERS = {"DiT-XL-256x256x1152": (256, 256, 1152, 16)}
CPU_LAYERS = {"cpu-8x64x384": (8, 64, 384, 6)}
LAYER_SHAPES = GPU_LAYERS if HAS_CUDA else CPU_LAYERS


@pytest.mark.parametrize("shape_name", list(LAYER_SHAPES))
@pytest.mark.parametrize("impl", ["torch_eager", "torch_compile"])
@pytest.mark.parametrize("layer", ["attention", "mlp"])
def test_layer_forward(benchmark, copy_ceiling_gbs, matmul_ceiling_tflops, layer, impl, shape_name):
    if impl == "torch_compile" and not HAS_CUDA:
        pytest.skip("the compiled layers are timed on GPUs (on CPU the training-step cases time compile)")
    B, N, D, heads = LAYER_SHAPES[shape_name]
    torch.manual_seed(0)
    module = (Attention(D, heads) if layer == "attention" else Mlp(D, 4 * D)).to(DEVICE, DTYPE).eval()
    fn = torch.compile(module, dynamic=False) if impl == "torch_compile" else module
    x = torch.randn(B, N, D, device=DEVICE, dtype=DTYPE)
    esize = x.element_size()
    weights = sum(p.numel() for p in module.parameters()) * esize
    if layer == "attention":
        flops = B * (8 * N * D * D + 4 * N * N * D)
    else:
        flops = B * 4 * N * D * 4 * D
    nbytes = 2 * x.numel() * esize + weights
    benchmark.group = f"layer-{layer}-forward-{shape_name}"

    def call():
        with torch.no_grad():
            return fn(x)

    reps, rounds = (20, 10) if HAS_CUDA else (5, 5)
    per_call = bench_call(benchmark, call, reps, rounds, bytes_moved=nbytes, ceiling_gbs=copy_ceiling_gbs,
                          flops=flops, ceiling_tflops=matmul_ceiling_tflops, impl=impl, layer=layer,
                          shape=shape_name, dtype=str(DTYPE))
    print(f"\n[bench] layer {layer} forward {shape_name} {impl}: {per_call * 1e6:.1f} us, "
          f"{flops / per_call / 1e12:.3f} TFLOP/s")
