"""Where the training step's time goes: ``bench/profile_step.py`` profiles one DiT-XL/2 step (the fused model,
defaults) and one step of the main job (configs/fmnist-tiny.yaml) under torch.profiler, and writes the table
(matmul/conv, attention, norms, other kernels, optimizer + EMA, gaps with no kernel running) beside images/s and
MFU into the output folder (profile.md, profile.json). A dry run profiles the tiny CPU step and the main job's step
at batch 16 from CPU op events (the table says so).

Time box: 90 s on a GPU (one XL/2 compile and one of the main job's, 3 warm-up + 10 timed steps each); with the
check's 480 s budget it runs only when the stages before it leave that much (it is dropped before bench-train).
"""
from __future__ import annotations

import json

from ..runner import PY, Check, Stage

NAME = "profile"
ORDER = 70
GPU_BOX_S, DRY_BOX_S = 90, 600


def run(check: Check) -> Stage:
    s = Stage(NAME)
    out_json, out_md = check.out / "profile.json", check.out / "profile.md"
    cmd = [PY, "bench/profile_step.py", "--json", str(out_json), "--md", str(out_md)]
    cmd += ["--dry-run", "--batch", "16"] if check.dry_run else ["--size", "XL2", "--size", "main"]
    rc, out = check.run(s, cmd, check.box(GPU_BOX_S, DRY_BOX_S), env=check.child_env(interpret=False),
                        min_s=10 if check.dry_run else 40)
    if not out_json.exists():
        if rc == 0:
            s.status, s.reason = "failed", "bench/profile_step.py wrote no JSON"
        return s
    rows = json.loads(out_json.read_text())["rows"]
    s.details = {"rows": rows, "table": "profile.md"}
    if rc == 0:
        s.status = "passed"
        parts = []
        for r in rows:
            if "profile" not in r:
                parts.append(f"{r['size']} {r['variant']}: {r.get('skipped', 'no profile')[:80]}")
                continue
            p = r["profile"]
            span = p["span_us"] or 1.0
            top = max(p["by_category_us"], key=p["by_category_us"].get)
            parts.append(f"{r['size']} {r['images_per_s']:.0f} img/s, {top} {100 * p['by_category_us'][top] / span:.0f}%"
                         f", gaps {100 * p['gaps_us'] / span:.0f}%")
        s.reason = "; ".join(parts) + ("; CPU op events (dry run)" if check.dry_run else "")
    return s
