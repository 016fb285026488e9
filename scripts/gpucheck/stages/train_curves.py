"""Training curves of the fused backend against torch, judged against the drift that rounding alone causes.

Three short runs from the same seed on generated images: ``torch`` (torch ops, bf16 autocast: the reference),
``torch-fp32`` (torch ops, fp32: differs from the reference only in rounding) and ``fused`` (the fused backend,
bf16: the Triton kernels, compiled on the GPU, under the interpreter in a dry run). Training is chaotic: two runs
that differ only in rounding drift apart, so a fixed tolerance either fails a correct kernel (the H200 run of
2026-12-04: 9% at one point on a correct kernel) or, set loose, passes a wrong one. The tolerance is measured in
the same stage instead (``RULE``, stated in the JSON and the summary):

- drift(t) = |torch - torch-fp32| / torch at each logged step t, and its running envelope env(t) = max over
  s <= t of drift(s) (rounding differences only grow as the runs diverge; the envelope keeps a crossing of the
  two curves from reading as zero drift);
- per point: |torch - fused| / torch <= MULTIPLE x env(t) + POINT_FLOOR at every logged step;
- last quarter: |mean torch - mean fused| / mean torch <= MULTIPLE x (mean of drift(t) over the last quarter)
  + TAIL_FLOOR.

The fp32 partner's rounding differs from the bf16 reference's in every matrix product, a fused kernel's only in
its own few ops, so a correct kernel's drift stays within the calibration's (MULTIPLE = 3 leaves room for the
chaos of a single pair). The floors (0.2% a point, 0.1% the tail) cover the case where the calibration drift is
near zero (a tiny model on a CPU: bf16 and fp32 curves agree to ~1e-4) and are well below what a kernel a few
percent off does: tests/test_gpu_check.py plants one (the modulated LayerNorm's output x 1.03, by
``gpucheck.train_run``) and the rule fails it (0.5% at the end of 40 tiny steps), while a correct kernel that
rounds differently passes. The three runs go concurrently (they time nothing; the fused step is timed in
bench-train): on the GPU they share it, on a CPU they fill the cores the other PARALLEL stages leave.
"""
from __future__ import annotations

import json
import math
import shutil
import threading
from pathlib import Path
from typing import Optional, Sequence

from ..runner import PY, Check, Stage

NAME = "train-curves"
ORDER = 32
PARALLEL = True
MULTIPLE = 3.0
POINT_FLOOR = 0.002
TAIL_FLOOR = 0.001
RULE = {"reference": "torch (bf16)", "calibration": "torch-fp32 (same seed: differs only in rounding)",
        "multiple": MULTIPLE, "point_floor": POINT_FLOOR, "tail_floor": TAIL_FLOOR,
        "per_point": "|torch - fused| / torch <= multiple x max(drift up to that step) + point_floor",
        "last_quarter": "|mean torch - mean fused| / mean torch <= multiple x mean(drift over the last quarter) "
                        "+ tail_floor",
        "drift": "|torch - torch-fp32| / torch at each logged step"}
TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "train.threads=1"]


