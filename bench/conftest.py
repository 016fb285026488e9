"""Benchmark fixtures; the timing machinery is in benchutil.py."""
from __future__ import annotations

import pytest

from benchutil import DEVICE, HAS_CUDA, measure_copy_gbs


@pytest.fixture(scope="session")
def copy_ceiling_gbs() -> float:
    """The copy bandwidth of this device at a size beyond its caches (256 MiB on GPU, 64 MiB on CPU)."""
    gbs = measure_copy_gbs((256 if HAS_CUDA else 64) << 20)
    print(f"\n[bench] device-to-device copy ceiling on {DEVICE}: {gbs:.1f} GB/s")
    return gbs
