"""The CUDA C++ kernels (fastsemdiff._C, csrc/) against the plain-PyTorch references, forward and every gradient.

The ops are wrapped here in a small autograd.Function (x as [M, C] rows, modulation as [M / tokens_per_mod_row, C]
rows) and checked by the accuracy rule of SPEC section 7 (tests/kernel_helpers.py): fp32 within 1e-5 relative;
bf16/fp16 at most twice the error of the reference run in the same dtype, plus a small floor. Output buffers
are allocated by the extension, so before each call the caching allocator is handed NaN-filled blocks of the
outputs' sizes: an element a kernel forgets to write most likely shows up as NaN.

Every norm check runs under each kernel variant of csrc/adaln.cu (the ``variant`` fixture:
``_cuda.TEST_VARIANTS``, selected with ``_cuda.norm_variants``), so one GPU run proves or disproves each.

Needs a CUDA device and the built extension; skips with the reason otherwise.
"""
from __future__ import annotations

import functools
import re

import pytest
import torch
from torch.testing import assert_close

from fastsemdiff.nn.embedding import timestep_embedding
from fastsemdiff.nn.norm import gated_residual_modulated_norm_ref, modulated_layer_norm_ref
from fastsemdiff.ops import _cuda, dispatch

if not torch.cuda.is_available():
    pytest.skip("the CUDA kernels need a CUDA device (none here)", allow_module_level=True)
if _cuda.load() is None:
    pytest.skip(_cuda.unavailable_reason(), allow_module_level=True)

import csrc_bad_inputs  # noqa: E402
from kernel_helpers import DTYPES, EPS, check_op, mod_shape, randn  # noqa: E402

OPS = _cuda.load()
DEV = torch.device("cuda")


@pytest.fixture(params=list(_cuda.TEST_VARIANTS.values()), ids=list(_cuda.TEST_VARIANTS))
def variant(request):
    """Runs the test under one (forward, backward) kernel variant."""
    fwd, bwd = request.param
    with _cuda.norm_variants(fwd, bwd):
        yield request.param


def _poison(*specs):
    """Hand the caching allocator NaN-filled blocks of these (shape, dtype) sizes, for the op to reuse."""
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device=DEV) for shape, dtype in specs]
    del blocks


def _rows(m: torch.Tensor, C: int) -> torch.Tensor:
    return m.reshape(-1, C)


class _MLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps, rms):
        C = x.shape[-1]
        x2, sh2, sc2 = x.reshape(-1, C), _rows(shift, C), _rows(scale, C)
        tpm = x2.shape[0] // sc2.shape[0]
        _poison((x2.shape, x.dtype), ((x2.shape[0],), torch.float32), ((x2.shape[0],), torch.float32))
        y, mean, rstd = OPS.mln_fwd(x2, sh2, sc2, weight, bias, eps, tpm, rms)
        ctx.save_for_backward(x2, mean, rstd, sc2, weight, bias)
        ctx.meta = (tpm, rms, x.shape, shift.shape, scale.shape)
        return y.view(x.shape)

    @staticmethod
    def backward(ctx, dy):
        x2, mean, rstd, sc2, weight, bias = ctx.saved_tensors
        tpm, rms, x_shape, shift_shape, scale_shape = ctx.meta
        _poison((x2.shape, x2.dtype), (sc2.shape, sc2.dtype), (sc2.shape, sc2.dtype))
        dx, dshift, dscale, dw, db = OPS.mln_bwd(dy.reshape(x2.shape), x2, mean, rstd, sc2, weight, bias, tpm, rms)
        return (dx.view(x_shape), dshift.view(shift_shape), dscale.view(scale_shape),
                dw if weight is not None else None, db if bias is not None else None, None, None)


