"""Python, torch, Triton, CUDA, the GPU and its architecture: the facts every later stage reads (check.env)."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import time
from pathlib import Path

from ..runner import REPO, Check, Stage

NAME = "environment"
ORDER = 0


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def cuda_tool(name: str) -> str | None:
    """A CUDA toolkit program on PATH or in /usr/local/cuda/bin (the GPU image's place), else None."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path("/usr/local/cuda/bin") / name
    return str(candidate) if candidate.exists() else None


def run(check: Check) -> Stage:
    s = Stage(NAME)
    t0 = time.monotonic()
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda or "none",
           "triton": version("triton"), "diffusers": version("diffusers"), "pytest_xdist": version("pytest-xdist"),
           "cpus": os.cpu_count(), "gpu": None, "capability": None, "arch_list": None,
           "nvcc": cuda_tool("nvcc"), "compute_sanitizer": cuda_tool("compute-sanitizer")}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        env.update(gpu=torch.cuda.get_device_name(), capability=f"{major}.{minor}", arch_list=f"{major}.{minor}")
    try:
        env["commit"] = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        env["commit"] = "unknown"
    check.env = env
    s.details = env
    s.seconds = time.monotonic() - t0
    if check.dry_run:
        s.status, s.reason = "passed", "dry run on the CPU" + (" (a GPU is present but not used)" if env["gpu"] else "")
    elif env["gpu"] is None:
        s.status, s.reason = "failed", "no CUDA device is visible to torch: run with --dry-run, or on the GPU machine"
    else:
        s.status = "passed"
    check.write_log(s.name, "(in process)", json.dumps(env, indent=1))
    return s
