"""The prepared GPU check: install, CUDA correctness and the benchmarks in one time-boxed command.

    python scripts/gpu_check.py --out DIR             # on a machine with one NVIDIA GPU, ~8 minutes
    python scripts/gpu_check.py --dry-run --out DIR   # every stage on the CPU at tiny shapes, ~2-3 minutes

Stages, each a subprocess with a time limit (one that fails or runs out of time is reported, and the next
still runs; what was not measured says why):

1. ``environment``: Python, torch, Triton, CUDA, the GPU and its architecture.
2. ``install``: ``pip install --no-index --no-build-isolation --no-deps -e .`` (no network; the extension is
   left to the next stage), then ``build-cuda`` starts in the background: ``setup.py build_ext --inplace``
   with ``TORCH_CUDA_ARCH_LIST`` set to the local GPU's capability only. Stages 3 to 5 time nothing, so they
   run side by side while it builds; the benchmarks run alone.
3. ``kernel-tests``: ``tests/test_kernel_*.py`` and ``tests/test_fused_check.py`` on the GPU, compiled (no
   ``TRITON_INTERPRET``: ``tests/conftest.py`` picks CUDA tensors when a GPU is present).
4. ``model-check``: the whole model (``SemanticDiffusion``, S preset, bf16 autocast) fused (``triton``) against
   torch: loss and every gradient, against an fp32 run of the reference, by the accuracy rule of the kernel
   tests (the fused error at most twice the torch-bf16 error plus a floor); every first-use check must pass.
5. ``train-curves``: 200 steps of the S preset (configs/gpu-fmnist-S4.yaml on generated images) with
   ``model.backend=torch`` and with ``triton`` from the same seed; the loss curves must agree within
   ``CURVE_TOLERANCE`` (stated in the JSON and the summary).
6. ``csrc-tests``: waits for the build, then ``tests/test_csrc_cuda.py`` and ``tests/test_csrc_build.py``.
7. ``bench-adaln``: ``bench/test_bench_adaln.py`` at [256, 256, 1152] bf16 (and fwd+bwd at the small end,
   batch 8 and 32 of 256 tokens; the copy ceiling case) and ``bench/test_bench_timestep_embedding.py`` at
   t [256] x 256: eager, compiled, triton, cuda, call time and kernel time (the rows that
   ``fastsemdiff.ops.dispatch.AUTO_MEASURED`` is filled from).
8. ``bench-train-XL2`` / ``-B2`` / ``-S2``: ``bench/test_bench_train.py``'s DiT step (reference eager,
   reference compiled, fused; diffusers' DiT where importable), one process per size, largest first (the
   SPEC's targets), so that a budget running out costs the smallest.
9. ``report``: the benchmark JSONs merged into one, ``bench/report.py``'s markdown tables.

Written to DIR (at most 8 files, for the device tool): ``gpu_check.json`` (everything), ``bench.json`` (the
merged pytest-benchmark JSON), ``tables.md``, ``summary.txt`` (one screen, also printed last) and
``logs.txt`` (every stage's output). Scratch (training runs, per-stage JSONs) goes to ``--work``.
``--dry-run`` runs every stage on the CPU: the install as ``pip install --dry-run``, no CUDA build, the
kernels under the Triton interpreter (a slice of the kernel tests: CI runs them all), a tiny model, 4 training
steps, the CPU benchmark cases for two rounds with torch.compile off (``TORCHDYNAMO_DISABLE=1``: compiling on
two CPU cores takes minutes; CI's tests cover the compiled paths). It proves the plumbing, not the figures.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
BUDGET_S = 480  # the whole check on a GPU: 8 minutes of wall time
DRY_BUDGET_S = 1800  # a dry run's upper bound (about 2 minutes on an idle 2-core CPU; far more on a loaded one)
# Loss curves of backend=torch and backend=triton from the same seed: each logged loss (the mean over
# log_every steps) within 5% of the other's, and the mean over the last quarter of the steps within 2%.
CURVE_TOLERANCE = {"per_point_rel": 0.05, "last_quarter_mean_rel": 0.02}
GRAD_FLOOR = 1e-3  # model check: allowed gradient error (relative) = 2 x the torch-bf16 error + this
LOSS_FLOOR = 5e-3  # model check: allowed loss error (relative) = 2 x the torch-bf16 error + this
# bench-adaln's selection (-k): on the GPU, mln and grmln in every direction at the target shape, the modulated
# RMSNorm (mrms, against the peers' fused one) in fwd+bwd there, fwd+bwd at the small end, the copy ceiling and
# the timestep embedding's target; in a dry run one CPU case and the copy case.
GPU_ADALN = "(target and (forward_backward or not mrms)) or (small and forward_backward and not mrms) or copy_ceiling"
DRY_ADALN = "(cpu and mln and forward and not backward and not grmln and not compile) or copy_ceiling"


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    reason: str = ""
    command: str = ""
    details: dict = field(default_factory=dict)


class Check:
    """The stages' shared state: time left, the log, the results."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget_s: float):
        self.out, self.work, self.dry_run = out, work, dry_run
        self.start, self.budget_s = time.monotonic(), budget_s
        self.stages: list[Stage] = []
        self.log = open(out / "logs.txt", "w")
        self.log_lock = threading.Lock()
        self.env: dict = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def box(self, gpu_s: float, dry_s: float) -> float:
        """A stage's time box: on the GPU tight (the 8 minutes), in a dry run loose (a shared CPU can be slow; an
        idle 2-core machine needs about 2 minutes of CPU time for the whole dry run)."""
        return dry_s if self.dry_run else gpu_s

    def child_env(self, interpret: Optional[bool] = None, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:  # tiny ops on a shared CPU: one intra-op thread avoids OpenMP's oversubscription stalls
            env["OMP_NUM_THREADS"] = "1"
        if interpret if interpret is not None else self.dry_run:
            env["TRITON_INTERPRET"] = "1"
        env.update(extra)
        return env

    def write_log(self, name: str, command: str, text: str) -> None:
        with self.log_lock:
            self.log.write(f"\n===== {name}: {command}\n{text}\n")
            self.log.flush()

    def run(self, stage: Stage, cmd: list[str], cap_s: float, env: Optional[dict] = None,
            min_s: float = 10) -> tuple[Optional[int], str]:
        """Run ``cmd`` for ``stage`` within min(cap, time left); returns (exit code or None on timeout, output)."""
        stage.command = " ".join(cmd)
        timeout = min(cap_s, self.left())
        if timeout < min_s:
            stage.status, stage.reason = "skipped", f"the {self.budget_s:.0f} s budget was spent before it"
            return None, ""
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env or self.child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=timeout)
            rc: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            _kill(proc)
            output, _ = proc.communicate()
            rc = None
        stage.seconds += time.monotonic() - t0
        self.write_log(stage.name, stage.command, output or "")
        if rc is None:
            stage.status, stage.reason = "timed out", f"stopped after {timeout:.0f} s (its time box)"
        elif rc != 0 and stage.status != "failed":
            stage.status, stage.reason = "failed", f"exit code {rc}: {_last_lines(output)}"
        return rc, output or ""


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-400:]


