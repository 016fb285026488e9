"""Every input the fused ops do not take is refused with a clear error before anything launches.

Two layers validate (fastsemdiff/ops/validation.py for the custom ops whatever backend runs; csrc/validate.h for
the raw fastsemdiff._C ops, which on CPU tensors validate before their "CUDA only" refusal, so a CPU proves
each C++ message too). Each case below starts from a valid call and breaks one thing; the table names the
message each layer must give (None: that layer takes the input, e.g. C=100 runs on Triton but not in the
16-byte vectorised CUDA kernels). The Triton kernels are replaced by tripwires, so a refusal that came after
a launch fails the test.
"""
from __future__ import annotations

import math

import pytest
import torch

from fastsemdiff.ops import _cuda, validation

BF16, F32 = torch.bfloat16, torch.float32
M, C, TPM = 6, 64, 3  # two modulation rows of three tokens
R = M // TPM


def _t(*shape, dtype=BF16):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 7), dtype=F32).to(dtype)


def fwd_args(gated=False):
    """A valid forward call: dict of the operands (x, h, gate, shift, scale, weight, bias, eps, tpm)."""
    return dict(x=_t(M, C), h=_t(M, C) if gated else None, gate=_t(R, C) if gated else None, shift=_t(R, C),
                scale=_t(R, C), weight=_t(C, dtype=F32), bias=_t(C, dtype=F32), eps=1e-6, tpm=TPM)


def bwd_args(gated=False):
    return dict(dx_out=_t(M, C) if gated else None, dy=_t(M, C), x=_t(M, C), h=_t(M, C) if gated else None,
                gate=_t(R, C) if gated else None, mean=_t(M, dtype=F32), rstd=_t(M, dtype=F32).abs() + 1,
                scale=_t(R, C), weight=_t(C, dtype=F32), bias=_t(C, dtype=F32), tpm=TPM)


def _misaligned_start():
    return _t(M, C + 8)[:, 4:4 + C]  # bf16: starts 8 bytes into the allocation


def _odd_row_stride():
    return _t(M, C + 4)[:, :C]  # bf16 rows 136 bytes apart


