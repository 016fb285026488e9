"""adaLN-modulated LayerNorm (or RMSNorm), alone or fused with the gated residual before it, in Triton.

Two ops share these kernels (the residual is a compile-time flag):

* modulated norm:         ``y = norm(x) [* w + b] * (1 + scale) + shift``
* gated residual + norm:  ``x_out = x + gate * h``; ``y = norm(x_out) [* w + b] * (1 + scale) + shift``

``norm`` is LayerNorm, or RMSNorm with ``rms=True`` (no centring; ``mean`` is stored as 0).

Layout. ``x`` (and ``h``) are viewed as ``[M, C]`` rows (one row = one token, ``M = B * N``). The
modulation ``shift``/``scale``/``gate`` is ``[M // tokens_per_mod_row, C]``: token row ``r`` is
modulated by row ``r // tokens_per_mod_row``. Per-sample modulation (``[B, C]`` or ``[B, 1, C]``) is
``tokens_per_mod_row = N``; per-token modulation (``[B, N, C]``) is ``tokens_per_mod_row = 1``.

Forward: one ``[ROWS, BLOCK_C]`` tile of consecutive rows per program (``BLOCK_C = next_power_of_2(C)``
lanes with a mask, so any C works; row statistics are reductions along axis 1, one barrier for all ROWS rows).
Statistics are fp32; ``mean`` and ``rstd`` (fp32 ``[M]``) are saved for the backward. The residual sum is
rounded to x's dtype before it is normalised, exactly as the unfused reference does.

Backward, built for memory-level parallelism: each *group* of rows sharing a modulation row (a sample; all M rows
for per-token modulation) is split into S *parts* of whole tiles (S a power of two from the config's programs per
SM, so the grid fills the GPU at batch 8 as at 512: ``adaln_config.programs_per_group``). A program walks its part
in tiles of ROWS rows (a constexpr trip count: a loop triton software-pipelines with ``num_stages`` >= 2, its tile
loads becoming cp.async into shared memory, so the next tile is in flight while this one reduces; read in the sm_90
code by bench/codegen.py); each tile's x and dy (dx_out, h) loads are issued together, its two row reductions cover
all its rows at once, and its column sums (one reduction over the tile's rows) go into fp32 register accumulators of
dshift/dscale/dgate and dweight/dbias. At the end a program writes one row: the final per-sample sums in the
modulation's dtype when S == 1 (pid == sample), else an fp32 partial that one small launch of ``_finish_kernel``
sums over the S parts (per-sample) or over all programs (weight/bias). No atomics, no torch reductions. Per-token
dshift/dscale/dgate are elementwise and written directly.

Launch settings (rows per tile, warps, stages, programs per SM) come from ``adaln_config.launch_config``: the
tuned table for the device class, op, direction and width, or defaults.

What it must move, and what it should reach, at ``[256 x 256 rows, C = 1152]`` bf16 (one tensor = 151 MB;
the H200 copy ceiling measured 4,157 GB/s on 2026-12-04, 85% of it = 3,533 GB/s). Predictions, not
measurements:

=====================  ====================================  =======  ==============  ================
kernel                 bytes it must move                    MB       at 100% copy    at 85% (goal)
=====================  ====================================  =======  ==============  ================
modulated LN fwd       read x, write y                       302      73 us           86 us
modulated LN bwd       read x, dy; write dx                  453      109 us          128 us
gated + LN fwd         read x, h; write x_out, y             604      145 us          171 us
gated + LN bwd         read x_out, h, dy, dx_out; write      906      218 us          256 us
                       dx, dh
=====================  ====================================  =======  ==============  ================

(mean/rstd, 0.5 MB, the modulation rows and the per-part fp32 sums, ~2-7 MB at S = 2, are under 2%.) The old
backward kept one row's loads in flight per program (~4.6 KB for x + dy at C = 1152, ~2 programs per SM:
~9 KB per SM, far under the ~20 KB an SM needs in flight at ~30 B/ns x ~0.7 us); it measured 23-24%. The tiled
backward keeps ROWS rows of every input in flight per program (default 2 rows x 2 tensors x 2.3 KB = 9 KB,
plus the next tile through the 2-stage pipeline: ~18 KB per block, two resident 256-thread blocks per SM at
117-127 registers on triton 3.8, so ~36 KB per SM),
which is what the QuACK/apex designs need to reach 80-90% of bandwidth; the expectation is 75-90% of the copy
ceiling (bwd 121-145 us for the plain op, 242-290 us for the gated one) once the tuner has picked rows, warps
and stages on the device, and >= 1.5x torch.compile's 344 / 468 us backwards would need <= 229 / 312 us, which
the bytes allow. The forwards (one tile per program, 171 / 275 us today at one row per program) should come to
80-90% (85-90 / 170-180 us): their loads were never serialised, so the gain is from fewer, wider programs.
None of this is measured until ``scripts/gpu_check.py`` runs on a GPU.

Launchers only; the autograd lives in ``fastsemdiff.ops``. Under ``TRITON_INTERPRET=1`` (set before
this module is imported) the kernels run on CPU tensors.
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl

from .adaln_config import device_class, launch_config, programs_per_group, tile_rows

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
    M, C, tokens_per_mod_row, eps,
    HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_C: tl.constexpr, ROWS: tl.constexpr, RNE: tl.constexpr,
):
    # One [ROWS, BLOCK_C] tile per program: every row's loads are issued together, the row statistics are
    # reductions along axis 1 (one barrier for all ROWS rows).
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    row_mask = rows < M
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    mod = (rows // tokens_per_mod_row)[:, None] * stride_mod + cols[None, :]

    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0, eviction_policy="evict_first")
    if HAS_RESIDUAL:
        h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        gate = tl.load(GATE + mod, mask=mask, other=0.0).to(tl.float32)
        x = _cast(x.to(tl.float32) + gate * h, XOUT.dtype.element_ty, RNE)  # rounded like the reference
        tl.store(XOUT + rows[:, None] * C + cols[None, :], x, mask=mask)
    x = x.to(tl.float32)

    if IS_RMS:
        mean = tl.zeros([ROWS], dtype=tl.float32)
        xc = x
    else:
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
    a = xc * rstd[:, None]
    if HAS_WEIGHT:
        a = a * tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        a = a + tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    shift = tl.load(SHIFT + mod, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + mod, mask=mask, other=0.0).to(tl.float32)
    y = a * (1.0 + scale) + shift

    tl.store(Y + rows[:, None] * stride_y + cols[None, :], _cast(y, Y.dtype.element_ty, RNE), mask=mask)
    tl.store(MEAN + rows, mean, mask=row_mask)
    tl.store(RSTD + rows, rstd, mask=row_mask)


@triton.jit
def _bwd_kernel(
    DY, DXOUT, X, H, GATE, MEAN, RSTD, SCALE, W, B,
    DX, DH, DSHIFT, DSCALE, DGATE, DW_PART, DB_PART,
    stride_dy, stride_dxout, stride_x, stride_h, stride_mod,
    C, rows_per_group, programs_per_group, rows_per_program,
    PER_TOKEN: tl.constexpr, HAS_RESIDUAL: tl.constexpr, IS_RMS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr,
    TILES: tl.constexpr, NUM_STAGES: tl.constexpr, RNE: tl.constexpr,
):
    # This program's rows: part `part` of group `group` (a sample, or all rows when PER_TOKEN), walked in
    # TILES tiles of ROWS rows; rows past the part's end are masked (the last part of a group is ragged).
    pid = tl.program_id(0).to(tl.int64)
    group = pid // programs_per_group
    part = pid % programs_per_group
    row_start = group * rows_per_group + part * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, (group + 1) * rows_per_group)

    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if not PER_TOKEN:  # one modulation row for all of the program's rows
        sample_scale = 1.0 + tl.load(SCALE + group * stride_mod + cols, mask=col_mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            sample_gate = tl.load(GATE + group * stride_mod + cols, mask=col_mask, other=0.0).to(tl.float32)

    # fp32 partial sums over this program's rows; each tile adds its column sums (axis 0: the rows of a
    # tile are held by the same threads, so no barrier)
    acc_dshift = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dscale = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dgate = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_dw = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc_db = tl.zeros([BLOCK_C], dtype=tl.float32)

    # A constexpr trip count: the GPU image's interpreter (triton 3.6) takes no tensor bound in range(), and
    # a uniform loop is one the compiler can software-pipeline (NUM_STAGES).
    for i in tl.range(0, TILES, num_stages=NUM_STAGES):
        rows = row_start + i * ROWS + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0,
                    eviction_policy="evict_first").to(tl.float32)
        dy = tl.load(DY + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0,
                     eviction_policy="evict_first").to(tl.float32)
        mean = tl.load(MEAN + rows, mask=row_mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if PER_TOKEN:
            mod = rows[:, None] * stride_mod + cols[None, :]
            one_plus_scale = 1.0 + tl.load(SCALE + mod, mask=mask, other=0.0).to(tl.float32)
        else:
            one_plus_scale = sample_scale[None, :]

        # through the modulation and the affine, then through the normalisation (row sums along axis 1)
        dnorm = dy * one_plus_scale
        g = dnorm
        if HAS_WEIGHT:
            g = g * w
        mean_g_xhat = tl.sum(g * xhat, axis=1) / C
        if IS_RMS:
            dx = (g - xhat * mean_g_xhat[:, None]) * rstd[:, None]
        else:
            dx = (g - (tl.sum(g, axis=1) / C)[:, None] - xhat * mean_g_xhat[:, None]) * rstd[:, None]

        out = rows[:, None] * C + cols[None, :]
        if HAS_RESIDUAL:  # x_out = x + gate * h: dx_out flows to x unchanged and to h through the gate
            dx += tl.load(DXOUT + rows[:, None] * stride_dxout + cols[None, :], mask=mask, other=0.0,
                          eviction_policy="evict_first").to(tl.float32)
            h = tl.load(H + rows[:, None] * stride_h + cols[None, :], mask=mask, other=0.0,
                        eviction_policy="evict_first").to(tl.float32)
            if PER_TOKEN:
                gate = tl.load(GATE + mod, mask=mask, other=0.0).to(tl.float32)
                tl.store(DGATE + out, _cast(dx * h, DGATE.dtype.element_ty, RNE), mask=mask)
            else:
                gate = sample_gate[None, :]
                acc_dgate += tl.sum(dx * h, axis=0)
            tl.store(DH + out, _cast(dx * gate, DH.dtype.element_ty, RNE), mask=mask)
        tl.store(DX + out, _cast(dx, DX.dtype.element_ty, RNE), mask=mask)

        a = xhat
        if HAS_WEIGHT:
            a = a * w
        if HAS_BIAS:
            a = a + b
        if PER_TOKEN:
            tl.store(DSHIFT + out, _cast(dy, DSHIFT.dtype.element_ty, RNE), mask=mask)
            tl.store(DSCALE + out, _cast(dy * a, DSCALE.dtype.element_ty, RNE), mask=mask)
        else:
            acc_dshift += tl.sum(dy, axis=0)
            acc_dscale += tl.sum(dy * a, axis=0)
        if HAS_WEIGHT:
            acc_dw += tl.sum(dnorm * xhat, axis=0)
        if HAS_BIAS:
            acc_db += tl.sum(dnorm, axis=0)

    # One row per program: the final per-sample value (in the modulation's dtype) when the sample has one
    # program (then pid == group), else an fp32 partial that _finish_kernel sums.
    if not PER_TOKEN:
        tl.store(DSHIFT + pid * C + cols, _cast(acc_dshift, DSHIFT.dtype.element_ty, RNE), mask=col_mask)
        tl.store(DSCALE + pid * C + cols, _cast(acc_dscale, DSCALE.dtype.element_ty, RNE), mask=col_mask)
        if HAS_RESIDUAL:
            tl.store(DGATE + pid * C + cols, _cast(acc_dgate, DGATE.dtype.element_ty, RNE), mask=col_mask)
    if HAS_WEIGHT:
        tl.store(DW_PART + pid * C + cols, acc_dw, mask=col_mask)
    if HAS_BIAS:
        tl.store(DB_PART + pid * C + cols, acc_db, mask=col_mask)


@triton.jit
def _finish_kernel(
    PART, OUT0, OUT1, OUT2, C, stride_k,
    K: tl.constexpr, PARTS: tl.constexpr, PART_BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr,
):
    """The second step of the per-sample (or per-parameter) sums: ``OUTk[g] = sum_p PART[k, g, p]`` for the
    K <= 3 quantities of one launch, PART fp32 ``[K, groups, PARTS, C]`` (k-stride ``stride_k``), each OUTk
    ``[groups, C]`` in its own dtype. One program per (group, column block)."""
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < C
    parts = tl.arange(0, PART_BLOCK)
    base = PART + group * PARTS * C
    acc0 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK_C], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_C], dtype=tl.float32)
    for p0 in tl.range(0, PARTS, PART_BLOCK):
        p = p0 + parts
        mask = (p < PARTS)[:, None] & col_mask[None, :]
        offs = p[:, None] * C + cols[None, :]
        acc0 += tl.sum(tl.load(base + offs, mask=mask, other=0.0), axis=0)
        if K > 1:
            acc1 += tl.sum(tl.load(base + stride_k + offs, mask=mask, other=0.0), axis=0)
        if K > 2:
            acc2 += tl.sum(tl.load(base + 2 * stride_k + offs, mask=mask, other=0.0), axis=0)
    tl.store(OUT0 + group * C + cols, _cast(acc0, OUT0.dtype.element_ty, RNE), mask=col_mask)
    if K > 1:
        tl.store(OUT1 + group * C + cols, _cast(acc1, OUT1.dtype.element_ty, RNE), mask=col_mask)
    if K > 2:
        tl.store(OUT2 + group * C + cols, _cast(acc2, OUT2.dtype.element_ty, RNE), mask=col_mask)


# ------------------------------------------------------------------------------------------ helpers
def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) in plain integers: ``triton.cdiv`` is a ConstexprFunction in triton 3.8, ~2 us per host call."""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1), in plain integers (``triton.next_power_of_2`` costs ~3 us)."""
    return 1 << (n - 1).bit_length()


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
    holds at least 16 bytes of the row, so aligned rows move in 128-bit loads and stores (the timestep
    embedding's launcher uses it)."""
    return max(1, min(most, block * element_bytes // (16 * 32)))


def _block_c(C: int) -> int:
    block = _pow2(C)
    if block > MAX_FUSED_SIZE:
        raise ValueError(f"modulated norm: C={C} exceeds the fused row limit of {MAX_FUSED_SIZE}")
    return block


def _launchable(x: torch.Tensor) -> None:
    if x.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError("the Triton modulated-norm kernels got a CPU tensor but were not defined under the "
                           "Triton interpreter: set TRITON_INTERPRET=1 before fastsemdiff.kernels is imported, "
                           "or use backend='torch'")


def _check(x: torch.Tensor, tokens_per_mod_row: int, mods: dict[str, torch.Tensor]) -> None:
    """The launchers' own argument checks (``Prevalidated`` skips them: ``fastsemdiff.ops`` checks more first)."""
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


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs the backward's grid is sized for (one on the interpreter). Cached: asked once per device."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@functools.lru_cache(maxsize=None)
def _device_class(device: torch.device) -> str:
    """The launch table's key for ``device`` (``"sm_90"``), asked once per device."""
    return device_class(device)


def config_for(op: str, direction: str, C: int, device: torch.device, config: Optional[dict] = None) -> dict:
    """The launch settings of one call: ``config`` (tests, the tuner) over the table's or the default ones."""
    base, _ = launch_config(op, direction, C, _device_class(device))
    if config:
        base.update(config)
    return base


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
    config: Optional[dict] = None,
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
        config: launch settings over the table's (``rows``, ``warps``, ``stages``; tests and the tuner).

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
    return _fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, h, gate, config)


def _fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, h=None, gate=None, config=None):
    """``modulated_norm_fwd`` after its checks."""
    _launchable(x)
    residual = h is not None
    M, C = x.shape
    x_out = _new((M, C), x.dtype, x.device) if residual else None
    y = _new((M, C), x.dtype, x.device)
    mean = _new((M,), torch.float32, x.device)
    rstd = _new((M,), torch.float32, x.device)
    if M == 0:
        return x_out, y, mean, rstd
    x, shift, scale = _rows(x), _rows(shift), _rows(scale)
    h, gate = (_rows(h), _rows(gate)) if residual else (x, shift)
    cfg = config_for("gated_residual_norm" if residual else "modulated_norm", "fwd", C, x.device, config)
    ROWS = cfg["rows"]
    _fwd_kernel[(_cdiv(M, ROWS),)](
        x, h, gate, x_out if residual else y, y, shift, scale,
        weight if weight is not None else x, bias if bias is not None else x, mean, rstd,
        x.stride(0), h.stride(0), y.stride(0), _mod_stride(shift, scale, gate),
        M, C, tokens_per_mod_row, eps,
        HAS_RESIDUAL=residual, IS_RMS=rms, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_C=_block_c(C), ROWS=ROWS, RNE=INTERPRETED, num_warps=cfg["warps"], num_stages=cfg["stages"],
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
    config: Optional[dict] = None,
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
        rows_per_program: rows each program reduces (default: the config's split, see
            ``adaln_config.programs_per_group``; ``ROWS_PER_PROGRAM`` overrides the default).
        config: launch settings over the table's (``rows``, ``warps``, ``stages``, ``programs_per_sm``,
            ``min_rows``; tests and the tuner).

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
    return _bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, dx_out, h, gate, rows_per_program,
                config)


