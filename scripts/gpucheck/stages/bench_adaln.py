"""The adaLN and timestep-embedding benchmarks at the target shapes ([256, 256, 1152] bf16; t [256] x 256):
eager, compiled, triton, cuda, the peers where importable, kernel time beside call time (the rows ``fastsemdiff.ops.dispatch.AUTO_MEASURED`` is filled from)."""
from __future__ import annotations

from ..runner import Check, Stage, bench_stage

NAME = "bench-adaln"
ORDER = 50
# -k on the GPU: mln and grmln in every direction at the target shape, the modulated RMSNorm (mrms, against the
# peers' fused one) in fwd+bwd there, fwd+bwd at the small end (batch 8 and 32), the copy ceiling that the report
# divides by, and the timestep embedding's target; in a dry run one CPU case and the copy case.
GPU_SLICE = "(target and (forward_backward or not mrms)) or (small and forward_backward and not mrms) or copy_ceiling"
DRY_SLICE = "(cpu and mln and forward and not backward and not grmln and not compile) or copy_ceiling"


def run(check: Check) -> Stage:
    args = ["bench/test_bench_adaln.py", "bench/test_bench_timestep_embedding.py",
            "-k", DRY_SLICE if check.dry_run else GPU_SLICE]
    return bench_stage(check, NAME, args, check.box(180, 300), check.work / "bench-adaln.json")
