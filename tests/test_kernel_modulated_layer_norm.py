"""The fused modulated LayerNorm / RMSNorm (Triton) against the plain-PyTorch reference, forward and every gradient.

On a machine without CUDA the kernels run under the Triton interpreter on CPU tensors (conftest.py sets
``TRITON_INTERPRET=1`` before anything imports them). Every buffer the launchers allocate is pre-filled
with NaN (``POISON_OUTPUTS``), so an element a kernel fails to write cannot pass.
"""
from __future__ import annotations

import functools

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

from fastsemdiff.kernels import modulated_layer_norm as K  # noqa: E402
from fastsemdiff.nn import ModulatedLayerNorm, modulated_layer_norm_ref  # noqa: E402
from fastsemdiff.ops import modulated_layer_norm  # noqa: E402

from kernel_helpers import DEVICE, DTYPES, EPS, KINDS, check_op, mod_shape, randn  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")

if DEVICE.type == "cpu" and not K.INTERPRETED:
    raise RuntimeError("fastsemdiff.kernels was imported before TRITON_INTERPRET=1 was set, so its Triton "
                       "kernels cannot run on this CPU-only machine")

NAMES = ["y", "x", "shift", "scale", "weight", "bias"]


def make_inputs(B, N, C, kind, affine, dtype, seed=0, rms=False):
    """x with a non-zero mean; distinct, never-zero per-sample modulation; random affine; random dy."""
    x = randn(B, N, C, seed=seed, scale=2.0, offset=0.7, dtype=dtype)
    shift = randn(*mod_shape(kind, B, N, C), seed=seed + 1, scale=0.5, dtype=dtype)
    scale = randn(*mod_shape(kind, B, N, C), seed=seed + 2, scale=0.5, dtype=dtype)
    weight = randn(C, seed=seed + 3, scale=0.3, offset=1.0, dtype=dtype) if affine else None
    bias = randn(C, seed=seed + 4, scale=0.3, dtype=dtype) if affine and not rms else None
    dy = randn(B, N, C, seed=seed + 5, dtype=dtype)
    return [x, shift, scale, weight, bias], dy


def check(inputs, dy, rms=False):
    kernel = functools.partial(modulated_layer_norm, eps=EPS, rms=rms)
    ref = functools.partial(modulated_layer_norm_ref, eps=EPS, rms=rms)
    check_op(kernel, ref, inputs, dy, NAMES)


# ------------------------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("C", [72, 100, 384, 1152])
def test_matrix_small_n(C, kind, affine, dtype):
    """Every C (100 is not a multiple of 8), modulation shape, affine and dtype at B=3, N=7."""
    check(*make_inputs(3, 7, C, kind, affine, dtype, seed=C))


@pytest.mark.parametrize("B,N,C,kind,affine,dtype", [
    (1, 1, 72, "BC", True, torch.float32),
    (3, 1, 100, "BNC", False, torch.bfloat16),
    (3, 1, 1152, "B1C", True, torch.float16),
    (1, 7, 96, "BC", True, torch.bfloat16),
    (1, 64, 384, "B1C", False, torch.float32),
    (1, 64, 1152, "BC", False, torch.float16),
    (3, 64, 1152, "BC", True, torch.bfloat16),
    (3, 64, 1152, "BNC", False, torch.bfloat16),
    (3, 64, 100, "BC", True, torch.float32),
    (3, 64, 96, "BNC", True, torch.float16),
    (3, 64, 72, "B1C", True, torch.float32),
])
def test_single_token_and_long_sequences(B, N, C, kind, affine, dtype):
    check(*make_inputs(B, N, C, kind, affine, dtype, seed=B * N + C))


@pytest.mark.parametrize("B,N,C,kind,affine,dtype", [
    (3, 7, 72, "BC", True, torch.float32),
    (3, 7, 100, "BNC", False, torch.bfloat16),
    (1, 64, 1152, "B1C", True, torch.float16),
    (3, 64, 384, "BC", False, torch.float32),
    (3, 1, 96, "BC", True, torch.bfloat16),
])
def test_rms_norm(B, N, C, kind, affine, dtype):
    """The RMSNorm flag: no centring, weight only."""
    check(*make_inputs(B, N, C, kind, affine, dtype, seed=7 * C + N, rms=True), rms=True)


