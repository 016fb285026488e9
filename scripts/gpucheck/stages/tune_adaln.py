"""Tune the Triton adaLN kernels' launch settings on this GPU (``bench/tune_adaln.py``): candidate rows per tile,
warps, stages and programs per SM, timed as CUDA-graph replays at [256 x 256, C] bf16 for C = 384, 768, 1152,
both ops and directions. Writes ``adaln_configs.json`` (the table's format, timings beside it) into the run's
output folder: the lead commits it as ``kernels/adaln_configs.json``. The dry run: tiny shapes under the
interpreter, two candidates per group, only the plumbing."""
from __future__ import annotations

import json

from ..runner import PY, Check, Stage

NAME = "tune-adaln"
ORDER = 55
GPU_BOX_S = 180  # the candidates' share of the 8-minute run; the script stops trying candidates at 80% of it
DRY_BOX_S = 300


def run(check: Check) -> Stage:
    s = Stage(NAME)
    out = check.out / "adaln_configs.json"
    cap = check.box(GPU_BOX_S, DRY_BOX_S)
    cmd = [PY, "bench/tune_adaln.py", "--out", str(out), "--time-box", str(int(0.8 * cap) if not check.dry_run
                                                                           else 60)]
    if check.dry_run:
        cmd.append("--dry-run")
    rc, output = check.run(s, cmd, cap, check.child_env())
    if rc != 0:
        return s
    if not out.exists():
        s.status, s.reason = "failed", f"{out.name} was not written"
        return s
    data = json.loads(out.read_text())
    tuned = {f"{op} {direction} C={C}": {"us": e["us"], "default_us": e["default_us"],
                                         "config": {k: e[k] for k in ("rows", "warps", "stages", "programs_per_sm")}}
             for cls, ops in data["devices"].items() for op, dirs in ops.items()
             for direction, widths in dirs.items() for C, e in widths.items()}
    errors = [t for t in data.get("timings", []) if "error" in t]
    s.details.update(table=str(out), device_class=data["measured"]["device_class"], tuned=tuned,
                     candidates=len(data.get("timings", [])), rejected=errors[:20])
    if not tuned:
        s.status, s.reason = "failed", "no candidate was timed"
        return s
    gains = [e["default_us"] / e["us"] for e in tuned.values() if e.get("default_us")]
    s.status = "passed"
    s.reason = (f"{len(tuned)} groups tuned from {len(data['timings'])} candidates ({len(errors)} rejected)"
                + (f"; best vs default up to {max(gains):.2f}x" if gains else "")
                + (" (dry run: the plumbing only)" if check.dry_run else f" -> {out.name}"))
    return s
