"""scripts/gpu_check.py (the runner and stages in scripts/gpucheck/): its dry run on this CPU (every stage, tiny
shapes), ``--only``, and the pieces that judge a GPU run.

The dry run is what CI can prove of the prepared GPU command: every stage starts, is time-boxed, reports, and
writes the JSON, the tables and the one-screen summary a GPU run would write.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env, kill_tree

sys.path.insert(0, str(REPO / "scripts"))  # the gpucheck package (scripts/gpu_check.py does the same)

from gpucheck import runner  # noqa: E402
from gpucheck.stages import train_curves  # noqa: E402

STAGES = ["environment", "install", "build-cuda", "kernel-tests", "model-check", "train-curves", "csrc-tests",
          "bench-adaln", "bench-train-tiny", "profile", "switch-matrix", "report"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, work = tmp_path_factory.mktemp("gpu-check-out"), tmp_path_factory.mktemp("gpu-check-work")
    cmd = [sys.executable, "scripts/gpu_check.py", "--dry-run", "--out", str(out), "--work", str(work)]
    env = child_env()
    env.pop("TRITON_INTERPRET", None)  # the script sets it for its own stages
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=2000)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"{' '.join(cmd)} ran past 2000 s")
    return out, proc.returncode, output, time.monotonic() - start


def test_dry_run_passes_every_stage(dry_run):
    out, rc, output, seconds = dry_run
    record = json.loads((out / "gpu_check.json").read_text())
    stages = {s["name"]: s for s in record["stages"]}
    assert list(stages) == STAGES, list(stages)
    bad = {n: (s["status"], s["reason"]) for n, s in stages.items() if s["status"] != "passed"}
    assert bad == {"build-cuda": ("skipped", bad.get("build-cuda", ("", ""))[1])}, (bad, output[-3000:])
    assert rc == 0 and record["passed"] and record["dry_run"], output[-3000:]
    assert record["wall_s"] <= record["budget_s"] and seconds < 2000
    assert stages["kernel-tests"]["details"]["counts"]["passed"] >= 12
    assert stages["kernel-tests"]["details"]["counts"].get("failed", 0) == 0
    curves = stages["train-curves"]["details"]
    assert curves["passed"] and len(curves["steps"]) == 2 and curves["tolerance"] == train_curves.CURVE_TOLERANCE
    assert all(x > 0 for x in curves["loss_torch"] + curves["loss_fused"])
    model = stages["model-check"]["details"]
    assert model["passed"] and model["fused_backend"] == "triton" and model["checks_ok"]
    assert len(model["first_use_checks"]) >= 3  # the interpreter's kernels were checked on first use
    assert model["grad_rel_error"]["bf16_fused"] > 0  # a real comparison, not identical code paths
    assert stages["csrc-tests"]["details"]["counts"].get("failed", 0) == 0
    assert any(item["what"] == "build-cuda" for item in record["not_measured"])
    profiled = stages["profile"]["details"]["rows"]
    assert {r["size"] for r in profiled} == {"tiny", "main"}
    assert all(r["profile"]["source"].startswith("CPU op events") and r["profile"]["by_category_us"]["matmul/conv"] > 0
               for r in profiled)
    matrix = {r["variant"]: r for r in stages["switch-matrix"]["details"]["rows"] if r["size"] == "tiny"}
    assert matrix["mlp_epilogue=addmm"]["ratio_to_reference"] > 0 and matrix["update=loop"]["finite"]
    for refused in ("attention=cudnn", "fp8=rowwise", "reduce-overhead"):  # the CPU's refusals, with reasons
        assert "skipped" in matrix[refused], matrix[refused]


def test_dry_run_writes_the_benchmarks_tables_and_summary(dry_run):
    out, _, output, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "gpu_check.json", "logs.txt", "profile.json",
                                                    "profile.md", "summary.txt", "switch_matrix.json",
                                                    "switch_matrix.md", "tables.md"]
    bench = json.loads((out / "bench.json").read_text())
    groups = {b["group"] for b in bench["benchmarks"]}
    assert any(g.startswith("adaln-mln-forward") for g in groups) and any(g.startswith("train-dit") for g in groups)
    tables = (out / "tables.md").read_text()
    assert "| impl |" in tables and "torch_eager" in tables and "- device: cpu" in tables
    summary = (out / "summary.txt").read_text()
    assert summary.strip() in output  # printed last, as written
    assert "DRY RUN" in summary and "RESULT: all stages passed" in summary
    for name in STAGES:
        assert name in summary
    assert len(summary.splitlines()) <= 40  # one screen
    assert "===== kernel-tests:" in (out / "logs.txt").read_text()


def test_curve_comparison_states_and_applies_its_tolerance():
    a = [{"step": s, "loss": 1.0 / s} for s in range(10, 110, 10)]
    close = [{"step": r["step"], "loss": r["loss"] * 1.01} for r in a]
    far = [{"step": r["step"], "loss": r["loss"] * (1.2 if r["step"] == 50 else 1.0)} for r in a]
    drift = [{"step": r["step"], "loss": r["loss"] * 1.04} for r in a]
    assert train_curves.compare_curves(a, close)["passed"]
    assert not train_curves.compare_curves(a, far)["passed"]  # one point 20% off
    assert not train_curves.compare_curves(a, drift)["passed"]  # within 5% everywhere, but 4% off at the end
    assert not train_curves.compare_curves(a, [])["passed"]
    assert not train_curves.compare_curves(a, [{"step": 10, "loss": float("nan")}])["passed"]


def test_a_failing_or_overrunning_stage_is_reported_and_the_next_runs(tmp_path):
    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=60)
    failing, slow, after = runner.Stage("a"), runner.Stage("b"), runner.Stage("c")
    rc, _ = c.run(failing, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, min_s=1)
    assert rc == 3 and failing.status == "failed" and "exit code 3: boom" in failing.reason
    rc, _ = c.run(slow, [sys.executable, "-c", "import time; time.sleep(30)"], 1, min_s=0.5)
    assert rc is None and slow.status == "timed out" and slow.seconds < 10
    rc, out = c.run(after, [sys.executable, "-c", "print('ran')"], 30, min_s=1)
    assert rc == 0 and "ran" in out
    c.budget_s = 0
    late = runner.Stage("d")
    assert c.run(late, [sys.executable, "-c", "pass"], 30)[0] is None and late.status == "skipped"
    assert "budget" in late.reason


def test_pytest_counts_and_bench_merge(tmp_path):
    assert runner.pytest_counts("...\n3 failed, 10 passed, 2 skipped, 1 warning in 4.0s\n") == {
        "failed": 3, "passed": 10, "skipped": 2, "warning": 1}
    for i in range(2):
        (tmp_path / f"{i}.json").write_text(json.dumps({"machine_info": {"i": i}, "benchmarks": [{"name": str(i)}]}))
    merged = runner.merge_bench([tmp_path / "0.json", tmp_path / "missing.json", tmp_path / "1.json"],
                                   tmp_path / "m.json")
    assert [b["name"] for b in merged["benchmarks"]] == ["0", "1"] and merged["machine_info"] == {"i": 0}
    assert json.loads(Path(tmp_path / "m.json").read_text()) == merged


def _gpu_check(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    env = child_env()
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "scripts/gpu_check.py", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_only_runs_just_the_named_stages(tmp_path):
    proc = _gpu_check("--dry-run", "--only", "install,report", "--out", str(tmp_path / "out"),
                      "--work", str(tmp_path / "work"))
    record = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    # environment always runs (the others read its facts); nothing else but what was named
    assert [s["name"] for s in record["stages"]] == ["environment", "install", "report"], proc.stdout[-2000:]
    assert record["only"] == "install,report" and record["passed"] and proc.returncode == 0, proc.stdout[-2000:]
    left_out = next(item for item in record["not_measured"] if item["what"] == "the stages --only left out")
    assert "kernel-tests" in left_out["why"] and "install" not in left_out["why"].split(": ", 1)[1].split(", ")
    summary = (tmp_path / "out" / "summary.txt").read_text()
    assert "kernel-tests" not in summary and "install" in summary


def test_an_unknown_stage_is_a_clear_error_listing_the_stages(tmp_path):
    proc = _gpu_check("--dry-run", "--only", "install,kernel-test", "--out", str(tmp_path / "out"), timeout=120)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert "unknown stage kernel-test for --only" in proc.stderr, proc.stderr
    for name in [n for n in STAGES if n != "bench-train-tiny"] + ["bench-train"]:
        assert name in proc.stderr.split("the stages are:")[1]
    with pytest.raises(ValueError, match="the stages are: environment, install"):
        runner.select(runner.discover(), "nope")


def test_stages_are_discovered_in_their_order_and_keep_the_contract():
    mods = runner.discover()
    orders = {m.NAME: m.ORDER for m in mods}
    assert [m.ORDER for m in mods] == sorted(m.ORDER for m in mods)
    assert {k: orders[k] for k in ("environment", "install", "build-cuda", "kernel-tests", "model-check",
                                   "train-curves", "csrc-tests", "bench-adaln", "bench-train", "profile",
                                   "switch-matrix", "report")} == {
        "environment": 0, "install": 10, "build-cuda": 20, "kernel-tests": 30, "model-check": 31,
        "train-curves": 32, "csrc-tests": 40, "bench-adaln": 50, "bench-train": 60, "profile": 70,
        "switch-matrix": 75, "report": 99}
    assert mods[-1].NAME == "report"
    parallel = [m.NAME for m in mods if getattr(m, "PARALLEL", False)]
    assert {"kernel-tests", "model-check", "train-curves"} <= set(parallel)
    assert [m.NAME for m in runner.select(mods, "report")] == ["environment", "report"]


def test_parallel_neighbours_share_the_machine_and_a_raising_stage_costs_only_itself(tmp_path):
    import threading
    import types

    active, peak, lock = [0], [0], threading.Lock()

    def stage(name, order, parallel=False, boom=False):
        def run(check):
            if boom:
                raise RuntimeError("planted")
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            time.sleep(0.3)
            with lock:
                active[0] -= 1
            return runner.Stage(name, "passed")
        return types.SimpleNamespace(NAME=name, ORDER=order, PARALLEL=parallel, run=run)

    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=60)
    runner.run_stages(c, [stage("a", 0), stage("p1", 1, True), stage("p2", 2, True), stage("x", 3, boom=True),
                          stage("b", 4)])
    assert [s.name for s in c.stages] == ["a", "p1", "p2", "x", "b"] and peak[0] == 2
    assert c.stages[3].status == "failed" and "RuntimeError: planted" in c.stages[3].reason
    assert c.stages[4].status == "passed"
