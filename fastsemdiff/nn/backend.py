"""Backend selection for the fused layers.

Only the plain-PyTorch path exists in this version; ``auto`` resolves to it. Fused backends are added
here without changing any module's interface or state-dict keys.
"""
from __future__ import annotations

BACKENDS = ("auto", "torch")


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not available; choose one of {BACKENDS}")
    return backend


def resolve_backend(backend: str) -> str:
    """The concrete backend a call runs on."""
    check_backend(backend)
    return "torch"
