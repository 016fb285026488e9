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
from gpucheck.stages import fp8_curve, train_curves  # noqa: E402

# gpu_check runs on the GPU machines, whose stack .venv-gpu-image mirrors: the README's test command runs this module
# there and not on .venv (see conftest.py).
pytestmark = pytest.mark.device_tool

STAGES = ["environment", "install", "build-cuda", "kernel-tests", "model-check", "train-curves", "csrc-tests",
          "memcheck", "fuzz", "bench-adaln", "tune-adaln", "bench-train-tiny", "profile", "switch-matrix", "fp8-curve", "report"]
SKIPPED_IN_A_DRY_RUN = {"build-cuda", "memcheck"}  # no GPU: nothing to build for, nothing for the sanitizer to watch


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
    assert set(bad) == SKIPPED_IN_A_DRY_RUN and {v[0] for v in bad.values()} == {"skipped"}, (bad, output[-3000:])
    assert "dry run" in bad["memcheck"][1]
    assert rc == 0 and record["passed"] and record["dry_run"], output[-3000:]
    assert record["wall_s"] <= record["budget_s"] and seconds < 2000
    assert stages["kernel-tests"]["details"]["counts"]["passed"] >= 12
    assert stages["kernel-tests"]["details"]["counts"].get("failed", 0) == 0
    curves = stages["train-curves"]["details"]
    assert curves["passed"] and len(curves["steps"]) == 2 and curves["rule"] == train_curves.RULE
    assert record["curve_rule"] == train_curves.RULE and "rounding drift" in stages["train-curves"]["reason"]
    assert all(x > 0 for x in curves["loss_torch"] + curves["loss_torch_fp32"] + curves["loss_fused"])
    assert curves["runs"]["fused"].startswith("model.backend=triton")
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
    fp8 = stages["fp8-curve"]["details"]
    assert fp8["passed"] and fp8["rule"] == fp8_curve.RULE and record["fp8_curve_rule"] == fp8_curve.RULE
    assert fp8["runs"]["bf16-seed1"].endswith("train.seed=1") and "plumbing only" in fp8["note"]
    assert fp8["loss_bf16"] != fp8["loss_bf16_seed1"]  # the calibration run really drew other numbers
    assert fp8["cpu_refusal"]["clear"] and fp8["cpu_refusal"]["exit_code"] == 2, fp8["cpu_refusal"]


