"""What the fused ops take, checked before any kernel launches (a bad tensor must raise, never crash).

Each custom op of ``fastsemdiff.ops`` calls one function of this module first, whatever backend then runs:
the Triton kernels index memory with the shapes they are given, so a modulation row too short or a ``mean``
of the wrong length would read or write out of bounds on a GPU instead of failing. The checks compare
shapes, strides, dtypes and devices only (no tensor data is read, nothing synchronises), so they cost a few
microseconds per call. Everything refused raises :class:`ValueError` naming the operand and the fix:

* rank: rows ``[M, C]`` (2-D), modulation ``[M // tokens_per_mod_row, C]``, ``weight``/``bias`` ``[C]``,
  ``mean``/``rstd`` float32 ``[M]``, ``t`` ``[B]``;
* dtype: floating tensors (integer ``t`` is fine for the embedding; bool and complex are not);
* ``C == 0`` (a row of no columns); ``M == 0`` is fine and gives empty results;
* ``tokens_per_mod_row`` below 1 or not dividing ``M``;
* modulation tensors of more than one row that do not share one row stride (the Triton kernels read them
  with one; a view without unit column stride counts with the stride of its contiguous copy);
* operands on another device than ``x`` (or ``t``);
* ``eps`` not finite or negative; ``dim`` below 1; ``max_period`` not finite or not positive.

What only the CUDA kernels refuse (C not a multiple of 8 or above 8192, rows not 16-byte aligned) is not an
error here: ``fastsemdiff.ops.dispatch`` sends such inputs to Triton. The raw ``fastsemdiff._C`` ops check
those themselves (``csrc/validate.h``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

MOD_ROWS = "M / tokens_per_mod_row rows of C"


def _fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def _same_device(op: str, name: str, t: Tensor, x: Tensor, x_name: str = "x") -> None:
    if t.device != x.device:
        _fail(op, f"{name} is on {t.device} but {x_name} is on {x.device}; every operand must be on one device")


def _floating(op: str, name: str, t: Tensor) -> None:
    if not t.is_floating_point():
        _fail(op, f"{name} must be a floating tensor, got {t.dtype}")


def _shaped(op: str, name: str, t: Tensor, x: Tensor, shape: tuple, what: str) -> None:
    _same_device(op, name, t, x)
    if tuple(t.shape) != shape:
        _fail(op, f"{name} must be {list(shape)} ({what}), got {list(t.shape)}")
    _floating(op, name, t)


def _rows_and_mod_rows(op: str, x: Tensor, tokens_per_mod_row: int) -> tuple[int, int, int]:
    if x.dim() != 2:
        _fail(op, f"x must be [M, C] (2-D), got {list(x.shape)}")
    _floating(op, "x", x)
    M, C = x.shape
    if C == 0:
        _fail(op, "x has rows of no columns (C=0)")
    if tokens_per_mod_row < 1 or M % tokens_per_mod_row:
        _fail(op, f"tokens_per_mod_row={tokens_per_mod_row} must be >= 1 and divide M={M}")
    return M, C, M // tokens_per_mod_row


def _mods(op: str, x: Tensor, R: int, C: int, mods: dict[str, Optional[Tensor]]) -> None:
    strides = set()
    for name, m in mods.items():
        if m is None:
            continue
        _shaped(op, name, m, x, (R, C), MOD_ROWS)
        if R > 1:  # the row stride the kernels see: a view without unit column stride is copied first
            strides.add(m.stride(0) if m.stride(1) == 1 or C == 1 else C)
    if len(strides) > 1:
        _fail(op, f"the modulation tensors {[n for n, m in mods.items() if m is not None]} must share one row "
                  f"stride (chunks of one adaLN output do), got {sorted(strides)}; pass .contiguous() copies")


def _params(op: str, x: Tensor, C: int, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None:
            _shaped(op, name, p, x, (C,), "one per channel")


def _eps(op: str, eps: float) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        _fail(op, f"eps must be finite and >= 0, got {eps}")


def norm_fwd(op: str, x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
             eps: float, tokens_per_mod_row: int, h: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> None:
    """The forward of the modulated norm (``h``/``gate`` None) or of the gated residual + norm."""
    M, C, R = _rows_and_mod_rows(op, x, tokens_per_mod_row)
    if h is not None:
        _shaped(op, "h", h, x, (M, C), "like x")
    _mods(op, x, R, C, {"shift": shift, "scale": scale, "gate": gate})
    _params(op, x, C, weight, bias)
    _eps(op, eps)


def norm_bwd(op: str, dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, weight: Optional[Tensor],
             bias: Optional[Tensor], tokens_per_mod_row: int, dx_out: Optional[Tensor] = None,
             h: Optional[Tensor] = None, gate: Optional[Tensor] = None) -> None:
    """The backward of either op (``x`` is the normalised input: ``x_out`` for the gated one)."""
    M, C, R = _rows_and_mod_rows(op, x, tokens_per_mod_row)
    for name, t in (("dy", dy), ("dx_out", dx_out), ("h", h)):
        if t is not None:
            _shaped(op, name, t, x, (M, C), "like x")
    for name, t in (("mean", mean), ("rstd", rstd)):
        _same_device(op, name, t, x)
        if t.dtype != torch.float32 or tuple(t.shape) != (M,):
            _fail(op, f"{name} must be float32 [{M}] (as the forward returns it), got {t.dtype} {list(t.shape)}")
    _mods(op, x, R, C, {"scale": scale, "gate": gate})
    _params(op, x, C, weight, bias)


def timestep_embedding(op: str, t: Tensor, dim: int, max_period: float) -> None:
    if t.dim() != 1:
        _fail(op, f"t must be [B] (1-D), got {list(t.shape)}")
    if t.dtype == torch.bool or t.is_complex():
        _fail(op, f"t must be a real (floating or integer) tensor, got {t.dtype}")
    if dim < 1:
        _fail(op, f"dim must be >= 1, got {dim}")
    if not (math.isfinite(max_period) and max_period > 0):
        _fail(op, f"max_period must be finite and > 0, got {max_period}")