class _GRMLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, gate, shift, scale, weight, bias, eps, rms):
        C = x.shape[-1]
        x2, h2, g2, sh2, sc2 = x.reshape(-1, C), h.reshape(-1, C), _rows(gate, C), _rows(shift, C), _rows(scale, C)
        tpm = x2.shape[0] // sc2.shape[0]
        _poison((x2.shape, x.dtype), (x2.shape, x.dtype))
        x_out, y, mean, rstd = OPS.grmln_fwd(x2, h2, g2, sh2, sc2, weight, bias, eps, tpm, rms)
        ctx.save_for_backward(x_out, h2, g2, mean, rstd, sc2, weight, bias)
        ctx.meta = (tpm, rms, x.shape, gate.shape, shift.shape, scale.shape)
        return x_out.view(x.shape), y.view(x.shape)

    @staticmethod
    def backward(ctx, dx_out, dy):
        x_out, h2, g2, mean, rstd, sc2, weight, bias = ctx.saved_tensors
        tpm, rms, x_shape, gate_shape, shift_shape, scale_shape = ctx.meta
        dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.reshape(x_out.shape)
        dy = torch.zeros_like(x_out) if dy is None else dy.reshape(x_out.shape)
        _poison((x_out.shape, x_out.dtype), (x_out.shape, x_out.dtype), (g2.shape, g2.dtype))
        dx, dh, dgate, dshift, dscale, dw, db = OPS.grmln_bwd(dx_out, dy, x_out, h2, g2, mean, rstd, sc2, weight,
                                                              bias, tpm, rms)
        return (dx.view(x_shape), dh.view(x_shape), dgate.view(gate_shape), dshift.view(shift_shape),
                dscale.view(scale_shape), dw if weight is not None else None, db if bias is not None else None,
                None, None)


def cuda_mln(x, shift, scale, weight=None, bias=None, eps=EPS, rms=False):
    return _MLN.apply(x, shift, scale, weight, bias, eps, rms)


def cuda_grmln(x, h, gate, shift, scale, weight=None, bias=None, eps=EPS, rms=False):
    return _GRMLN.apply(x, h, gate, shift, scale, weight, bias, eps, rms)


def mln_inputs(B, N, C, kind, affine, dtype, seed=0, param_dtype=None, mod_dtype=None):
    """x with a non-zero mean; distinct, never-zero per-sample modulation; random affine; random dy."""
    mod_dtype, param_dtype = mod_dtype or dtype, param_dtype or dtype
    x = randn(B, N, C, seed=seed, scale=2.0, offset=0.7, dtype=dtype)
    shift = randn(*mod_shape(kind, B, N, C), seed=seed + 1, scale=0.5, dtype=mod_dtype)
    scale = randn(*mod_shape(kind, B, N, C), seed=seed + 2, scale=0.5, dtype=mod_dtype)
    weight = randn(C, seed=seed + 3, scale=0.3, offset=1.0, dtype=param_dtype) if affine else None
    bias = randn(C, seed=seed + 4, scale=0.3, dtype=param_dtype) if affine else None
    dy = randn(B, N, C, seed=seed + 5, dtype=dtype)
    return [x, shift, scale, weight, bias], dy


def grmln_inputs(B, N, C, kind, affine, dtype, seed=0):
    (x, shift, scale, weight, bias), dy = mln_inputs(B, N, C, kind, affine, dtype, seed)
    h = randn(B, N, C, seed=seed + 6, scale=1.5, dtype=dtype)
    gate = randn(*mod_shape(kind, B, N, C), seed=seed + 7, scale=0.5, offset=0.2, dtype=dtype)
    dx_out = randn(B, N, C, seed=seed + 8, dtype=dtype)
    return [x, h, gate, shift, scale, weight, bias], (dx_out, dy)


MLN_NAMES = ["y", "x", "shift", "scale", "weight", "bias"]
GRMLN_NAMES = ["x_out", "y", "x", "h", "gate", "shift", "scale", "weight", "bias"]


def check_mln(inputs, dy, rms):
    check_op(functools.partial(cuda_mln, eps=EPS, rms=rms), functools.partial(modulated_layer_norm_ref, eps=EPS,
                                                                              rms=rms), inputs, dy, MLN_NAMES)


def check_grmln(inputs, dys, rms):
    check_op(functools.partial(cuda_grmln, eps=EPS, rms=rms),
             functools.partial(gated_residual_modulated_norm_ref, eps=EPS, rms=rms, stored_dtype=inputs[0].dtype),
             inputs, dys, GRMLN_NAMES)


