"""adaLN-modulated LayerNorm (or RMSNorm), alone or fused with the gated residual before it, in Triton.

Two ops share these kernels (the residual is a compile-time flag):

* modulated norm:         ``y = norm(x) [* w + b] * (1 + scale) + shift``
* gated residual + norm:  ``x_out = x + gate * h``; ``y = norm(x_out) [* w + b] * (1 + scale) + shift``

``norm`` is LayerNorm, or RMSNorm with ``rms=True`` (no centring; ``mean`` is stored as 0).

Layout. ``x`` (and ``h``) are viewed as ``[M, C]`` rows (one row = one token, ``M = B * N``). The
modulation ``shift``/``scale``/``gate`` is ``[M // tokens_per_mod_row, C]``: token row ``r`` is
modulated by row ``r // tokens_per_mod_row``. Per-sample modulation (``[B, C]`` or ``[B, 1, C]``) is
``tokens_per_mod_row = N``; per-token modulation (``[B, N, C]``) is ``tokens_per_mod_row = 1``.

Forward: one program per row, ``BLOCK_C = next_power_of_2(C)`` lanes with a mask (any C works).
Statistics are fp32; ``mean`` and ``rstd`` (fp32 ``[M]``) are saved for the backward. The residual sum
is rounded to x's dtype before it is normalised, exactly as the unfused reference does.

Backward: one program per block of consecutive rows inside one *group* (a group is one sample's tokens
for per-sample modulation, all M rows for per-token modulation). Each program accumulates its partial
sums of dshift/dscale/dgate (per-sample) and dweight/dbias (affine) in fp32 registers and writes one
fp32 ``[C]`` partial row; a small torch ``sum`` over the partials finishes them, so no ``[M, C]``
temporary is materialised for the reductions. Per-token dshift/dscale/dgate are elementwise and are
written directly.

Launchers only; the autograd lives in ``fastsemdiff.ops``. Under ``TRITON_INTERPRET=1`` (set before
this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

# Whether the kernels below were defined under the Triton interpreter (decided when @triton.jit runs).
INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Test hooks. POISON_OUTPUTS: every buffer a launcher allocates is pre-filled with NaN, so an element a
# kernel forgets to write shows up as NaN. ROWS_PER_PROGRAM: force the backward's rows per program.
POISON_OUTPUTS: bool = False
ROWS_PER_PROGRAM: Optional[int] = None

MAX_FUSED_SIZE = 65536  # one row of C elements lives in registers


@triton.jit
def _cast(v, dtype: tl.constexpr, INTERPRETER_RNE: tl.constexpr):
    """``v.to(dtype)`` rounding to nearest even. GPUs do that already; the interpreter truncates fp32 to
    bf16, so there the rounding is done on the bits first (then the truncation is exact)."""
    if INTERPRETER_RNE:
        if dtype == tl.bfloat16:
            bits = v.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _fwd_kernel(
    X, H, GATE, XOUT, Y, SHIFT, SCALE, W, B, MEAN, RSTD,
    stride_x, stride_h, stride_y, stride_mod,
    C, tokens_per_mod_row, eps,
    HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, RNE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    mod_row = row // tokens_per_mod_row
    cols = tl.arange(0, BLOCK_C)
    mask = cols < C

    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        x = _cast(x.to(tl.float32) + gate * h, XOUT.dtype.element_ty, RNE)  # rounded like the reference
        tl.store(XOUT + row * C + cols, x, mask=mask)
    x = x.to(tl.float32)

    if IS_RMS:
        mean = 0.0
        xc = x
    else:
        mean = tl.sum(x, axis=0) / C
        xc = tl.where(mask, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
    a = xc * rstd
    if HAS_WEIGHT:
        a = a * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        a = a + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)

    shift = tl.load(SHIFT + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + mod_row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
    y = a * (1.0 + scale) + shift

    tl.store(Y + row * stride_y + cols, _cast(y, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _bwd_kernel(
    DY, DXOUT, X, H, GATE, MEAN, RSTD, SCALE, W, B,
    DX, DH, DSHIFT, DSCALE, DGATE, DW_PART, DB_PART,
    stride_dy, stride_dxout, stride_x, stride_h, stride_mod,
    C, rows_per_group, blocks_per_group, rows_per_program, tokens_per_mod_row,
    PER_TOKEN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr,
):
    # This program's rows: block `block` of group `group` (a sample, or all rows when PER_TOKEN).
    pid = tl.program_id(0).to(tl.int64)
    group = pid // blocks_per_group
    block = pid % blocks_per_group
    row_start = group * rows_per_group + block * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, (group + 1) * rows_per_group)

    cols = tl.arange(0, BLOCK_C)
    mask = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        b = tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    if not PER_TOKEN:  # one modulation row for the whole block
        sample_scale = 1.0 + tl.load(SCALE + group * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            sample_gate = tl.load(GATE + group * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)

    acc_dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)

    # A while loop, not `for row in range(row_start, row_end)`: triton 3.6's interpreter cannot take a
    # program-id-derived bound in range() (its scalars are 1-element arrays). Both compilers emit the same
    # loop for either form (tests/test_codegen.py reads the machine code).
    row = row_start
    while row < row_end:
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + row)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(mask, (x - mean) * rstd, 0.0)
        if PER_TOKEN:
            one_plus_scale = 1.0 + tl.load(SCALE + row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            one_plus_scale = sample_scale

        # through the modulation and the affine, then through the normalisation
        dnorm = dy * one_plus_scale
        g = dnorm
        if HAS_WEIGHT:
            g = g * w
        mean_g_xhat = tl.sum(g * xhat, axis=0) / C
        if IS_RMS:
            dx = (g - xhat * mean_g_xhat) * rstd
        else:
            dx = (g - tl.sum(g, axis=0) / C - xhat * mean_g_xhat) * rstd

        if HAS_RESIDUAL:  # x_out = x + gate * h: dx_out flows to x unchanged and to h through the gate
            dx += tl.load(DXOUT + row * stride_dxout + cols, mask=mask, other=0.0).to(tl.float32)
            h = tl.load(H + row * stride_h + cols, mask=mask, other=0.0).to(tl.float32)
            if PER_TOKEN:
                gate = tl.load(GATE + row * stride_mod + cols, mask=mask, other=0.0).to(tl.float32)
                tl.store(DGATE + row * C + cols, _cast(dx * h, DGATE.dtype.element_ty, RNE), mask=mask)
            else:
                gate = sample_gate
                acc_dgate += dx * h
            tl.store(DH + row * C + cols, _cast(dx * gate, DH.dtype.element_ty, RNE), mask=mask)
        tl.store(DX + row * C + cols, _cast(dx, DX.dtype.element_ty, RNE), mask=mask)

        a = xhat
        if HAS_WEIGHT:
            a = a * w
        if HAS_BIAS:
            a = a + b
        if PER_TOKEN:
            tl.store(DSHIFT + row * C + cols, _cast(dy, DSHIFT.dtype.element_ty, RNE), mask=mask)
            tl.store(DSCALE + row * C + cols, _cast(dy * a, DSCALE.dtype.element_ty, RNE), mask=mask)
        else:
            acc_dshift += dy
            acc_dscale += dy * a
        if HAS_WEIGHT:
            acc_dw += dnorm * xhat
        if HAS_BIAS:
            acc_db += dnorm
        row += 1

    if not PER_TOKEN:
        tl.store(DSHIFT + pid * C + cols, acc_dshift, mask=mask)
        tl.store(DSCALE + pid * C + cols, acc_dscale, mask=mask)
        if HAS_RESIDUAL:
            tl.store(DGATE + pid * C + cols, acc_dgate, mask=mask)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * C + cols, acc_dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, acc_db, mask=mask)


# ------------------------------------------------------------------------------------------ helpers
def _new(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An output buffer: uninitialised, or NaN-filled when POISON_OUTPUTS is set (tests)."""
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D tensor whose columns are unit-stride (any row stride, even 0); copies only when needed."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def num_warps_for(block: int, element_bytes: int, most: int) -> int:
    """Warps for a one-row program of ``block`` lanes: at most ``most``, and few enough that each thread
    holds at least 16 bytes of the row, so aligned rows move in 128-bit loads and stores (at 384 bf16
    columns, 4 warps would give each thread 8 bytes: 64-bit accesses)."""
    return max(1, min(most, block * element_bytes // (16 * 32)))


def _block_settings(C: int, element_bytes: int) -> tuple[int, int]:
    block = triton.next_power_of_2(C)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"modulated norm: C={C} exceeds the fused row limit of {MAX_FUSED_SIZE}")
    most = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps_for(block, element_bytes, most)


def _check(x: torch.Tensor, tokens_per_mod_row: int, mods: dict[str, torch.Tensor]) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton modulated-norm kernels got a CPU tensor but were not defined under the "
                           "Triton interpreter: set TRITON_INTERPRET=1 before fastsemdiff.kernels is imported, "
                           "or use backend='torch'")
    if x.dim() != 2:
        raise ValueError(f"modulated norm: x must be [M, C], got {tuple(x.shape)}")
    M, C = x.shape
    if tokens_per_mod_row < 1 or (M and M % tokens_per_mod_row):
        raise ValueError(f"modulated norm: tokens_per_mod_row={tokens_per_mod_row} must divide M={M}")
    rows = M // tokens_per_mod_row
    for name, m in mods.items():
        if m.dim() != 2 or tuple(m.shape) != (rows, C):
            raise ValueError(f"modulated norm: {name} must be [{rows}, {C}], got {tuple(m.shape)}")
    strides = {m.stride(0) for m in mods.values() if m.shape[0] > 1}
    if len(strides) > 1:
        raise ValueError("modulated norm: the modulation tensors must share one row stride")


