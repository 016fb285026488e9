"""adaLN seams: the modulated LayerNorm and the fused gated residual + modulated LayerNorm.

    pytest bench/ --benchmark-only -k adaln

Each op (``mln``: modulated LayerNorm; ``grmln``: gated residual + modulated LayerNorm; ``mrms``: modulated
RMSNorm, LightningDiT's block) runs forward, backward (on a prebuilt graph) and forward+backward, in one run:
the plain-PyTorch reference eager, the reference under torch.compile, the fused Triton kernels, the CUDA C++
kernels (``fastsemdiff._C``; skipped with the reason where it is not built), and the peers a user would reach
for (``bench/peers.py``: Liger-Kernel's and QuACK's norms with a compiled modulate, Liger's fused modulated
RMSNorm; each skipped as "absent: <reason>" where it does not import or has no such kernel).
GPU shapes (bf16): [256, 256, 1152] (the SPEC target shape), DiT-S [256, 256, 384] and DiT-B
[256, 256, 768], and the small end, batch 8 and 32 of 256 tokens at 1152, where launches rather than bytes
set the time; the CPU case [8, 64, 384] fp32 times the reference eager and compiled (the Triton kernels
run on a CPU only under the interpreter, a correctness tool, so they are not timed there; nor are the CUDA
kernels).

Each record carries the call time (per call, as a training step calls it: Python, autograd, dispatch and the
launches included), the device time of the same call (a CUDA-graph replay: the kernels alone; "n/a on CPU"),
the bytes the op must move at least (``moved``, the one formula, which the table's header writes out) and,
for both times, the achieved GB/s and % of the copy ceiling. The ceiling is measured in the same run by
``test_copy_ceiling`` (a device-to-device copy timed the same two ways), which ``bench/report.py`` reads.

What ``scripts/gpu_check.py`` selects (its 8-minute budget): ``-k "(target and (forward_backward or not mrms))
or (small and forward_backward and not mrms) or copy_ceiling"``: mln and grmln in every direction and
implementation at [256, 256, 1152], mrms (for the peers' fused modulated RMSNorm) in fwd+bwd there, mln and
grmln in fwd+bwd at the small end, and the copy. The DiT-S and DiT-B widths and everything else:
``pytest bench/test_bench_adaln.py --benchmark-only``.
"""
from __future__ import annotations

import functools

import pytest
import torch

from fastsemdiff.nn import gated_residual_modulated_norm_ref, modulated_layer_norm_ref
from fastsemdiff.ops import gated_residual_modulated_norm, modulated_layer_norm

import peers
from benchutil import DEVICE, HAS_CUDA, bench_call, skip_unless_fused_timeable

GPU_SHAPES = {"target-256x256x1152": (256, 256, 1152), "DiT-S-256x256x384": (256, 256, 384),
              "DiT-B-256x256x768": (256, 256, 768), "small-8x256x1152": (8, 256, 1152),
              "small-32x256x1152": (32, 256, 1152)}
CPU_SHAPES = {"cpu-8x64x384": (8, 64, 384)}
SHAPES = GPU_SHAPES if HAS_CUDA else CPU_SHAPES
DTYPE = torch.bfloat16 if HAS_CUDA else torch.float32
IMPLS = ["torch_eager", "torch_compile", "triton", "cuda", *peers.PEERS]
OPS = ["mln", "grmln", "mrms"]
FUSED = ("triton", "cuda")
MODES = ["forward", "backward", "forward_backward"]

# The bytes an op must move at least: the [B, N, C] tensors each direction reads and writes, in x's dtype. The
# per-sample modulation rows ([B, C]), the affine parameters and the fp32 row statistics ([B, N]) are left
# out: at 256 tokens they are under 1% of the total.
TENSORS_MOVED = {("mln", "forward"): ("x", "y"), ("mln", "backward"): ("x", "dy", "dx"),
                 ("mrms", "forward"): ("x", "y"), ("mrms", "backward"): ("x", "dy", "dx"),
                 ("grmln", "forward"): ("x", "h", "x_out", "y"),
                 ("grmln", "backward"): ("dx_out", "dy", "x_out", "h", "dx", "dh")}


def moved(op: str, mode: str, shape: tuple[int, int, int], element_size: int) -> tuple[int, str]:
    """The bytes ``op`` must move in ``mode`` at ``shape`` and the formula that counts them (the table header)."""
    names = (TENSORS_MOVED[op, "forward"] + TENSORS_MOVED[op, "backward"] if mode == "forward_backward"
             else TENSORS_MOVED[op, mode])
    B, N, C = shape
    return len(names) * B * N * C * element_size, f"{len(names)} x B*N*C*{element_size} B ({', '.join(names)})"


