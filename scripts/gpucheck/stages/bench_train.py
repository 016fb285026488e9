"""``bench/test_bench_train.py``'s DiT training step (reference eager, reference compiled, fused; diffusers' DiT
where importable), one process per size, largest first (the SPEC's targets), so that a budget running out costs
the smallest. A dry run times the tiny CPU case."""
from __future__ import annotations

from ..runner import Check, Stage, bench_stage

NAME = "bench-train"
ORDER = 60
SIZES = ["XL2", "B2", "S2"]


def run(check: Check) -> list[Stage]:
    stages = []
    for size in ["tiny"] if check.dry_run else SIZES:
        k = "cpu_interleaved and dit" if check.dry_run else f"dit-{size}-"
        stages.append(bench_stage(check, f"{NAME}-{size}", ["bench/test_bench_train.py", "-k", k],
                                  check.box(130, 500), check.work / f"{NAME}-{size}.json"))
    return stages
