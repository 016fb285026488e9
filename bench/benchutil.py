"""Shared benchmark machinery: the device, a synchronising timer, and the ceilings measured in the same run.

pytest-benchmark times wall-clock, so every timed call ends with a device synchronisation on CUDA; to keep
that sync out of a ~100 us kernel's time, one timed call runs the op ``reps`` times and syncs once, and
the per-call time is ``median / reps`` (recorded in ``extra_info``). Achieved bandwidth is reported
against a device-to-device copy, and achieved FLOP/s against a large matrix product (bf16 on GPU, fp32 on
CPU), both measured in the same session, so ratios, not absolute numbers, carry. ``bench/report.py`` turns
the ``--benchmark-json`` file into tables and a roofline plot.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
DEVICE_NAME = torch.cuda.get_device_name() if HAS_CUDA else "cpu"
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="GPU case: no CUDA device on this machine")

# Ceilings measured in this session (filled by the conftest fixtures), written into the JSON's machine_info.
CEILINGS: dict[str, float] = {}
# Per-call seconds of every case timed in this session, by group then impl: the terminal summary's ratios.
TIMINGS: dict[str, dict[str, dict]] = {}


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def bench_call(benchmark, fn: Callable[[], object], reps: int, rounds: int, bytes_moved: int | None = None,
               ceiling_gbs: float | None = None, flops: int | None = None, ceiling_tflops: float | None = None,
               warmup: bool = True, **info) -> float:
    """Time ``fn`` (``reps`` calls then one sync per round); record per-call us, GB/s and TFLOP/s with their
    % of the ceilings. Returns the per-call median in seconds. ``warmup=False`` when the caller already ran
    ``fn`` (compilation, autotuning, allocator) outside the timing."""
    def run():
        for _ in range(reps):
            fn()
        sync()

    if warmup:
        run()
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / reps
    benchmark.extra_info.update(info, device=DEVICE_NAME, torch=torch.__version__, reps=reps,
                                us_per_call=round(per_call * 1e6, 2))
    if bytes_moved:
        gbs = bytes_moved / per_call / 1e9
        benchmark.extra_info.update(bytes=bytes_moved, gb_per_s=round(gbs, 1))
        if ceiling_gbs:
            benchmark.extra_info.update(ceiling_gbs=round(ceiling_gbs, 1), pct_of_copy=round(100 * gbs / ceiling_gbs, 1))
    if flops:
        tflops = flops / per_call / 1e12
        benchmark.extra_info.update(flops=flops, tflop_per_s=round(tflops, 4))
        if ceiling_tflops:
            benchmark.extra_info.update(ceiling_tflops=round(ceiling_tflops, 4),
                                        pct_of_matmul=round(100 * tflops / ceiling_tflops, 1))
    TIMINGS.setdefault(benchmark.group or benchmark.name, {})[str(info.get("impl", benchmark.name))] = {
        "s": per_call, **{k: benchmark.extra_info[k] for k in ("images_per_s", "tflop_per_s", "mfu_pct")
                          if k in benchmark.extra_info}}
    return per_call


def measure_copy_gbs(nbytes: int, reps: int = 20) -> float:
    """Device-to-device copy bandwidth (read + write bytes per second) for a buffer of ``nbytes``."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    sync()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(reps):
            dst.copy_(src)
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * nbytes / best / 1e9


def measure_matmul_tflops(n: int, dtype: torch.dtype, reps: int = 10, trials: int = 5) -> float:
    """Achieved TFLOP/s of an ``[n, n] @ [n, n]`` product (2 n^3 FLOPs), the best of ``trials``."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    a = torch.randn(n, n, device=DEVICE, generator=g).to(dtype)
    b = torch.randn(n, n, device=DEVICE, generator=g).to(dtype)
    out = torch.empty(n, n, device=DEVICE, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b, out=out)
    sync()
    best = float("inf")
    for _ in range(trials):
        start = time.perf_counter()
        for _ in range(reps):
            torch.matmul(a, b, out=out)
        sync()
        best = min(best, (time.perf_counter() - start) / reps)
    return 2 * n**3 / best / 1e12


def skip_unless_fused_timeable(impl: str, what: str) -> None:
    """Skip a ``triton`` or ``cuda`` case where it cannot be timed: Triton off a GPU runs in the interpreter,
    and the CUDA C++ kernels need a GPU and the built extension. ``what`` names the op in the reason."""
    if impl == "triton" and not HAS_CUDA:
        pytest.skip(f"{what}, Triton: timed on GPUs only (on a CPU the interpreter runs it)")
    if impl == "cuda":
        if not HAS_CUDA:
            pytest.skip(f"{what}, CUDA C++: runs on GPUs only")
        from fastsemdiff.ops import _cuda

        if not _cuda.available():
            pytest.skip(f"{what}, CUDA C++: {_cuda.unavailable_reason()}")


def oom_skip(exc: BaseException, what: str) -> None:
    """Turn a CUDA out-of-memory error into a skip that says which case did not fit."""
    torch.cuda.empty_cache()
    pytest.skip(f"{what}: out of memory on {DEVICE_NAME} ({str(exc).splitlines()[0][:160]})")


def ratio_lines(group: str, entries: dict[str, dict], baselines=("torch_eager", "torch_compile", "diffusers"),
                ) -> list[str]:
    """One line per impl: its per-call time and how many times faster it is than each baseline present."""
    lines = []
    for impl, e in entries.items():
        parts = [f"{e['s'] * 1e3:9.2f} ms"]
        if "images_per_s" in e:
            parts.append(f"{e['images_per_s']:9.1f} img/s")
        if "mfu_pct" in e:
            parts.append(f"MFU {e['mfu_pct']:.1f}%")
        elif "tflop_per_s" in e:
            parts.append(f"{e['tflop_per_s']:.3f} TFLOP/s")
        for base in baselines:
            if base in entries and base != impl:
                parts.append(f"{entries[base]['s'] / e['s']:.2f}x vs {base}")
        lines.append(f"  {group:<44} {impl:<15} " + "  ".join(parts))
    return lines
