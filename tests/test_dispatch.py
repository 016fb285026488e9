"""The backend decision (``fastsemdiff.ops.dispatch``): each rule, the table ``auto`` reads, and the facts the
layers and the ops gather for it.

The rules are a pure function of the facts, so they are tested here for CUDA inputs on a machine without a
GPU; the layers' view of a CUDA tensor is reproduced with fake tensors (what ``torch.compile`` traces with).
"""
from __future__ import annotations

import re

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fastsemdiff.ops import _cuda, dispatch
from fastsemdiff.ops.dispatch import (AUTO_UNMEASURED, OPS, aligned_rows, choose_backend, cuda_refusal,
                                      launch_backend, resolve_backend)

from conftest import REPO

bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64
MLN, GRMLN, TEMB = "modulated_layer_norm", "gated_residual_modulated_norm", "timestep_embedding"


def decide(requested, op=MLN, device="cuda", dtype=bf16, channels=384, aligned=None, ndim=None, triton=True,
           cuda=True, measured=None):
    return choose_backend(requested, op, device, dtype, channels, aligned, ndim=ndim, triton_available=triton,
                          cuda_available=cuda, cuda_reason="fastsemdiff._C was not built (test)", measured=measured)


# ------------------------------------------------------------------------------------------------ the rules
def test_torch_runs_torch_whatever_the_facts():
    for facts in ({}, {"device": "cpu"}, {"dtype": f64}, {"ndim": 2}, {"triton": False, "cuda": False}):
        for op in OPS:
            assert decide("torch", op, **facts) == "torch", (op, facts)


def test_impossible_explicit_requests_say_why_and_name_the_fix():
    with pytest.raises(RuntimeError, match=r"backend='triton' needs the triton package \(pip install "
                                           r"'fastsemdiff\[triton\]'\); use backend='torch' or 'auto'"):
        decide("triton", triton=False)
    with pytest.raises(RuntimeError, match=r"backend='cuda': fastsemdiff._C was not built \(test\); "
                                           r"or use backend='triton' or 'auto'"):
        decide("cuda", cuda=False)
    with pytest.raises(RuntimeError, match="backend='cuda'"):  # on CPU tensors too: the request itself is impossible
        decide("cuda", device="cpu", cuda=False)
    with pytest.raises(ValueError, match=r"backend='fastest' is not available; choose one of"):
        decide("fastest")
    with pytest.raises(ValueError, match="no fused op 'layer_norm'"):
        decide("auto", op="layer_norm")


def test_inputs_the_fused_ops_are_not_written_for_run_torch():
    for requested in ("auto", "triton", "cuda"):
        # the rank the layers hand the ops: [B, N, C] for the norms (the gate that lived in nn/norm.py), [B] for t
        assert decide(requested, MLN, ndim=2) == "torch" and decide(requested, GRMLN, ndim=4) == "torch"
        assert decide(requested, TEMB, ndim=2, channels=None) == "torch"
        # fp64: the norm kernels would compute it in fp32
        assert decide(requested, MLN, dtype=f64) == "torch" and decide(requested, GRMLN, dtype=f64) == "torch"
    assert decide("triton", MLN, ndim=3) == "triton" and decide("triton", TEMB, ndim=1, channels=None) == "triton"
    assert decide("triton", TEMB, dtype=f64, channels=None) == "triton"  # fp32 in the reference as well
    for dtype in (f32, bf16, f16):
        assert decide("auto", dtype=dtype, measured={MLN: "triton"}) == "triton"


def test_auto_off_cuda_and_its_defaults_on_cuda():
    for op in OPS:
        assert decide("auto", op, device="cpu") == "torch" and decide("auto", op, device=None) == "torch"
    # a device class no run has measured: torch for every op (the kernels lost where they were measured)
    for op in OPS:
        assert decide("auto", op) == "torch" and decide("auto", op, measured={}) == "torch"
    assert decide("auto", MLN, triton=False, measured={MLN: "triton"}) == "torch"
    assert decide("auto", MLN, triton=False, cuda=False, measured={MLN: "cuda"}) == "torch"  # never raises


def test_auto_reads_the_measured_table():
    table = {MLN: "cuda", TEMB: "triton"}
    assert decide("auto", MLN, measured=table) == "cuda"
    assert decide("auto", GRMLN, measured=table) == "torch"  # not in the table: the default
    assert decide("auto", TEMB, channels=None, measured=table) == "triton"
    assert decide("auto", TEMB, channels=None, measured={TEMB: "cuda"}) == "cuda"
    assert decide("auto", MLN, measured={MLN: "torch"}) == "torch"
    # a measured cuda row where the CUDA kernels cannot serve this call: Triton, then torch
    assert decide("auto", MLN, measured=table, cuda=False) == "triton"
    assert decide("auto", MLN, measured=table, channels=12) == "triton"
    assert decide("auto", MLN, measured=table, aligned=False) == "triton"
    assert decide("auto", MLN, measured=table, aligned=False, triton=False) == "torch"
    assert decide("auto", MLN, measured=table, device="cpu") == "torch"


