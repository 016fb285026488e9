"""The first-use check of the fused kernels: one small forward and backward against the torch reference.

The first time a fused op runs with a given configuration (op, backend, device, dtypes, width, norm kind,
affine parameters, modulation layout) on a checked device, it is run once on a few rows of fresh random data
and compared with the plain-PyTorch reference (in the op's file: ``modulated_norm.py``, ``timestep_embedding.py``):
forward outputs and every gradient, by the accuracy rule of the kernel tests (SPEC section 7): the fused
error against an fp64 reference at most twice the error of the reference run in the same dtypes, plus
``1e-5`` of the tensor's largest value. A kernel that raises counts as a mismatch too.

What a mismatch does is the ``fused_check`` mode (``model.fused_check``):

* ``warn`` (default): one :class:`FusedKernelMismatch` warning with the errors, and that configuration
  runs on torch for the rest of the process;
* ``error``: :class:`FusedCheckError` with the same text;
* ``off``: no check.

The check runs inside the op's implementation, i.e. on real tensors when the op executes, never while
``torch.compile`` traces (tracing runs the ops' fake implementations), so compiled models are checked
too. An op's implementation runs below autograd, so the check runs in a short-lived thread of its own,
where autograd and no autocast are in force. Only ``CHECKED_DEVICE_TYPES`` are checked: CUDA devices; the
tests add ``"cpu"`` to check the kernels under the Triton interpreter.
"""
from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

MODES = ("warn", "error", "off")
CHECKED_DEVICE_TYPES: tuple[str, ...] = ("cuda",)
ABS_FLOOR = 1e-5  # of the tensor's largest reference value
_MISSING = object()


class FusedKernelMismatch(UserWarning):
    """A fused kernel disagreed with the torch reference on its first-use check; torch serves instead."""


class FusedCheckError(RuntimeError):
    """A fused kernel disagreed with the torch reference and ``fused_check=error`` was asked for."""


@dataclass(frozen=True)
class Mismatch:
    name: str
    max_abs: float
    max_rel: float  # max abs error over the largest reference value
    allowed: float
    shape: tuple[int, ...]
    dtype: torch.dtype

    def __str__(self) -> str:
        return (f"{self.name} {list(self.shape)} {str(self.dtype).replace('torch.', '')}: max abs error "
                f"{self.max_abs:.3g}, max rel error {self.max_rel:.3g} (allowed abs {self.allowed:.3g})")


_verdicts: dict[tuple, Optional[str]] = {}  # key -> None (passed) or the mismatch message
_lock = threading.RLock()
_generation = 0  # counts reset()s: a decision cached from the verdicts is valid within one generation


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"fused_check={mode!r} is not valid; choose one of {MODES}")
    return mode


def reset() -> None:
    """Forget every verdict (tests)."""
    global _generation
    with _lock:
        _verdicts.clear()
        _generation += 1


def generation() -> int:
    """How many times the verdicts were forgotten: part of the key of any decision cached from them."""
    return _generation


def verdicts() -> dict[tuple, Optional[str]]:
    """A copy of the verdicts so far: key -> None (the kernels passed) or the mismatch message."""
    with _lock:
        return dict(_verdicts)


def compare(name: str, got: Optional[torch.Tensor], ref64: Optional[torch.Tensor],
            same: Optional[torch.Tensor]) -> Optional[Mismatch]:
    """``got`` (fused) against ``ref64`` (the reference in fp64) with ``same`` (the reference in the fused
    call's dtypes) setting the allowed error; None when it passes."""
    if ref64 is None:
        return None
    scale = max(1.0, ref64.abs().max().item()) if ref64.numel() else 1.0
    ref_err = (same.double() - ref64).abs().max().item() if ref64.numel() else 0.0
    allowed = 2 * ref_err + ABS_FLOOR * scale
    if got is None or tuple(got.shape) != tuple(ref64.shape):
        return Mismatch(f"{name} (shape {None if got is None else list(got.shape)})", float("inf"), float("inf"),
                        allowed, tuple(ref64.shape), ref64.dtype if same is None else same.dtype)
    err = (got.double() - ref64).abs().max().item() if got.numel() else 0.0
    if not torch.isfinite(got).all():
        err = float("inf")
    if err <= allowed:
        return None
    return Mismatch(name, err, err / scale, allowed, tuple(got.shape), got.dtype)


def compare_all(names: Sequence[str], got, ref64, same) -> list[Mismatch]:
    return [m for m in (compare(*args) for args in zip(names, got, ref64, same)) if m is not None]


def _in_fresh_thread(fn: Callable[[], list[Mismatch]], device: torch.device) -> list[Mismatch]:
    """Run ``fn`` in a new thread (autograd on, autocast off, no dispatch keys excluded) and return its result
    or re-raise its exception."""
    out: dict = {}

    def body():
        try:
            with torch.enable_grad(), torch.autocast(device.type, enabled=False):
                if device.type == "cuda":
                    with torch.cuda.device(device):
                        out["result"] = fn()
                else:
                    out["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            out["error"] = e

    thread = threading.Thread(target=body, name="fastsemdiff-fused-check", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["result"]


def passes(key: tuple, mode: str, device: torch.device, run: Callable[[], list[Mismatch]],
           what: Union[str, Callable[[], str]]) -> bool:
    """Whether the fused kernels may serve ``key``: runs the check ``run`` the first time (mode permitting)
    and remembers the verdict for the process. ``what`` describes the configuration for the message (or makes
    that description: it is only needed when a message is written)."""
    if mode == "off" or device.type not in CHECKED_DEVICE_TYPES:
        return True
    if _verdicts.get(key, _MISSING) is None:  # passed before: a lock-free read (only ever set under the lock)
        return True
    check_mode(mode)
    if callable(what):
        what = what()
    with _lock:
        if key not in _verdicts:
            try:
                mismatches = _in_fresh_thread(run, device)
                _verdicts[key] = None if not mismatches else "; ".join(map(str, mismatches))
            except Exception as e:  # a kernel that does not run fails its check
                _verdicts[key] = f"the fused call raised {type(e).__name__}: {e}"
            failed = _verdicts[key] is not None
        else:
            failed = None  # already reported
        message = _verdicts[key]
    if message is None:
        return True
    head = f"fastsemdiff: the fused {what} disagrees with the torch reference on its first-use check: {message}"
    if mode == "error":
        raise FusedCheckError(f"{head}. Fix or rebuild the kernels, or set model.fused_check=warn to fall back to "
                              "torch (off skips the check)")
    if failed:
        warnings.warn(f"{head}. It runs on torch for the rest of the process (model.fused_check=error stops "
                      "instead, off skips the check)", FusedKernelMismatch, stacklevel=3)
    return False
