"""Backend selection for the fused layers.

* ``torch``: the plain-PyTorch reference path (defines each layer's meaning).
* ``triton``: the fused Triton kernels (``fastsemdiff.ops``); on CPU tensors they run only under the
  Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported).
* ``cuda``: the CUDA C++ kernels of ``csrc/`` (the ``fastsemdiff._C`` extension, built by setup.py where
  nvcc is present); widths or layouts they do not take (C not a multiple of 8, unaligned rows) run on Triton.
* ``auto``: per op, the backend the benchmarks measured fastest on the device class (``AUTO_MEASURED``);
  ``triton`` where nothing was measured; ``torch`` on CPU tensors or without Triton.

Layers without a fused kernel yet run their torch path whatever the backend. Fused backends are added
here without changing any module's interface or state-dict keys.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton", "cuda")

# What ``auto`` picks on CUDA tensors, per op, from a measured benchmark (bench/RESULTS.md, produced by
# ``pytest bench/ --benchmark-only -k adaln``): empty until a GPU measurement exists, so Triton serves.
AUTO_MEASURED: dict[str, str] = {}

# Looked up once without importing Triton (importing it is slow and, on CPU, decides the interpreter mode).
TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, x: Optional[torch.Tensor] = None, op: str = "") -> str:
    """The concrete backend (``torch``, ``triton`` or ``cuda``) a call of ``op`` on ``x`` runs on.

    ``auto`` picks, for a CUDA tensor, ``AUTO_MEASURED[op]`` or else ``triton`` (when Triton is installed);
    without ``x`` (device unknown) or on CPU it picks ``torch``. ``triton`` without Triton, or ``cuda``
    without the built extension, raises a RuntimeError that says why.
    """
    check_backend(backend)
    if backend == "cuda":
        from ..ops import _cuda

        if not _cuda.available():
            raise RuntimeError(f"backend='cuda': {_cuda.unavailable_reason()}; or use backend='triton' or 'auto'")
        return "cuda"
    if backend == "auto" and x is not None and x.is_cuda and AUTO_MEASURED.get(op) == "cuda":
        from ..ops import _cuda

        if _cuda.available():
            return "cuda"
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package (pip install 'fastsemdiff[triton]'); "
                               "use backend='torch' or 'auto'")
        return "triton"
    if backend == "auto" and TRITON_AVAILABLE and x is not None and x.is_cuda:
        return "triton"
    return "torch"