def _bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, dx_out=None, h=None, gate=None,
         rows_per_program=None, config=None):
    """``modulated_norm_bwd`` after its checks."""
    _launchable(x)
    residual = h is not None
    M, C = x.shape
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

    # Split each group (a sample, or all rows when per-token) into S parts of whole tiles.
    op = "gated_residual_norm" if residual else "modulated_norm"
    cfg = config_for(op, "bwd", C, x.device, config)
    ROWS = tile_rows(cfg, weight is not None or bias is not None)
    num_groups, rows_per_group = (1, M) if per_token else (M // t, t)
    rpp = rows_per_program or ROWS_PER_PROGRAM
    if rpp is None:
        S, rpp = programs_per_group(num_groups, rows_per_group, ROWS, _sm_count(x.device), cfg)
    else:
        rpp = max(1, min(int(rpp), rows_per_group))
        S = _cdiv(rows_per_group, rpp)
    ROWS = min(ROWS, _pow2(rpp))
    num_programs = num_groups * S

    f32 = torch.float32
    n_mod = 3 if residual else 2
    if per_token:  # elementwise gradients, written by the kernel directly
        mods_out = [_new((M, C), scale.dtype, x.device) for _ in range(n_mod)]
        mod_part = None
    elif S == 1:  # one program per sample: the kernel writes the final sums
        mods_out = [_new((num_groups, C), scale.dtype, x.device) for _ in range(n_mod)]
        mod_part = None
    else:  # fp32 partials [n_mod, groups * S, C], summed by _finish_kernel
        mod_part = _new((n_mod, num_programs, C), f32, x.device)
        mods_out = list(mod_part.unbind(0))
    aff = [p for p in (weight, bias) if p is not None]
    aff_part = _new((len(aff), num_programs, C), f32, x.device) if aff else None
    aff_bufs = list(aff_part.unbind(0)) if aff else []
    dw_part = aff_bufs[0] if weight is not None else None
    db_part = aff_bufs[-1] if bias is not None else None
    dshift, dscale = mods_out[0], mods_out[1]
    dgate = mods_out[2] if residual else None

    _bwd_kernel[(num_programs,)](
        dy, dx_out, x, h, gate, mean, rstd, scale,
        weight if weight is not None else x, bias if bias is not None else x,
        dx, dh if residual else dx, dshift, dscale, dgate if residual else dshift,
        dw_part if dw_part is not None else dx, db_part if db_part is not None else dx,
        dy.stride(0), dx_out.stride(0), x.stride(0), h.stride(0), _mod_stride(scale, gate),
        C, rows_per_group, S, rpp,
        PER_TOKEN=per_token, HAS_RESIDUAL=residual, IS_RMS=rms,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK_C=_block_c(C), ROWS=ROWS,
        TILES=_cdiv(rpp, ROWS), NUM_STAGES=cfg["stages"], RNE=INTERPRETED, num_warps=cfg["warps"],
    )
    if mod_part is not None:
        mods_out = [_new((num_groups, C), scale.dtype, x.device) for _ in range(n_mod)]
        _finish(mod_part, mods_out, num_groups, S, C)
        dshift, dscale = mods_out[0], mods_out[1]
        dgate = mods_out[2] if residual else None
    dweight = dbias = None
    if aff:
        outs = [_new((1, C), p.dtype, x.device) for p in aff]
        _finish(aff_part, outs, 1, num_programs, C)
        dweight = outs[0].view(C) if weight is not None else None
        dbias = outs[-1].view(C) if bias is not None else None
    return dx, dh, dgate, dshift, dscale, dweight, dbias


class Prevalidated:
    """The two launchers without their argument checks, for ``fastsemdiff.ops``: each of its ops runs
    ``fastsemdiff.ops.validation`` (everything ``_check`` asks, and more) before it launches, and asking twice
    cost host time on every call (bench/test_bench_call_overhead.py). Direct callers use the checked ones."""

    modulated_norm_fwd = staticmethod(_fwd)
    modulated_norm_bwd = staticmethod(_bwd)


def _finish(part: torch.Tensor, outs: list, groups: int, parts: int, C: int) -> None:
    """``outs[k][g] = part[k, g * parts:(g + 1) * parts].sum(0)`` in one launch of _finish_kernel.

    Per-sample sums (many groups, few parts): one warp per 256 columns, so each thread stores 8 contiguous
    values (128-bit in bf16) and reads 128-bit fp32. Weight/bias sums (one group, a part per backward program):
    4 warps over [16, 256] tiles, the columns split across programs."""
    BLOCK_C = min(256, _pow2(C))
    many = groups > 1
    PART_BLOCK = min(8 if many else 16, _pow2(parts))
    o = outs + [outs[0]] * (3 - len(outs))
    _finish_kernel[(groups, _cdiv(C, BLOCK_C))](
        part, o[0], o[1], o[2], C, part.stride(0),
        K=len(outs), PARTS=parts, PART_BLOCK=PART_BLOCK, BLOCK_C=BLOCK_C, RNE=INTERPRETED,
        num_warps=1 if many else 4,
    )