def test_dry_run_writes_the_benchmarks_tables_and_summary(dry_run):
    out, _, output, _ = dry_run
    assert sorted(p.name for p in out.iterdir()) == ["adaln_configs.json", "bench.json", "gpu_check.json", "logs.txt",
                                                    "profile.json", "profile.md", "summary.txt", "switch_matrix.json",
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


def test_curve_comparison_calibrates_its_tolerance_on_the_rounding_drift():
    a = [{"step": s, "loss": 1.0 / s} for s in range(10, 110, 10)]
    scaled = lambda curve, f: [{"step": r["step"], "loss": r["loss"] * f(r["step"])} for r in curve]  # noqa: E731
    drifting = scaled(a, lambda s: 1 + 0.01 * s / 100)  # rounding drift growing to 1% at the end
    assert train_curves.compare_curves(a, drifting, scaled(a, lambda s: 1 + 0.025 * s / 100))["passed"]
    assert not train_curves.compare_curves(a, drifting, scaled(a, lambda s: 1.04))["passed"]  # 4% from the start
    still = scaled(a, lambda s: 1.0)  # no drift at all: only the floors remain
    assert train_curves.compare_curves(a, still, scaled(a, lambda s: 1.0008))["passed"]
    late = train_curves.compare_curves(a, still, scaled(a, lambda s: 1.003 if s > 70 else 1.0))
    assert not late["passed"] and late["worst_step"] == 80 and not late["points_ok"]
    tail = train_curves.compare_curves(a, still, scaled(a, lambda s: 1.0015 if s > 70 else 1.0))
    assert tail["points_ok"] and not tail["tail_ok"] and not tail["passed"]  # within the point floor, not the tail's
    spike = train_curves.compare_curves(a, scaled(a, lambda s: 1.02 if s == 20 else 1.0),
                                        scaled(a, lambda s: 1.05 if s == 50 else 1.0))
    # one 2% drift at step 20: the envelope keeps it, so 5% at step 50 is within 3 x 2% + the floor
    assert spike["allowed"][3] == pytest.approx(3 * 0.02 + train_curves.POINT_FLOOR) and spike["passed"]
    assert not train_curves.compare_curves(a, a, [])["passed"]
    assert not train_curves.compare_curves(a, a, [{"step": 10, "loss": float("nan")}])["passed"]
    assert "3x rounding drift" in train_curves.verdict(late)


def test_the_fp8_rule_allows_a_seeds_drift_and_no_more():
    """MULTIPLE = 1: an FP8 curve as far from bf16 as another seed is passes; twice as far fails."""
    steps = range(25, 525, 25)
    a = [{"step": s, "loss": 1.0 / (1 + s / 100)} for s in steps]
    seed = [{"step": r["step"], "loss": r["loss"] * (1.02 if r["step"] % 50 else 0.98)} for r in a]  # +-2%

    def off(f):
        return [{"step": r["step"], "loss": r["loss"] * f} for r in a]

    assert fp8_curve.MULTIPLE == 1.0
    assert train_curves.compare_curves(a, seed, off(1.019), multiple=fp8_curve.MULTIPLE)["passed"]
    assert not train_curves.compare_curves(a, seed, off(1.045), multiple=fp8_curve.MULTIPLE)["passed"]


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


def test_the_checks_pytest_sessions_are_not_taken_for_xdist_workers(tmp_path, monkeypatch):
    """Run by a pytest-xdist worker (the tests run on two), the check's children must not inherit the worker's
    PYTEST_XDIST_* variables: pytest-benchmark reads them as "xdist is on" and refuses --benchmark-only, which
    failed both bench stages of the dry run."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw1")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    monkeypatch.setenv("FASTSEMDIFF_KEPT", "1")
    env = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=60).child_env()
    assert not any(k.startswith("PYTEST_XDIST_") for k in env) and env["FASTSEMDIFF_KEPT"] == "1"


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
    expected = {"environment": 0, "install": 10, "build-cuda": 20, "kernel-tests": 30, "model-check": 31,
                "train-curves": 32, "csrc-tests": 40, "memcheck": 42, "fuzz": 45, "bench-adaln": 50,
                "tune-adaln": 55, "bench-train": 60, "profile": 70, "switch-matrix": 75, "report": 99}
    assert {k: orders[k] for k in expected} == expected
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


def test_the_record_is_rewritten_after_every_stage_so_a_killed_check_still_says_what_it_measured(tmp_path,
                                                                                               monkeypatch):
    """The device tool kills a command at its time limit and returns what $OUT holds then: gpu_check.json must
    already name the stages that ran, and say which were not reached, before the last stage ends."""
    import types

    seen = {}

    def stage(name, order, body=None):
        def run(check):
            if body:
                body(check)
            return runner.Stage(name, "passed", 0.1, "ok")
        return types.SimpleNamespace(NAME=name, ORDER=order, run=run)

    def peek(check):  # what a reader of $OUT finds while the third stage runs
        seen.update(json.loads((check.out / "gpu_check.json").read_text()))

    mods = [stage("environment", 0), stage("first", 10), stage("second", 20, peek), stage("third", 30),
            stage("report", 99)]
    monkeypatch.setattr(runner, "discover", lambda: mods)
    assert runner.main(["--dry-run", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]) == 0
    assert [s["name"] for s in seen["stages"]] == ["environment", "first"]
    assert seen["complete"] is False and seen["passed"] is False
    pending = next(i for i in seen["not_measured"] if i["what"] == "the stages not reached yet")
    assert pending["why"].endswith(": second, third, report")
    final = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert final["complete"] and final["passed"] and len(final["stages"]) == 5
    assert not any(i["what"] == "the stages not reached yet" for i in final["not_measured"])
    assert not (tmp_path / "out" / "gpu_check.json.tmp").exists()


PLANTED = '''
import ctypes
import os


def test_a_passes():
    pass


def test_b_fails():
    assert 1 == 2, "planted failure"


def test_c_segfaults():
    ctypes.string_at(0)  # reads address 0: SIGSEGV


def test_d_passes_after_the_crash():
    pass


def test_e_aborts():
    os.abort()  # SIGABRT


def test_f_fails_after_two_crashes():
    assert False, "planted failure after the crashes"


def test_g_passes():
    pass
'''


def test_a_crash_costs_one_test_and_the_names_are_kept(tmp_path):
    from gpucheck.crashsafe import crash_safe_pytest_stage

    (tmp_path / "planted").mkdir()
    module = tmp_path / "planted" / "test_planted.py"
    module.write_text(PLANTED)
    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=300)
    s = crash_safe_pytest_stage(c, "planted", [str(module)], 240, interpret=False, min_s=1)
    crashed = {x["test"].split("::")[-1]: x for x in s.details["crashed"]}
    assert set(crashed) == {"test_c_segfaults", "test_e_aborts"}, (s.details, c.out)
    assert crashed["test_c_segfaults"]["exit"] == "SIGSEGV" and crashed["test_e_aborts"]["exit"] == "SIGABRT"
    assert any("Segmentation fault" in line for line in crashed["test_c_segfaults"]["trace"])
    assert [t.split("::")[-1] for t in s.details["failed_tests"]] == ["test_b_fails",
                                                                      "test_f_fails_after_two_crashes"]
    assert s.details["counts"] == {"passed": 3, "failed": 2, "crashed": 2} and s.details["runs"] == 3
    assert s.status == "failed" and s.reason.startswith("2 crashed, 2 failed, 3 passed")
    lines = s.details["summary_lines"]
    assert any("test_c_segfaults (SIGSEGV)" in line for line in lines)
    assert any("test_b_fails" in line and "test_f_fails_after_two_crashes" in line for line in lines)
    c.stages.append(s)
    assert "test_c_segfaults (SIGSEGV)" in runner.summary(c, None, 1.0)


def test_a_clean_module_passes_crash_safe(tmp_path):
    from gpucheck.crashsafe import crash_safe_pytest_stage

    module = tmp_path / "test_clean.py"
    module.write_text("def test_one():\n    pass\n\n\ndef test_two():\n    pass\n")
    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=300)
    s = crash_safe_pytest_stage(c, "clean", [str(module)], 120, interpret=False, min_s=1)
    assert s.status == "passed" and s.details["counts"] == {"passed": 2} and s.details["runs"] == 1, s
    assert s.reason == "2 passed" and not s.details["crashed"] and not s.details["summary_lines"]


FAKE_SANITIZER = """#!/bin/sh
# stands in for compute-sanitizer: drops its options, runs the command, reports one planted finding
while [ "${1#--}" != "$1" ]; do shift 2; done
"$@"
rc=$?
echo "========= Invalid __global__ read of size 4 bytes"
echo "=========     at planted_kernel+0x10"
echo "========= ERROR SUMMARY: 1 error"
exit $rc
"""


def test_memcheck_runs_the_tests_under_the_tool_and_reports_its_findings(tmp_path, monkeypatch):
    from gpucheck.stages import memcheck

    tool = tmp_path / "compute-sanitizer"
    tool.write_text(FAKE_SANITIZER)
    tool.chmod(0o755)
    module = tmp_path / "test_cuda_like.py"
    module.write_text("import ctypes\n\n\ndef test_ok():\n    pass\n\n\ndef test_crash():\n    ctypes.string_at(0)\n"
                      "\n\ndef test_after():\n    pass\n")
    monkeypatch.setattr(memcheck, "MODULE", str(module))
    c = runner.Check(tmp_path, tmp_path, dry_run=False, budget_s=300)
    c.env = {"gpu": "planted", "compute_sanitizer": str(tool)}
    s = memcheck.run(c)
    assert s.status == "failed" and s.details["errors"] == 2, s  # one ERROR SUMMARY per run: before and after the crash
    assert s.details["first_lines"][0] == "========= Invalid __global__ read of size 4 bytes"
    assert [x["test"].split("::")[-1] for x in s.details["crashed"]] == ["test_crash"]
    assert s.details["tests"] == {"passed": 2, "crashed": 1} and str(tool) in s.command
    assert memcheck.findings("========= Error: Device not supported\n")[2]  # gVisor's refusal is recognised
    c.env = {"gpu": "planted", "compute_sanitizer": None}
    assert memcheck.run(c).status == "skipped" and "not found" in memcheck.run(c).reason


def test_the_curve_check_fails_a_planted_wrong_kernel_and_passes_a_correct_one(tmp_path):
    """The train-curves rule on a tiny CPU model, 40 steps: the reference and its rounding partner as the stage
    runs them, and two candidate kernels for the modulated LayerNorm planted by gpucheck.train_run: a correct one
    that rounds differently (two-pass statistics) and a wrong one (output x 1.03). The Triton interpreter would
    take minutes for 40 steps, so the candidates run on the torch path; the dry run proves the Triton one at 4."""
    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=600)
    data = train_curves.write_images(tmp_path / "images.npz", 512)
    common = [*train_curves.TINY, "data.source=npz", f"data.path={data}", "train.batch_size=8", "train.steps=40",
              "train.log_every=2", "train.warmup_steps=4"]
    bf16, fp32 = ["model.backend=torch", "train.precision=bf16"], ["model.backend=torch", "train.precision=fp32"]
    s = runner.Stage("planted")
    curves = train_curves.train_runs(c, s, {"torch": (bf16, ()), "torch-fp32": (fp32, ()),
                                            "correct": (bf16, ["mln-twopass"]), "wrong": (bf16, ["mln-scale=1.03"])},
                                     common, 300, concurrent=True)
    assert all(v is not None for v in curves.values()), (s, (tmp_path / "logs.txt").read_text()[-3000:])
    good = train_curves.compare_curves(curves["torch"], curves["torch-fp32"], curves["correct"])
    bad = train_curves.compare_curves(curves["torch"], curves["torch-fp32"], curves["wrong"])
    assert len(good["steps"]) == 20 and good["gap"] != [0.0] * 20  # the correct kernel does round differently
    assert good["passed"], train_curves.verdict(good)
    assert not bad["passed"] and not bad["tail_ok"], train_curves.verdict(bad)
    assert bad["last_quarter_mean_rel"] > 2 * bad["last_quarter_allowed"]  # failed by a margin, not by a hair


def test_the_csrc_stage_is_crash_safe(tmp_path, monkeypatch):
    from gpucheck.stages import csrc_tests

    module = tmp_path / "test_like_csrc.py"
    module.write_text("import ctypes\n\n\ndef test_before():\n    pass\n\n\ndef test_bad_input_segfaults():\n"
                      "    ctypes.string_at(0)\n\n\ndef test_after():\n    assert False\n")
    monkeypatch.setattr(csrc_tests, "MODULES", [str(module)])
    c = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=300)
    s = csrc_tests.run(c)
    assert s.name == "csrc-tests" and s.status == "failed" and s.details["counts"] == {
        "passed": 1, "failed": 1, "crashed": 1}, s
    assert s.details["crashed"][0]["test"].endswith("::test_bad_input_segfaults")
    assert s.details["failed_tests"][0].endswith("::test_after")