# (id, fwd or bwd, gated, {operand: new value}, C++ message or None, Python message or None)
NORM_CASES = [
    ("x-3d", "fwd", False, {"x": _t(2, 3, C)}, r"x must be \[M, C\] \(2-D\)", r"x must be \[M, C\] \(2-D\)"),
    ("x-1d-bwd", "bwd", False, {"x": _t(C)}, r"x must be \[M, C\] \(2-D\)", r"x must be \[M, C\] \(2-D\)"),
    ("x-int", "fwd", False, {"x": torch.ones(M, C, dtype=torch.int32)}, "x must be float32, float16 or bfloat16",
     "x must be a floating tensor"),
    ("x-fp64", "fwd", False, {"x": _t(M, C, dtype=torch.float64)}, "x must be float32, float16 or bfloat16", None),
    ("C-not-multiple-of-8", "fwd", True, {"x": _t(M, 100), "h": _t(M, 100), "gate": _t(R, 100),
                                          "shift": _t(R, 100), "scale": _t(R, 100), "weight": None, "bias": None},
     "C=100 is not a positive multiple of 8", None),
    ("C-above-row-limit", "fwd", False, {"x": _t(2, 8200), "shift": _t(2, 8200), "scale": _t(2, 8200),
                                         "weight": None, "bias": None, "tpm": 1}, "row limit of 8192", None),
    ("empty-rows-C0", "fwd", False, {"x": _t(M, 0), "shift": _t(R, 0), "scale": _t(R, 0), "weight": None,
                                     "bias": None}, "C=0 is not a positive multiple of 8", r"C=0"),
    ("empty-rows-C0-bwd", "bwd", False, {"x": _t(M, 0), "dy": _t(M, 0), "scale": _t(R, 0), "weight": None,
                                         "bias": None}, "C=0 is not a positive multiple of 8", r"C=0"),
    ("misaligned-start", "fwd", False, {"x": _misaligned_start()}, "x does not start at a 16-byte aligned", None),
    ("misaligned-row-stride", "fwd", False, {"x": _odd_row_stride()}, "row stride of x .* multiple of 16 bytes",
     None),
    ("misaligned-dy", "bwd", False, {"dy": _odd_row_stride()}, "row stride of dy", None),
    ("misaligned-gate", "fwd", True, {"gate": _t(R, C + 4)[:, :C]}, "row stride of gate", None),
    ("shift-rows", "fwd", False, {"shift": _t(3, C)}, r"shift must be \[2, 64\]", r"shift must be \[2, 64\]"),
    ("scale-width", "fwd", False, {"scale": _t(R, 32)}, r"scale must be \[2, 64\]", r"scale must be \[2, 64\]"),
    ("shift-1d", "fwd", False, {"shift": _t(C)}, r"shift must be \[2, 64\]", r"shift must be \[2, 64\]"),
    ("gate-rows", "fwd", True, {"gate": _t(M, C)}, r"gate must be \[2, 64\]", r"gate must be \[2, 64\]"),
    ("scale-rows-bwd", "bwd", True, {"scale": _t(1, C)}, r"scale must be \[2, 64\]", r"scale must be \[2, 64\]"),
    ("shift-int", "fwd", False, {"shift": torch.ones(R, C, dtype=torch.int64)}, "shift must be a floating tensor",
     "shift must be a floating tensor"),
    ("mod-strides-differ", "fwd", False, {"shift": _t(R, 2 * C)[:, :C]}, None, "must share one row stride"),
    ("mod-transposed-view", "fwd", True, {"gate": _t(C, R).t(), "shift": _t(R, 3 * C)[:, :C],
                                          "scale": _t(R, 3 * C)[:, C:2 * C]}, None, "must share one row stride"),
    ("tpm-not-dividing", "fwd", False, {"tpm": 4, "shift": _t(1, C), "scale": _t(1, C)},
     "tokens_per_mod_row=4 must be >= 1 and divide M=6", "tokens_per_mod_row=4 must be >= 1 and divide M=6"),
    ("tpm-zero", "fwd", False, {"tpm": 0}, "tokens_per_mod_row=0 must be >= 1", "tokens_per_mod_row=0 must be >= 1"),
    ("tpm-not-dividing-bwd", "bwd", True, {"tpm": 5}, "tokens_per_mod_row=5", "tokens_per_mod_row=5"),
    ("h-shape", "fwd", True, {"h": _t(M, 32)}, r"h must be \[6, 64\] \(like x\)", r"h must be \[6, 64\] \(like x\)"),
    ("dy-shape", "bwd", False, {"dy": _t(M - 1, C)}, r"dy must be \[6, 64\]", r"dy must be \[6, 64\]"),
    ("dx_out-shape", "bwd", True, {"dx_out": _t(M, 2 * C)}, r"dx_out must be \[6, 64\]", r"dx_out must be \[6, 64\]"),
    ("weight-shape", "fwd", False, {"weight": _t(32, dtype=F32)}, r"weight must be \[64\]", r"weight must be \[64\]"),
    ("bias-2d", "bwd", False, {"bias": _t(1, C, dtype=F32)}, r"bias must be \[64\]", r"bias must be \[64\]"),
    ("weight-int", "fwd", False, {"weight": torch.ones(C, dtype=torch.int32)}, "weight must be a floating tensor",
     "weight must be a floating tensor"),
    ("mean-dtype", "bwd", False, {"mean": _t(M, dtype=BF16)}, r"mean and rstd must be float32 \[6\]",
     r"mean must be float32 \[6\]"),
    ("rstd-length", "bwd", True, {"rstd": _t(M + 1, dtype=F32)}, r"mean and rstd must be float32 \[6\]",
     r"rstd must be float32 \[6\]"),
    ("eps-nan", "fwd", False, {"eps": math.nan}, "eps must be finite and >= 0", "eps must be finite and >= 0"),
    ("eps-inf", "fwd", True, {"eps": math.inf}, "eps must be finite and >= 0", "eps must be finite and >= 0"),
    ("eps-negative", "fwd", False, {"eps": -1e-6}, "eps must be finite and >= 0", "eps must be finite and >= 0"),
]
TIMESTEP_CASES = [  # (id, (t, dim, max_period), message of both layers)
    ("t-2d", (torch.rand(3, 1), 8, 1e4), r"t must be \[B\] \(1-D\)"),
    ("t-bool", (torch.ones(3, dtype=torch.bool), 8, 1e4), "t must be a real"),
    ("t-complex", (torch.ones(3, dtype=torch.complex64), 8, 1e4), "t must be a real"),
    ("dim-zero", (torch.rand(3), 0, 1e4), "dim must be"),
    ("max-period-nan", (torch.rand(3), 8, math.nan), "max_period must be finite and > 0"),
    ("max-period-zero", (torch.rand(3), 8, 0.0), "max_period must be finite and > 0"),
]


