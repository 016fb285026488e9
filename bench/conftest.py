"""Benchmark fixtures (the ceilings measured in this run) and hooks (what the JSON records, the ratio summary);
the timing machinery is in benchutil.py."""
from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import pytest
import torch

from benchutil import CEILINGS, DEVICE, DEVICE_NAME, HAS_CUDA, TIMINGS, measure_copy_gbs, measure_matmul_tflops, ratio_lines


@pytest.fixture(scope="session")
def copy_ceiling_gbs() -> float:
    """The copy bandwidth of this device at a size beyond its caches (256 MiB on GPU, 64 MiB on CPU)."""
    gbs = measure_copy_gbs((256 if HAS_CUDA else 64) << 20)
    CEILINGS["copy_gbs"] = round(gbs, 1)
    print(f"\n[bench] device-to-device copy ceiling on {DEVICE}: {gbs:.1f} GB/s")
    return gbs


@pytest.fixture(scope="session")
def matmul_ceiling_tflops() -> float:
    """The compute ceiling of this device: a bf16 [8192]^2 product on GPU, an fp32 [1024]^2 one on CPU."""
    n, dtype = (8192, torch.bfloat16) if HAS_CUDA else (1024, torch.float32)
    tflops = measure_matmul_tflops(n, dtype)
    CEILINGS["matmul_tflops"] = round(tflops, 4)
    CEILINGS["matmul"] = f"{n}x{n}x{n} {str(dtype).removeprefix('torch.')}"
    print(f"\n[bench] matmul ceiling on {DEVICE}: {tflops:.3f} TFLOP/s ({CEILINGS['matmul']})")
    return tflops


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def pytest_benchmark_update_machine_info(config, machine_info):
    """Device, versions, commit and the ceilings of this run, so a table made from the JSON says what it
    was measured on."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    machine_info["fastsemdiff"] = {
        "device": DEVICE_NAME, "torch": torch.__version__, "cuda": torch.version.cuda or "none",
        "triton": _version("triton"), "diffusers": _version("diffusers"), "commit": commit,
        "ceilings": dict(CEILINGS),
    }


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    groups = {g: e for g, e in TIMINGS.items() if len(e) > 1}
    if not groups:
        return
    terminalreporter.section("fastsemdiff ratios (same run, same device)")
    terminalreporter.write_line(f"device {DEVICE_NAME}; ceilings {CEILINGS}")
    for group, entries in groups.items():
        for line in ratio_lines(group, entries):
            terminalreporter.write_line(line)
        fastest = min(entries, key=lambda impl: entries[impl]["s"])
        terminalreporter.write_line(f"  {group:<44} fastest: {fastest}")
