"""Backend selection for the fused layers.

* ``torch``: the plain-PyTorch reference path (defines each layer's meaning).
* ``triton``: the fused Triton kernels (``fastsemdiff.ops``); on CPU tensors they run only under the
  Triton interpreter (``TRITON_INTERPRET=1`` set before the kernels are first imported).
* ``auto``: ``triton`` for CUDA tensors when Triton is installed, ``torch`` otherwise.

Layers without a fused kernel yet run their torch path whatever the backend. Fused backends are added
here without changing any module's interface or state-dict keys.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

import torch

BACKENDS = ("auto", "torch", "triton")

# Looked up once without importing Triton (importing it is slow and, on CPU, decides the interpreter mode).
TRITON_AVAILABLE: bool = importlib.util.find_spec("triton") is not None


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str, x: Optional[torch.Tensor] = None) -> str:
    """The concrete backend (``torch`` or ``triton``) a call on ``x`` runs on.

    ``auto`` picks ``triton`` when ``x`` is a CUDA tensor and Triton is installed; without ``x`` (device
    unknown) it picks ``torch``. ``triton`` without Triton installed raises a RuntimeError.
    """
    check_backend(backend)
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("backend='triton' needs the triton package (pip install 'fastsemdiff[triton]'); "
                               "use backend='torch' or 'auto'")
        return "triton"
    if backend == "auto" and TRITON_AVAILABLE and x is not None and x.is_cuda:
        return "triton"
    return "torch"
