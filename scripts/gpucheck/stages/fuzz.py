"""Fuzzing both fused backends against the plain-PyTorch reference on the GPU (``tests/fuzz_ops.py``): random
shapes (odd C, B=1, N=1, an empty batch, widths above the CUDA row limit), strides (column chunks of one adaLN
output, transposed views), dtypes and modulation layouts, forward and backward, on ``triton`` and ``cuda`` and
through the raw ``fastsemdiff._C`` forward. Every case must match the reference or raise a documented error.

The cases run in a subprocess that names each case in a progress file before running it. If the process dies
(a segfault, an abort), the case it was running is recorded by name as crashed and a new process resumes with
the next case, so a crash costs one case. A dry run fuzzes Triton under the interpreter on the CPU (a few small
cases). Details: cases run, passed, refused (a documented error), failed (with their problems) and crashed."""
from __future__ import annotations

import json
from pathlib import Path

from ..runner import PY, Check, Stage

NAME = "fuzz"
ORDER = 45
SEED = 20261204
GPU_CASES, DRY_CASES = 2000, 6  # the GPU run stops starting cases when its time box runs out
MAX_RESTARTS = 20  # after this many crashes the stage stops (something is broken everywhere)


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def run(check: Check) -> Stage:
    s = Stage(NAME)
    dry = check.dry_run
    progress, results = check.work / "fuzz-progress.txt", check.work / "fuzz-results.jsonl"
    for p in (progress, results):
        p.unlink(missing_ok=True)
    cases = DRY_CASES if dry else GPU_CASES
    backends = "triton" if dry else "triton,cuda"
    device = "cpu" if dry else "cuda"
    box = check.box(150, 300)
    crashed: list[str] = []
    start = 0
    spent = 0.0
    while start < cases and len(crashed) <= MAX_RESTARTS:
        left = box - spent
        if left < 15:
            break
        cmd = [PY, "tests/fuzz_ops.py", "--device", device, "--backends", backends, "--cases", str(cases),
               "--start", str(start), "--seed", str(SEED), "--progress", str(progress), "--out", str(results),
               "--max-seconds", str(max(5.0, left - 30)), *([] if dry else ["--big"])]
        before = s.seconds
        rc, _ = check.run(s, cmd, left, check.child_env(interpret=dry))
        spent += s.seconds - before
        started = _read_lines(progress)
        if rc is None:  # a case hung past the time box
            if started:
                crashed.append(f"{started[-1].split(chr(9), 1)[1]} (hung: stopped by the time box)")
            break
        if rc in (0, 1):  # finished (1: some case failed)
            break
        if not started:
            break  # died before its first case: nothing to resume
        index, name = started[-1].split("\t", 1)
        crashed.append(f"{name} (exit code {rc})")
        start = int(index) + 1
    done = [json.loads(line) for line in _read_lines(results)]
    failed = [r for r in done if r["status"] == "fail"]
    s.details = {
        "seed": SEED, "device": device, "backends": backends.split(","), "cases_run": len(done) + len(crashed),
        "passed": sum(r["status"] == "pass" for r in done), "refused": sum(r["status"] == "refused" for r in done),
        "failed": len(failed), "crashed": crashed,
        "failures": [{"name": r["name"], "problems": r["problems"][:4]} for r in failed[:30]],
        "replay": f"python tests/fuzz_ops.py --device {device} --backends {backends} --seed {SEED} --start N "
                  f"--cases N+1{'' if dry else ' --big'}",
    }
    d = s.details
    summary = (f"{d['cases_run']} cases: {d['passed']} matched the reference, {d['refused']} refused as documented, "
               f"{d['failed']} failed, {len(crashed)} crashed")
    if s.status == "skipped" and not done:
        return s
    if not done and not crashed:
        s.status = "failed"
        s.reason = "no case ran: " + (s.reason or "see the log")
    elif failed or crashed:
        s.status = "failed"
        names = [r["name"] for r in failed[:2]] + crashed[:2]
        s.reason = f"{summary}; e.g. {'; '.join(names)}"
    else:
        s.status, s.reason = "passed", summary
    return s
