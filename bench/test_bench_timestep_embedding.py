"""The sinusoidal timestep embedding: does a kernel beat the compiled torch path? (``model.backend=auto``
keeps it on torch unless a GPU row here says so; see ``fastsemdiff.ops.dispatch.AUTO_MEASURED``.)

    pytest bench/ --benchmark-only -k timestep_embedding

The forward (what a training step runs: t needs no gradient) of the plain-PyTorch reference eager
(``fastsemdiff.nn.timestep_embedding``, a chain of arange, exp, outer product, cos, sin and cat), the reference
under torch.compile, the Triton kernel and the CUDA C++ kernel (``fastsemdiff._C``; skipped with the reason
where it is not built), in one run. GPU shapes: t [256] to a 256-wide table (DiT's batch and frequency
width, the target) and t [4096] (a large batch); CPU: t [64] x 256, the reference eager and compiled only (the
kernels run on a CPU only under the interpreter). Each record carries per-call microseconds and the bytes the
op must move (t in, the fp32 table out).
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastsemdiff.nn import timestep_embedding as reference
from fastsemdiff.ops import timestep_embedding as fused

from benchutil import DEVICE, HAS_CUDA, bench_call, skip_unless_fused_timeable

GPU_SHAPES = {"target-256x256": (256, 256), "batch-4096x256": (4096, 256)}
CPU_SHAPES = {"cpu-64x256": (64, 256)}
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
IMPLS = ["torch_eager", "torch_compile", "triton", "cuda"]


def _function(impl: str):
    if impl in ("triton", "cuda"):
        return functools.partial(fused, backend=impl)
    if impl == "torch_compile":
        torch._dynamo.reset()
        return torch.compile(reference, fullgraph=True, dynamic=False)
    return reference


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("impl", IMPLS)
def test_timestep_embedding(benchmark, copy_ceiling_gbs, impl, shape_name):
    skip_unless_fused_timeable(impl, "timestep embedding")
    B, dim = SHAPES[shape_name]
    t = torch.rand(B, device=DEVICE, generator=torch.Generator(device=DEVICE).manual_seed(0)) * 1000
    fn = _function(impl)
    benchmark.group = f"timestep_embedding-forward-{shape_name}"
    nbytes = B * t.element_size() + B * dim * 4

    def call():
        with torch.no_grad():
            return fn(t, dim)

    reps, rounds = (50, 15) if HAS_CUDA else (20, 5)
    per_call = bench_call(benchmark, call, reps, rounds, bytes_moved=nbytes, ceiling_gbs=copy_ceiling_gbs,
                          op="timestep_embedding", impl=impl, mode="forward", shape=shape_name, dtype="float32")
    print(f"\n[bench] timestep_embedding forward {shape_name} {impl}: {per_call * 1e6:.1f} us")