def write_images(path: Path, n: int, size: int = 28, seed: int = 0) -> Path:
    """``n`` generated grey images (a few soft blobs each, labels by blob count) as an .npz: structured enough
    that the denoising loss falls, and needing no dataset on the machine."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((n, size, size), np.float32)
    labels = rng.integers(1, 4, size=n)
    for i in range(n):
        for _ in range(labels[i]):
            cy, cx = rng.uniform(4, size - 4, 2)
            r = rng.uniform(2, 6)
            images[i] += rng.uniform(0.5, 1.0) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    images = (255 * np.clip(images, 0, 1)).astype(np.uint8)
    np.savez(path, x_train=images, y_train=labels.astype(np.int64), x_test=images[:256],
             y_test=labels[:256].astype(np.int64))
    return path


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


def compare_curves(torch_run: list[dict], calibration: list[dict], fused: list[dict],
                   multiple: float = MULTIPLE, point_floor: float = POINT_FLOOR, tail_floor: float = TAIL_FLOOR) -> dict:
    """The calibrated rule (module docstring) on three ``metrics.jsonl`` curves, at their common logged steps."""
    a, b, f = _losses(torch_run), _losses(calibration), _losses(fused)
    steps = sorted(set(a) & set(b) & set(f))
    if not steps:
        return {"steps": [], "passed": False, "why": "no common logged steps"}
    finite = all(math.isfinite(x[t]) for x in (a, b, f) for t in steps)
    drift = [abs(a[t] - b[t]) / max(abs(a[t]), 1e-12) for t in steps]
    gap = [abs(a[t] - f[t]) / max(abs(a[t]), 1e-12) for t in steps]
    envelope = [max(drift[:i + 1]) for i in range(len(steps))]
    allowed = [multiple * e + point_floor for e in envelope]
    worst = max(range(len(steps)), key=lambda i: gap[i] / allowed[i])
    tail = list(range(len(steps) - max(1, len(steps) // 4), len(steps)))
    ma, mf = (sum(x[steps[i]] for i in tail) / len(tail) for x in (a, f))
    tail_gap = abs(ma - mf) / max(abs(ma), 1e-12)
    tail_drift = sum(drift[i] for i in tail) / len(tail)
    tail_allowed = multiple * tail_drift + tail_floor
    points_ok = all(g <= al for g, al in zip(gap, allowed))
    tail_ok = tail_gap <= tail_allowed
    r = lambda x: round(x, 6)  # noqa: E731
    return {"steps": steps, "loss_torch": [a[t] for t in steps], "loss_torch_fp32": [b[t] for t in steps],
            "loss_fused": [f[t] for t in steps], "drift": [r(x) for x in drift], "gap": [r(x) for x in gap],
            "allowed": [r(x) for x in allowed], "max_point_rel": r(max(gap)), "max_drift": r(max(drift)),
            "worst_step": steps[worst], "worst_gap": r(gap[worst]), "worst_allowed": r(allowed[worst]),
            "last_quarter_mean_rel": r(tail_gap), "last_quarter_drift": r(tail_drift),
            "last_quarter_allowed": r(tail_allowed), "points_ok": points_ok, "tail_ok": tail_ok,
            "finite": finite, "first_loss": a[steps[0]], "last_loss": a[steps[-1]], "rule": RULE,
            "passed": finite and points_ok and tail_ok}


def verdict(d: dict) -> str:
    if not d.get("steps"):
        return d.get("why", "no curves")
    return (f"worst point step {d['worst_step']}: {100 * d['worst_gap']:.2f}% vs allowed "
            f"{100 * d['worst_allowed']:.2f}% ({MULTIPLE:g}x rounding drift + {100 * POINT_FLOOR:g}%); last quarter "
            f"{100 * d['last_quarter_mean_rel']:.2f}% vs allowed {100 * d['last_quarter_allowed']:.2f}%"
            + ("" if d["finite"] else "; NON-FINITE loss"))


def train_runs(check: Check, stage: Stage, runs: dict[str, tuple[Sequence[str], Sequence[str]]],
               common: Sequence[str], cap_s: float, concurrent: bool) -> dict[str, Optional[list[dict]]]:
    """Each run ``name: (fastsemdiff.train overrides, planted faults)`` in its own process (seed 0 unless its
    overrides set ``train.seed``; ``gpucheck.train_run``),
    writing ``check.work/train-<name>``; its metrics records, or None (the reason is in ``stage``)."""
    curves: dict[str, Optional[list[dict]]] = {}
    lock = threading.Lock()

    def one(name: str) -> None:
        overrides, faults = runs[name]
        run_dir = check.work / f"train-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [PY, "-m", "gpucheck.train_run", *(f"--fault={x}" for x in faults), "--", *common, "train.seed=0",
               *overrides, f"train.run_dir={run_dir}", "train.ckpt_every=100000", "train.progress=false"]
        sub = Stage(stage.name)
        rc, _ = check.run(sub, cmd, cap_s, check.helper_env(), min_s=20)
        metrics = run_dir / "metrics.jsonl"
        with lock:
            stage.seconds = max(stage.seconds, sub.seconds) if concurrent else stage.seconds + sub.seconds
            stage.command = (stage.command + " ; " if stage.command else "") + sub.command
            curves[name] = ([json.loads(line) for line in metrics.read_text().splitlines()]
                            if rc == 0 and metrics.exists() else None)
            if curves[name] is None and stage.status != "failed":
                stage.status, stage.reason = sub.status, f"{name}: {sub.reason}"

    if concurrent:
        threads = [threading.Thread(target=one, args=(n,)) for n in runs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    else:
        for n in runs:
            one(n)
    return curves


def run(check: Check) -> Stage:
    s = Stage(NAME)
    check.record["curve_rule"] = RULE
    data = write_images(check.work / "images.npz", 512 if check.dry_run else 8192)
    source = ["data.source=npz", f"data.path={data}"]
    if check.dry_run:  # tiny: 32 wide, 2 blocks, 16 tokens; the interpreter runs the Triton kernels (slowly)
        common = [*TINY, *source, "train.batch_size=4", "train.steps=4", "train.log_every=2", "train.warmup_steps=2"]
        fused = "model.backend=triton"
    else:  # the GPU recipe, 200 steps, eager (the compiled fused step is timed in bench-train)
        common = ["--config", "configs/gpu-fmnist-S4.yaml", *source, "train.steps=200", "train.log_every=10",
                  "train.warmup_steps=50", "train.compile=off", "train.probe_every=0"]
        fused = "model.backend=triton"  # auto picks torch on sm_90 (the 2026-12-04 record)
    runs = {"torch": (["model.backend=torch", "train.precision=bf16"], ()),
            "torch-fp32": (["model.backend=torch", "train.precision=fp32"], ()),
            "fused": ([fused, "train.precision=bf16"], ())}
    curves = train_runs(check, s, runs, common, check.box(150, 400), concurrent=True)
    if any(c is None for c in curves.values()):
        return s
    s.details = compare_curves(curves["torch"], curves["torch-fp32"], curves["fused"])
    s.details["runs"] = {k: " ".join(v[0]) for k, v in runs.items()}
    s.details["img_per_s"] = {k: round(sum(r["img_per_s"] for r in v[1:]) / max(1, len(v) - 1), 1)
                              for k, v in curves.items()}
    s.details["img_per_s_note"] = "three runs sharing the machine with the other PARALLEL stages: not a throughput"
    s.status = "passed" if s.details["passed"] else "failed"
    s.reason = verdict(s.details)
    s.details["summary_lines"] = [
        f"rule: |torch - fused| within {MULTIPLE:g}x the torch bf16-vs-fp32 drift (running max; measured up to "
        f"{100 * s.details.get('max_drift', float('nan')):.2f}%) + {100 * POINT_FLOOR:g}% per point, "
        f"{MULTIPLE:g}x + {100 * TAIL_FLOOR:g}% on the last-quarter mean"]
    return s
