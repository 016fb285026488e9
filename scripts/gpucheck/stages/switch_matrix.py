"""Each speed switch on and off in one run (``bench/switch_matrix.py``): images/s, MFU, the ratio to the compiled
reference of the same size (the main job's rows: to its defaults), the loss after the same steps from the same
weights and draws, host syncs per step; into switch_matrix.md / switch_matrix.json in the output folder.

Rows, in order (a row that would start after the time box is recorded "not reached"): DiT-XL/2 reference
(torch.compile) and fused, the main job with its defaults, under CUDA graphs (reduce-overhead, per block), as one
whole-model CUDA graph and whole-model compiled without graphs, then at XL/2 each of attention=flash/cudnn,
mlp_epilogue=addmm, update=foreach, fp8=rowwise/tensorwise, attention=efficient/flash_attn, update=loop,
reduce-overhead and max-autotune-no-cudagraphs (the slow compiles last), then the main job with update=foreach. Time box: 120 s on a GPU, and it is the first stage dropped when the 480 s budget runs short (highest
ORDER but the report); the full matrix with B/2 and S/2 is
``python scripts/gpu_check.py --only install,switch-matrix --budget 900`` (FASTSEMDIFF_SWITCH_SIZES=XL2,main,B2,S2).
A dry run measures the tiny CPU step and the main job's at batch 16, and records the CPU's refusals (cudnn, fp8,
reduce-overhead) as skipped rows with their reasons.
"""
from __future__ import annotations

import json
import os

from ..runner import PY, Check, Stage

NAME = "switch-matrix"
ORDER = 75
GPU_BOX_S, DRY_BOX_S = 120, 900


def run(check: Check) -> Stage:
    s = Stage(NAME)
    out_json, out_md = check.out / "switch_matrix.json", check.out / "switch_matrix.md"
    box = min(check.box(GPU_BOX_S, DRY_BOX_S), check.left())
    cmd = [PY, "bench/switch_matrix.py", "--json", str(out_json), "--md", str(out_md),
           "--deadline-s", str(int(max(0, box - (5 if check.dry_run else 25))))]  # room for the last row to finish
    if check.dry_run:
        cmd += ["--dry-run", "--min-row-s", "2"]
    else:
        cmd += ["--sizes", os.environ.get("FASTSEMDIFF_SWITCH_SIZES", "XL2,main")]
    rc, _ = check.run(s, cmd, box, env=check.child_env(interpret=False), min_s=10 if check.dry_run else 45)
    if not out_json.exists():
        if rc == 0:
            s.status, s.reason = "failed", "bench/switch_matrix.py wrote no JSON"
        return s
    rows = json.loads(out_json.read_text())["rows"]
    s.details = {"rows": rows, "table": "switch_matrix.md"}
    measured = [r for r in rows if "images_per_s" in r]
    skipped = [r for r in rows if "skipped" in r]
    errors = [f"{r['size']} {r['variant']}: {r['error']}" for r in rows if "error" in r]
    if rc is not None:  # a time box that stopped the process keeps its status and reason (timed out)
        s.status = "failed" if errors or rc != 0 else "passed"
    best = max((r for r in measured if r["size"] != "main" and not r["variant"].startswith("reference")),
               key=lambda r: r.get("ratio_to_reference", 0), default=None)
    s.reason = (f"{len(measured)} rows measured, {len(skipped)} refused/skipped, "
                f"{sum('not_reached' in r for r in rows)} not reached"
                + (f"; best {best['size']} {best['variant']} {best['ratio_to_reference']:.2f}x its reference"
                   if best else "") + ("; " + "; ".join(errors) if errors else ""))
    return s
