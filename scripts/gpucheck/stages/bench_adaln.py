"""The adaLN and timestep-embedding benchmarks at the target shapes ([256, 256, 1152] bf16; t [256] x 256):
eager, compiled, triton, cuda (the rows ``fastsemdiff.ops.dispatch.AUTO_MEASURED`` is filled from)."""
from __future__ import annotations

from ..runner import Check, Stage, bench_stage

NAME = "bench-adaln"
ORDER = 50
DRY_SLICE = "cpu and mln and forward and not backward and not grmln and not compile"


def run(check: Check) -> Stage:
    args = ["bench/test_bench_adaln.py", "bench/test_bench_timestep_embedding.py",
            "-k", DRY_SLICE if check.dry_run else "target"]
    return bench_stage(check, NAME, args, check.box(120, 300), check.work / "bench-adaln.json")