# ------------------------------------------------------------------------------------ the launchers
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("rows_per_program", [1, 2, 3, 5, 7, 64])
def test_backward_row_blocking(per_token, rows_per_program, rms):
    """Any split of a sample's tokens into row blocks (ragged last blocks included) gives the same sums;
    the saved statistics are the true mean and 1/std (or 0 and 1/rms)."""
    B, N, C = 3, 7, 100
    (x, _, _, w, b, ), dy = make_inputs(B, N, C, "BC", True, torch.float32, seed=7, rms=rms)
    rows = B * N if per_token else B
    shift, scale = randn(rows, C, seed=70, scale=0.5), randn(rows, C, seed=71, scale=0.5)
    t = 1 if per_token else N
    _, y, mean, rstd = K.modulated_norm_fwd(x.view(-1, C), shift, scale, w, b, EPS, t, rms)
    x64 = x.double().view(-1, C)
    if rms:
        assert_close(mean, torch.zeros_like(mean))
        assert_close(rstd, (x64.square().mean(-1) + EPS).rsqrt().float(), rtol=1e-5, atol=1e-6)
    else:
        assert_close(mean, x64.mean(-1).float(), rtol=1e-5, atol=1e-6)
        assert_close(rstd, (x64.var(-1, unbiased=False) + EPS).rsqrt().float(), rtol=1e-5, atol=1e-6)
    dx, dh, dgate, dshift, dscale, dw, db = K.modulated_norm_bwd(
        dy.view(-1, C), x.view(-1, C), mean, rstd, scale, w, b, t, rms, rows_per_program=rows_per_program)
    assert dh is None and dgate is None
    shape = x.shape if per_token else (B, 1, C)
    ref = functools.partial(modulated_layer_norm_ref, eps=EPS, rms=rms)
    from kernel_helpers import grads_of
    (y64,), (rx, rshift, rscale, rw, rb) = grads_of(ref, [x, shift.view(shape), scale.view(shape), w, b], dy,
                                                    cast=torch.float64)
    assert_close(y, y64.view(-1, C).float(), rtol=1e-5, atol=1e-5)
    for got, want in [(dx, rx), (dshift, rshift), (dscale, rscale), (dw, rw), (db, rb)]:
        if want is None:
            assert got is None
        else:
            assert_close(got, want.reshape(got.shape).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
@pytest.mark.parametrize("config", [
    {"rows": 1}, {"rows": 4, "warps": 2}, {"rows": 16, "warps": 4},
    {"rows": 2, "programs_per_sm": 64, "min_rows": 2},  # S = 16 parts per sample: the _finish_kernel step
    {"rows": 4, "programs_per_sm": 8, "min_rows": 3, "stages": 2},  # ragged parts (61 rows = 2 x 32 - 3)
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_backward_tiles_and_work_split(config, per_token, rms):
    """Tiles of several rows (ragged last tile), S parts per sample with the finishing step, per-token rows:
    fwd and bwd against fp64, at an odd width (200) with distinct per-sample modulation and an affine."""
    B, N, C = 2, 61, 200
    (x, _, _, w, b), dy = make_inputs(B, N, C, "BC", True, torch.float32, seed=17, rms=rms)
    rows = B * N if per_token else B
    shift, scale = randn(rows, C, seed=170, scale=0.5), randn(rows, C, seed=171, scale=0.5)
    t = 1 if per_token else N
    _, y, mean, rstd = K.modulated_norm_fwd(x.view(-1, C), shift, scale, w, b, EPS, t, rms, config=config)
    got = K.modulated_norm_bwd(dy.view(-1, C), x.view(-1, C), mean, rstd, scale, w, b, t, rms, config=config)
    shape = x.shape if per_token else (B, 1, C)
    ref = functools.partial(modulated_layer_norm_ref, eps=EPS, rms=rms)
    from kernel_helpers import grads_of
    (y64,), (rx, rshift, rscale, rw, rb) = grads_of(ref, [x, shift.view(shape), scale.view(shape), w, b], dy,
                                                    cast=torch.float64)
    assert_close(y, y64.view(-1, C).float(), rtol=1e-5, atol=1e-5)
    dx, dh, dgate, dshift, dscale, dw, db = got
    assert dh is None and dgate is None
    for got_, want in [(dx, rx), (dshift, rshift), (dscale, rscale), (dw, rw), (db, rb)]:
        if want is None:
            assert got_ is None
        else:
            scale_ = max(1.0, want.abs().max().item())
            assert_close(got_, want.reshape(got_.shape).float(), rtol=1e-5, atol=1e-5 * scale_)


def test_launch_config_table_and_defaults():
    """The table's entry wins for its device class, op, direction and width (completed by the defaults) and says
    so; anything else is the default; the work split fills a 132-SM GPU at batch 8 as at 512."""
    from fastsemdiff.kernels import adaln_config as AC

    table = {"sm_90": {"modulated_norm": {"bwd": {"1152": {"rows": 4, "warps": 4, "stages": 2}}}}}
    cfg, source = AC.launch_config("modulated_norm", "bwd", 1152, "sm_90", table=table)
    assert source == "table" and (cfg["rows"], cfg["warps"], cfg["stages"]) == (4, 4, 2)
    assert cfg["programs_per_sm"] == AC.default_config("modulated_norm", "bwd", 1152)["programs_per_sm"]
    for args in [("modulated_norm", "bwd", 768, "sm_90"), ("modulated_norm", "fwd", 1152, "sm_90"),
                 ("gated_residual_norm", "bwd", 1152, "sm_90"), ("modulated_norm", "bwd", 1152, "sm_80")]:
        cfg, source = AC.launch_config(*args, table=table)
        assert source == "default" and cfg == AC.default_config(*args[:3])
    with pytest.raises(ValueError, match="op must be"):
        AC.launch_config("layer_norm", "bwd", 1152, "sm_90")
    # the committed table is valid JSON in this format (empty or not)
    for cls, ops in AC.load_table().items():
        for op, dirs in ops.items():
            assert op in AC.OPS and set(dirs) <= set(AC.DIRECTIONS), (cls, op)
    base = AC.default_config("modulated_norm", "bwd", 1152)
    split = {B: AC.programs_per_group(B, 256, base["rows"], 132, base) for B in (1, 8, 64, 256, 512)}
    assert {B: S for B, (S, _) in split.items()} == {1: 32, 8: 32, 64: 8, 256: 2, 512: 1}
    for B, (S, per_program) in split.items():
        assert S * per_program >= 256 and per_program % base["rows"] == 0 and per_program >= base["min_rows"]


def test_poisoned_buffers_are_nan():
    """The NaN pre-fill the other tests rely on is really active."""
    assert K.POISON_OUTPUTS and torch.isnan(K._new((4, 3), torch.bfloat16, DEVICE)).all()


# ------------------------------------------------------------------------------ layouts and shapes
def test_non_contiguous_inputs():
    """Transposed x (copied), row-strided x (used in place), DiT's chunked modulation views, a transposed
    per-token modulation: all match the reference, and gradients reach the chunked parent."""
    B, N, C = 3, 7, 100
    parent = randn(B, 6 * C, seed=80, scale=0.5)
    xs = {
        "transposed": randn(B, C, N, seed=81, scale=2.0, offset=0.7).transpose(1, 2),
        "row_strided": randn(B, N, C + 37, seed=82, scale=2.0, offset=0.7)[..., 5:5 + C],
    }
    dy = randn(B, N, C, seed=83)

    def chunked(x, p):
        shift, scale = p.chunk(6, dim=-1)[1:3]
        return x, shift, scale

    for name, x in xs.items():
        assert not x.is_contiguous(), name
        check_op(lambda x, p: modulated_layer_norm(*chunked(x, p), eps=EPS),
                 lambda x, p: modulated_layer_norm_ref(*chunked(x, p), eps=EPS), [x, parent], dy, ["y", "x", "p"])
    (x, _, _, w, b), dy = make_inputs(B, N, C, "BNC", True, torch.float32, seed=84)
    shift = randn(B, C, N, seed=85, scale=0.5).transpose(1, 2)
    scale = randn(B, C, N, seed=86, scale=0.5).transpose(1, 2)
    check([x, shift, scale, w, b], dy)


def test_mixed_and_broadcast_modulation():
    """Per-sample shift with per-token scale, a batch-1 modulation broadcast over B, mixed dtypes."""
    B, N, C = 3, 5, 72
    (x, _, _, w, b), dy = make_inputs(B, N, C, "BC", True, torch.float32, seed=90)
    check([x, randn(B, C, seed=91, scale=0.5), randn(B, N, C, seed=92, scale=0.5), w, b], dy)
    check([x, randn(1, 1, C, seed=93, scale=0.5), randn(B, 1, C, seed=94, scale=0.5), w, b], dy)
    # bf16 activations with fp32 modulation and fp32 affine (the autocast layout): output bf16, grads per dtype
    check([x.bfloat16(), randn(B, C, seed=95, scale=0.5), randn(B, C, seed=96, scale=0.5), w, b], dy.bfloat16())


def test_bad_shapes_are_rejected():
    x = randn(2, 3, 8, seed=1)
    with pytest.raises(ValueError, match="x must be"):
        modulated_layer_norm(x[0], randn(2, 8, seed=2), randn(2, 8, seed=3))
    with pytest.raises(ValueError, match="shift"):
        modulated_layer_norm(x, randn(2, 9, seed=2), randn(2, 8, seed=3))
    with pytest.raises(ValueError, match="scale"):
        modulated_layer_norm(x, randn(2, 8, seed=2), randn(2, 4, 8, seed=3))


# ---------------------------------------------------------------------------------- nn and backends
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
def test_module_triton_equals_torch(kind, affine, rms):
    """The module on both backends: same state-dict keys, same output and gradients (parameters included)."""
    B, N, C = 2, 5, 96
    mods = {name: ModulatedLayerNorm(C, elementwise_affine=affine, backend=name, rms=rms).to(DEVICE)
            for name in ("torch", "triton")}
    with torch.no_grad():
        for i, p in enumerate(mods["torch"].parameters()):
            p.copy_(randn(C, seed=101 + i, scale=0.3, offset=1.0 - i))
    mods["triton"].load_state_dict(mods["torch"].state_dict())
    assert list(mods["triton"].state_dict()) == list(mods["torch"].state_dict())
    (x, shift, scale, _, _), dy = make_inputs(B, N, C, kind, False, torch.float32, seed=110)
    res = {}
    for name, m in mods.items():
        leaves = [t.detach().requires_grad_() for t in (x, shift, scale)]
        y = m(*leaves)
        res[name] = (y, torch.autograd.grad(y, leaves + list(m.parameters()), dy))
    assert_close(res["triton"][0], res["torch"][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(res["triton"][1], res["torch"][1]):
        assert_close(a, b, rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per_sample", "per_token"])
def test_opcheck(per_token, rms):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration."""
    B, N, C = 2, 3, 72
    (x, _, _, w, b), dy = make_inputs(B, N, C, "BC", True, torch.float32, seed=140)
    rows = B * N if per_token else B
    shift, scale = randn(rows, C, seed=141, scale=0.5), randn(rows, C, seed=142, scale=0.5)
    t = 1 if per_token else N
    x2, dy2 = x.reshape(-1, C), dy.reshape(-1, C)
    leaves = [a.clone().requires_grad_() for a in (x2, shift, scale, w, b)]
    fwd, bwd = torch.ops.fastsemdiff.modulated_norm_fwd.default, torch.ops.fastsemdiff.modulated_norm_bwd.default
    torch.library.opcheck(fwd, (*leaves, EPS, t, rms, "triton"))
    torch.library.opcheck(fwd, (leaves[0], leaves[1], leaves[2], None, None, EPS, t, rms, "triton"))
    _, _, mean, rstd = K.modulated_norm_fwd(x2, shift, scale, w, b, EPS, t, rms)
    torch.library.opcheck(bwd, (dy2, x2, mean, rstd, scale, w, b, t, rms, "triton"))
    torch.library.opcheck(bwd, (dy2, x2, mean, rstd, scale, None, None, t, rms, "triton"))


def test_cuda_launchers_fall_back_to_triton_off_gpu(monkeypatch):
    """The 'cuda' op backend runs Triton for inputs the CUDA kernels do not take (here: CPU tensors; the
    extension made to look loaded, so this holds where it is not built too)."""
    from fastsemdiff.ops import _cuda

    monkeypatch.setattr(_cuda, "_loaded", True)
    monkeypatch.setattr(_cuda, "_ops", object())
    monkeypatch.setattr(_cuda, "_reason", None)
    (x, shift, scale, w, b), _ = make_inputs(2, 5, 100, "BC", True, torch.float32, seed=150)
    got = modulated_layer_norm(x, shift, scale, w, b, eps=EPS, backend="cuda")
    assert_close(got, modulated_layer_norm_ref(x, shift, scale, w, b, eps=EPS), rtol=1e-5, atol=1e-5)
