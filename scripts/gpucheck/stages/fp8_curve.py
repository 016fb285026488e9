"""The FP8 loss-curve check (issue 21): ``train.fp8=rowwise`` against bf16 over 500 steps, judged against the
difference two bf16 runs of different seeds show.

Three runs of the GPU recipe's model (``configs/gpu-fmnist-S4.yaml``, DiT-S at patch 4, batch 256, eager, bf16
autocast) on generated images: ``bf16`` (seed 0: the reference), ``bf16-seed1`` (seed 1: the calibration, what a
run differing in nothing but its random draws does) and ``fp8`` (seed 0, torchao's rowwise float8 training of
the blocks' token matmuls, ``fastsemdiff.levers.fp8_filter``). FP8 passes when its curve stays as close to the
reference as another seed's does: the train-curves stage's rule (``compare_curves``) with MULTIPLE = 1 (a seed's
drift already holds every source of difference a run can have, so no room is added) and the same floors.

Needs FP8 tensor cores (compute capability 8.9+) and torchao; anywhere else the stage is skipped with the
reason. A dry run (CPU) checks the plumbing: the three runs at tiny shapes with the ``fp8`` leg in bf16 (FP8 does
not run on a CPU), the comparison, and the refusal a CPU gives ``train.fp8=rowwise`` (exit 2, a message naming
the need). Time box 180 s on the GPU; ORDER 78: the first stage dropped when the budget runs short (the full
check is ``python scripts/gpu_check.py --only install,fp8-curve``).
"""
from __future__ import annotations

import importlib.util
import subprocess

from ..runner import PY, REPO, Check, Stage
from .train_curves import POINT_FLOOR, TAIL_FLOOR, TINY, compare_curves, train_runs, write_images

NAME = "fp8-curve"
ORDER = 78
PARALLEL = False
MULTIPLE = 1.0
STEPS = 500
RULE = {"reference": "bf16 (seed 0)", "calibration": "bf16 seed 1 (differs in every random draw)",
        "candidate": "train.fp8=rowwise (seed 0)", "multiple": MULTIPLE, "point_floor": POINT_FLOOR,
        "tail_floor": TAIL_FLOOR,
        "per_point": "|bf16 - fp8| / bf16 <= multiple x max(seed drift up to that step) + point_floor",
        "last_quarter": "|mean bf16 - mean fp8| / mean bf16 <= multiple x mean(seed drift over the last quarter) "
                        "+ tail_floor",
        "drift": "|bf16 seed 0 - bf16 seed 1| / bf16 seed 0 at each logged step"}


def fp8_unavailable() -> str:
    """Why FP8 training cannot run here ('' where it can)."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU"
    cap = torch.cuda.get_device_capability()
    if cap < (8, 9):
        return f"compute capability {cap[0]}.{cap[1]} has no FP8 tensor cores (8.9+ needed)"
    if importlib.util.find_spec("torchao") is None:
        return "torchao is not installed (carry its wheel, docs/GPU_CHECK.md)"
    return ""


def cpu_refusal(check: Check, source: list[str]) -> dict:
    """``train.fp8=rowwise`` on this CPU: it must exit 2 with one error line naming FP8 tensor cores."""
    cmd = [PY, "-m", "fastsemdiff.train", *TINY, *source, "train.steps=1", "train.fp8=rowwise",
           f"train.run_dir={check.work / 'train-fp8-refused'}", "train.progress=false"]
    p = subprocess.run(cmd, cwd=REPO, env=check.child_env(interpret=False), capture_output=True, text=True,
                       timeout=120)
    lines = [x for x in p.stderr.splitlines() if "error" in x.lower()]
    return {"command": " ".join(cmd), "exit_code": p.returncode, "error": lines[-1] if lines else p.stderr[-300:],
            "clear": p.returncode == 2 and "Traceback" not in p.stderr and "FP8 tensor cores" in p.stderr}


def run(check: Check) -> Stage:
    s = Stage(NAME)
    check.record["fp8_curve_rule"] = RULE
    why = "" if check.dry_run else fp8_unavailable()
    if why:
        s.status, s.reason = "skipped", f"FP8 training cannot run here: {why}"
        return s
    data = write_images(check.work / "images-fp8.npz", 512 if check.dry_run else 8192, seed=1)
    source = ["data.source=npz", f"data.path={data}"]
    if check.dry_run:
        common = [*TINY, *source, "train.batch_size=4", "train.steps=4", "train.log_every=2", "train.warmup_steps=2"]
        fp8 = []  # FP8 does not run on a CPU: the leg runs in bf16 (plumbing only)
    else:
        common = ["--config", "configs/gpu-fmnist-S4.yaml", *source, f"train.steps={STEPS}", "train.log_every=25",
                  "train.batch_size=256", "train.warmup_steps=50", "train.compile=off", "train.probe_every=0"]
        fp8 = ["train.fp8=rowwise"]
    runs = {"bf16": (["train.precision=bf16"], ()),
            "bf16-seed1": (["train.precision=bf16", "train.seed=1"], ()),
            "fp8": (["train.precision=bf16", *fp8], ())}
    curves = train_runs(check, s, runs, common, check.box(180, 400), concurrent=True)
    if any(c is None for c in curves.values()):
        return s
    d = compare_curves(curves["bf16"], curves["bf16-seed1"], curves["fp8"], multiple=MULTIPLE)
    d["loss_bf16"], d["loss_bf16_seed1"], d["loss_fp8"] = d.pop("loss_torch"), d.pop("loss_torch_fp32"), d.pop("loss_fused")
    d["rule"], d["runs"] = RULE, {k: " ".join(v[0]) for k, v in runs.items()}
    d["img_per_s"] = {k: round(sum(r["img_per_s"] for r in v[1:]) / max(1, len(v) - 1), 1) for k, v in curves.items()}
    d["img_per_s_note"] = "three runs sharing one device, eager: not a throughput (switch-matrix times fp8)"
    passed = d["passed"]
    if check.dry_run:
        d["note"] = "dry run: the fp8 leg ran in bf16 (FP8 needs compute capability 8.9+); plumbing only"
        d["cpu_refusal"] = cpu_refusal(check, source)
        passed = passed and d["cpu_refusal"]["clear"]
    s.details = d
    s.status = "passed" if passed else "failed"
    s.reason = (f"worst point step {d['worst_step']}: {100 * d['worst_gap']:.2f}% vs allowed "
                f"{100 * d['worst_allowed']:.2f}% (the bf16 seed-to-seed drift + {100 * POINT_FLOOR:g}%); last quarter "
                f"{100 * d['last_quarter_mean_rel']:.2f}% vs allowed {100 * d['last_quarter_allowed']:.2f}%"
                + ("" if d["finite"] else "; NON-FINITE loss")
                + ("; CPU refusal of train.fp8 not clear" if check.dry_run and not d["cpu_refusal"]["clear"] else ""))
    return s
