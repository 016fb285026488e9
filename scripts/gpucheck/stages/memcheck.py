"""``compute-sanitizer --tool memcheck`` over the CUDA extension's tests (``tests/test_csrc_cuda.py`` only: the
tool slows every kernel and API call many times over, so one module within a time box): out-of-bounds and
misaligned accesses, and CUDA API errors, that a passing test can hide. PyTorch's caching allocator is off for
the run (``PYTORCH_NO_CUDA_MEMORY_CACHING=1``) so each tensor's real bounds are what the tool checks. Crash-safe
like csrc-tests. Skipped, with the reason, in a dry run, without a GPU, without the tool, or where the runtime
does not let the tool attach (gVisor: "Device not supported"; /work/.library/device/KINDS.md)."""
from __future__ import annotations

import re

from ..crashsafe import crash_safe_pytest_stage
from ..runner import Check, Stage
from . import build_cuda

NAME = "memcheck"
ORDER = 42
MODULE = "tests/test_csrc_cuda.py"
UNSUPPORTED = ("Device not supported", "Unable to find injection library", "not supported on this platform")


def findings(output: str) -> tuple[int, list[str], str]:
    """(errors counted by the tool's ERROR SUMMARY lines, its first report lines, a line saying the tool could
    not run, or '')."""
    errors = sum(int(n) for n in re.findall(r"=+ ERROR SUMMARY: (\d+) errors?", output))
    lines = [line.strip() for line in output.splitlines()
             if line.startswith("=========") and "ERROR SUMMARY" not in line and "COMPUTE-SANITIZER" not in line
             and line.strip("= ")]
    refusal = next((line.strip() for line in output.splitlines() if any(u in line for u in UNSUPPORTED)), "")
    return errors, lines[:20], refusal


def run(check: Check) -> Stage:
    s = Stage(NAME)
    tool = check.env.get("compute_sanitizer")
    s.details["tool"] = tool
    if check.dry_run or not check.env.get("gpu") or not tool:
        s.status = "skipped"
        s.reason = ("dry run: no GPU for compute-sanitizer to watch" if check.dry_run else
                    "no GPU" if not check.env.get("gpu") else
                    "compute-sanitizer was not found (PATH, /usr/local/cuda/bin)")
        return s
    build_cuda.wait(check)
    outputs: list[str] = []
    t = crash_safe_pytest_stage(check, NAME, [MODULE], check.box(120, 120), interpret=False,
                                wrapper=[tool, "--tool", "memcheck", "--print-limit", "30"],
                                extra_env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, outputs=outputs, min_s=30)
    s.seconds, s.command, tests = t.seconds, t.command, t.details
    errors, lines, refusal = findings("\n".join(outputs))
    s.details.update(errors=errors, first_lines=lines, tests=tests.get("counts", {}),
                     crashed=tests.get("crashed", []), failed_tests=tests.get("failed_tests", []))
    passed = tests.get("counts", {}).get("passed", 0)
    if t.status == "skipped":
        s.status, s.reason = "skipped", t.reason
    elif refusal and not passed:
        s.status, s.reason = "skipped", f"compute-sanitizer cannot watch this GPU here: {refusal}"[:300]
    elif errors:
        s.status, s.reason = "failed", f"{errors} memcheck errors; first: {lines[0] if lines else '?'}"[:300]
        s.details["summary_lines"] = lines[:3]
    elif t.status == "timed out":
        s.status, s.reason = "timed out", f"no memcheck error in the tests it reached ({t.reason})"[:300]
    elif not passed:
        s.status, s.reason = "failed", f"no test passed under the tool: {t.reason}"[:300]
    else:
        s.status = "passed"
        s.reason = f"0 memcheck errors over {sum(tests['counts'].values())} tests ({t.reason}; the tests' own " \
                   f"verdicts are csrc-tests')"
    return s
