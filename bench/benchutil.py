"""Shared benchmark machinery: the device, a synchronising timer, and the ceilings measured in the same run.

pytest-benchmark times wall-clock, so every timed call ends with a device synchronisation on CUDA; to keep
that sync out of a ~100 us kernel's time, one timed call runs the op ``reps`` times and syncs once, and
the per-call time is ``median / reps`` (recorded in ``extra_info``). Achieved bandwidth is reported
against a device-to-device copy, and achieved FLOP/s against a large matrix product (bf16 on GPU, fp32 on
CPU), both measured in the same session, so ratios, not absolute numbers, carry. ``bench/report.py`` turns
the ``--benchmark-json`` file into tables and a roofline plot.

Beside that call time, a case may ask for the device time of the same call (``kernel=True``): the call
captured once in a CUDA graph and replayed, so no Python, dispatch or launch cost of the host is in it (or,
where a call cannot be captured, the kernel rows of ``torch.profiler``). A slow call with a fast kernel time
is slow around its kernels; a slow kernel time is slow kernels. On a CPU there is no device time to take:
the record says "n/a on CPU".
"""
from __future__ import annotations

import time
import statistics
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


KERNEL_NA_CPU = "n/a on CPU"


def _graph_seconds(fn: Callable[[], object], reps: int, rounds: int) -> float:
    """Median device seconds of one call of ``fn``, captured once in a CUDA graph and replayed ``reps`` times
    per round between two CUDA events."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm on a side stream, as torch.cuda.graph's documentation asks
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / reps)
    del graph
    torch.cuda.synchronize()
    return statistics.median(times)


def _profiler_seconds(fn: Callable[[], object], reps: int) -> float:
    """Device seconds of one call of ``fn``: the summed self time of the CUDA kernel rows of ``torch.profiler``
    over ``reps`` calls, divided by ``reps``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync()
    total_us = sum(e.self_device_time_total for e in prof.key_averages() if e.self_device_time_total > 0)
    return total_us / 1e6 / reps


def device_seconds(fn: Callable[[], object], reps: int = 20, rounds: int = 5) -> tuple[Optional[float], str]:
    """The device time of one call of ``fn`` without the host around it, and how it was taken: a CUDA-graph
    replay, else (a call that cannot be captured) the profiler's kernel rows; ``(None, why)`` where neither
    can be taken (``"n/a on CPU"`` on a CPU)."""
    if not HAS_CUDA:
        return None, KERNEL_NA_CPU
    try:
        return _graph_seconds(fn, reps, rounds), "cuda-graph replay"
    except Exception as e:  # noqa: BLE001 - a call that cannot be captured: measured another way, said so
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        torch.cuda.synchronize()
    try:
        return _profiler_seconds(fn, reps), f"profiler kernel rows (graph capture failed: {why})"
    except Exception as e:  # noqa: BLE001
        return None, f"n/a: graph capture failed ({why}); profiler failed ({type(e).__name__}: {e})"[:300]


def bench_call(benchmark, fn: Callable[[], object], reps: int, rounds: int, bytes_moved: int | None = None,
               ceiling_gbs: float | None = None, flops: int | None = None, ceiling_tflops: float | None = None,
               warmup: bool = True, kernel: bool = False, bytes_formula: str | None = None, **info) -> float:
    """Time ``fn`` (``reps`` calls then one sync per round); record per-call us, GB/s and TFLOP/s with their
    % of the ceilings. Returns the per-call median in seconds. ``warmup=False`` when the caller already ran
    ``fn`` (compilation, autotuning, allocator) outside the timing. ``kernel``: also record the device time of
    one call (``device_seconds``) with its GB/s and % of the copy ceiling; ``bytes_formula`` says how
    ``bytes_moved`` was counted (for the table's header)."""
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
        if bytes_formula:
            benchmark.extra_info.update(bytes_formula=bytes_formula)
    if kernel:
        seconds, method = device_seconds(fn, reps=reps, rounds=max(3, min(rounds, 5)))
        benchmark.extra_info.update(kernel_method=method)
        if seconds is not None:
            benchmark.extra_info.update(kernel_us_per_call=round(seconds * 1e6, 2))
            if bytes_moved:
                kgbs = bytes_moved / seconds / 1e9
                benchmark.extra_info.update(kernel_gb_per_s=round(kgbs, 1))
                if ceiling_gbs:
                    benchmark.extra_info.update(kernel_pct_of_copy=round(100 * kgbs / ceiling_gbs, 1))
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


def interleaved_medians(benchmark, calls: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each variant, timed one call of each in turn per round (the order rotating,
    so none always runs first): on a shared CPU, load from other work hits every variant alike, so their
    ratios hold even when the absolute times drift. The first (warm-up) round is dropped; the benchmark's own
    time is one round of all variants."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    order = list(calls)

    def one_round():
        order.append(order.pop(0))
        for name in order:
            start = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, iterations=1, warmup_rounds=1)
    return {name: statistics.median(ts[1:]) for name, ts in times.items()}


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