# ------------------------------------------------------------------------------------------- the matrix
MATRIX = [
    pytest.mark.parametrize("dtype", DTYPES, ids=str),
    pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"]),
    pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"]),
    pytest.mark.parametrize("kind", ["BC", "BNC"]),  # per-sample (B1C is the same rows), per-token
    pytest.mark.parametrize("N", [1, 7, 256]),
    pytest.mark.parametrize("B", [1, 3]),
    pytest.mark.parametrize("C", [72, 96, 384, 1152]),
]


def _matrix(fn):
    for mark in MATRIX:
        fn = mark(fn)
    return fn


@_matrix
def test_mln_matrix(C, B, N, kind, affine, rms, dtype, variant):
    check_mln(*mln_inputs(B, N, C, kind, affine, dtype, seed=C + N), rms)


@_matrix
def test_grmln_matrix(C, B, N, kind, affine, rms, dtype, variant):
    check_grmln(*grmln_inputs(B, N, C, kind, affine, dtype, seed=C + N), rms)


@pytest.mark.parametrize("kind", ["B1C", "BNC"])
def test_b1c_modulation_and_wide_rows(kind, variant):
    """[B, 1, C] modulation, and widths that use 256-, 512- and 1024-thread rows."""
    for C, dtype in [(2056, torch.bfloat16), (4096, torch.float32), (8192, torch.float16), (8192, torch.float32)]:
        check_mln(*mln_inputs(2, 5, C, kind, True, dtype, seed=C), rms=False)
        check_grmln(*grmln_inputs(2, 5, C, kind, True, dtype, seed=C), rms=True)


def test_mixed_dtypes(variant):
    """fp32 modulation and parameters with bf16 x (the modulation is read as fp32); fp16 modulation with bf16 x."""
    check_mln(*mln_inputs(3, 7, 384, "BC", True, torch.bfloat16, mod_dtype=torch.float32,
                          param_dtype=torch.float32), rms=False)
    check_mln(*mln_inputs(3, 7, 384, "BNC", True, torch.bfloat16, mod_dtype=torch.float16), rms=True)


def test_branch_output_in_another_dtype(variant):
    """h in bf16 on an fp32 residual stream (autocast): h is read as fp32, dh comes back in bf16."""
    inputs, dys = grmln_inputs(3, 7, 384, "BC", True, torch.float32)
    inputs[1] = inputs[1].to(torch.bfloat16)
    check_grmln(inputs, dys, rms=False)


def test_strided_modulation_from_one_adaln_output(variant):
    """shift/scale/gate as column chunks of one [B, 6C] tensor (DiT's adaLN output): read in place."""
    B, N, C = 3, 7, 384
    ada = randn(B, 6 * C, seed=1, dtype=torch.bfloat16)
    shift, scale, gate = ada[:, :C], ada[:, C:2 * C], ada[:, 2 * C:3 * C]
    x = randn(B, N, C, seed=2, dtype=torch.bfloat16)
    h = randn(B, N, C, seed=3, dtype=torch.bfloat16)
    x_out, y = cuda_grmln(x, h, gate, shift, scale)
    ref_out, ref_y = gated_residual_modulated_norm_ref(x, h, gate.contiguous(), shift.contiguous(),
                                                       scale.contiguous(), eps=EPS)
    assert_close(x_out.float(), ref_out.float(), rtol=0.02, atol=0.02)
    assert_close(y.float(), ref_y.float(), rtol=0.02, atol=0.03)


@pytest.mark.parametrize("C", [8, 72, 200, 1272, 1280, 1288, 1536, 1544])
@pytest.mark.parametrize("blocks_per_sm", [1, 0])
def test_rows_variants_edge_widths_and_splits(C, blocks_per_sm, variant):
    """The rows kernels' limits (forward C <= 1280: one row per warp, 40 elements a lane; backward C <= 1536:
    192 threads a row; wider rows run the baseline) and widths whose last 16-byte vector leaves some lanes idle;
    persistent grids of one block per SM (long row ranges crossing many sample boundaries mid-tile) and of the
    occupancy figure."""
    fwd, bwd = variant
    with _cuda.norm_variants(fwd, bwd, blocks_per_sm):
        for B, N, kind, dtype in [(5, 37, "BC", torch.bfloat16), (64, 256, "BC", torch.bfloat16),
                                  (3, 11, "BNC", torch.float32)]:
            check_mln(*mln_inputs(B, N, C, kind, True, dtype, seed=C + N), rms=False)
            check_grmln(*grmln_inputs(B, N, C, kind, kind == "BC", dtype, seed=C + N), rms=kind != "BC")


