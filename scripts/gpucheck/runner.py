"""The GPU check's runner: stage discovery, time boxes, subprocesses, the log, the JSON and the summary.

    python scripts/gpu_check.py --out DIR [--dry-run] [--only STAGE,...] [--budget S] [--work DIR]

A stage is a module in ``scripts/gpucheck/stages/`` with ``NAME`` (what ``--only`` takes), ``ORDER`` (its place
in the run, lower first), ``def run(check) -> Stage | list[Stage]`` and optionally ``PARALLEL = True`` (it times
nothing, so it shares the machine with the PARALLEL stages next to it in ORDER). Adding a stage is adding a file.
Every stage has a dry run (``check.dry_run``: CPU, tiny shapes, Triton under the interpreter) that CI runs, writes
what it measured into ``stage.details`` and says in one line (``stage.reason``) what it found.

What a stage has to work with (``Check``): ``env`` (the environment stage's facts), ``box(gpu_s, dry_s)``,
``left()``, ``run(stage, cmd, cap_s, env, min_s)``, ``child_env(interpret, **extra)`` and ``helper_env`` (the
same with ``scripts/`` importable, for ``python -m gpucheck....`` children), ``bench_jsons`` (merged into
bench.json), ``record`` (top-level entries for gpu_check.json, e.g. a stated rule), ``finishers`` (background
work awaited at the end). ``pytest_stage`` and ``bench_stage`` here, ``crashsafe.crash_safe_pytest_stage`` for
tests that can kill their process. ``details["summary_lines"]``: a stage's extra lines under its summary line.

What runs out first when time is short. The stages run in ORDER against one budget (``--budget``, default
``BUDGET_S`` on a GPU). Each subprocess gets min(its stage's time box, the time left); a stage that cannot get
its minimum (``min_s``, 10 s unless the stage asks for more: the benchmarks want 45) is reported ``skipped`` with
"the budget was spent before it", and the next one is still tried. So the stages with the highest ORDER are
dropped first: switch-matrix (75), profile (70), bench-train (60: the smallest size, S2, first), tune-adaln
(55), bench-adaln (50), fuzz (45), memcheck (42), and the correctness stages (0-40) last. ``report`` (99) needs
no time and always runs. ``--only`` is the way to spend a short budget on what matters. A stage that fails,
crashes or overruns its box costs that stage, never the check: heavy work runs in a subprocess (``check.run``;
``gpucheck.crashsafe`` makes a crash inside a pytest run cost one test), and an exception in a stage's own code
is reported as its failure.
"""
from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.util
import json
import os
import pkgutil
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
PY = sys.executable
BUDGET_S = 480  # the whole check on a GPU: 8 minutes of wall time
DRY_BUDGET_S = 1800  # a dry run's upper bound (about 2 minutes on an idle 2-core CPU; far more on a loaded one)
ALWAYS = ("environment",)  # runs under --only too: the other stages read its facts (GPU, architecture, commit)


@dataclass
class Stage:
    name: str
    status: str = "not run"  # passed | failed | timed out | skipped | not run
    seconds: float = 0.0
    reason: str = ""
    command: str = ""
    details: dict = field(default_factory=dict)


