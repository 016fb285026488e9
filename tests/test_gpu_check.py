"""scripts/gpu_check.py: its dry run on this CPU (every stage, tiny shapes) and the pieces that judge a GPU run.

The dry run is what CI can prove of the prepared GPU command: every stage starts, is time-boxed, reports, and
writes the JSON, the tables and the one-screen summary a GPU run would write.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, child_env, kill_tree

SPEC = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(SPEC)
sys.modules["gpu_check"] = gpu_check  # its dataclasses look their module up while it is executed
SPEC.loader.exec_module(gpu_check)

STAGES = ["environment", "install", "build-cuda", "kernel-tests", "model-check", "train-curves", "csrc-tests",
          "bench-adaln", "bench-train-tiny", "report"]


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
    assert curves["passed"] and len(curves["steps"]) == 2 and curves["tolerance"] == gpu_check.CURVE_TOLERANCE
    assert all(x > 0 for x in curves["loss_torch"] + curves["loss_fused"])
    model = stages["model-check"]["details"]
    assert model["passed"] and model["fused_backend"] == "triton" and model["checks_ok"]
    assert len(model["first_use_checks"]) >= 3  # the interpreter's kernels were checked on first use
    assert model["grad_rel_error"]["bf16_fused"] > 0  # a real comparison, not identical code paths
    assert stages["csrc-tests"]["details"]["counts"].get("failed", 0) == 0
    assert any(item["what"] == "build-cuda" for item in record["not_measured"])


def test_dry_run_writes_the_benchmarks_tables_and_summary(dry_run):
    out, _, output, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "gpu_check.json", "logs.txt", "summary.txt",
                                                    "tables.md"]
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
    assert gpu_check.compare_curves(a, close)["passed"]
    assert not gpu_check.compare_curves(a, far)["passed"]  # one point 20% off
    assert not gpu_check.compare_curves(a, drift)["passed"]  # within 5% everywhere, but 4% off at the end
    assert not gpu_check.compare_curves(a, [])["passed"]
    assert not gpu_check.compare_curves(a, [{"step": 10, "loss": float("nan")}])["passed"]


def test_a_failing_or_overrunning_stage_is_reported_and_the_next_runs(tmp_path):
    c = gpu_check.Check(tmp_path, tmp_path, dry_run=True, budget_s=60)
    failing, slow, after = gpu_check.Stage("a"), gpu_check.Stage("b"), gpu_check.Stage("c")
    rc, _ = c.run(failing, [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], 30, min_s=1)
    assert rc == 3 and failing.status == "failed" and "exit code 3: boom" in failing.reason
    rc, _ = c.run(slow, [sys.executable, "-c", "import time; time.sleep(30)"], 1, min_s=0.5)
    assert rc is None and slow.status == "timed out" and slow.seconds < 10
    rc, out = c.run(after, [sys.executable, "-c", "print('ran')"], 30, min_s=1)
    assert rc == 0 and "ran" in out
    c.budget_s = 0
    late = gpu_check.Stage("d")
    assert c.run(late, [sys.executable, "-c", "pass"], 30)[0] is None and late.status == "skipped"
    assert "budget" in late.reason


def test_pytest_counts_and_bench_merge(tmp_path):
    assert gpu_check._pytest_counts("...\n3 failed, 10 passed, 2 skipped, 1 warning in 4.0s\n") == {
        "failed": 3, "passed": 10, "skipped": 2, "warning": 1}
    for i in range(2):
        (tmp_path / f"{i}.json").write_text(json.dumps({"machine_info": {"i": i}, "benchmarks": [{"name": str(i)}]}))
    merged = gpu_check.merge_bench([tmp_path / "0.json", tmp_path / "missing.json", tmp_path / "1.json"],
                                   tmp_path / "m.json")
    assert [b["name"] for b in merged["benchmarks"]] == ["0", "1"] and merged["machine_info"] == {"i": 0}
    assert json.loads(Path(tmp_path / "m.json").read_text()) == merged
