"""The fused gated residual + modulated norm (Triton) against the unfused reference, forward and every gradient.

``x_out = x + gate * h``; ``y = norm(x_out) * (1 + scale) + shift``; both outputs get an upstream gradient,
as in a DiT block where x_out feeds the next residual and y feeds the MLP. Launch buffers are NaN-poisoned.
"""
from __future__ import annotations

import functools

import pytest
import torch

pytest.importorskip("triton")

from fastsemdiff.kernels import modulated_layer_norm as K  # noqa: E402
from fastsemdiff.nn import GatedResidualModulatedNorm, gated_residual_modulated_norm_ref  # noqa: E402
from fastsemdiff.ops import gated_residual_modulated_norm  # noqa: E402

from kernel_helpers import DEVICE, DTYPES, EPS, KINDS, check_op, grads_of, mod_shape, randn  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")

NAMES = ["x_out", "y", "x", "h", "gate", "shift", "scale", "weight", "bias"]


def make_inputs(B, N, C, kind, affine, dtype, seed=0, rms=False):
    """Residual stream with a non-zero mean, a branch output h, distinct never-zero gates and modulation."""
    x = randn(B, N, C, seed=seed, scale=2.0, offset=0.7, dtype=dtype)
    h = randn(B, N, C, seed=seed + 1, scale=1.5, dtype=dtype)
    gate, shift, scale = (randn(*mod_shape(kind, B, N, C), seed=seed + i, scale=0.5, offset=o, dtype=dtype)
                          for i, o in ((2, 0.3), (3, 0.0), (4, 0.0)))
    weight = randn(C, seed=seed + 5, scale=0.3, offset=1.0, dtype=dtype) if affine else None
    bias = randn(C, seed=seed + 6, scale=0.3, dtype=dtype) if affine and not rms else None
    dys = (randn(B, N, C, seed=seed + 7, dtype=dtype), randn(B, N, C, seed=seed + 8, dtype=dtype))
    return [x, h, gate, shift, scale, weight, bias], dys


