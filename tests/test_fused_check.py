"""The fused kernels' first-use check (``fastsemdiff.ops.guard``), the torch fallback it switches to, and the
fused ops without Triton (the decision itself: tests/test_dispatch.py).

The check runs on CUDA devices only; here ``"cpu"`` is added to ``guard.CHECKED_DEVICE_TYPES`` so that it
checks the Triton kernels under the interpreter (conftest.py sets ``TRITON_INTERPRET=1``). Faults are
injected by wrapping the kernel launchers so that they perturb what they return.
"""
from __future__ import annotations

import functools
import sys
import warnings

import pytest
import torch

from fastsemdiff import ops
from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.nn import GatedResidualModulatedNorm, ModulatedLayerNorm, TimestepEmbedder
from fastsemdiff.nn.norm import gated_residual_modulated_norm_ref, modulated_layer_norm_ref
from fastsemdiff.ops import _cuda, dispatch, guard
from fastsemdiff.ops.guard import FusedCheckError, FusedKernelMismatch

from kernel_helpers import DEVICE, EPS, KINDS, check_op, mod_shape, randn

B, N, C = 2, 5, 16
bf16, f16, f32, f64 = torch.bfloat16, torch.float16, torch.float32, torch.float64


# ---------------------------------------------------------------- backend="cuda" without Triton installed
@pytest.fixture
def no_triton(monkeypatch):
    """Triton hidden: not findable, not importable, the kernels' modules forgotten; the CUDA extension looks
    loaded (it need not be built for this: CPU tensors never reach it)."""
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    monkeypatch.setitem(sys.modules, "triton", None)
    for name in [n for n in sys.modules if n.startswith("fastsemdiff.kernels")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "fastsemdiff.kernels", None)
    monkeypatch.setattr(_cuda, "_loaded", True)
    monkeypatch.setattr(_cuda, "_ops", object())
    monkeypatch.setattr(_cuda, "_reason", None)
    with pytest.raises(ImportError):
        import triton  # noqa: F401


def mln_inputs(kind, affine, rms, dtype, seed=0, C=C, device=DEVICE):
    """x, shift, scale, weight, bias (on the test device: the interpreter's CPU, or the GPU) and dy."""
    r = lambda *shape, **kw: randn(*shape, dtype=dtype, **kw).to(device)  # noqa: E731
    x = r(B, N, C, seed=seed, scale=2.0, offset=0.7)
    shift = r(*mod_shape(kind, B, N, C), seed=seed + 1, scale=0.5)
    scale = r(*mod_shape(kind, B, N, C), seed=seed + 2, scale=0.5)
    weight = r(C, seed=seed + 3, scale=0.3, offset=1.0) if affine else None
    bias = r(C, seed=seed + 4, scale=0.3) if affine and not rms else None
    return [x, shift, scale, weight, bias], r(B, N, C, seed=seed + 5)


def grmln_inputs(kind, affine, rms, dtype, seed=0, C=C, device=DEVICE):
    (x, shift, scale, weight, bias), dy = mln_inputs(kind, affine, rms, dtype, seed, C, device)
    h = randn(B, N, C, seed=seed + 6, dtype=dtype).to(device)
    gate = randn(*mod_shape(kind, B, N, C), seed=seed + 7, scale=0.5, dtype=dtype).to(device)
    return [x, h, gate, shift, scale, weight, bias], (randn(B, N, C, seed=seed + 8, dtype=dtype).to(device), dy)