def _inputs(op: str, B: int, N: int, C: int):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device=DEVICE, dtype=DTYPE, generator=g)  # noqa: E731
    x = rnd(B, N, C)
    mods = [rnd(B, C) * 0.5 for _ in range(3 if op == "grmln" else 2)]
    extra = [rnd(B, N, C)] if op == "grmln" else []
    return [x, *extra, *mods]  # mln: x, shift, scale; grmln: x, h, gate, shift, scale


def _function(op: str, impl: str, C: int):
    if impl in peers.PEERS:
        return peers.function(impl, op, C, DTYPE)
    if op == "mrms":
        fn = (functools.partial(modulated_layer_norm, rms=True, backend=impl) if impl in FUSED
              else functools.partial(modulated_layer_norm_ref, rms=True))
    elif op == "mln":
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
    """A zero-argument callable for one timed call."""
    B, N, C = shape
    fn = _function(op, impl, C)
    inputs = _inputs(op, B, N, C)
    if mode == "forward":
        return lambda: fn(*inputs)  # the inputs need no gradient: no autograd graph is recorded
    leaves = [t.requires_grad_() for t in inputs]
    outs = lambda: fn(*leaves)  # noqa: E731
    as_tuple = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    dys = [torch.randn_like(o) for o in as_tuple(outs())]
    if mode == "backward":
        graph = as_tuple(outs())
        return lambda: torch.autograd.grad(graph, leaves, dys, retain_graph=True)
    return lambda: torch.autograd.grad(as_tuple(outs()), leaves, dys)


@pytest.mark.parametrize("shape_name", list(SHAPES))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("op", OPS)
def test_adaln(benchmark, copy_ceiling_gbs, op, impl, mode, shape_name):
    if impl in peers.PEERS:
        why = peers.absent(impl, op)
        if why:
            pytest.skip(f"absent: {why}")
    skip_unless_fused_timeable(impl, "adaLN")
    benchmark.group = f"adaln-{op}-{mode}-{shape_name}"
    if impl in peers.PEERS:
        B, N, C = SHAPES[shape_name]
        why = peers.disagreement(_function(op, impl, C), *_inputs(op, B, N, C), rms=op == "mrms")
        if why:
            pytest.skip(f"absent: {impl} {why}")
    call = _case(op, impl, mode, SHAPES[shape_name])
    nbytes, formula = moved(op, mode, SHAPES[shape_name], torch.empty(0, dtype=DTYPE).element_size())
    reps, rounds = (20, 15) if HAS_CUDA else (5, 5)
    per_call = bench_call(benchmark, call, reps, rounds, bytes_moved=nbytes, ceiling_gbs=copy_ceiling_gbs,
                          kernel=True, bytes_formula=formula, op=op, impl=impl, mode=mode, shape=shape_name,
                          dtype=str(DTYPE))
    info = benchmark.extra_info
    kernel = (f"{info['kernel_us_per_call']:.1f} us ({info.get('kernel_pct_of_copy', float('nan')):.0f}% of copy)"
              if "kernel_us_per_call" in info else info["kernel_method"])
    print(f"\n[bench] adaln {op} {mode} {shape_name} {impl}: call {per_call * 1e6:.1f} us, "
          f"{nbytes / per_call / 1e9:.1f} GB/s ({100 * nbytes / per_call / 1e9 / copy_ceiling_gbs:.0f}% of copy); "
          f"kernel {kernel}")


COPY_BYTES = {"target-256MiB": 256 << 20} if HAS_CUDA else {"cpu-64MiB": 64 << 20}


@pytest.mark.parametrize("size_name", list(COPY_BYTES))
def test_copy_ceiling(benchmark, copy_ceiling_gbs, size_name):
    """The copy ceiling the report holds every adaLN row to: a device-to-device copy of a buffer beyond the
    caches, timed as the adaLN cases are (call and device time); GB/s counts the read and the write."""
    nbytes = COPY_BYTES[size_name]
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    benchmark.group = f"copy_ceiling-{size_name}"
    reps, rounds = (20, 15) if HAS_CUDA else (5, 5)
    per_call = bench_call(benchmark, lambda: dst.copy_(src), reps, rounds, bytes_moved=2 * nbytes,
                          ceiling_gbs=copy_ceiling_gbs, kernel=True, bytes_formula="2 x buffer (read, write)",
                          op="copy", impl="copy", mode="copy", shape=size_name, dtype="uint8")
    print(f"\n[bench] copy {size_name}: call {2 * nbytes / per_call / 1e9:.1f} GB/s; "
          f"kernel {benchmark.extra_info.get('kernel_gb_per_s', benchmark.extra_info['kernel_method'])}")
