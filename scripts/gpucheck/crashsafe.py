"""pytest for the stages whose tests can crash the process (a segfault in a CUDA op, an abort in a kernel):
one crash costs one test, and the names survive.

The tests run with the ``gpucheck.pytest_progress`` plugin, which writes each test's start and outcome to a file
as they happen, and with the fault handler on (``-X faulthandler``: the crashing thread's Python stack lands in
the log). When the process dies inside a test (started, no outcome), that test is recorded as crashed, with the
signal and the fault handler's lines, and pytest is run again with every test that already has an outcome and
every crashed test deselected, until a run ends on its own, ``max_crashes`` is reached or the time box is spent.
The stage's details name the crashed and the failing tests; its summary lines show them.
"""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Optional, Sequence

from .runner import PY, Check, Stage, last_lines, xdist_args

SEVERITY = {"crashed": 4, "error": 3, "failed": 2, "passed": 1, "skipped": 1}


def read_progress(path: Path) -> tuple[dict[str, str], Optional[str]]:
    """(outcome per test, the test that started last and has no outcome after that start: the one that was
    running when the process ended, or None)."""
    outcomes: dict[str, str] = {}
    running: Optional[str] = None
    if not path.exists():
        return outcomes, running
    for line in path.read_text().splitlines():
        try:
            event = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the crash itself
            continue
        if "start" in event:
            running = event["start"]
            continue
        test, outcome = event["test"], event["outcome"]
        if outcome == "failed" and event.get("when") in ("setup", "teardown"):
            outcome = "error"
        if SEVERITY.get(outcome, 0) >= SEVERITY.get(outcomes.get(test, ""), 0):
            outcomes[test] = outcome
        if test == running:
            running = None
    return outcomes, running


def fault_lines(output: str, n: int = 12) -> list[str]:
    """The fault handler's report (``Fatal Python error: ...`` and the stack under it), cut to ``n`` lines."""
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if "Fatal Python error" in line:  # pytest's progress dots may precede it on the line
            return [line[line.index("Fatal Python error"):]] + [x for x in lines[i + 1:i + n] if x.strip()]
    return lines[-3:]


def describe_exit(rc: int) -> str:
    if rc < 0:
        try:
            return signal.Signals(-rc).name
        except ValueError:
            return f"signal {-rc}"
    return f"exit code {rc}"


def crash_safe_pytest_stage(check: Check, name: str, args: list[str], cap_s: float,
                            interpret: Optional[bool] = None, parallel: bool = False, max_crashes: int = 8,
                            min_s: float = 10, wrapper: Sequence[str] = (), extra_env: Optional[dict] = None,
                            outputs: Optional[list[str]] = None) -> Stage:
    """Like ``runner.pytest_stage``, but a test that kills the process is named, and the tests after it still run
    (see the module's docstring). ``cap_s`` bounds all the runs together. ``wrapper``: a command that runs pytest
    (e.g. compute-sanitizer); ``outputs`` collects each run's output for the caller."""
    s = Stage(name)
    progress, deselect = check.work / f"{name}.progress.jsonl", check.work / f"{name}.deselect.txt"
    for p in (progress, deselect):
        p.unlink(missing_ok=True)
    env = check.helper_env(interpret, GPUCHECK_PROGRESS=str(progress), GPUCHECK_DESELECT=str(deselect),
                           **(extra_env or {}))
    cmd = [*wrapper, PY, "-X", "faulthandler", "-m", "pytest", *args, "-q", "-rfEs", "-p", "no:cacheprovider",
           "-p", "gpucheck.pytest_progress", *(xdist_args(check) if parallel else [])]
    deadline = time.monotonic() + cap_s
    crashes: list[dict] = []
    failure_lines: list[str] = []
    runs, last, rc, out = 0, Stage(name), None, ""
    while True:
        runs += 1
        last = Stage(name)
        rc, out = check.run(last, cmd, deadline - time.monotonic(), env, min_s=min_s if runs == 1 else 1)
        s.seconds += last.seconds
        if outputs is not None:
            outputs.append(out)
        failure_lines += [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
        outcomes, running = read_progress(progress)
        if rc is None or running is None:  # ended on its own, ran out of time, or was never started
            break
        crashes.append({"test": running, "exit": describe_exit(rc), "run": runs, "trace": fault_lines(out)})
        if len(crashes) >= max_crashes:
            break
        deselect.write_text("\n".join([*outcomes, *(c["test"] for c in crashes)]) + "\n")
    s.command = last.command if runs == 1 else f"{last.command}  (run {runs} times: each rerun deselects the " \
                                                  f"tests already run and the crashed ones)"
    outcomes, running = read_progress(progress)
    for c in crashes:
        outcomes[c["test"]] = "crashed"
    known = {c["test"] for c in crashes}  # pytest-xdist replaces a crashed worker itself and reports the test
    crashes += [{"test": t, "exit": "its xdist worker crashed", "run": runs, "trace": []}
                for t, o in outcomes.items() if o == "crashed" and t not in known]
    counts: dict[str, int] = {}
    for outcome in outcomes.values():
        counts[outcome] = counts.get(outcome, 0) + 1
    failed = sorted(t for t, o in outcomes.items() if o in ("failed", "error"))
    s.details = {"counts": counts, "runs": runs, "crashed": crashes, "failed_tests": failed[:60]}
    if failure_lines:
        s.details["failures"] = failure_lines[:20]
    lines = [f"crashed: {c['test']} ({c['exit']})" for c in crashes[:4]]
    if failed:
        lines.append(f"failed ({len(failed)}): " + ", ".join(t.split("/")[-1] for t in failed))
    s.details["summary_lines"] = lines

    tally = ", ".join(f"{v} {k}" for k, v in sorted(counts.items(), key=lambda kv: -SEVERITY.get(kv[0], 0)))
    if rc is None and last.status == "skipped" and runs == 1:
        s.status, s.reason = "skipped", last.reason
    elif rc is None:
        s.status = "timed out"
        s.reason = f"{last.reason}{f' in {running}' if running else ''}; so far: {tally or 'no test finished'}"
    elif crashes and len(crashes) >= max_crashes and running:
        s.status, s.reason = "failed", f"stopped after {len(crashes)} crashes; {tally}"
    elif crashes or failed:
        s.status, s.reason = "failed", tally
    elif rc == 5 or not outcomes:
        s.status, s.reason = "failed", "no tests were collected" if rc == 5 else f"exit code {rc}: {last_lines(out)}"
    elif rc != 0:
        s.status, s.reason = "failed", f"{describe_exit(rc)}: {last_lines(out)}"
    else:
        s.status, s.reason = "passed", tally
        if not check.dry_run and counts.get("skipped") and not counts.get("passed"):
            s.status, s.reason = "failed", "every test skipped: " + last_lines(
                "\n".join(line for line in out.splitlines() if "SKIP" in line))
    return s
