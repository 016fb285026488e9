"""The fuzz of the fused norm ops (tests/fuzz_ops.py) in CI: a fixed, seeded budget of cases on the CPU, Triton
under the interpreter and the raw fastsemdiff._C ops on their CPU registration (validation, then "CUDA only").
Every case must match the reference or raise its documented error. Also: the stream covers what it claims, the
fuzz catches a planted kernel fault, and the gpu_check stage names a case that crashed its process and goes on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

import fuzz_ops  # noqa: E402

CI_SEED, CI_CASES = 20261204, 40
REPO = Path(__file__).resolve().parents[1]


def _report(results):
    return "\n".join(f"{r['name']}: {'; '.join(r['problems'])}" for r in results if r["status"] == "fail")


def test_fuzz_cases_match_the_reference_or_raise_the_documented_error():
    results = fuzz_ops.run(CI_CASES, CI_SEED, ["triton"], "cpu")
    assert len(results) == CI_CASES
    assert not _report(results), _report(results)
    assert sum(r["status"] == "refused" for r in results) >= 1  # the broken inputs were refused


def test_the_ci_stream_covers_the_edge_cases():
    cases = [fuzz_ops.draw_case(CI_SEED, i) for i in range(CI_CASES)]
    assert any(c.C % 2 for c in cases) and any(c.C % 8 == 0 for c in cases)
    assert {0, 1} <= {c.B for c in cases} and 1 in {c.N for c in cases}
    assert {"BC", "B1C", "BNC"} <= {k for c in cases for k in c.kinds.values()}
    assert {"separate", "adaln_chunks", "transposed"} <= {c.mod_source for c in cases}
    assert {"contiguous", "column_chunk", "transposed"} <= {c.x_layout for c in cases}
    assert set(fuzz_ops.DTYPES) <= {c.dtype for c in cases}
    assert {"mln", "grmln"} <= {c.op for c in cases} and {True, False} <= {c.rms for c in cases}
    assert any(c.broken for c in cases) and any(c.mod_dtype != c.dtype for c in cases)
    assert fuzz_ops.draw_case(CI_SEED, 7) == fuzz_ops.draw_case(CI_SEED, 7)  # any case replays alone


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_a_planted_kernel_fault_is_caught(monkeypatch, where):
    """A Triton launcher 1% off in one output: the fuzz reports failures (so a passing fuzz means something)."""
    from fastsemdiff.kernels import modulated_layer_norm as kernels

    K = kernels.Prevalidated  # the entries the ops call, after fastsemdiff.ops.validation
    name = "modulated_norm_fwd" if where == "forward" else "modulated_norm_bwd"
    real = getattr(K, name)

    def off(*args, **kwargs):
        out = list(real(*args, **kwargs))
        i = 1 if where == "forward" else 0  # y, or dx
        out[i] = out[i] * 1.01
        return tuple(out)

    monkeypatch.setattr(K, name, staticmethod(off))
    results = fuzz_ops.run(12, CI_SEED, ["triton"], "cpu", raw=False)
    failed = [r for r in results if r["status"] == "fail"]
    assert len(failed) >= 3, [r["status"] for r in results]
    assert all("max abs error" in p for r in failed for p in r["problems"])


def test_the_command_line_names_each_case_before_it_runs(tmp_path):
    progress, out = tmp_path / "progress.txt", tmp_path / "out.jsonl"
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1", "FASTSEMDIFF_FUZZ_PLANT_CRASH": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "fuzz_ops.py"), "--device", "cpu", "--cases", "4",
                           "--seed", str(CI_SEED), "--progress", str(progress), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -11, proc.stderr[-2000:]
    started = progress.read_text().splitlines()
    assert [line.split("\t")[0] for line in started] == ["0", "1", "2"]
    assert started[-1].split("\t")[1] == fuzz_ops.draw_case(CI_SEED, 2).name
    assert len(out.read_text().splitlines()) == 2  # the two cases before the crash were recorded


def test_the_gpu_check_stage_reports_a_crashed_case_by_name_and_resumes(tmp_path, monkeypatch):
    """The fuzz stage in a dry run with a planted segfault at case 2: one case lost, named; the rest ran."""
    if not (REPO / "scripts" / "gpucheck" / "runner.py").exists():
        pytest.skip("scripts/gpucheck (the gpu_check stage package) is not in this checkout yet")
    monkeypatch.syspath_prepend(str(REPO / "scripts"))
    from gpucheck import runner
    from gpucheck.stages import fuzz

    monkeypatch.setenv("FASTSEMDIFF_FUZZ_PLANT_CRASH", "2")
    check = runner.Check(tmp_path, tmp_path, dry_run=True, budget_s=900)
    stage = fuzz.run(check)
    d = stage.details
    assert stage.status == "failed" and len(d["crashed"]) == 1, (stage.reason, d)
    assert d["crashed"][0].startswith(fuzz_ops.draw_case(fuzz.SEED, 2).name) and "exit code -11" in d["crashed"][0]
    assert d["cases_run"] == fuzz.DRY_CASES and d["passed"] + d["refused"] == fuzz.DRY_CASES - 1
    assert json.dumps(d)  # it lands in gpu_check.json
