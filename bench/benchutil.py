"""Shared benchmark machinery: the device, a synchronising timer, and the copy-bandwidth ceiling.

pytest-benchmark times wall-clock, so every timed call ends with a device synchronisation on CUDA; to keep
that sync out of a ~100 us kernel's time, one timed call runs the op ``reps`` times and syncs once, and
the per-call time is ``median / reps`` (recorded in ``extra_info``). Achieved bandwidth is reported
against a device-to-device copy measured in the same session, so ratios, not absolute numbers, carry.
"""
from __future__ import annotations

import time
from typing import Callable

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
gpu_only = pytest.mark.skipif(not HAS_CUDA, reason="GPU case: no CUDA device on this machine")


def sync() -> None:
    if HAS_CUDA:
        torch.cuda.synchronize()


def bench_call(benchmark, fn: Callable[[], object], reps: int, rounds: int, bytes_moved: int | None = None,
               ceiling_gbs: float | None = None, **info) -> float:
    """Time ``fn`` (``reps`` calls then one sync per round); record per-call us, GB/s and % of the ceiling.
    Returns the per-call median in seconds."""
    def run():
        for _ in range(reps):
            fn()
        sync()

    run()  # warm-up outside the timing (compilation, autotuning, allocator)
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    per_call = benchmark.stats.stats.median / reps
    benchmark.extra_info.update(info, device=torch.cuda.get_device_name() if HAS_CUDA else "cpu",
                                torch=torch.__version__, us_per_call=round(per_call * 1e6, 2))
    if bytes_moved:
        gbs = bytes_moved / per_call / 1e9
        benchmark.extra_info.update(bytes=bytes_moved, gb_per_s=round(gbs, 1))
        if ceiling_gbs:
            benchmark.extra_info["pct_of_copy"] = round(100 * gbs / ceiling_gbs, 1)
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