@pytest.fixture(scope="module")
def bad_input_results():
    """Every refused input of tests/csrc_bad_inputs.py, called in child processes: a crash costs one case."""
    return csrc_bad_inputs.run_isolated()


@pytest.mark.parametrize("name", csrc_bad_inputs.NAMES)
def test_unsupported_input_raises_its_clear_error(name, bad_input_results):
    """Rank, dtype, width, alignment, modulation shape, tokens_per_mod_row, eps, devices: each refused with its
    message before anything is launched (the first H200 run segfaulted on the first of them)."""
    r = bad_input_results[name]
    assert r["result"] == "raised", f"{name}: {r['result']} {r.get('message', '')[-1500:]}"
    assert r["type"] == "RuntimeError" and re.search(csrc_bad_inputs.message(name), r["message"]), r


def test_inputs_the_cuda_kernels_do_not_take_are_sent_to_triton():
    base = torch.randn(6, 72, device=DEV, dtype=torch.bfloat16)
    misaligned = base[:, 4:68]  # starts 8 bytes into a row
    mods = torch.randn(2, 64, device=DEV, dtype=torch.bfloat16)
    assert dispatch.launch_backend("cuda", "modulated_layer_norm", misaligned, (mods,)) == "triton"
    assert dispatch.launch_backend("cuda", "modulated_layer_norm", torch.randn(6, 100, device=DEV)) == "triton"
    assert dispatch.launch_backend("cuda", "modulated_layer_norm", torch.randn(6, 64, device=DEV)) == "cuda"


def test_empty_input(variant):
    x = torch.empty(0, 64, device=DEV)
    m = torch.empty(0, 64, device=DEV)
    y, mean, rstd = OPS.mln_fwd(x, m, m, None, None, EPS, 1, False)
    assert y.shape == (0, 64) and mean.shape == (0,)


def test_opcheck_and_compile():
    """Meta kernels agree with the CUDA kernels; torch.compile(fullgraph=True) traces the raw ops."""
    (x, shift, scale, weight, bias), dy = mln_inputs(3, 7, 96, "BC", True, torch.bfloat16)
    args = (x.reshape(-1, 96), shift, scale, weight, bias, EPS, 7, False)
    torch.library.opcheck(OPS.mln_fwd.default, args, test_utils=("test_schema", "test_faketensor"))
    y, mean, rstd = OPS.mln_fwd(*args)
    bwd_args = (dy.reshape(-1, 96), x.reshape(-1, 96), mean, rstd, scale, weight, bias, 7, False)
    torch.library.opcheck(OPS.mln_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))
    t = torch.rand(5, device=DEV) * 1000
    torch.library.opcheck(OPS.timestep_embedding.default, (t, 256, 10000.0),
                          test_utils=("test_schema", "test_faketensor"))

    @torch.compile(fullgraph=True)
    def f(x2, shift, scale):
        return OPS.mln_fwd(x2, shift, scale, None, None, EPS, 7, False)[0] * 2

    assert_close(f(x.reshape(-1, 96), shift, scale), OPS.mln_fwd(x.reshape(-1, 96), shift, scale, None, None, EPS,
                                                                 7, False)[0] * 2)


# ------------------------------------------------------------------------------------------ timestep embedding
@pytest.mark.parametrize("dim", [1, 2, 33, 256, 257])
@pytest.mark.parametrize("t_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64], ids=str)
def test_timestep_embedding(dim, t_dtype):
    t = (torch.rand(37, generator=torch.Generator().manual_seed(dim)) * 1000).to(DEV)
    t = t.to(t_dtype)
    got = OPS.timestep_embedding(t, dim, 10000.0)
    ref = timestep_embedding(t, dim)
    assert got.dtype == torch.float32 and got.shape == (37, dim)
    # the same fp32 operations as the reference on the same device: equal up to the last bit or so
    assert_close(got, ref, rtol=1e-5, atol=1e-5)
