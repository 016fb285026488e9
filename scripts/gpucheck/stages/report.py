"""The benchmark JSONs of this run merged into bench.json and ``bench/report.py``'s markdown tables (tables.md).
Always last."""
from __future__ import annotations

from ..runner import PY, Check, Stage, merge_bench

NAME = "report"
ORDER = 99


def run(check: Check) -> Stage:
    s = Stage(NAME)
    merged = merge_bench(check.bench_jsons, check.out / "bench.json")
    if not merged or not merged.get("benchmarks"):
        s.status, s.reason = "skipped", "no benchmark records to report (see the bench stages)"
        return s
    command = "python scripts/gpu_check.py" + (" --dry-run" if check.dry_run else "")
    rc, _ = check.run(s, [PY, "bench/report.py", str(check.out / "bench.json"), "-o", str(check.out / "tables.md"),
                          "--command", command], check.box(60, 200), min_s=1)
    if rc == 0:
        s.status, s.reason = "passed", f"{len(merged['benchmarks'])} records -> tables.md"
    return s