class Check:
    """The stages' shared state: time left, the log, the environment's facts, the benchmark JSONs."""

    def __init__(self, out: Path, work: Path, dry_run: bool, budget_s: float):
        self.out, self.work, self.dry_run = out, work, dry_run
        self.start, self.budget_s = time.monotonic(), budget_s
        self.stages: list[Stage] = []
        self.log = open(out / "logs.txt", "w")
        self.log_lock = threading.Lock()
        self.env: dict = {}
        self.bench_jsons: list[Path] = []
        self.finishers: list[Callable[[], None]] = []  # background work a later stage (or the end) waits for
        self.record: dict = {}  # extra top-level entries a stage wants in gpu_check.json (e.g. a stated rule)

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.start)

    def box(self, gpu_s: float, dry_s: float) -> float:
        """A stage's time box: on the GPU tight (the 8 minutes), in a dry run loose (a shared CPU can be slow; an
        idle 2-core machine needs about 2 minutes of CPU time for the whole dry run)."""
        return dry_s if self.dry_run else gpu_s

    def child_env(self, interpret: Optional[bool] = None, **extra: str) -> dict:
        # a check run by a pytest-xdist worker (the tests) starts pytest sessions of its own, not workers: with the
        # worker's PYTEST_XDIST_* variables pytest-benchmark would take them for workers and refuse to time
        env = {k: v for k, v in os.environ.items()
               if k not in ("TRITON_INTERPRET", "PYTEST_ADDOPTS") and not k.startswith("PYTEST_XDIST_")}
        env["PYTHONUNBUFFERED"] = "1"
        if self.dry_run:  # tiny ops on a shared CPU: one intra-op thread avoids OpenMP's oversubscription stalls
            env["OMP_NUM_THREADS"] = "1"
        if interpret if interpret is not None else self.dry_run:
            env["TRITON_INTERPRET"] = "1"
        env.update(extra)
        return env

    def helper_env(self, interpret: Optional[bool] = None, **extra: str) -> dict:
        """``child_env`` with ``scripts/`` importable, for subprocesses that run a ``gpucheck`` module
        (``python -m gpucheck....``) or load its pytest plugin."""
        env = self.child_env(interpret, **extra)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH", "")) if p)
        return env

    def write_log(self, name: str, command: str, text: str) -> None:
        with self.log_lock:
            self.log.write(f"\n===== {name}: {command}\n{text}\n")
            self.log.flush()

    def run(self, stage: Stage, cmd: list[str], cap_s: float, env: Optional[dict] = None,
            min_s: float = 10) -> tuple[Optional[int], str]:
        """Run ``cmd`` for ``stage`` within min(cap, time left); returns (exit code or None on timeout, output).
        A process killed by a signal returns its negative signal number (a segfault: -11)."""
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
            kill(proc)
            output, _ = proc.communicate()
            rc = None
        stage.seconds += time.monotonic() - t0
        self.write_log(stage.name, stage.command, output or "")
        if rc is None:
            stage.status, stage.reason = "timed out", f"stopped after {timeout:.0f} s (its time box)"
        elif rc != 0 and stage.status != "failed":
            stage.status, stage.reason = "failed", f"exit code {rc}: {last_lines(output)}"
        return rc, output or ""


def kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def last_lines(text: str, n: int = 3) -> str:
    lines = [line for line in (text or "").strip().splitlines() if line.strip()]
    return " | ".join(lines[-n:])[-400:]


def pytest_counts(output: str) -> dict:
    """passed/failed/skipped/... from pytest's last summary line."""
    counts = {}
    for line in reversed(output.strip().splitlines()):
        found = re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected|warnings?)", line)
        if found:
            for n, what in found:
                counts[what.rstrip("s") if what.startswith(("error", "warning")) else what] = int(n)
            break
    return counts


