"""Inputs and the accuracy rule shared by the fused-kernel tests (Triton here; CUDA C++ later).

Accuracy rule (SPEC section 7): fp32 matches the fp64 reference within 1e-5 relative (to the element, or to
the tensor's largest element for reductions whose terms cancel); in bf16/fp16 the
kernel's max error against the fp64 reference is at most twice that of the plain-PyTorch reference run
in the same dtype, plus a small absolute floor.
"""
from __future__ import annotations

import torch
from torch.testing import assert_close

from helpers import gen

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = ["BC", "B1C", "BNC"]  # per-sample [B, C], per-sample [B, 1, C], per-token [B, N, C]
EPS = 1e-6


def randn(*shape, seed: int, scale: float = 1.0, offset: float = 0.0, dtype=torch.float32) -> torch.Tensor:
    """Fresh normal values (never zeros), repeatable by seed, on the test device."""
    t = torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale + offset
    return t.to(device=DEVICE, dtype=dtype)


def mod_shape(kind: str, B: int, N: int, C: int) -> tuple[int, ...]:
    return {"BC": (B, C), "B1C": (B, 1, C), "BNC": (B, N, C)}[kind]


def grads_of(fn, inputs: list, dy, cast=None):
    """fn(*inputs)'s output(s) and the gradients w.r.t. every tensor input, on fresh leaves (optionally
    cast). ``dy`` is one tensor or a tuple matching fn's outputs. Absent (None) inputs get None."""
    leaves = [None if t is None else (t if cast is None else t.to(cast)).detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    dys = dy if isinstance(dy, tuple) else (dy,)
    dys = [d if cast is None else d.to(cast) for d in dys]
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(outs, present, dys))
    return [o.detach() for o in outs], [None if t is None else next(grads) for t in leaves]


def assert_accurate(name: str, got, ref64, same=None, like=None):
    """``got`` (kernel) vs ``ref64`` (fp64 reference) by the accuracy rule. ``same`` is the reference run
    on the kernel's input dtypes: given, the low-precision rule applies (also to fp32 results computed from
    low-precision inputs); None means an all-fp32 case. ``like`` fixes the expected dtype and shape."""
    if ref64 is None:
        assert got is None, f"{name}: expected no gradient"
        return
    if like is not None:
        assert got.dtype == like.dtype and got.shape == like.shape, (
            f"{name}: got {got.dtype} {tuple(got.shape)}, expected {like.dtype} {tuple(like.shape)}")
    assert torch.isfinite(got).all(), f"{name}: non-finite values (an element left unwritten?)"
    if same is None:
        assert got.dtype == torch.float32, name
        # 1e-5 relative to each element, or to the tensor's scale for elements that are sums with cancellation
        scale = max(1.0, ref64.abs().max().item())
        assert_close(got, ref64.float(), rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{name}: {m}")
        return
    err = (got.double() - ref64).abs().max().item()
    ref_err = (same.double() - ref64).abs().max().item()
    floor = 1e-3 * torch.finfo(got.dtype).eps * (1 + ref64.abs().max().item())
    assert err <= 2 * ref_err + floor, f"{name} {got.dtype}: kernel error {err:.3g} vs reference {ref_err:.3g}"


def check_op(kernel_fn, ref_fn, inputs: list, dys, names: list[str]):
    """Forward outputs and every gradient of ``kernel_fn`` against ``ref_fn`` by the accuracy rule.

    ``names`` names the outputs then the inputs (for messages). Gradients must match their input's
    dtype and shape; outputs must be finite (launch buffers are NaN-poisoned by the tests)."""
    outs, grads = grads_of(kernel_fn, inputs, dys)
    outs64, grads64 = grads_of(ref_fn, inputs, dys, cast=torch.float64)
    same_outs, same_grads = [None] * len(outs), [None] * len(grads)
    low = any(t is not None and t.dtype != torch.float32 for t in inputs)
    if low:
        same_outs, same_grads = grads_of(ref_fn, inputs, dys)
    for i, (o, r, s) in enumerate(zip(outs, outs64, same_outs)):
        assert_accurate(names[i], o, r, s, like=inputs[0])
    for j, (g, r, s, inp) in enumerate(zip(grads, grads64, same_grads, inputs)):
        assert_accurate("d" + names[len(outs) + j], g, r, s, like=inp)