def test_cuda_falls_back_where_its_kernels_do_not_take_the_input():
    assert decide("cuda") == "cuda" and decide("cuda", aligned=True) == "cuda"
    assert decide("cuda", aligned=None) == "cuda"  # unknown (trace time): the op decides on the real tensors
    for facts in ({"channels": 12}, {"channels": 0}, {"channels": 8200}, {"aligned": False}, {"device": "cpu"}):
        assert decide("cuda", **facts) == "triton", facts
        assert decide("cuda", triton=False, **facts) == "torch", facts
    assert decide("cuda", TEMB, channels=None) == "cuda" and decide("cuda", TEMB, device="cpu") == "triton"
    assert decide("triton", device="cpu") == "triton"  # asked for: the interpreter serves CPU tensors


def test_triton_row_limit():
    assert decide("triton", channels=65536) == "triton"
    assert decide("triton", channels=65537) == "torch" and decide("auto", channels=65537) == "torch"


def test_cuda_refusal_says_why():
    assert cuda_refusal(MLN, "cuda", bf16, 1152, True) is None
    assert cuda_refusal(MLN, None) is None and cuda_refusal(TEMB, "cuda", f64) is None
    assert "CUDA tensors, not cpu" in cuda_refusal(MLN, "cpu")
    assert "float32, float16 or bfloat16" in cuda_refusal(MLN, "cuda", f64)
    assert "C=100 is not a positive multiple of 8" in cuda_refusal(MLN, "cuda", bf16, 100)
    assert "C=16384 exceeds 8192" in cuda_refusal(GRMLN, "cuda", bf16, 16384)
    assert "16-byte aligned" in cuda_refusal(MLN, "cuda", bf16, 1152, aligned=False)


def test_the_tables_name_backends_and_ops():
    for cls, row in dispatch.AUTO_MEASURED.items():
        assert re.fullmatch(r"sm_\d{2,3}", cls), cls
    for table in (*dispatch.AUTO_MEASURED.values(), AUTO_UNMEASURED):
        assert set(table) <= set(OPS) and set(table.values()) <= {"torch", "triton", "cuda"}, table
    assert set(AUTO_UNMEASURED) == set(OPS)


# ---------------------------------------------------------------------------- the table against the record
RESULTS = REPO / "bench" / "RESULTS.md"
# the op's group in bench/report.py's tables: the direction a training step needs, at the target shape
RECORD_GROUPS = {MLN: "adaln-mln-forward_backward-target-256x256x1152",
                 GRMLN: "adaln-grmln-forward_backward-target-256x256x1152",
                 TEMB: "timestep_embedding-forward-target-256x256"}
IMPL_BACKEND = {"torch_eager": "torch", "torch_compile": "torch", "triton": "triton", "cuda": "cuda"}


def _seconds(cell: str) -> float:
    value, unit = cell.split()
    return float(value.replace(",", "")) * {"ms": 1e-3, "us": 1e-6, "s": 1.0}[unit]


def recorded_choices(text: str) -> dict[str, dict[str, str]]:
    """Per device class, the backend of the fastest row of each op's group in RESULTS.md's GPU sections (a
    section is a ``### `` heading with a ``- device class: sm_XX`` line; a later section of a class replaces
    an earlier one)."""
    gpu = text.split("\n## GPU\n", 1)[1].split("\n## ", 1)[0]
    choices: dict[str, dict[str, str]] = {}
    for section in gpu.split("\n### ")[1:]:
        found = re.search(r"^- device class: (sm_\d+)\s*$", section, re.M)
        if not found:
            continue
        row = {}
        for op, group in RECORD_GROUPS.items():
            heading = re.search(rf"^#### {re.escape(group)}\n", section, re.M)
            if not heading:
                continue
            body = section[heading.end():].split("\n#### ", 1)[0]
            times = {}
            for line in [line for line in body.splitlines() if line.startswith("|")][2:]:  # past header and rule
                cells = [c.strip() for c in line.strip("|").split("|")]
                times[cells[0]] = _seconds(cells[1])
            row[op] = IMPL_BACKEND[min(times, key=times.get)]
        choices[found.group(1)] = row
    return choices


