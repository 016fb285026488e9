"""Two short training runs from the same seed, ``model.backend=torch`` and the fused backend (``auto`` on the GPU,
``triton`` under the interpreter in a dry run), on generated images; their loss curves must agree within
``CURVE_TOLERANCE`` (stated in the JSON and the summary). The fused step is timed in bench-train, not here."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from ..runner import PY, Check, Stage

NAME = "train-curves"
ORDER = 32
PARALLEL = True
# Loss curves of backend=torch and the fused backend from the same seed: each logged loss (the mean over
# log_every steps) within 5% of the other's, and the mean over the last quarter of the steps within 2%.
CURVE_TOLERANCE = {"per_point_rel": 0.05, "last_quarter_mean_rel": 0.02}


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


def compare_curves(a: list[dict], b: list[dict]) -> dict:
    """Relative differences of two loss curves (``metrics.jsonl`` records) at their common steps."""
    la, lb = {r["step"]: r["loss"] for r in a}, {r["step"]: r["loss"] for r in b}
    steps = sorted(set(la) & set(lb))
    if not steps:
        return {"steps": [], "passed": False, "why": "no common logged steps"}
    rel = [abs(la[t] - lb[t]) / max(abs(la[t]), 1e-12) for t in steps]
    tail = steps[-max(1, len(steps) // 4):]
    ma, mb = sum(la[t] for t in tail) / len(tail), sum(lb[t] for t in tail) / len(tail)
    tail_rel = abs(ma - mb) / max(abs(ma), 1e-12)
    finite = all(math.isfinite(la[t]) and math.isfinite(lb[t]) for t in steps)
    ok = (finite and max(rel) <= CURVE_TOLERANCE["per_point_rel"]
          and tail_rel <= CURVE_TOLERANCE["last_quarter_mean_rel"])
    return {"steps": steps, "loss_torch": [la[t] for t in steps], "loss_fused": [lb[t] for t in steps],
            "max_point_rel": round(max(rel), 5), "last_quarter_mean_rel": round(tail_rel, 5),
            "first_loss": la[steps[0]], "last_loss": la[steps[-1]], "tolerance": CURVE_TOLERANCE, "passed": ok}


def run(check: Check) -> Stage:
    s = Stage(NAME)
    check.record["curve_tolerance"] = CURVE_TOLERANCE
    data = write_images(check.work / "images.npz", 512 if check.dry_run else 8192)
    if check.dry_run:  # tiny: 32 wide, 2 blocks, 16 tokens; the interpreter runs the Triton kernels
        common = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16",
                  "train.batch_size=4", "train.steps=4", "train.log_every=2", "train.threads=1",
                  "train.warmup_steps=2"]
        backends = {"torch": "model.backend=torch", "fused": "model.backend=triton"}
    else:  # the GPU recipe, 200 steps, eager (the compiled fused step is timed in bench-train)
        common = ["--config", "configs/gpu-fmnist-S4.yaml", "train.steps=200", "train.log_every=10",
                  "train.warmup_steps=50", "train.compile=off", "train.probe_every=0"]
        backends = {"torch": "model.backend=torch", "fused": "model.backend=auto"}
    curves = {}
    for name, backend in backends.items():
        run_dir = check.work / f"train-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [PY, "-m", "fastsemdiff.train", *common, backend, "data.source=npz", f"data.path={data}",
               f"train.run_dir={run_dir}", "train.ckpt_every=100000", "train.progress=false", "train.seed=0"]
        sub = Stage(s.name)
        rc, _ = check.run(sub, cmd, check.box(150, 400), min_s=20)
        s.seconds += sub.seconds
        s.command = (s.command + " ; " if s.command else "") + sub.command
        if rc != 0:
            s.status, s.reason = sub.status, f"{backend}: {sub.reason}"
            return s
        curves[name] = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    s.details = compare_curves(curves["torch"], curves["fused"])
    s.details["backends"] = backends
    s.details["img_per_s"] = {k: round(sum(r["img_per_s"] for r in v[1:]) / max(1, len(v) - 1), 1)
                              for k, v in curves.items()}
    s.status = "passed" if s.details["passed"] else "failed"
    s.reason = (f"max logged-loss difference {100 * s.details.get('max_point_rel', float('nan')):.2f}% "
                f"(allowed {100 * CURVE_TOLERANCE['per_point_rel']:.0f}%), last-quarter mean "
                f"{100 * s.details.get('last_quarter_mean_rel', float('nan')):.2f}% "
                f"(allowed {100 * CURVE_TOLERANCE['last_quarter_mean_rel']:.0f}%)")
    return s