def xdist_args(check: Check) -> list[str]:
    if check.dry_run or importlib.util.find_spec("xdist") is None:
        return []
    return ["-n", str(min(8, max(2, (os.cpu_count() or 4) // 2)))]


def pytest_stage(check: Check, name: str, args: list[str], cap_s: float, interpret: Optional[bool] = None,
                 parallel: bool = False, quick: bool = False, min_s: float = 10) -> Stage:
    """One pytest process for the stage: counts, the failing tests' lines, and the verdict."""
    s = Stage(name)
    cmd = [PY, "-m", "pytest", *args, "-q", "-rfEs", "-p", "no:cacheprovider"]
    if parallel:
        cmd += xdist_args(check)
    # quick (dry-run benchmarks): two rounds, and torch.compile off (TORCHDYNAMO_DISABLE): a CPU compile of
    # the models costs minutes on two cores, and no figure of a dry run means anything anyway
    extra = {"FASTSEMDIFF_BENCH_QUICK": "1", "TORCHDYNAMO_DISABLE": "1"} if quick else {}
    rc, out = check.run(s, cmd, cap_s, check.child_env(interpret, **extra), min_s=min_s)
    s.details["counts"] = pytest_counts(out)
    failures = [line for line in out.splitlines() if line.startswith(("FAILED", "ERROR"))]
    if failures:
        s.details["failures"] = failures[:20]
    if rc == 0:
        s.status = "passed"
        n = s.details["counts"]
        s.reason = ", ".join(f"{v} {k}" for k, v in n.items())
        if not check.dry_run and n.get("skipped") and not n.get("passed"):
            s.status, s.reason = "failed", "every test skipped: " + last_lines(
                "\n".join(line for line in out.splitlines() if "SKIP" in line))
    elif rc == 5:
        s.status, s.reason = "failed", "no tests were collected"
    return s


def bench_stage(check: Check, name: str, args: list[str], cap_s: float, json_path: Path) -> Stage:
    """A pytest-benchmark run whose JSON is merged into bench.json (by the report stage)."""
    check.bench_jsons.append(json_path)
    s = pytest_stage(check, name, [*args, "--benchmark-only", f"--benchmark-json={json_path}", "-s"], cap_s,
                     interpret=False, quick=check.dry_run, min_s=10 if check.dry_run else 45)
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


# ------------------------------------------------------------------------------------------- discovery
def discover() -> list[ModuleType]:
    """Every module of ``gpucheck.stages``, in ORDER (then by NAME)."""
    from . import stages

    modules = []
    for info in pkgutil.iter_modules(stages.__path__):
        mod = importlib.import_module(f"{stages.__name__}.{info.name}")
        for attr in ("NAME", "ORDER", "run"):
            if not hasattr(mod, attr):
                raise TypeError(f"{mod.__name__} is not a stage: it has no {attr} (see gpucheck/runner.py)")
        modules.append(mod)
    names = [m.NAME for m in modules]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise TypeError(f"two stage modules share the NAME {dupes}")
    return sorted(modules, key=lambda m: (m.ORDER, m.NAME))


def select(modules: list[ModuleType], only: Optional[str]) -> list[ModuleType]:
    """The stages ``--only`` names (plus ``environment``, whose facts the others read); ValueError naming the
    known stages for a name that is none of them."""
    if not only:
        return modules
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    known = [m.NAME for m in modules]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"unknown stage{'s' if len(unknown) > 1 else ''} {', '.join(unknown) or '(none given)'} "
                         f"for --only; the stages are: {', '.join(known)}")
    return [m for m in modules if m.NAME in wanted or m.NAME in ALWAYS]


def _run_one(check: Check, mod: ModuleType) -> list[Stage]:
    """A stage module's stages; an exception in its own code fails it (with the traceback in the log)."""
    t0 = time.monotonic()
    try:
        result = mod.run(check)
    except Exception as e:  # reported, never hidden: the check goes on with the next stage
        check.write_log(mod.NAME, "(in process)", traceback.format_exc())
        return [Stage(mod.NAME, "failed", time.monotonic() - t0, f"the stage raised {type(e).__name__}: {e}"[:300])]
    return result if isinstance(result, list) else [result]


def run_stages(check: Check, modules: list[ModuleType],
               after_each: Optional[Callable[[list[ModuleType]], None]] = None) -> None:
    """Run the modules in ORDER; neighbours with PARALLEL = True share the machine (threads, each its own
    subprocesses). The stage objects land in check.stages in ORDER. ``after_each(the modules not run yet)`` runs
    after each stage (or group of parallel stages): main writes the record so far there, so a check killed from
    outside still says what it measured."""
    i = 0
    while i < len(modules):
        group = [modules[i]]
        while getattr(group[0], "PARALLEL", False) and i + len(group) < len(modules) \
                and getattr(modules[i + len(group)], "PARALLEL", False):
            group.append(modules[i + len(group)])
        if len(group) == 1:
            check.stages += _run_one(check, group[0])
        else:
            with ThreadPoolExecutor(len(group)) as pool:
                for stages in pool.map(lambda m: _run_one(check, m), group):
                    check.stages += stages
        i += len(group)
        if after_each is not None:
            after_each(modules[i:])
    for finish in check.finishers:  # background work nobody waited for (e.g. --only build-cuda)
        finish()


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


def summary(check: Check, merged: Optional[dict], wall: float) -> str:
    e = check.env
    head = (f"fastsemdiff GPU check{' (DRY RUN on the CPU)' if check.dry_run else ''}: {e.get('gpu') or 'cpu'}"
            f"{' sm_' + e['arch_list'].replace('.', '') if e.get('arch_list') else ''}, torch {e.get('torch')}, "
            f"triton {e.get('triton')}, python {e.get('python')}, commit {e.get('commit')}; "
            f"{wall:.0f} s of {check.budget_s:.0f} s")
    lines = [head]
    for s in check.stages:
        lines.append(f"  {s.status.upper():<9} {s.name:<16} {s.seconds:6.1f} s  {s.reason}"[:160])
        for extra in s.details.get("summary_lines", []):  # a stage's own lines: crashed/failing test names
            lines.append(f"      {extra}"[:160])
    bl = bench_lines(merged)
    if bl:
        lines.append("benchmarks (median per call / step; ratios vs the reference eager in the same run)"
                     + (": DRY RUN, torch.compile off, two rounds on a CPU: these figures mean nothing"
                        if check.dry_run else ":"))
        lines += [line[:200] for line in bl]
    failed = [s.name for s in check.stages if s.status not in ("passed", "skipped")]
    lines.append("RESULT: " + ("all stages passed" if not failed else "not passed: " + ", ".join(failed)))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- main
def parser(stage_names: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="scripts/gpu_check.py",
                                description="The prepared GPU check: install, CUDA correctness and the benchmarks "
                                            "in one time-boxed command (scripts/gpucheck/runner.py says more).")
    p.add_argument("--out", type=Path, required=True,
                   help="folder for gpu_check.json, bench.json, tables.md, summary.txt, logs.txt")
    p.add_argument("--work", type=Path, help="scratch folder (default: a new temporary folder)")
    p.add_argument("--dry-run", action="store_true", help="every stage on the CPU at tiny shapes")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the whole check (default {BUDGET_S}; dry run {DRY_BUDGET_S}); stages are "
                        "run in order and those the budget no longer reaches are reported skipped")
    p.add_argument("--only", metavar="STAGE,...",
                   help="run just these stages, in their usual order: " + ", ".join(stage_names) + ". "
                        "'environment' always runs (the others read its facts: GPU, architecture, commit); "
                        "nothing else is added, so name 'install' or 'build-cuda' too unless the package and its "
                        "CUDA extension are already installed and built")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    modules = discover()
    p = parser([m.NAME for m in modules])
    args = p.parse_args(argv)
    try:
        modules = select(modules, args.only)
    except ValueError as e:
        p.error(str(e))

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = (args.work or Path(tempfile.mkdtemp(prefix="fastsemdiff-gpu-check-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    check = Check(out, work, args.dry_run, args.budget or (DRY_BUDGET_S if args.dry_run else BUDGET_S))
    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")

    def write_record(merged: Optional[dict], pending: list[ModuleType]) -> dict:
        final = not pending
        wall = time.monotonic() - check.start
        not_measured = [{"what": s.name, "why": f"{s.status}: {s.reason}"} for s in check.stages
                        if s.status not in ("passed",)]
        if not final:
            not_measured.append({"what": "the stages not reached yet", "why": "the check was still running when "
                                 "this record was written (it is rewritten after every stage): "
                                 + ", ".join(m.NAME for m in pending)})
        if args.only:
            not_measured.append({"what": "the stages --only left out",
                                 "why": f"--only {args.only}: " + ", ".join(m.NAME for m in discover()
                                                                         if m not in modules)})
        elif not args.dry_run:
            not_measured.append({"what": "bench-train joint step (encoder + denoiser)", "why": "outside the "
                                 "8-minute budget: pytest bench/test_bench_train.py --benchmark-only -k joint"})
        record = {"tool": "scripts/gpu_check.py", "dry_run": args.dry_run, "only": args.only, "started": started,
                  "complete": final, "wall_s": round(wall, 1), "budget_s": check.budget_s,
                  "environment": check.env, **check.record,
                  "stages": [asdict(s) for s in check.stages], "not_measured": not_measured,
                  "passed": final and all(s.status in ("passed", "skipped") for s in check.stages),
                  "files": {"bench": "bench.json" if merged else None,
                            "tables": "tables.md" if (out / "tables.md").exists() else None,
                            "summary": "summary.txt", "logs": "logs.txt"}}
        tmp = out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(record, indent=1, default=str))
        tmp.replace(out / "gpu_check.json")  # a reader never sees half a record
        return record

    run_stages(check, modules, after_each=lambda pending: write_record(None, pending) if pending else None)
    merged = merge_bench(check.bench_jsons, out / "bench.json")
    record = write_record(merged, [])
    wall = time.monotonic() - check.start
    text = summary(check, merged, wall)
    (out / "summary.txt").write_text(text + "\n")
    check.log.close()
    print(text, flush=True)
    return 0 if record["passed"] else 1