def _pytest_counts(output: str) -> dict:
    """passed/failed/skipped/... from pytest's last summary line."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)", line)
        if found:
            for n, what in found:
                counts[what.rstrip("s") if what.startswith(("error", "warning")) else what] = int(n)
            break
    return counts


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


# ---------------------------------------------------------------------------------------------- stages
def stage_environment(c: Check) -> Stage:
    s = Stage("environment")
    t0 = time.monotonic()
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "triton": _version("triton"), "diffusers": _version("diffusers"), "pytest_xdist": _version("pytest-xdist"),
           "cpus": os.cpu_count(), "gpu": None, "capability": None, "arch_list": None,
           "nvcc": shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists()
                                            else None)}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}", arch_list=f"{major}.{minor}")
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    c.env = env
    s.details = env
    s.seconds = time.monotonic() - t0
    if c.dry_run:
        s.status, s.reason = "passed", "dry run on the CPU" + (" (a GPU is present but not used)" if env["gpu"] else "")
    elif env["gpu"] is None:
        s.status, s.reason = "failed", "no CUDA device is visible to torch: run with --dry-run, or on the GPU machine"
    else:
        s.status = "passed"
    c.write_log(s.name, "(in process)", json.dumps(env, indent=1))
    return s


def stage_install(c: Check) -> Stage:
    s = Stage("install")
    cmd = [PY, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "--disable-pip-version-check",
           *(["--dry-run"] if c.dry_run else []), "-e", "."]
    rc, out = c.run(s, cmd, c.box(150, 400), c.child_env(FASTSEMDIFF_BUILD_CUDA="0"))
    if rc == 0:
        probe = [PY, "-c", "import fastsemdiff, fastsemdiff.ops, importlib.util as u; "
                           "assert u.find_spec('fastsemdiff.kernels'), 'fastsemdiff.kernels is not importable'; "
                           "print('fastsemdiff', fastsemdiff.__version__, 'from', fastsemdiff.__file__)"]
        rc, out = c.run(s, probe, c.box(60, 200))
    if rc == 0:
        s.status = "passed"
        s.reason = ("pip --dry-run (nothing changed); the package imports" if c.dry_run
                    else "installed editable with no network; the package imports")
    return s


def start_build(c: Check) -> tuple[Stage, Optional[subprocess.Popen], float]:
    """Start the CUDA extension's build for the local architecture in the background."""
    s = Stage("build-cuda")
    if c.dry_run or not c.env.get("arch_list"):
        s.status = "skipped"
        s.reason = ("dry run: no GPU, so no local architecture to build for (tests/test_csrc_build.py covers the "
                    "build in CI where nvcc exists)" if c.dry_run else "no GPU: no local architecture")
        return s, None, 0.0
    if not c.env.get("nvcc"):
        s.status, s.reason = "failed", "no nvcc (set CUDA_HOME or put nvcc on PATH)"
        return s, None, 0.0
    env = c.child_env(FASTSEMDIFF_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=c.env["arch_list"],
                      MAX_JOBS=str(os.cpu_count() or 4))
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    s.command = f"TORCH_CUDA_ARCH_LIST={c.env['arch_list']} FASTSEMDIFF_BUILD_CUDA=1 " + " ".join(cmd)
    log = open(c.work / "build-cuda.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    return s, proc, time.monotonic()


def finish_build(c: Check, s: Stage, proc: Optional[subprocess.Popen], started: float, cap_s: float = 300) -> None:
    if proc is None:
        return
    try:
        rc = proc.wait(timeout=max(1.0, min(cap_s - (time.monotonic() - started), c.left())))
    except subprocess.TimeoutExpired:
        _kill(proc)
        proc.wait()
        rc = None
    s.seconds = time.monotonic() - started
    log = (c.work / "build-cuda.log").read_text()
    c.write_log(s.name, s.command, log)
    if rc is None:
        s.status, s.reason = "timed out", f"stopped after {s.seconds:.0f} s"
        return
    if rc != 0:
        s.status, s.reason = "failed", f"exit code {rc}: {_last_lines(log)}"
        return
    probe = [PY, "-c", "from fastsemdiff.ops import _cuda; import sys; print(_cuda.unavailable_reason() or 'loads'); "
                       "sys.exit(0 if _cuda.available() else 1)"]
    rc, out = c.run(s, probe, 60, min_s=1)
    if rc == 0:
        s.status, s.reason = "passed", f"fastsemdiff._C built for sm_{c.env['arch_list'].replace('.', '')} and loads"
    s.details["built_in_s"] = round(s.seconds, 1)


def pytest_stage(c: Check, name: str, args: list[str], cap_s: float, interpret: Optional[bool] = None,
                 parallel: bool = False, quick: bool = False, min_s: float = 10) -> Stage:
    s = Stage(name)
    cmd = [PY, "-m", "pytest", *args, "-q", "-rfEs", "-p", "no:cacheprovider"]
    if parallel and not c.dry_run and importlib.util.find_spec("xdist") is not None:
        cmd += ["-n", str(min(8, max(2, (os.cpu_count() or 4) // 2)))]
    # quick (dry-run benchmarks): two rounds, and torch.compile off (TORCHDYNAMO_DISABLE): a CPU compile of
    # the models costs minutes on two cores, and no figure of a dry run means anything anyway
    extra = {"FASTSEMDIFF_BENCH_QUICK": "1", "TORCHDYNAMO_DISABLE": "1"} if quick else {}
    rc, out = c.run(s, cmd, cap_s, c.child_env(interpret, **extra), min_s=min_s)
    s.details["counts"] = _pytest_counts(out)
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if failures:
        s.details["failures"] = failures[:20]
    if rc == 0:
        s.status = "passed"
        n = s.details["counts"]
        s.reason = ", ".join(f"{v} {k}" for k, v in n.items())
        if not c.dry_run and n.get("skipped") and not n.get("passed"):
            s.status, s.reason = "failed", "every test skipped: " + _last_lines(
                "\n".join(line for line in out.splitlines() if "SKIP" in line))
    elif rc == 5:
        s.status, s.reason = "failed", "no tests were collected"
    return s


def stage_model_check(c: Check) -> Stage:
    s = Stage("model-check")
    result = c.work / "model-check.json"
    cmd = [PY, str(Path(__file__).resolve()), "--stage", "model-check", "--result", str(result),
           *(["--dry-run"] if c.dry_run else [])]
    rc, _ = c.run(s, cmd, c.box(120, 500))
    if result.exists():
        s.details = json.loads(result.read_text())
    if rc == 0:
        s.status, s.reason = "passed", s.details.get("verdict", "")
    elif rc is not None and s.details.get("verdict"):
        s.reason = s.details["verdict"]
    return s


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


def stage_train_curves(c: Check) -> Stage:
    s = Stage("train-curves")
    data = write_images(c.work / "images.npz", 512 if c.dry_run else 8192)
    if c.dry_run:  # tiny: 32 wide, 2 blocks, 16 tokens; the interpreter runs the Triton kernels
        common = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16",
                  "train.batch_size=4", "train.steps=4", "train.log_every=2", "train.threads=1",
                  "train.warmup_steps=2"]
        backends = {"torch": "model.backend=torch", "fused": "model.backend=triton"}
    else:  # the GPU recipe, 200 steps, eager (the compiled fused step is timed in bench-train)
        common = ["--config", "configs/gpu-fmnist-S4.yaml", "train.steps=200", "train.log_every=10",
                  "train.warmup_steps=50", "train.compile=off", "train.probe_every=0"]
        backends = {"torch": "model.backend=torch", "fused": "model.backend=triton"}  # auto: torch on sm_90
    curves = {}
    for name, backend in backends.items():
        run_dir = c.work / f"train-{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [PY, "-m", "fastsemdiff.train", *common, backend, "data.source=npz", f"data.path={data}",
               f"train.run_dir={run_dir}", "train.ckpt_every=100000", "train.progress=false", "train.seed=0"]
        sub = Stage(s.name)
        rc, out = c.run(sub, cmd, c.box(150, 400), min_s=20)
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


def bench_stage(c: Check, name: str, args: list[str], cap_s: float, json_path: Path) -> Stage:
    s = pytest_stage(c, name, [*args, "--benchmark-only", f"--benchmark-json={json_path}", "-s"], cap_s,
                     interpret=False, quick=c.dry_run, min_s=10 if c.dry_run else 45)
    if json_path.exists():
        data = json.loads(json_path.read_text())
        s.details["records"] = len(data.get("benchmarks", []))
    elif s.status == "passed":
        s.status, s.reason = "failed", "no benchmark JSON was written"
    return s


def merge_bench(paths: list[Path], out: Path) -> Optional[dict]:
    merged = None
    for p in paths:
        if not p.exists():
            continue
        data = json.loads(p.read_text())
        if merged is None:
            merged = data
        else:
            merged["benchmarks"].extend(data.get("benchmarks", []))
    if merged is not None:
        out.write_text(json.dumps(merged, indent=1))
    return merged


def stage_report(c: Check, merged: Optional[dict], command: str) -> Stage:
    s = Stage("report")
    if not merged or not merged.get("benchmarks"):
        s.status, s.reason = "skipped", "no benchmark records to report (see the bench stages)"
        return s
    rc, _ = c.run(s, [PY, "bench/report.py", str(c.out / "bench.json"), "-o", str(c.out / "tables.md"),
                      "--command", command], c.box(60, 200), min_s=1)
    if rc == 0:
        s.status, s.reason = "passed", f"{len(merged['benchmarks'])} records -> tables.md"
    return s


# ------------------------------------------------------------------------------------- the model check
def model_check(dry_run: bool) -> dict:
    """Loss and gradients of the fused model against the reference (run in a subprocess by --stage)."""
    import torch

    from fastsemdiff.config import load_config
    from fastsemdiff.models import SemanticDiffusion
    from fastsemdiff.ops import guard

    if dry_run:
        device, sizes, batch = torch.device("cpu"), ["model.hidden_size=32", "model.depth=2", "model.num_heads=2",
                                                     "encoder.dim=16"], 4
        fused, data = "triton", ["data.image_size=28", "data.channels=1", "model.patch_size=7"]
        guard.CHECKED_DEVICE_TYPES = ("cuda", "cpu")  # the interpreter's kernels are checked too
    else:
        device, sizes, batch = torch.device("cuda"), ["model.preset=S"], 32
        # the kernels by name: ``auto`` runs torch where the record has torch.compile ahead (bench/RESULTS.md)
        fused, data = "triton", ["data.image_size=32", "data.channels=4", "model.patch_size=2"]
    gen = torch.Generator().manual_seed(0)
    x0 = (torch.rand(batch, *([1, 28, 28] if dry_run else [4, 32, 32]), generator=gen) * 2 - 1).to(device)

    def run(backend: str, bf16: bool) -> tuple[float, dict]:
        torch.manual_seed(0)
        cfg = load_config(None, [*sizes, *data, f"model.backend={backend}", "model.fused_check=error"])
        model = SemanticDiffusion(cfg).to(device)
        with torch.no_grad():  # away from adaLN-Zero's zeros, so every gradient is non-trivial
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(device) * 0.02)
        ctx = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else torch.autocast(device.type,
                                                                                              enabled=False)
        with ctx:
            loss, _ = model(x0, torch.Generator(device).manual_seed(1))
        loss.backward()
        return loss.item(), {n: p.grad.detach().double() for n, p in model.named_parameters() if p.grad is not None}

    ref_loss, ref_grads = run("torch", False)
    t_loss, t_grads = run("torch", True)
    f_loss, f_grads = run(fused, True)

    def rel(grads: dict) -> tuple[float, dict]:
        per = {n: ((g - ref_grads[n]).norm() / ref_grads[n].norm().clamp_min(1e-30)).item() for n, g in grads.items()}
        total = (sum(((g - ref_grads[n]) ** 2).sum() for n, g in grads.items()) ** 0.5
                 / sum((g ** 2).sum() for g in ref_grads.values()) ** 0.5).item()
        return total, per

    t_total, t_per = rel(t_grads)
    f_total, f_per = rel(f_grads)
    worst = max(f_per, key=lambda n: f_per[n] / (2 * t_per[n] + GRAD_FLOOR))
    loss_ok = abs(f_loss - ref_loss) <= 2 * abs(t_loss - ref_loss) + LOSS_FLOOR * abs(ref_loss)
    grads_ok = set(f_grads) == set(ref_grads) and f_total <= 2 * t_total + GRAD_FLOOR
    verdicts = guard.verdicts()
    checks_ok = all(v is None for v in verdicts.values()) and (dry_run or len(verdicts) > 0)
    passed = loss_ok and grads_ok and checks_ok and math.isfinite(f_loss)
    verdict = (f"loss {f_loss:.6f} vs fp32 {ref_loss:.6f} (torch bf16 {t_loss:.6f}); gradient rel. error "
               f"{f_total:.2e} vs torch bf16 {t_total:.2e} (allowed {2 * t_total + GRAD_FLOOR:.2e}); "
               f"{len(verdicts)} first-use checks, {sum(v is not None for v in verdicts.values())} failed")
    return {"passed": passed, "verdict": verdict, "fused_backend": fused, "batch": batch,
            "loss": {"fp32_torch": ref_loss, "bf16_torch": t_loss, "bf16_fused": f_loss, "ok": loss_ok},
            "grad_rel_error": {"bf16_torch": t_total, "bf16_fused": f_total, "ok": grads_ok,
                               "worst_param": worst, "worst_fused": f_per[worst], "worst_torch": t_per[worst],
                               "params": len(f_grads)},
            "first_use_checks": {str(k): v for k, v in verdicts.items()}, "checks_ok": checks_ok}


# ---------------------------------------------------------------------------------------------- summary
def bench_lines(merged: Optional[dict]) -> list[str]:
    if not merged:
        return []
    groups: dict[str, dict[str, dict]] = {}
    for b in merged.get("benchmarks", []):
        info = b.get("extra_info", {})
        rows = (info["interleaved"].items() if "interleaved" in info
                else [(info.get("impl", b["name"]), info)])
        for impl, v in rows:
            us = v.get("us_per_call") or (v["ms"] * 1e3 if "ms" in v else None)
            groups.setdefault(b.get("group") or b["name"], {})[impl] = {"us": us, "img_s": v.get("images_per_s"),
                                                                         "mfu": v.get("mfu_pct")}
    lines = []
    for group, impls in groups.items():
        base = impls.get("torch_eager", {}).get("us")
        cells = []
        for impl, v in impls.items():
            if v["us"] is None:
                continue
            cell = f"{impl} {v['us'] / 1e3:.2f} ms" if v["us"] >= 1000 else f"{impl} {v['us']:.1f} us"
            if v["img_s"]:
                cell += f" {v['img_s']:.0f} img/s"
            if v["mfu"]:
                cell += f" MFU {v['mfu']:.0f}%"
            if base and impl != "torch_eager":
                cell += f" ({base / v['us']:.2f}x eager)"
            cells.append(cell)
        lines.append(f"  {group}: " + "; ".join(cells))
    return lines


def summary(c: Check, merged: Optional[dict], wall: float) -> str:
    e = c.env
    head = (f"fastsemdiff GPU check{' (DRY RUN on the CPU)' if c.dry_run else ''}: {e.get('gpu') or 'cpu'}"
            f"{' sm_' + e['arch_list'].replace('.', '') if e.get('arch_list') else ''}, torch {e.get('torch')}, "
            f"triton {e.get('triton')}, python {e.get('python')}, commit {e.get('commit')}; "
            f"{wall:.0f} s of {c.budget_s:.0f} s")
    lines = [head]
    for s in c.stages:
        lines.append(f"  {s.status.upper():<9} {s.name:<16} {s.seconds:6.1f} s  {s.reason}"[:160])
    bl = bench_lines(merged)
    if bl:
        lines.append("benchmarks (median per call / step; ratios vs the reference eager in the same run)"
                     + (": DRY RUN, torch.compile off, two rounds on a CPU: these figures mean nothing" if c.dry_run
                        else ":"))
        lines += [line[:200] for line in bl]
    failed = [s.name for s in c.stages if s.status not in ("passed", "skipped")]
    lines.append("RESULT: " + ("all stages passed" if not failed else "not passed: " + ", ".join(failed)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for gpu_check.json, bench.json, tables.md, summary.txt, logs.txt")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes")
    p.add_argument("--budget", type=float, default=None, help=f"seconds for the whole check (default {BUDGET_S}; "
                                                               f"dry run {DRY_BUDGET_S})")
    p.add_argument("--stage", help=argparse.SUPPRESS)  # internal: one stage in this subprocess
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.stage == "model-check":
        try:
            res = model_check(args.dry_run)
        except Exception as e:  # reported, not hidden: the stage fails with the reason
            res = {"passed": False, "verdict": f"{type(e).__name__}: {e}"}
        args.result.write_text(json.dumps(res, indent=1, default=str))
        print(res["verdict"])
        return 0 if res["passed"] else 1
    if args.out is None:
        p.error("--out DIR is required")

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="fastsemdiff-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    c = Check(out, work, args.dry_run, args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S))
    dry = args.dry_run
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    c.stages.append(stage_environment(c))
    c.stages.append(stage_install(c))
    build, build_proc, build_t0 = start_build(c)
    c.stages.append(build)

    kernel_args = ([f"tests/{n}" for n in ("test_kernel_modulated_layer_norm.py", "test_kernel_gated_residual_norm.py",
                                           "test_kernel_timestep_embedding.py", "test_kernel_dit_block.py",
                                           "test_fused_check.py")])
    if dry:  # a slice of each module under the interpreter (the whole set runs in CI's pytest)
        kernel_args += ["-k", "BC-plain-torch.float32 or backends_agree or dit_block_triton_equals_torch or "
                              "warn_falls_back"]
    # The correctness stages time nothing, so they share the machine (and the CUDA build's wait).
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(pytest_stage, c, "kernel-tests", kernel_args, c.box(200, 500), None, True),
                   pool.submit(stage_model_check, c), pool.submit(stage_train_curves, c)]
        c.stages += [f.result() for f in futures]
    finish_build(c, build, build_proc, build_t0)
    c.stages.append(pytest_stage(c, "csrc-tests", ["tests/test_csrc_cuda.py", "tests/test_csrc_build.py"],
                                 c.box(90, 300), interpret=False))

    jsons = []
    adaln = work / "bench-adaln.json"
    jsons.append(adaln)
    c.stages.append(bench_stage(c, "bench-adaln", ["bench/test_bench_adaln.py",
                                                   "bench/test_bench_timestep_embedding.py", "-k",
                                                   DRY_ADALN if dry else GPU_ADALN], c.box(120, 300), adaln))
    sizes = ["tiny"] if dry else ["XL2", "B2", "S2"]  # the SPEC's targets first, should time run out
    for size in sizes:
        path = work / f"bench-train-{size}.json"
        jsons.append(path)
        k = "cpu_interleaved and dit" if dry else f"dit-{size}-"
        c.stages.append(bench_stage(c, f"bench-train-{size}", ["bench/test_bench_train.py", "-k", k],
                                    c.box(130, 500), path))
    merged = merge_bench(jsons, out / "bench.json")
    c.stages.append(stage_report(c, merged, "python scripts/gpu_check.py" + (" --dry-run" if dry else "")))

    wall = time.monotonic() - c.start
    not_measured = [{"what": s.name, "why": f"{s.status}: {s.reason}"} for s in c.stages
                    if s.status not in ("passed",)]
    if not dry:
        not_measured.append({"what": "bench-train joint step (encoder + denoiser)", "why": "outside the 8-minute "
                             "budget: pytest bench/test_bench_train.py --benchmark-only -k joint"})
    record = {"tool": "scripts/gpu_check.py", "dry_run": dry, "started": started, "wall_s": round(wall, 1),
              "budget_s": c.budget_s, "environment": c.env, "curve_tolerance": CURVE_TOLERANCE,
              "grad_floor": GRAD_FLOOR, "loss_floor": LOSS_FLOOR, "stages": [asdict(s) for s in c.stages],
              "not_measured": not_measured,
              "passed": all(s.status in ("passed", "skipped") for s in c.stages),
              "files": {"bench": "bench.json" if merged else None,
                        "tables": "tables.md" if (out / "tables.md").exists() else None,
                        "summary": "summary.txt", "logs": "logs.txt"}}
    (out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
    text = summary(c, merged, wall)
    (out / "summary.txt").write_text(text + "\n")
    c.log.close()
    print(text, flush=True)
    return 0 if record["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