def test_auto_follows_the_recorded_measurements():
    """AUTO_MEASURED and bench/RESULTS.md change together: each class's row names the fastest backend of the
    record's forward_backward rows, and every class in the table has its record."""
    recorded = recorded_choices(RESULTS.read_text())
    assert "sm_90" in recorded and recorded["sm_90"] == {MLN: "torch", GRMLN: "torch", TEMB: "torch"}
    assert dispatch.AUTO_MEASURED == recorded


def test_the_record_parser_reads_the_fastest_row():
    text = ("# x\n\n## GPU\n\n### a run\n\n- device class: sm_80\n\n"
            f"#### {RECORD_GROUPS[MLN]}\n\nbytes moved: 5 x B*N*C*2 B\n\n| impl | time/call | x |\n|---|---|---|\n"
            "| torch_eager | 1.02 ms | 1 |\n| torch_compile | 259.4 us | 1 |\n| cuda | 166.3 us | 1 |\n\n"
            "## CPU\n\n### not a GPU\n\n- device class: sm_70\n")
    assert recorded_choices(text) == {"sm_80": {MLN: "cuda"}}


def test_limits_match_the_kernels():
    common = (REPO / "csrc" / "common.h").read_text()
    value = lambda name: int(re.search(rf"constexpr int {name} = (\d+);", common).group(1))  # noqa: E731
    assert value("kChannelMultiple") == dispatch.CUDA_CHANNEL_MULTIPLE
    assert value("kMaxChannels") == dispatch.CUDA_MAX_CHANNELS
    assert value("kVectorBytes") == dispatch.CUDA_VECTOR_BYTES
    pytest.importorskip("triton")
    from fastsemdiff.kernels import modulated_layer_norm as K

    assert K.MAX_FUSED_SIZE == dispatch.TRITON_MAX_CHANNELS


# --------------------------------------------------------------------------------------- the facts gathered
def test_aligned_rows_reads_addresses_and_row_strides():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 64, generator=g, dtype=bf16)
    mod = torch.randn(2, 64, generator=g, dtype=bf16)
    assert aligned_rows(x, mod, None)
    assert not aligned_rows(torch.randn(6, 72, generator=g, dtype=bf16)[:, 4:68])  # starts 8 bytes into a row
    assert not aligned_rows(x, torch.randn(2, 68, generator=g, dtype=bf16)[:, :64])  # row stride of 136 bytes
    assert aligned_rows(x, torch.randn(2, 68, generator=g)[:, 1:65])  # another dtype: the op converts it
    assert aligned_rows(x, torch.randn(64, 2, generator=g, dtype=bf16).t())  # column-strided: the op copies it
    assert aligned_rows(x, torch.empty(0, 64, dtype=bf16))


def fake_cuda(*shape, dtype=f32):
    """A CUDA tensor as torch.compile's tracing sees it: device, dtype and shape, no storage."""
    with FakeTensorMode():
        return torch.empty(*shape, device="cuda", dtype=dtype)


def test_resolve_backend_reads_the_facts_from_the_tensor():
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    assert resolve_backend("auto", MLN, x) == "torch" and resolve_backend("triton", MLN, x) == "triton"
    assert resolve_backend("triton", MLN, x.double()) == "torch"  # fp64 on any backend
    assert resolve_backend("triton", MLN, x[0]) == "torch"  # [N, C]: not the fused op's rank
    assert resolve_backend("auto", MLN) == "torch" and resolve_backend("torch", MLN) == "torch"
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 8)) == "torch"  # no device class known: unmeasured
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 8, dtype=f64)) == "torch"
    assert resolve_backend("auto", TEMB, fake_cuda(4)) == "torch"
    assert resolve_backend("triton", TEMB, fake_cuda(4)) == "triton"
    with pytest.raises(ValueError, match="cuda-magic"):
        resolve_backend("cuda-magic", MLN, x)


@pytest.fixture
def cuda_extension(monkeypatch):
    """fastsemdiff._C made to look loaded (no call reaches it: the tests only decide)."""
    monkeypatch.setattr(_cuda, "_loaded", True)
    monkeypatch.setattr(_cuda, "_ops", object())
    monkeypatch.setattr(_cuda, "_reason", None)


@pytest.fixture
def no_cuda_extension(monkeypatch):
    monkeypatch.setattr(_cuda, "_loaded", True)
    monkeypatch.setattr(_cuda, "_ops", None)
    monkeypatch.setattr(_cuda, "_reason", "fastsemdiff._C was not built (test)")


