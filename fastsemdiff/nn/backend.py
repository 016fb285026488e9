"""Backend selection for the fused layers.

* ``torch``: the plain-PyTorch reference path (defines each layer's meaning).
* ``triton``: the fused Triton kernels (``fastsemdiff.ops``); on CPU tensors they run only under the
  Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported).
* ``cuda``: the CUDA C++ kernels of ``csrc/`` (the ``fastsemdiff._C`` extension, built by setup.py where
  nvcc is present); inputs they do not take (C not a multiple of 8, unaligned rows, CPU tensors) run on
  Triton, or on torch where Triton is not installed.
* ``auto``: per op, the backend the benchmarks measured fastest on the device class (``AUTO_MEASURED``);
  ``triton`` where nothing was measured; ``torch`` on CPU tensors, without Triton, or for a dtype the
  kernels do not compute in (fp64: the kernels would silently compute it in fp32).

Every fused backend takes the torch path for such dtypes. :func:`choose_backend` is the decision as a pure
function of the facts (device type, dtype, width, alignment, what is installed), so it can be tested on
any machine; :func:`resolve_backend` gathers the facts from a tensor. The first use of a fused op on a GPU
is checked against the reference (``fused_check``, see ``fastsemdiff.ops.guard``).

Layers without a fused kernel yet run their torch path whatever the backend. Fused backends are added
here without changing any module's interface or state-dict keys.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")
FUSED_CHECKS = ("warn", "error", "off")

# What ``auto`` picks on CUDA tensors, per op, from a measured benchmark (bench/RESULTS.md, produced by
# ``pytest bench/ --benchmark-only -k adaln``): empty until a GPU measurement exists, so Triton serves.
AUTO_MEASURED: dict[str, str] = {}

# Looked up once without importing Triton (importing it is slow and, on CPU, decides the interpreter mode).
TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None

# The dtypes each op's kernels compute in (their statistics and sums are fp32); others take the torch path.
# The timestep embedding is fp32 whatever t's dtype, in the reference too, so any float t may use it.
LOW_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPES: dict[str, tuple[torch.dtype, ...]] = {
    "modulated_layer_norm": LOW_AND_FP32,
    "gated_residual_modulated_norm": LOW_AND_FP32,
    "timestep_embedding": (*LOW_AND_FP32, torch.float64),
}
CUDA_CHANNEL_MULTIPLE, CUDA_MAX_CHANNELS = 8, 8192  # the norm kernels of csrc/ (fastsemdiff.ops._cuda)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    return backend


def check_fused_check(mode: str) -> str:
    if mode not in FUSED_CHECKS:
        raise ValueError(f"fused_check={mode!r} is not valid; choose one of {FUSED_CHECKS}")
    return mode


def cuda_takes(op: str, device_type: str, dtype: torch.dtype, channels: Optional[int], aligned: bool) -> bool:
    """Whether the CUDA C++ kernels of ``op`` take such an input as it is."""
    if device_type != "cuda":
        return False
    if op == "timestep_embedding":
        return True
    if dtype not in LOW_AND_FP32 or not aligned:
        return False
    return channels is None or (channels > 0 and channels % CUDA_CHANNEL_MULTIPLE == 0
                                and channels <= CUDA_MAX_CHANNELS)


def choose_backend(requested: str, op: str, device_type: Optional[str], dtype: Optional[torch.dtype] = None,
                   channels: Optional[int] = None, aligned: bool = True, *, triton_available: bool,
                   cuda_available: bool, measured: Optional[dict[str, str]] = None,
                   cuda_reason: str = "fastsemdiff._C is not available") -> str:
    """The concrete backend (``torch``, ``triton`` or ``cuda``) for one call of ``op``: a pure function.

    ``device_type`` None means unknown (no tensor given). ``aligned``: whether the input's rows are 16-byte
    aligned (the CUDA kernels need it; unknown at trace time, so layers pass True and the CUDA launchers
    decide again on the real tensors). Raises RuntimeError for ``triton`` without Triton and ``cuda``
    without the extension, saying why.
    """
    check_backend(requested)
    if requested == "torch":
        return "torch"
    if requested == "triton" and not triton_available:
        raise RuntimeError("backend='triton' needs the triton package (pip install 'fastsemdiff[triton]'); "
                           "use backend='torch' or 'auto'")
    if requested == "cuda" and not cuda_available:
        raise RuntimeError(f"backend='cuda': {cuda_reason}; or use backend='triton' or 'auto'")
    if dtype is not None and dtype not in KERNEL_DTYPES.get(op, LOW_AND_FP32):
        return "torch"  # the kernels would compute it at a lower precision than asked for
    if requested == "auto":
        if device_type != "cuda":
            return "torch"
        if ((measured or {}).get(op) == "cuda" and cuda_available
                and cuda_takes(op, device_type, dtype, channels, aligned)):
            return "cuda"
        return "triton" if triton_available else "torch"
    if requested == "cuda" and device_type is not None and not cuda_takes(op, device_type, dtype, channels,
                                                                          aligned):
        return "triton" if triton_available else "torch"
    return requested


def resolve_backend(backend: str, x: Optional[torch.Tensor] = None, op: str = "") -> str:
    """The concrete backend (``torch``, ``triton`` or ``cuda``) a call of ``op`` on ``x`` runs on.

    ``auto`` picks, for a CUDA tensor of a dtype the kernels compute in, ``AUTO_MEASURED[op]`` or else
    ``triton`` (when Triton is installed); without ``x`` (device unknown) or on CPU it picks ``torch``.
    ``triton`` without Triton, or ``cuda`` without the built extension, raises a RuntimeError that says why.
    """
    check_backend(backend)
    cuda_available, reason = False, ""
    if backend == "cuda" or (backend == "auto" and "cuda" in AUTO_MEASURED.values()):
        from ..ops import _cuda

        cuda_available, reason = _cuda.available(), _cuda.unavailable_reason() or ""
    return choose_backend(
        backend, op, None if x is None else x.device.type, None if x is None else x.dtype,
        None if x is None or x.dim() == 0 or op == "timestep_embedding" else x.shape[-1],
        triton_available=TRITON_AVAILABLE, cuda_available=cuda_available, measured=AUTO_MEASURED,
        cuda_reason=reason)