@pytest.mark.parametrize("dtype", [f32, bf16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("kind", KINDS)
def test_cuda_backend_without_triton_runs_torch(no_triton, kind, affine, rms, dtype, monkeypatch):
    """Input the CUDA kernels do not take (here: CPU tensors, on any machine) on backend='cuda' without
    Triton: no ImportError; the torch fallback's forward and every gradient match the reference by the
    kernels' accuracy rule."""
    from fastsemdiff.ops import torch_launchers

    calls = []
    for name in ("modulated_norm_fwd", "modulated_norm_bwd"):
        real = getattr(torch_launchers, name)
        monkeypatch.setattr(torch_launchers, name,
                            lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    inputs, dy = mln_inputs(kind, affine, rms, dtype, device="cpu")
    check_op(functools.partial(ops.modulated_layer_norm, eps=EPS, rms=rms, backend="cuda"),
             functools.partial(modulated_layer_norm_ref, eps=EPS, rms=rms), inputs, dy,
             ["y", "x", "shift", "scale", "weight", "bias"])
    inputs, dys = grmln_inputs(kind, affine, rms, dtype, device="cpu")
    check_op(functools.partial(ops.gated_residual_modulated_norm, eps=EPS, rms=rms, backend="cuda"),
             functools.partial(gated_residual_modulated_norm_ref, eps=EPS, rms=rms, stored_dtype=inputs[0].dtype),
             inputs, dys,
             ["x_out", "y", "x", "h", "gate", "shift", "scale", "weight", "bias"])
    assert calls.count("modulated_norm_fwd") >= 2 and calls.count("modulated_norm_bwd") == 2, calls


def test_cuda_backend_layers_without_triton(no_triton):
    """The layers and the timestep embedding on backend='cuda' without Triton: the reference's results."""
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32, device="cpu")
    assert torch.equal(ModulatedLayerNorm(C, backend="cuda")(x, shift, scale),
                       modulated_layer_norm_ref(x, shift, scale, eps=1e-6))
    t = torch.rand(4, generator=torch.Generator().manual_seed(3))
    emb = {b: TimestepEmbedder(32, backend=b) for b in ("torch", "cuda")}
    emb["cuda"].load_state_dict(emb["torch"].state_dict())
    assert torch.equal(emb["cuda"](t), emb["torch"](t))
    assert torch.equal(ops.timestep_embedding(t * 1000, 32, backend="cuda"), ops.timestep_embedding(
        t * 1000, 32, backend="cuda", check="off"))


# ----------------------------------------------------------------------------------- the first-use check
@pytest.fixture
def checked_on_cpu(monkeypatch):
    """The check on CPU tensors too (the Triton interpreter), with no verdicts from earlier tests."""
    pytest.importorskip("triton")
    monkeypatch.setattr(guard, "CHECKED_DEVICE_TYPES", ("cuda", "cpu"))
    guard.reset()
    yield
    guard.reset()


@pytest.fixture
def kernels():
    """The Triton launchers the ops call (they validate first, so they run the unchecked entries)."""
    from fastsemdiff.kernels import modulated_layer_norm as K

    return K.Prevalidated


def perturb_forward(monkeypatch, K, how="shift"):
    """The Triton forward launcher returns y + 0.5 (or raises)."""
    real = K.modulated_norm_fwd

    def faulty(*args, **kwargs):
        if how == "raise":
            raise RuntimeError("injected launch failure")
        x_out, y, mean, rstd = real(*args, **kwargs)
        return x_out, y + 0.5, mean, rstd

    monkeypatch.setattr(K, "modulated_norm_fwd", staticmethod(faulty))


def test_correct_kernels_pass_without_a_warning(checked_on_cpu):
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32)
    inputs, _ = grmln_inputs("BC", True, False, bf16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ModulatedLayerNorm(C, backend="triton")(x, shift, scale)
        ModulatedLayerNorm(C, backend="triton", rms=True)(x, shift, scale)
        ops.gated_residual_modulated_norm(*inputs, backend="triton")
        TimestepEmbedder(32, backend="triton").to(DEVICE)(torch.rand(3, device=DEVICE))
    seen = guard.verdicts()
    assert len(seen) == 4 and all(v is None for v in seen.values()), seen
    assert {k[0] for k in seen} == {"modulated_layer_norm", "gated_residual_modulated_norm", "timestep_embedding"}


def test_warn_falls_back_to_torch_and_warns_once(checked_on_cpu, kernels, monkeypatch):
    perturb_forward(monkeypatch, kernels)
    layer = ModulatedLayerNorm(C, backend="triton")
    (x, shift, scale, _, _), dy = mln_inputs("BC", False, False, f32)
    leaves = [t.detach().requires_grad_() for t in (x, shift, scale)]
    with pytest.warns(FusedKernelMismatch) as caught:
        y = layer(*leaves)
    assert len(caught) == 1
    msg = str(caught[0].message)
    for part in ("modulated_layer_norm (triton, float32, C=16", "first-use check", "y [6, 16] float32",
                 "max abs error 0.5", "max rel error", "runs on torch"):
        assert part in msg, (part, msg)
    ref_leaves = [t.detach().requires_grad_() for t in (x, shift, scale)]
    ref = modulated_layer_norm_ref(*ref_leaves, eps=1e-6)
    assert torch.equal(y, ref)
    grads = torch.autograd.grad(y, leaves, dy)
    for g, r in zip(grads, torch.autograd.grad(ref, ref_leaves, dy)):
        torch.testing.assert_close(g, r)
    with warnings.catch_warnings():  # once: the same configuration neither checks nor warns again
        warnings.simplefilter("error")
        assert torch.equal(layer(x, shift, scale), ref.detach())
        assert torch.equal(ModulatedLayerNorm(C, backend="triton")(x, shift, scale), ref.detach())
    with pytest.warns(FusedKernelMismatch, match="bfloat16"):  # per dtype: bf16 is checked on its own
        layer(x.to(bf16), shift.to(bf16), scale.to(bf16))


def test_a_kernel_that_raises_fails_its_check(checked_on_cpu, kernels, monkeypatch):
    perturb_forward(monkeypatch, kernels, how="raise")
    (x, shift, scale, _, _), _ = mln_inputs("B1C", False, True, f32)
    with pytest.warns(FusedKernelMismatch, match="raised RuntimeError: injected launch failure"):
        y = ModulatedLayerNorm(C, backend="triton", rms=True)(x, shift, scale)
    assert torch.equal(y, modulated_layer_norm_ref(x, shift, scale, eps=1e-6, rms=True))


def test_a_faulty_backward_is_caught(checked_on_cpu, kernels, monkeypatch):
    real = kernels.modulated_norm_bwd

    def faulty(*args, **kwargs):
        dx, dh, dgate, dshift, dscale, dw, db = real(*args, **kwargs)
        return dx, dh * 1.5, dgate, dshift, dscale, dw, db

    monkeypatch.setattr(kernels, "modulated_norm_bwd", staticmethod(faulty))
    inputs, dys = grmln_inputs("BNC", True, False, f32)
    layer = GatedResidualModulatedNorm(C, elementwise_affine=True, backend="triton").to(DEVICE)
    with torch.no_grad():
        layer.weight.copy_(inputs[5])
        layer.bias.copy_(inputs[6])
    with pytest.warns(FusedKernelMismatch, match=r"dh \[6, 16\] float32: max abs error"):
        layer(*inputs[:5])
    check_op(lambda *a: layer(*a), functools.partial(gated_residual_modulated_norm_ref, weight=layer.weight,
                                                     bias=layer.bias, eps=1e-6),
             inputs[:5], dys, ["x_out", "y", "x", "h", "gate", "shift", "scale"])


def test_error_mode_raises(checked_on_cpu, kernels, monkeypatch):
    perturb_forward(monkeypatch, kernels)
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32)
    with pytest.raises(FusedCheckError, match=r"first-use check: y \[6, 16\] float32: max abs error 0.5.*"
                                              r"model.fused_check=warn"):
        ModulatedLayerNorm(C, backend="triton", fused_check="error")(x, shift, scale)
    with pytest.raises(FusedCheckError):  # and keeps refusing
        ops.modulated_layer_norm(x, shift, scale, backend="triton", check="error")


def test_off_runs_no_check(checked_on_cpu, kernels, monkeypatch):
    perturb_forward(monkeypatch, kernels)
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = ModulatedLayerNorm(C, backend="triton", fused_check="off")(x, shift, scale)
    assert guard.verdicts() == {}
    torch.testing.assert_close(y, modulated_layer_norm_ref(x, shift, scale, eps=1e-6) + 0.5)


@pytest.mark.skipif(DEVICE.type == "cuda", reason="on a GPU the kernel tests use CUDA tensors, which are checked")
def test_unchecked_devices_are_not_checked(kernels, monkeypatch):
    """By default only CUDA devices are checked: CPU tensors under the interpreter run unchecked."""
    pytest.importorskip("triton")
    guard.reset()
    perturb_forward(monkeypatch, kernels)
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32)
    ModulatedLayerNorm(C, backend="triton")(x, shift, scale)
    assert guard.verdicts() == {}