def _call(kind, gated, a, *, cpp: bool):
    """The case's call: of the raw fastsemdiff._C op (cpp) or of the fastsemdiff:: custom op on Triton."""
    if cpp:
        ops = _cuda.load()
        if kind == "fwd":
            if gated:
                return ops.grmln_fwd(a["x"], a["h"], a["gate"], a["shift"], a["scale"], a["weight"], a["bias"],
                                     a["eps"], a["tpm"], False)
            return ops.mln_fwd(a["x"], a["shift"], a["scale"], a["weight"], a["bias"], a["eps"], a["tpm"], False)
        if gated:
            return ops.grmln_bwd(a["dx_out"], a["dy"], a["x"], a["h"], a["gate"], a["mean"], a["rstd"], a["scale"],
                                 a["weight"], a["bias"], a["tpm"], False)
        return ops.mln_bwd(a["dy"], a["x"], a["mean"], a["rstd"], a["scale"], a["weight"], a["bias"], a["tpm"], False)
    ops = torch.ops.fastsemdiff
    if kind == "fwd":
        if gated:
            return ops.gated_residual_modulated_norm_fwd(a["x"], a["h"], a["gate"], a["shift"], a["scale"],
                                                         a["weight"], a["bias"], a["eps"], a["tpm"], False,
                                                         "triton", "off")
        return ops.modulated_norm_fwd(a["x"], a["shift"], a["scale"], a["weight"], a["bias"], a["eps"], a["tpm"],
                                      False, "triton", "off")
    if gated:
        return ops.gated_residual_modulated_norm_bwd(a["dx_out"], a["dy"], a["x"], a["h"], a["gate"], a["mean"],
                                                     a["rstd"], a["scale"], a["weight"], a["bias"], a["tpm"], False,
                                                     "triton", "off")
    return ops.modulated_norm_bwd(a["dy"], a["x"], a["mean"], a["rstd"], a["scale"], a["weight"], a["bias"],
                                  a["tpm"], False, "triton", "off")


def _case_args(kind, gated, change):
    a = fwd_args(gated) if kind == "fwd" else bwd_args(gated)
    a.update(change)
    return a


@pytest.fixture
def no_launch(monkeypatch):
    """Every Triton kernel of fastsemdiff replaced by a tripwire: a launch fails the test."""
    pytest.importorskip("triton")
    from fastsemdiff.kernels import modulated_layer_norm as mln
    from fastsemdiff.kernels import timestep_embedding as ts

    class Tripwire:
        def __getitem__(self, grid):
            raise AssertionError("a Triton kernel was launched for an input that should have been refused")

    for mod, name in ((mln, "_fwd_kernel"), (mln, "_bwd_kernel"), (ts, "_timestep_embedding_kernel")):
        monkeypatch.setattr(mod, name, Tripwire())


@pytest.fixture(scope="module")
def cpp_ops():
    if _cuda.load() is None:
        pytest.skip(_cuda.unavailable_reason())
    return _cuda.load()


# ------------------------------------------------------------------------------------ Python op layer
@pytest.mark.parametrize("case", [c for c in NORM_CASES if c[5] is not None], ids=lambda c: c[0])
def test_custom_ops_refuse_before_launch(case, no_launch):
    _, kind, gated, change, _, message = case
    with pytest.raises(ValueError, match=message):
        _call(kind, gated, _case_args(kind, gated, change), cpp=False)


@pytest.mark.parametrize("case", TIMESTEP_CASES, ids=lambda c: c[0])
def test_timestep_op_refuses_before_launch(case, no_launch):
    _, (t, dim, max_period), message = case
    with pytest.raises(ValueError, match=message):
        torch.ops.fastsemdiff.timestep_embedding(t, dim, max_period, "triton", "off")


def test_operands_on_two_devices_are_refused():
    """A second device is an error in the custom ops (meta stands in for a GPU; both layers compare devices)."""
    a = fwd_args()
    with pytest.raises(ValueError, match="shift is on meta but x is on cpu; every operand must be on one device"):
        validation.norm_fwd("op", a["x"], a["shift"].to("meta"), a["scale"], a["weight"], a["bias"], 1e-6, TPM)
    b = bwd_args(gated=True)
    with pytest.raises(ValueError, match="rstd is on meta but x is on cpu"):
        validation.norm_bwd("op", b["dy"], b["x"], b["mean"], b["rstd"].to("meta"), b["scale"], None, None, TPM,
                            b["dx_out"], b["h"], b["gate"])
    with pytest.raises(ValueError, match="weight is on meta"):
        validation.norm_fwd("op", a["x"], a["shift"], a["scale"], a["weight"].to("meta"), None, 1e-6, TPM)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("gated", [False, True], ids=["mln", "grmln"])
