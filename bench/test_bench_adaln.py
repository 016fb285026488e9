"""adaLN seams: the modulated LayerNorm and the fused gated residual + modulated LayerNorm.

    pytest bench/ --benchmark-only -k adaln

Each op runs forward, backward (on a prebuilt graph) and forward+backward, on four implementations in one
run: the plain-PyTorch reference eager, the reference under torch.compile, the fused Triton kernels and the
CUDA C++ kernels (``fastsemdiff._C``; skipped with the reason where it is not built).
GPU shapes (bf16): [256, 256, 1152] (the SPEC target shape), DiT-S [256, 256, 384] and DiT-B
[256, 256, 768]; the CPU case [8, 64, 384] fp32 times the reference eager and compiled (the Triton kernels
run on a CPU only under the interpreter, a correctness tool, so they are not timed there; nor are the CUDA
kernels). Each record
carries per-call microseconds, the minimum bytes the op must move, achieved GB/s and % of the copy ceiling.
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastsemdiff.nn import gated_residual_modulated_norm_ref, modulated_layer_norm_ref
from fastsemdiff.ops import gated_residual_modulated_norm, modulated_layer_norm

from benchutil import DEVICE, HAS_CUDA, bench_call, skip_unless_fused_timeable

GPU_SHAPES = {"target-256x256x1152": (256, 256, 1152), "DiT-S-256x256x384": (256, 256, 384),
              "DiT-B-256x256x768": (256, 256, 768)}
CPU_SHAPES = {"cpu-8x64x384": (8, 64, 384)}
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
IMPLS = ["torch_eager", "torch_compile", "triton", "cuda"]
FUSED = ("triton", "cuda")
MODES = ["forward", "backward", "forward_backward"]

# Minimum traffic in units of one [B, N, C] tensor: (forward, backward). The norm reads x and writes y,
# and back reads x, dy and writes dx; the residual op also reads h and writes x_out, and back reads
# dx_out and h and writes dh. Modulation vectors and the fp32 row statistics are negligible.
TENSORS_MOVED = {"mln": (2, 3), "grmln": (4, 6)}


def _inputs(op: str, B: int, N: int, C: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=g)  # noqa: E731
    x = rnd(B, N, C)
    mods = [rnd(B, C) * 0.5 for _ in range(3 if op == "grmln" else 2)]
    extra = [rnd(B, N, C)] if op == "grmln" else []
    return [x, *extra, *mods]  # mln: x, shift, scale; grmln: x, h, gate, shift, scale


def _function(op: str, impl: str):
    if op == "mln":
        fn = (functools.partial(modulated_layer_norm, backend=impl) if impl in FUSED
              else modulated_layer_norm_ref)
    else:
        fn = (functools.partial(gated_residual_modulated_norm, backend=impl) if impl in FUSED
              else gated_residual_modulated_norm_ref)
    if impl == "torch_compile":
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, dynamic=False)
    return fn


def _case(op: str, impl: str, mode: str, shape: tuple[int, int, int]):
    """A zero-argument callable for one timed call, and the bytes it must move at least."""
    B, N, C = shape
    fn = _function(op, impl)
    inputs = _inputs(op, B, N, C)
    unit = B * N * C * inputs[0].element_size()
    fwd_t, bwd_t = TENSORS_MOVED[op]
    if mode == "forward":
        with torch.no_grad():
            return (lambda: fn(*inputs)), fwd_t * unit
    leaves = [t.requires_grad_() for t in inputs]
    outs = lambda: fn(*leaves)  # noqa: E731
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    dys = [torch.randn_like(o) for o in as_tuple(outs())]
    if mode == "backward":
        graph = as_tuple(outs())
        return (lambda: torch.autograd.grad(graph, leaves, dys, retain_graph=True)), bwd_t * unit
    return (lambda: torch.autograd.grad(as_tuple(outs()), leaves, dys)), (fwd_t + bwd_t) * unit


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", ["mln", "grmln"])
def test_adaln(benchmark, copy_ceiling_gbs, op, impl, mode, shape_name):
    skip_unless_fused_timeable(impl, "adaLN")
    benchmark.group = f"adaln-{op}-{mode}-{shape_name}"
    call, nbytes = _case(op, impl, mode, SHAPES[shape_name])
    reps, rounds = (20, 15) if HAS_CUDA else (5, 5)
    per_call = bench_call(benchmark, call, reps, rounds, bytes_moved=nbytes, ceiling_gbs=copy_ceiling_gbs,
                          op=op, impl=impl, mode=mode, shape=shape_name, dtype=str(DTYPE))
    print(f"\n[bench] adaln {op} {mode} {shape_name} {impl}: {per_call * 1e6:.1f} us, "
          f"{nbytes / per_call / 1e9:.1f} GB/s ({100 * nbytes / per_call / 1e9 / copy_ceiling_gbs:.0f}% of copy)")