def check(inputs, dys, rms=False):
    kernel = functools.partial(gated_residual_modulated_norm, eps=EPS, rms=rms)
    # the exact reference normalises x_out as stored in x's dtype, as the op does (see the reference's docstring)
    ref = functools.partial(gated_residual_modulated_norm_ref, eps=EPS, rms=rms, stored_dtype=inputs[0].dtype)
    check_op(kernel, ref, inputs, dys, NAMES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("C", [72, 100, 384, 1152])
def test_matrix_small_n(C, kind, affine, dtype):
    check(*make_inputs(3, 7, C, kind, affine, dtype, seed=C))


@pytest.mark.parametrize("B,N,C,kind,affine,dtype,rms", [
    (1, 1, 72, "BC", True, torch.float32, False),
    (3, 1, 100, "BNC", False, torch.bfloat16, False),
    (1, 64, 1152, "BC", False, torch.float16, False),
    (3, 64, 1152, "BC", True, torch.bfloat16, False),
    (3, 64, 96, "BNC", True, torch.float32, False),
    (3, 64, 384, "B1C", False, torch.bfloat16, True),
    (3, 7, 100, "BC", True, torch.float32, True),
    (1, 7, 72, "BNC", True, torch.float16, True),
])
def test_long_sequences_and_rms(B, N, C, kind, affine, dtype, rms):
    check(*make_inputs(B, N, C, kind, affine, dtype, seed=B * N + C, rms=rms), rms=rms)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("rows_per_program", [1, 3, 7, 64])
def test_backward_row_blocking(per_token, rows_per_program):
    """dgate's per-sample sums are right for any split of the tokens into row blocks."""
    B, N, C = 3, 7, 100
    (x, h, _, _, _, w, b), (dxo, dy) = make_inputs(B, N, C, "BC", True, torch.float32, seed=5)
    rows = B * N if per_token else B
    gate, shift, scale = (randn(rows, C, seed=50 + i, scale=0.5) for i in range(3))
    t = 1 if per_token else N
    flat = [a.reshape(-1, C) for a in (x, h, dxo, dy)]
    x_out, y, mean, rstd = K.modulated_norm_fwd(flat[0], shift, scale, w, b, EPS, t, False, flat[1], gate)
    got = K.modulated_norm_bwd(flat[3], x_out, mean, rstd, scale, w, b, t, False, flat[2], flat[1], gate,
                               rows_per_program=rows_per_program)
    shape = x.shape if per_token else (B, 1, C)
    ref = functools.partial(gated_residual_modulated_norm_ref, eps=EPS)
    _, (rx, rh, rgate, rshift, rscale, rw, rb) = grads_of(
        ref, [x, h, gate.view(shape), shift.view(shape), scale.view(shape), w, b], (dxo, dy), cast=torch.float64)
    for g, r in zip(got, (rx, rh, rgate, rshift, rscale, rw, rb)):
        torch.testing.assert_close(g, r.reshape(g.shape).float(), rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("config", [
    {"rows": 1}, {"rows": 8, "warps": 4},
    {"rows": 2, "programs_per_sm": 64, "min_rows": 2},  # S = 16 parts per sample: dgate via _finish_kernel
    {"rows": 4, "programs_per_sm": 8, "min_rows": 3, "stages": 2},  # ragged parts and tiles
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_backward_tiles_and_work_split(config, per_token, rms):
    """dx, dh, dgate (per-sample sums across S parts, or per token) and the rest at tiles of several rows, an odd
    width (200) and distinct per-sample modulation, against fp64."""
    B, N, C = 2, 61, 200
    (x, h, _, _, _, w, b), (dxo, dy) = make_inputs(B, N, C, "BC", True, torch.float32, seed=19, rms=rms)
    rows = B * N if per_token else B
    gate, shift, scale = (randn(rows, C, seed=190 + i, scale=0.5) for i in range(3))
    t = 1 if per_token else N
    flat = [a.reshape(-1, C) for a in (x, h, dxo, dy)]
    x_out, y, mean, rstd = K.modulated_norm_fwd(flat[0], shift, scale, w, b, EPS, t, rms, flat[1], gate,
                                                config=config)
    got = K.modulated_norm_bwd(flat[3], x_out, mean, rstd, scale, w, b, t, rms, flat[2], flat[1], gate,
                               config=config)
    shape = x.shape if per_token else (B, 1, C)
    ref = functools.partial(gated_residual_modulated_norm_ref, eps=EPS, rms=rms)
    (rxo, ry), grads = grads_of(ref, [x, h, gate.view(shape), shift.view(shape), scale.view(shape), w, b],
                                (dxo, dy), cast=torch.float64)
    torch.testing.assert_close(x_out, rxo.reshape(x_out.shape).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, ry.reshape(y.shape).float(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got, grads):
        if r is None:
            assert g is None
        else:
            torch.testing.assert_close(g, r.reshape(g.shape).float(), rtol=1e-5,
                                       atol=1e-5 * max(1.0, r.abs().max().item()))


def test_only_one_output_used():
    """When only y (or only x_out) reaches the loss, the missing upstream gradient counts as zero."""
    B, N, C = 2, 5, 72
    inputs, (dxo, dy) = make_inputs(B, N, C, "BC", True, torch.float32, seed=9)
    kernel = lambda *a: gated_residual_modulated_norm(*a, eps=EPS)[1]  # noqa: E731
    ref = lambda *a: gated_residual_modulated_norm_ref(*a, eps=EPS)[1]  # noqa: E731
    check_op(kernel, ref, inputs, dy, NAMES[1:2] + NAMES[2:])
    rest = inputs[3:]  # x_out alone depends on x, h and gate only
    kernel = lambda *a: gated_residual_modulated_norm(*a, *rest, eps=EPS)[0]  # noqa: E731
    ref = lambda *a: gated_residual_modulated_norm_ref(*a, *rest, eps=EPS)[0]  # noqa: E731
    check_op(kernel, ref, inputs[:3], dxo, NAMES[:1] + NAMES[2:5])


def test_chunked_modulation_views_and_mixed_dtypes():
    """DiT's six chunks of one adaLN output as gate/shift/scale, with bf16 activations and fp32 modulation."""
    B, N, C = 3, 7, 96
    parent = randn(B, 6 * C, seed=60, scale=0.5)
    (x, h, *_), (dxo, dy) = make_inputs(B, N, C, "BC", False, torch.bfloat16, seed=61)

    def split(fn, **kw):
        def run(x, h, p):
            _, _, gate, shift, scale, _ = p.chunk(6, dim=-1)
            return fn(x, h, gate, shift, scale, eps=EPS, **kw)
        return run

    check_op(split(gated_residual_modulated_norm), split(gated_residual_modulated_norm_ref, stored_dtype=x.dtype),
             [x, h, parent],
             (dxo, dy), ["x_out", "y", "x", "h", "parent"])


def test_bad_shapes_are_rejected():
    x = randn(2, 3, 8, seed=1)
    g = randn(2, 8, seed=2)
    with pytest.raises(ValueError, match="h must"):
        gated_residual_modulated_norm(x, randn(2, 4, 8, seed=3), g, g, g)
    with pytest.raises(ValueError, match="gate"):
        gated_residual_modulated_norm(x, x, randn(2, 9, seed=3), g, g)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_module_triton_equals_torch(rms):
    B, N, C = 2, 5, 96
    mods = {name: GatedResidualModulatedNorm(C, elementwise_affine=True, backend=name, rms=rms).to(DEVICE)
            for name in ("torch", "triton")}
    with torch.no_grad():
        for i, p in enumerate(mods["torch"].parameters()):
            p.copy_(randn(C, seed=70 + i, scale=0.3, offset=1.0 - i))
    mods["triton"].load_state_dict(mods["torch"].state_dict())
    inputs, dys = make_inputs(B, N, C, "BC", False, torch.float32, seed=71)
    res = {}
    for name, m in mods.items():
        leaves = [t.detach().requires_grad_() for t in inputs[:5]]
        outs = m(*leaves)
        res[name] = (outs, torch.autograd.grad(outs, leaves + list(m.parameters()), dys))
    for a, b in zip([*res["triton"][0], *res["triton"][1]], [*res["torch"][0], *res["torch"][1]]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_opcheck(per_token):
    B, N, C = 2, 3, 72
    (x, h, _, _, _, w, b), (dxo, dy) = make_inputs(B, N, C, "BC", True, torch.float32, seed=80)
    rows = B * N if per_token else B
    gate, shift, scale = (randn(rows, C, seed=81 + i, scale=0.5) for i in range(3))
    t = 1 if per_token else N
    x2, h2, dxo2, dy2 = (a.reshape(-1, C) for a in (x, h, dxo, dy))
    leaves = [a.clone().requires_grad_() for a in (x2, h2, gate, shift, scale, w, b)]
    fwd = torch.ops.fastsemdiff.gated_residual_modulated_norm_fwd.default
    bwd = torch.ops.fastsemdiff.gated_residual_modulated_norm_bwd.default
    torch.library.opcheck(fwd, (*leaves, EPS, t, False, "triton"))
    torch.library.opcheck(fwd, (*leaves[:5], None, None, EPS, t, True, "triton"))
    x_out, _, mean, rstd = K.modulated_norm_fwd(x2, shift, scale, w, b, EPS, t, False, h2, gate)
    torch.library.opcheck(bwd, (dxo2, dy2, x_out, h2, gate, mean, rstd, scale, w, b, t, False, "triton"))
