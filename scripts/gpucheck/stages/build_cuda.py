"""The CUDA extension (``setup.py build_ext --inplace``) for the local GPU's architecture only, built in the
background while the correctness stages (which time nothing) run; csrc-tests waits for it (``wait``)."""
from __future__ import annotations

import os
import subprocess
import time
from typing import Optional

from ..runner import PY, REPO, Check, Stage, kill, last_lines

NAME = "build-cuda"
ORDER = 20
CAP_S = 300  # the build's own time box, counted from its start


class Build:
    """The build process of one check, finished once (by csrc-tests or at the end of the run)."""

    def __init__(self, stage: Stage, proc: Optional[subprocess.Popen], started: float):
        self.stage, self.proc, self.started, self.done = stage, proc, started, proc is None


def run(check: Check) -> Stage:
    s = Stage(NAME)
    if check.dry_run or not check.env.get("arch_list"):
        s.status = "skipped"
        s.reason = ("dry run: no GPU, so no local architecture to build for (tests/test_csrc_build.py covers the "
                    "build in CI where nvcc exists)" if check.dry_run else "no GPU: no local architecture")
        return s
    if not check.env.get("nvcc"):
        s.status, s.reason = "failed", "no nvcc (set CUDA_HOME or put nvcc on PATH)"
        return s
    env = check.child_env(FASTSEMDIFF_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST=check.env["arch_list"],
                          MAX_JOBS=str(os.cpu_count() or 4))
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    s.command = f"TORCH_CUDA_ARCH_LIST={check.env['arch_list']} FASTSEMDIFF_BUILD_CUDA=1 " + " ".join(cmd)
    s.status, s.reason = "running", "started in the background"
    log = open(check.work / "build-cuda.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    check.build = Build(s, proc, time.monotonic())
    check.finishers.append(lambda: wait(check))
    return s


def wait(check: Check) -> None:
    """Wait for the background build (within its box and the budget) and probe that the extension loads."""
    build: Optional[Build] = getattr(check, "build", None)
    if build is None or build.done:
        return
    build.done = True
    s, proc = build.stage, build.proc
    try:
        rc = proc.wait(timeout=max(1.0, min(CAP_S - (time.monotonic() - build.started), check.left())))
    except subprocess.TimeoutExpired:
        kill(proc)
        proc.wait()
        rc = None
    s.seconds = time.monotonic() - build.started
    log = (check.work / "build-cuda.log").read_text()
    check.write_log(s.name, s.command, log)
    if rc is None:
        s.status, s.reason = "timed out", f"stopped after {s.seconds:.0f} s"
        return
    if rc != 0:
        s.status, s.reason = "failed", f"exit code {rc}: {last_lines(log)}"
        return
    probe = [PY, "-c", "from fastsemdiff.ops import _cuda; import sys; print(_cuda.unavailable_reason() or 'loads'); "
                       "sys.exit(0 if _cuda.available() else 1)"]
    command = s.command
    rc, _ = check.run(s, probe, 60, min_s=1)
    s.command = command
    if rc == 0:
        s.status, s.reason = "passed", f"fastsemdiff._C built for sm_{check.env['arch_list'].replace('.', '')} and loads"
    s.details["built_in_s"] = round(s.seconds, 1)
