"""What one fused adaLN call costs on the host around its kernel launch: the launches stubbed, everything else
real.

    TRITON_INTERPRET=1 pytest bench/test_bench_call_overhead.py --benchmark-only

A layer's call (``ModulatedLayerNorm`` / ``GatedResidualModulatedNorm`` with ``backend="triton"``, as a DiT
block calls them) runs, on CPU tensors: the layer's dispatch decision, the user-facing function (shape checks,
modulation rows), the custom op and its autograd (setup_context, the saved tensors, the backward node), the
op's dispatch decision on the real tensors, the first-use guard's lookup (the verdict is already in: the first
call ran the check with the real kernels), the launcher's checks and allocations and the torch ops that finish
the per-sample dshift/dscale sums; only the Triton kernels' launches are replaced by a stub that returns at
once. So the time is what the host spends per call before and after its kernels, the part that cannot overlap
them once the GPU is waiting for work: at the small end of DiT (S/2, ~10-25 us kernels) it decides the step.

Cases: each op in forward (inputs need no gradient), backward (on a retained graph) and forward+backward, at
[8, 256, 1152] fp32 (the allocations are never touched, so the size hardly matters); and ``floor``: a custom
op with autograd that returns an empty tensor, the least any custom-op call pays, and ``floor_function``, the
same as a plain ``torch.autograd.Function`` (what the custom op's dispatch and autograd wrapper add is the
difference). Timed in CPU time of the
process (``time.process_time``, one thread), 200 calls per round, the median of 15 rounds. CPU only: on a GPU machine
the kernels module is imported compiled, not under the interpreter, and the adaLN cases' call time against
their kernel time (bench/test_bench_adaln.py) says the same thing there.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from benchutil import HAS_CUDA, bench_call

pytestmark = pytest.mark.skipif(HAS_CUDA or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="CPU case with stubbed launches: run on a machine without a GPU, with "
                                       "TRITON_INTERPRET=1 (the kernels' module imports under the interpreter)")

SHAPE = (8, 256, 1152)
MODES = ["forward", "backward", "forward_backward"]


class _NoLaunch:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](*args, **meta)`` returns at once."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@torch.library.custom_op("fastsemdiff_bench::floor", mutates_args=())
def _floor(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@_floor.register_fake
def _(x, shift, scale):
    return torch.empty_like(x)


def _floor_backward(ctx, dy):
    return dy, None, None


def _floor_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


_floor.register_autograd(_floor_backward, setup_context=_floor_setup)


class _FloorFunction(torch.autograd.Function):
    """The floor as a plain ``torch.autograd.Function``: what the custom op's machinery adds is the difference."""

    @staticmethod
    def forward(ctx, x, shift, scale):
        ctx.save_for_backward(x)
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        return dy, None, None


@pytest.fixture(scope="module")
def stubbed_kernels():
    """The kernels module with its launches stubbed, after one real (interpreted) call per op has passed the
    first-use check, so the guard only looks its verdict up."""
    from fastsemdiff.kernels import modulated_layer_norm as K
    from fastsemdiff.ops import guard

    saved = (guard.CHECKED_DEVICE_TYPES, K._fwd_kernel, K._bwd_kernel)
    guard.CHECKED_DEVICE_TYPES = ("cuda", "cpu")
    for op in ("mln", "grmln"):  # the check runs the real kernels on a few rows, once per configuration
        layer, inputs = _layer_and_inputs(op, (2, 3, SHAPE[2]))
        out = layer(*inputs)
        torch.autograd.grad(out if isinstance(out, tuple) else (out,), inputs,
                            [torch.ones_like(o) for o in (out if isinstance(out, tuple) else (out,))])
    K._fwd_kernel, K._bwd_kernel = _NoLaunch(), _NoLaunch()
    yield K
    guard.CHECKED_DEVICE_TYPES, K._fwd_kernel, K._bwd_kernel = saved


def _layer_and_inputs(op: str, shape, requires_grad: bool = True):
    from fastsemdiff.nn import GatedResidualModulatedNorm, ModulatedLayerNorm

    B, N, C = shape
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
    if op == "mln":
        return ModulatedLayerNorm(C, backend="triton"), [rnd(B, N, C), rnd(B, C), rnd(B, C)]
    if op == "grmln":
        return GatedResidualModulatedNorm(C, backend="triton"), [rnd(B, N, C), rnd(B, N, C), rnd(B, C), rnd(B, C),
                                                                  rnd(B, C)]
    return (_floor if op == "floor" else _FloorFunction.apply), [rnd(B, N, C), rnd(B, C), rnd(B, C)]


def _call(op: str, mode: str):
    fn, inputs = _layer_and_inputs(op, SHAPE, requires_grad=mode != "forward")
    if mode == "forward":
        return lambda: fn(*inputs)
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    dys = [torch.ones_like(o) for o in as_tuple(fn(*inputs))]
    if mode == "backward":
        graph = as_tuple(fn(*inputs))
        return lambda: torch.autograd.grad(graph, inputs, dys, retain_graph=True, allow_unused=True)
    return lambda: torch.autograd.grad(as_tuple(fn(*inputs)), inputs, dys, allow_unused=True)  # floor: x only


# CPU time of this process (one thread: OMP_NUM_THREADS=1), not wall time: the shared development machine
# deschedules a process for milliseconds at a time, which wall time would count as call overhead.
@pytest.mark.benchmark(timer=time.process_time)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["mln", "grmln", "floor", "floor_function"])
def test_call_overhead(benchmark, stubbed_kernels, op, mode):
    benchmark.group = f"call_overhead-{op}-{mode}-{'x'.join(map(str, SHAPE))}"
    call = _call(op, mode)
    per_call = bench_call(benchmark, call, reps=200, rounds=15, op=op, impl=f"{op} (launch stubbed)", mode=mode,
                          shape="x".join(map(str, SHAPE)), dtype="float32", what="host time per call")
    print(f"\n[bench] call overhead {op} {mode}: {per_call * 1e6:.1f} us per call on the host")