def test_auto_in_a_layer_reads_the_module_table(cuda_extension, monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_MEASURED", {"sm_80": {MLN: "cuda", TEMB: "triton"}, "sm_90": {MLN: "triton"}})
    monkeypatch.setattr(dispatch, "device_class", lambda device: "sm_80" if device.type == "cuda" else None)
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 64, dtype=bf16)) == "cuda"
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 60, dtype=bf16)) == "triton"  # C not a multiple of 8
    assert resolve_backend("auto", GRMLN, fake_cuda(2, 3, 64, dtype=bf16)) == "torch"  # not in sm_80's row
    assert resolve_backend("auto", TEMB, fake_cuda(4)) == "triton"
    assert resolve_backend("auto", MLN, torch.randn(2, 3, 64).to(bf16)) == "torch"  # CPU
    monkeypatch.setattr(dispatch, "device_class", lambda device: "sm_90")
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 64, dtype=bf16)) == "triton"
    monkeypatch.setattr(dispatch, "device_class", lambda device: "sm_120")  # a class no run measured
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 64, dtype=bf16)) == "torch"


def test_device_class_off_cuda_is_unknown():
    assert dispatch.device_class(torch.device("cpu")) is None
    assert dispatch.measured_for(torch.device("cpu")) == {} and dispatch.measured_for(None) == {}
    if not torch.cuda.is_available():
        assert dispatch.device_class(torch.device("cuda")) is None
    else:
        major, minor = torch.cuda.get_device_capability()
        assert dispatch.device_class(torch.device("cuda")) == f"sm_{major}{minor}"


def test_auto_with_a_cuda_row_and_no_extension_runs_triton(no_cuda_extension, monkeypatch):
    monkeypatch.setattr(dispatch, "AUTO_MEASURED", {"sm_90": {MLN: "cuda"}})
    monkeypatch.setattr(dispatch, "device_class", lambda device: "sm_90")
    assert resolve_backend("auto", MLN, fake_cuda(2, 3, 64, dtype=bf16)) == "triton"


def test_cuda_without_the_extension_is_refused_in_layers_and_ops(no_cuda_extension):
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(2))
    with pytest.raises(RuntimeError, match=r"backend='cuda': fastsemdiff._C was not built \(test\).*'triton'"):
        resolve_backend("cuda", MLN, x)
    with pytest.raises(RuntimeError, match=r"backend='cuda': fastsemdiff._C was not built"):
        launch_backend("cuda", MLN, x.view(6, 8))
    assert resolve_backend("auto", MLN, x) == "torch"


def test_launch_backend_decides_on_the_real_rows(cuda_extension, monkeypatch):
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(3))
    assert launch_backend("cuda", MLN, x, (x[:2],)) == "triton"  # CPU tensors: not for the CUDA kernels
    assert launch_backend("triton", MLN, x) == "triton" and launch_backend("triton", MLN, x.double()) == "torch"
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    assert launch_backend("cuda", MLN, x) == "torch"
    with pytest.raises(RuntimeError, match="needs the triton package"):
        launch_backend("triton", MLN, x)
    with pytest.raises(ValueError, match=r"backend='auto' is not a fused backend; choose one of \('triton', 'cuda'\)"):
        launch_backend("auto", MLN, x)


def test_launch_backend_checks_alignment_only_for_cuda(cuda_extension, monkeypatch):
    """The alignment fact reaches the rule: the same facts with misaligned rows send 'cuda' to Triton."""
    seen = []
    real = dispatch.choose_backend
    monkeypatch.setattr(dispatch, "choose_backend", lambda *a, **k: seen.append(a[5]) or real(*a, **k))
    base = torch.randn(6, 72, generator=torch.Generator().manual_seed(5), dtype=bf16)
    launch_backend("cuda", MLN, base[:, :64].contiguous())
    launch_backend("cuda", MLN, base[:, 4:68])
    launch_backend("triton", MLN, base[:, 4:68])
    assert seen == [True, False, None]


def test_an_fp64_call_of_a_fused_op_runs_the_torch_launchers():
    """The op asked for Triton with fp64 tensors: dispatch sends it to the torch launchers, so the forward is
    fp64 (the Triton kernels would compute it in fp32). The op's schema saves the row statistics in fp32, so
    its backward is fp32-accurate; the layers send fp64 to the reference itself (rule 3)."""
    from fastsemdiff import ops
    from fastsemdiff.nn import modulated_layer_norm_ref

    g = torch.Generator().manual_seed(6)
    x, shift, scale = (torch.randn(*s, generator=g, dtype=f64) for s in ((2, 5, 24), (2, 24), (2, 24)))
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    ref_leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y = ops.modulated_layer_norm(*leaves, eps=1e-6, backend="triton")
    ref = modulated_layer_norm_ref(*ref_leaves, eps=1e-6)
    assert y.dtype == f64
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn(2, 5, 24, generator=g, dtype=f64)
    for a, b in zip(torch.autograd.grad(y, leaves, dy), torch.autograd.grad(ref, ref_leaves, dy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