def test_timestep_embedding_check(checked_on_cpu, monkeypatch):
    from fastsemdiff.kernels import timestep_embedding as TK

    real = TK.timestep_embedding_fwd
    monkeypatch.setattr(TK, "timestep_embedding_fwd", lambda *a: real(*a) * 1.01)
    t = torch.rand(4, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    emb = {b: TimestepEmbedder(32, backend=b).to(DEVICE) for b in ("torch", "triton")}
    emb["triton"].load_state_dict(emb["torch"].state_dict())
    with pytest.warns(FusedKernelMismatch, match=r"timestep_embedding \(triton, t float32, dim=256\).*emb \[4, 256\]"):
        got = emb["triton"](t)
    assert torch.equal(got, emb["torch"](t))
    with pytest.raises(FusedCheckError, match="timestep_embedding"):
        ops.timestep_embedding(t, 64, backend="triton", check="error")


def test_check_runs_outside_compile_tracing(checked_on_cpu, kernels, monkeypatch):
    """A compiled caller: the check runs when the op executes (never while tracing), and the fallback holds
    inside the compiled graph."""
    perturb_forward(monkeypatch, kernels)
    calls = []
    real_passes = guard.passes

    def spy(*args, **kwargs):
        calls.append(torch.compiler.is_compiling())
        return real_passes(*args, **kwargs)

    monkeypatch.setattr(guard, "passes", spy)
    layer = ModulatedLayerNorm(C, backend="triton")
    (x, shift, scale, _, _), _ = mln_inputs("BC", False, False, f32)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with pytest.warns(FusedKernelMismatch):
        y = compiled(x, shift, scale)
    assert calls and not any(calls)
    assert torch.equal(y, modulated_layer_norm_ref(x, shift, scale, eps=1e-6))


# ------------------------------------------------------------------------------------------ configuration
def test_config_key_reaches_every_fused_layer():
    with pytest.raises(ConfigError, match=r"model.fused_check='sometimes' is not valid"):
        load_config(None, ["model.fused_check=sometimes"])
    from fastsemdiff.models import SemanticDiffusion

    cfg = load_config(None, ["model.fused_check=error", "model.hidden_size=32", "model.depth=2",
                             "model.num_heads=2"])
    model = SemanticDiffusion(cfg)
    layers = [m for m in model.modules() if isinstance(m, (ModulatedLayerNorm, TimestepEmbedder))]
    assert len(layers) > 4 and all(m.fused_check == "error" for m in layers)
    with pytest.raises(ValueError, match="fused_check='loud' is not valid"):
        ModulatedLayerNorm(8, fused_check="loud")
    with pytest.raises(ValueError, match="fused_check='loud' is not valid"):
        ops.modulated_layer_norm(*mln_inputs("BC", False, False, f32)[0][:3], check="loud")


@pytest.mark.skipif(DEVICE.type != "cuda", reason="on a CPU the kernels run under the interpreter by design")
def test_a_gpu_runs_the_compiled_kernels():
    """With a GPU the kernel tests use CUDA tensors and compiled kernels (scripts/gpu_check.py relies on it)."""
    from fastsemdiff.kernels import modulated_layer_norm as K

    assert not K.INTERPRETED, "TRITON_INTERPRET is set on a GPU machine: unset it to test compiled kernels"
    x = torch.randn(4, 3, 64, device=DEVICE)
    shift, scale = torch.randn(4, 64, device=DEVICE), torch.randn(4, 64, device=DEVICE)
    torch.testing.assert_close(ops.modulated_layer_norm(x, shift, scale, backend="triton", check="error"),
                               modulated_layer_norm_ref(x, shift, scale, eps=1e-6), rtol=1e-5, atol=1e-5)