def test_valid_calls_pass_the_checks(kind, gated):
    """The base calls of the table are valid (so each case's error comes from the one thing it breaks)."""
    a = fwd_args(gated) if kind == "fwd" else bwd_args(gated)
    if kind == "fwd":
        validation.norm_fwd("op", a["x"], a["shift"], a["scale"], a["weight"], a["bias"], a["eps"], a["tpm"], a["h"],
                            a["gate"])
    else:
        validation.norm_bwd("op", a["dy"], a["x"], a["mean"], a["rstd"], a["scale"], a["weight"], a["bias"], a["tpm"],
                            a["dx_out"], a["h"], a["gate"])


def test_empty_batch_is_not_refused():
    """M == 0 (an empty batch) gives empty results on Triton rather than an error."""
    pytest.importorskip("triton")
    x, m = _t(0, C), _t(0, C)
    y, mean, rstd = torch.ops.fastsemdiff.modulated_norm_fwd(x, m, m, None, None, 1e-6, 1, False, "triton", "off")
    assert y.shape == (0, C) and mean.shape == (0,) and rstd.shape == (0,)


# ------------------------------------------------------------------------ C++ ops (CPU registration)
@pytest.mark.parametrize("case", [c for c in NORM_CASES if c[4] is not None], ids=lambda c: c[0])
def test_cpp_ops_refuse_with_the_message(case, cpp_ops):
    _, kind, gated, change, message, _ = case
    with pytest.raises(RuntimeError, match=message):
        _call(kind, gated, _case_args(kind, gated, change), cpp=True)


@pytest.mark.parametrize("case", TIMESTEP_CASES, ids=lambda c: c[0])
def test_cpp_timestep_refuses_with_the_message(case, cpp_ops):
    _, (t, dim, max_period), message = case
    with pytest.raises(RuntimeError, match=message):
        cpp_ops.timestep_embedding(t, dim, max_period)


@pytest.mark.parametrize("kind", ["fwd", "bwd"])
@pytest.mark.parametrize("gated", [False, True], ids=["mln", "grmln"])
@pytest.mark.parametrize("change", [{}, {"x": _t(0, C), "dy": _t(0, C), "dx_out": _t(0, C), "h": _t(0, C),
                                         "gate": _t(0, C), "shift": _t(0, C), "scale": _t(0, C),
                                         "mean": _t(0, dtype=F32), "rstd": _t(0, dtype=F32), "tpm": 1},
                                    {"shift": _t(R, 3 * C)[:, :C], "scale": _t(R, 3 * C)[:, C:2 * C]}],
                         ids=["valid", "empty-batch", "adaln-chunks"])
def test_valid_cpp_calls_pass_validation_then_say_cuda_only(kind, gated, change, cpp_ops):
    """Inputs the CUDA kernels take get through validation on CPU and meet the "CUDA only" refusal."""
    a = _case_args(kind, gated, {k: v for k, v in change.items() if k in (fwd_args(gated) if kind == "fwd"
                                                                            else bwd_args(gated))})
    with pytest.raises(RuntimeError, match=r"got CPU tensors; fastsemdiff._C ops run on CUDA tensors only"):
        _call(kind, gated, a, cpp=True)


@pytest.mark.parametrize("op", ["mln_fwd", "mln_bwd", "grmln_fwd", "grmln_bwd", "timestep_embedding"])
def test_cuda_kernels_are_registered_behind_the_host_compiled_checks(op, cpp_ops):
    """Every CUDA registration of fastsemdiff._C comes from csrc/ops.cpp, which validates before it calls into
    the nvcc-compiled files: a refused input raises with no nvcc-compiled frame on the stack (the first H200 run
    ended the process in a refusal raised from adaln.cu). The dispatcher records where each kernel was
    registered, so a CPU proves the structure."""
    dump = torch._C._dispatch_dump(f"fastsemdiff_C::{op}")
    registered = {line.split(":")[0]: line for line in dump.splitlines() if ": registered at " in line}
    assert "CUDA" in registered and "CPU" in registered, dump
    for key in ("CUDA", "CPU"):
        assert "csrc/ops.cpp:" in registered[key], registered[key]