def _mod_stride(*mods: torch.Tensor) -> int:
    return next((m.stride(0) for m in mods if m.shape[0] > 1), mods[0].shape[1])


def _target_programs(device: torch.device) -> int:
    """How many backward programs to aim for: a few per SM on a GPU, a handful on the interpreter."""
    if device.type == "cuda":
        return 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


# ------------------------------------------------------------------------------------------ launchers
def modulated_norm_fwd(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-6,
    tokens_per_mod_row: int = 1,
    rms: bool = False,
    h: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
) -> tuple[Optional[torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward of both ops.

    Args:
        x: ``[M, C]`` input rows (unit column stride, any row stride; copied otherwise), any float dtype.
        shift, scale (and gate): ``[M // tokens_per_mod_row, C]`` modulation rows sharing one row stride.
        weight, bias: optional ``[C]`` affine parameters of the norm.
        eps: the norm's epsilon. rms: RMSNorm instead of LayerNorm.
        tokens_per_mod_row: how many consecutive rows share one modulation row (N for per-sample
            modulation, 1 for per-token modulation); must divide M.
        h, gate: both or neither; with them, ``x + gate * h`` is normalised and returned as ``x_out``.

    Returns:
        ``(x_out, y, mean, rstd)``: ``x_out`` (None without h) and ``y`` are ``[M, C]`` contiguous in
        x's dtype; ``mean``, ``rstd`` fp32 ``[M]``.
    """
    residual = h is not None
    if residual != (gate is not None):
        raise ValueError("modulated norm: pass both h and gate, or neither")
    mods = {"shift": shift, "scale": scale, **({"gate": gate} if residual else {})}
    _check(x, tokens_per_mod_row, mods)
    if residual and tuple(h.shape) != tuple(x.shape):
        raise ValueError(f"modulated norm: h must be {tuple(x.shape)} like x, got {tuple(h.shape)}")
    M, C = x.shape
    x_out = _new((M, C), x.dtype, x.device) if residual else None
    y = _new((M, C), x.dtype, x.device)
    mean = _new((M,), torch.float32, x.device)
    rstd = _new((M,), torch.float32, x.device)
    if M == 0:
        return x_out, y, mean, rstd
    x, shift, scale = _rows(x), _rows(shift), _rows(scale)
    h, gate = (_rows(h), _rows(gate)) if residual else (x, shift)
    BLOCK_C, num_warps = _block_settings(C, x.element_size())
    _fwd_kernel[(M,)](
        x, h, gate, x_out if residual else y, y, shift, scale,
        weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), h.stride(0), y.stride(0), _mod_stride(shift, scale, gate),
        C, tokens_per_mod_row, eps,
        HAS_RESIDUAL=residual, IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=BLOCK_C, RNE=INTERPRETED, num_warps=num_warps,
    )
    return x_out, y, mean, rstd


def modulated_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    scale: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    tokens_per_mod_row: int = 1,
    rms: bool = False,
    dx_out: Optional[torch.Tensor] = None,
    h: Optional[torch.Tensor] = None,
    gate: Optional[torch.Tensor] = None,
    rows_per_program: Optional[int] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor,
           Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward of both ops.

    Args:
        dy: ``[M, C]`` gradient of ``y``.
        x, mean, rstd: the normalised input ``[M, C]`` (``x_out`` for the residual op) and its saved
            fp32 ``[M]`` statistics.
        scale: the forward's modulation scale (shift is not needed).
        weight, bias, tokens_per_mod_row, rms: as in the forward.
        dx_out, h, gate: all three for the residual op: the gradient of ``x_out`` and the forward's
            ``h`` and ``gate``.
        rows_per_program: rows each program reduces (default: enough programs to fill the device;
            ``ROWS_PER_PROGRAM`` overrides the default).

    Returns:
        ``(dx, dh, dgate, dshift, dscale, dweight, dbias)``: ``dx`` (the gradient of the op's input x)
        and ``dh`` are ``[M, C]`` in x's dtype; ``dgate``/``dshift``/``dscale`` are shaped like
        ``scale`` in its dtype; ``dweight``/``dbias`` ``[C]`` in the parameter's dtype. Entries of
        inputs the op did not have are None.
    """
    residual = h is not None
    if residual != (gate is not None) or residual != (dx_out is not None):
        raise ValueError("modulated norm backward: pass dx_out, h and gate together, or none of them")
    mods = {"scale": scale, **({"gate": gate} if residual else {})}
    _check(x, tokens_per_mod_row, mods)
    M, C = x.shape
    for name, t in (("dy", dy), ("dx_out", dx_out), ("h", h)):
        if t is not None and tuple(t.shape) != (M, C):
            raise ValueError(f"modulated norm backward: {name} must be [{M}, {C}], got {tuple(t.shape)}")
    t = tokens_per_mod_row
    per_token = t == 1  # each token has its own modulation row: dshift/dscale/dgate are elementwise
    dx = _new((M, C), x.dtype, x.device)
    dh = _new((M, C), x.dtype, x.device) if residual else None
    if M == 0:
        zero = scale.new_zeros(scale.shape)
        return (dx, dh, zero.clone() if residual else None, zero, zero.clone(),
                None if weight is None else torch.zeros_like(weight), None if bias is None else torch.zeros_like(bias))
    dy, x, scale = _rows(dy), _rows(x), _rows(scale)
    dx_out, h, gate = (_rows(dx_out), _rows(h), _rows(gate)) if residual else (dy, x, scale)
    mean, rstd = mean.contiguous(), rstd.contiguous()

    # Split each group (a sample, or all rows when per-token) into blocks of consecutive rows.
    num_groups, rows_per_group = (1, M) if per_token else (M // t, t)
    rpp = rows_per_program or ROWS_PER_PROGRAM
    if rpp is None:
        blocks = max(1, min(rows_per_group, _target_programs(x.device) // num_groups))
        rpp = triton.cdiv(rows_per_group, blocks)
    rpp = max(1, min(int(rpp), rows_per_group))
    blocks_per_group = triton.cdiv(rows_per_group, rpp)
    num_programs = num_groups * blocks_per_group

    f32 = torch.float32
    mod_buf = (lambda: _new((M, C), scale.dtype, x.device)) if per_token else (lambda: _new((num_programs, C), f32, x.device))
    dshift, dscale = mod_buf(), mod_buf()
    dgate = mod_buf() if residual else None
    dw_part = _new((num_programs, C), f32, x.device) if weight is not None else None
    db_part = _new((num_programs, C), f32, x.device) if bias is not None else None

    BLOCK_C, num_warps = _block_settings(C, x.element_size())
    _bwd_kernel[(num_programs,)](
        dy, dx_out, x, h, gate, mean, rstd, scale,
        weight if weight is not None else x, bias if bias is not None else x,
        dx, dh if residual else dx, dshift, dscale, dgate if residual else dshift,
        dw_part if dw_part is not None else dx, db_part if db_part is not None else dx,
        dy.stride(0), dx_out.stride(0), x.stride(0), h.stride(0), _mod_stride(scale, gate),
        C, rows_per_group, blocks_per_group, rpp, t,
        PER_TOKEN=per_token, HAS_RESIDUAL=residual, IS_RMS=rms,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=BLOCK_C, RNE=INTERPRETED,
        num_warps=num_warps,
    )

    def finish(partials):  # per-sample: sum each sample's block partials
        if partials is None or per_token:
            return partials
        return partials.view(num_groups, blocks_per_group, C).sum(1).to(scale.dtype)

    dweight = dw_part.sum(0).to(weight.dtype) if weight is not None else None
    dbias = db_part.sum(0).to(bias.dtype) if bias is not None else None
    return dx, dh, finish(dgate), finish(dshift), finish(dscale), dweight, dbias
