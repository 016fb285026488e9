"""The modulated norm and the gated residual + modulated norm as ``torch.library`` custom ops with autograd.

Ops (on 2-D rows; see ``kernels/modulated_layer_norm.py`` for the layout; ``R = M // tokens_per_mod_row``):

* ``fastsemdiff::modulated_norm_fwd(x[M, C], shift[R, C], scale[R, C], weight[C]?, bias[C]?, eps,
  tokens_per_mod_row, rms, backend, check) -> (y, mean[M] fp32, rstd[M] fp32)``
* ``fastsemdiff::gated_residual_modulated_norm_fwd(x, h, gate[R, C], shift, scale, weight?, bias?, eps,
  tokens_per_mod_row, rms, backend, check) -> (x_out, y, mean, rstd)``
* ``fastsemdiff::modulated_norm_bwd`` / ``gated_residual_modulated_norm_bwd``: their backwards.
  Gradients of absent inputs come back as empty ``[0]`` tensors (a custom op cannot return None).

``backend`` names the kernels asked for: ``"triton"`` (``fastsemdiff.kernels``) or ``"cuda"`` (the
``fastsemdiff._C`` extension); ``fastsemdiff.ops.dispatch`` decides, on the real tensors, what runs (inputs
the CUDA kernels do not take run on Triton, or on plain torch where Triton is not installed). ``check``
(``warn`` | ``error`` | ``off``) is the first-use check of those kernels against the reference
(``fastsemdiff.ops.guard``); a configuration that fails it under ``warn`` runs on torch
(``fastsemdiff.ops.torch_launchers``). The user-facing functions ``modulated_layer_norm`` and
``gated_residual_modulated_norm`` take ``x [B, N, C]`` with DiT's modulation shapes; the references that
define both ops (``modulated_layer_norm_ref``, ``gated_residual_modulated_norm_ref``) live beside it in
``fastsemdiff.ops.modulated_norm_reference`` and are importable from here too; the Triton kernels are imported
on the first call, so ``TRITON_INTERPRET`` may still be set after ``fastsemdiff`` has been imported.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _cuda, dispatch, guard, validation
from .guard import check_mode
from .modulated_norm_reference import (gated_residual_modulated_norm_ref, gated_residual_ref,  # noqa: F401
                                       modulate, modulated_layer_norm_ref)

CHECK_EPS = 1e-6


def _triton():
    from fastsemdiff.kernels import modulated_layer_norm as kernels  # decides interpreter-or-GPU on first import

    return kernels


class _CudaLaunchers:
    """The CUDA extension's norm ops behind the Triton launchers' signatures (for the inputs
    ``fastsemdiff.ops.dispatch`` sends them)."""

    @staticmethod
    def modulated_norm_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, h=None, gate=None):
        from . import _cuda

        if h is None:
            return (None, *_cuda.load().mln_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms))
        return tuple(_cuda.load().grmln_fwd(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms))

    @staticmethod
    def modulated_norm_bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, dx_out=None, h=None,
                           gate=None):
        from . import _cuda

        C = _cuda.load()
        if h is None:
            dx, dshift, dscale, dw, db = C.mln_bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms)
            dh = dgate = None
        else:
            dx, dh, dgate, dshift, dscale, dw, db = C.grmln_bwd(dx_out, dy, x, h, gate, mean, rstd, scale, weight,
                                                                bias, tokens_per_mod_row, rms)
        return (dx, dh, dgate, dshift, dscale, dw if weight is not None else None,
                db if bias is not None else None)


def _module(backend: str):
    if backend == "triton":
        return _triton().Prevalidated  # every op below validates its operands before it gets here
    if backend == "cuda":
        return _CudaLaunchers
    from . import torch_launchers

    return torch_launchers


# Decided once per configuration: the launchers a call runs, by everything the decision reads from the call
# (op, backend asked for, check mode, device, dtypes, width, norm kind, modulation layout, and for ``cuda``
# whether the rows are 16-byte aligned, which is read per call). An entry holds while the facts outside the
# call that the decision also read are unchanged (``_facts``); it replaces, per call, the dispatch rules, the
# first-use guard's lookup and the building of its key.
_PLANS: dict[tuple, tuple[tuple, object]] = {}


def _facts() -> tuple:
    """What a cached decision rests on besides the call: Triton's presence, the checked device types, the
    guard's verdicts (``guard.reset`` forgets them) and the CUDA extension's state."""
    return (dispatch.TRITON_AVAILABLE, guard.CHECKED_DEVICE_TYPES, guard.generation(), _cuda._loaded,
            _cuda._ops is None)


def _launchers(backend: str, check: str, x: Tensor, rows: tuple, scale: Tensor, weight: Optional[Tensor],
               bias: Optional[Tensor], tokens_per_mod_row: int, rms: bool, residual: bool):
    """The launchers that run this call: those of the kernels ``fastsemdiff.ops.dispatch`` picks for these
    tensors (``rows``: every other [rows, C] operand), or plain torch where it picks torch or the kernels
    failed their first-use check. Decided once per configuration (``_PLANS``)."""
    op = "gated_residual_modulated_norm" if residual else "modulated_layer_norm"
    aligned = dispatch.aligned_rows(x, *rows) if backend == "cuda" and x.device.type == "cuda" else None
    plan_key = (op, backend, check, x.device, x.dtype, scale.dtype, None if weight is None else weight.dtype,
                None if bias is None else bias.dtype, x.shape[-1], rms, tokens_per_mod_row == 1, aligned)
    facts = _facts()
    cached = _PLANS.get(plan_key)
    if cached is not None and cached[0] == facts:
        return cached[1]
    launchers = _decide(backend, check, op, x, rows, scale, weight, bias, tokens_per_mod_row, rms)
    _PLANS[plan_key] = (facts, launchers)
    return launchers


def _decide(backend: str, check: str, op: str, x: Tensor, rows: tuple, scale: Tensor, weight: Optional[Tensor],
            bias: Optional[Tensor], tokens_per_mod_row: int, rms: bool):
    """The launchers for this call by the dispatch rules and the first-use check (raises where they do)."""
    backend = dispatch.launch_backend(backend, op, x, rows)
    if backend == "torch":
        return _module("torch")
    key = (op, backend, str(x.device), x.dtype, scale.dtype, None if weight is None else weight.dtype,
           None if bias is None else bias.dtype, x.shape[-1], rms, tokens_per_mod_row == 1)
    what = lambda: (f"{key[0]} ({backend}, {str(x.dtype).replace('torch.', '')}, C={x.shape[-1]}, "  # noqa: E731
                    f"{'RMSNorm' if rms else 'LayerNorm'}, per-{'token' if key[-2] else 'sample'} modulation"
                    f"{', affine' if weight is not None else ''})")
    if guard.passes(key, check, x.device, lambda: _norm_check(_module(backend), key), what):
        return _module(backend)
    return _module("torch")


def _norm_check(launchers, key) -> list:
    """One small forward and backward of ``launchers`` against the reference (see ``fastsemdiff.ops.guard``)."""
    from .guard import compare_all

    op, _, device, x_dtype, mod_dtype, w_dtype, b_dtype, C, rms, per_token = key
    eps = CHECK_EPS
    residual = op == "gated_residual_modulated_norm"
    t, R = (1, 6) if per_token else (3, 2)
    M = R * t
    g = torch.Generator().manual_seed(20261201)

    def rnd(*shape, dtype, scale=1.0, offset=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + offset).to(device, dtype)

    x = rnd(M, C, dtype=x_dtype, scale=2.0, offset=0.7)
    h = rnd(M, C, dtype=x_dtype) if residual else None
    gate = rnd(R, C, dtype=mod_dtype, scale=0.5) if residual else None
    shift, scale = rnd(R, C, dtype=mod_dtype, scale=0.5), rnd(R, C, dtype=mod_dtype, scale=0.5)
    weight = None if w_dtype is None else rnd(C, dtype=w_dtype, scale=0.3, offset=1.0)
    bias = None if b_dtype is None else rnd(C, dtype=b_dtype, scale=0.3)
    dy = rnd(M, C, dtype=x_dtype)
    dx_out = rnd(M, C, dtype=x_dtype) if residual else None

    x_out, y, mean, rstd = launchers.modulated_norm_fwd(x, shift, scale, weight, bias, eps, t, rms, h, gate)
    dx, dh, dgate, dshift, dscale, dw, db = launchers.modulated_norm_bwd(
        dy, x_out if residual else x, mean, rstd, scale, weight, bias, t, rms, dx_out, h, gate)
    got = ([x_out] if residual else []) + [y, dx, dh, dgate, dshift, dscale, dw, db]

    def reference(cast):
        leaves = [None if v is None else (v if cast is None else v.to(cast)).detach().requires_grad_()
                  for v in (x, h, gate, shift, scale, weight, bias)]
        lx, lh, lgate, lshift, lscale, lw, lb = leaves
        groups = lambda v: v.view(R, t, C)  # noqa: E731
        if residual:
            # the exact run normalises x_out as the kernels store it (in x's dtype): see the reference
            outs = gated_residual_modulated_norm_ref(groups(lx), groups(lh), lgate, lshift, lscale, lw, lb, eps, rms,
                                                     x_dtype if cast is not None else None)
            douts = (dx_out, dy)
        else:
            outs, douts = (modulated_layer_norm_ref(groups(lx), lshift, lscale, lw, lb, eps, rms),), (dy,)
        douts = [groups(d if cast is None else d.to(cast)) for d in douts]
        present = [v for v in leaves if v is not None]
        grads = iter(torch.autograd.grad(outs, present, douts))
        grads = [None if v is None else next(grads) for v in leaves]
        return [o.detach().reshape(M, C) for o in outs] + grads

    names = (["x_out"] if residual else []) + ["y", "dx", "dh", "dgate", "dshift", "dscale", "dweight", "dbias"]
    return compare_all(names, got, reference(torch.float64), reference(None))


def _or_empty(t: Optional[Tensor], like: Tensor) -> Tensor:
    return t if t is not None else like.new_empty(0)


def _none_if_absent(grad: Tensor, given: Optional[Tensor]) -> Optional[Tensor]:
    return grad if given is not None else None


# ------------------------------------------------------------------------------- modulated norm
@torch.library.custom_op("fastsemdiff::modulated_norm_fwd", mutates_args=())
def modulated_norm_fwd(x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                       eps: float, tokens_per_mod_row: int, rms: bool, backend: str, check: str = "warn"
                       ) -> tuple[Tensor, Tensor, Tensor]:
    return _mn_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check)


def _mn_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check):
    """The modulated norm's forward (the custom op's body, and the eager Function's)."""
    validation.norm_fwd("fastsemdiff::modulated_norm_fwd", x, shift, scale, weight, bias, eps, tokens_per_mod_row)
    launchers = _launchers(backend, check, x, (shift, scale), scale, weight, bias, tokens_per_mod_row, rms, False)
    _, y, mean, rstd = launchers.modulated_norm_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms)
    return y, mean, rstd


@modulated_norm_fwd.register_fake
def _(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check="warn"):
    M, C = x.shape
    torch._check(scale.shape == shift.shape and scale.shape[-1] == C, lambda: "shift/scale must be [R, C]")
    return x.new_empty(M, C), x.new_empty(M, dtype=torch.float32), x.new_empty(M, dtype=torch.float32)


@torch.library.custom_op("fastsemdiff::modulated_norm_bwd", mutates_args=())
def modulated_norm_bwd(dy: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, scale: Tensor, weight: Optional[Tensor],
                       bias: Optional[Tensor], tokens_per_mod_row: int, rms: bool, backend: str, check: str = "warn"
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dshift, dscale, dw, db = _mn_bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, backend,
                                         check)
    return dx, dshift, dscale, _or_empty(dw, x), _or_empty(db, x)


def _mn_bwd(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, backend, check):
    """The modulated norm's backward; None for the gradient of an absent weight or bias."""
    validation.norm_bwd("fastsemdiff::modulated_norm_bwd", dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row)
    launchers = _launchers(backend, check, x, (dy, scale), scale, weight, bias, tokens_per_mod_row, rms, False)
    dx, _, _, dshift, dscale, dw, db = launchers.modulated_norm_bwd(
        dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms)
    return dx, dshift, dscale, _none_if_absent(dw, weight), _none_if_absent(db, bias)


@modulated_norm_bwd.register_fake
def _(dy, x, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, backend, check="warn"):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), scale.new_empty(scale.shape),
            scale.new_empty(scale.shape), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(0))


def _mn_setup(ctx, inputs, output):
    x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, weight, bias, mean, rstd)
    ctx.args = (tokens_per_mod_row, rms, backend, check)
    ctx.mark_non_differentiable(mean, rstd)


def _mn_backward(ctx, dy, _dmean, _drstd):
    x, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale, dw, db = modulated_norm_bwd(dy.contiguous(), x, mean, rstd, scale, weight, bias, *ctx.args)
    return dx, dshift, dscale, _none_if_absent(dw, weight), _none_if_absent(db, bias), None, None, None, None, None


modulated_norm_fwd.register_autograd(_mn_backward, setup_context=_mn_setup)


# ------------------------------------------------------------------------ gated residual + norm
@torch.library.custom_op("fastsemdiff::gated_residual_modulated_norm_fwd", mutates_args=())
def gated_residual_modulated_norm_fwd(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                      weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
                                      tokens_per_mod_row: int, rms: bool, backend: str, check: str = "warn"
                                      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _gr_fwd(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check)


def _gr_fwd(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check):
    """The gated residual + modulated norm's forward (the custom op's body, and the eager Function's)."""
    validation.norm_fwd("fastsemdiff::gated_residual_modulated_norm_fwd", x, shift, scale, weight, bias, eps,
                        tokens_per_mod_row, h, gate)
    launchers = _launchers(backend, check, x, (h, gate, shift, scale), scale, weight, bias, tokens_per_mod_row, rms,
                           True)
    return launchers.modulated_norm_fwd(x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, h, gate)


@gated_residual_modulated_norm_fwd.register_fake
def _(x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check="warn"):
    M, C = x.shape
    torch._check(h.shape == x.shape, lambda: "h must be shaped like x")
    torch._check(gate.shape == scale.shape and shift.shape == scale.shape, lambda: "gate/shift/scale must be [R, C]")
    f32 = torch.float32
    return x.new_empty(M, C), x.new_empty(M, C), x.new_empty(M, dtype=f32), x.new_empty(M, dtype=f32)


@torch.library.custom_op("fastsemdiff::gated_residual_modulated_norm_bwd", mutates_args=())
def gated_residual_modulated_norm_bwd(dx_out: Tensor, dy: Tensor, x_out: Tensor, h: Tensor, gate: Tensor,
                                      mean: Tensor, rstd: Tensor, scale: Tensor, weight: Optional[Tensor],
                                      bias: Optional[Tensor], tokens_per_mod_row: int, rms: bool, backend: str,
                                      check: str = "warn"
                                      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    dx, dh, dgate, dshift, dscale, dw, db = _gr_bwd(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias,
                                                    tokens_per_mod_row, rms, backend, check)
    return dx, dh, dgate, dshift, dscale, _or_empty(dw, x_out), _or_empty(db, x_out)


def _gr_bwd(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, backend, check):
    """The gated residual + modulated norm's backward; None for the gradient of an absent weight or bias."""
    validation.norm_bwd("fastsemdiff::gated_residual_modulated_norm_bwd", dy, x_out, mean, rstd, scale, weight, bias,
                        tokens_per_mod_row, dx_out, h, gate)
    launchers = _launchers(backend, check, x_out, (dx_out, dy, h, gate, scale), scale, weight, bias,
                           tokens_per_mod_row, rms, True)
    dx, dh, dgate, dshift, dscale, dw, db = launchers.modulated_norm_bwd(
        dy, x_out, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, dx_out, h, gate)
    return dx, dh, dgate, dshift, dscale, _none_if_absent(dw, weight), _none_if_absent(db, bias)


@gated_residual_modulated_norm_bwd.register_fake
def _(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias, tokens_per_mod_row, rms, backend, check="warn"):
    mod = scale.new_empty(scale.shape)
    return (x_out.new_empty(x_out.shape), x_out.new_empty(x_out.shape), mod, mod.clone(), mod.clone(),
            weight.new_empty(weight.shape) if weight is not None else x_out.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else x_out.new_empty(0))


def _gr_setup(ctx, inputs, output):
    x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check = inputs
    x_out, _, mean, rstd = output
    ctx.save_for_backward(x_out, h, gate, scale, weight, bias, mean, rstd)
    ctx.args = (tokens_per_mod_row, rms, backend, check)
    ctx.mark_non_differentiable(mean, rstd)


def _gr_backward(ctx, dx_out, dy, _dmean, _drstd):
    x_out, h, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
    dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.contiguous()
    dy = torch.zeros_like(x_out) if dy is None else dy.contiguous()
    dx, dh, dgate, dshift, dscale, dw, db = gated_residual_modulated_norm_bwd(
        dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias, *ctx.args)
    return (dx, dh, dgate, dshift, dscale, _none_if_absent(dw, weight), _none_if_absent(db, bias),
            None, None, None, None, None)


gated_residual_modulated_norm_fwd.register_autograd(_gr_backward, setup_context=_gr_setup)


# ------------------------------------------------------------------------ the eager path
# Outside torch.compile the same forward and backward run through plain ``autograd.Function``s: the custom op's
# dispatch, its default filling and the autograd wrapper around it cost more host time per call than the
# launcher itself (bench/test_bench_call_overhead.py, the ``floor`` rows against ``floor_function``), and in
# eager mode nothing needs the op's schema. Under torch.compile (and any dispatch mode, e.g. FakeTensorMode, or a
# tensor subclass such as DTensor) the custom ops run, with their fake implementations.
def _plain(*tensors: Optional[Tensor]) -> bool:
    """Whether a call may take the eager Functions: not traced, no dispatch mode or functorch transform active,
    plain tensors only. (The Functions take ``ctx`` in ``forward``: the ``setup_context`` form that functorch
    needs makes ``apply`` bind its arguments through ``inspect.signature``, ~25 us a call.)"""
    if torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active():
        return False
    for t in tensors:
        if t is not None and type(t) is not Tensor:
            return False
    return True


class _ModulatedNormFunction(torch.autograd.Function):
    """``modulated_norm_fwd`` with its backward, as a plain Function (the eager path)."""

    @staticmethod
    def forward(ctx, x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check):
        inputs = (x, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check)
        output = _mn_fwd(*inputs)
        _mn_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dy, _dmean, _drstd):
        x, scale, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale, dw, db = _mn_bwd(dy.contiguous(), x, mean, rstd, scale, weight, bias, *ctx.args)
        return dx, dshift, dscale, dw, db, None, None, None, None, None


class _GatedResidualNormFunction(torch.autograd.Function):
    """``gated_residual_modulated_norm_fwd`` with its backward, as a plain Function (the eager path)."""

    @staticmethod
    def forward(ctx, x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check):
        inputs = (x, h, gate, shift, scale, weight, bias, eps, tokens_per_mod_row, rms, backend, check)
        output = _gr_fwd(*inputs)
        _gr_setup(ctx, inputs, output)
        return output

    @staticmethod
    def backward(ctx, dx_out, dy, _dmean, _drstd):
        x_out, h, gate, scale, weight, bias, mean, rstd = ctx.saved_tensors
        dx_out = torch.zeros_like(x_out) if dx_out is None else dx_out.contiguous()
        dy = torch.zeros_like(x_out) if dy is None else dy.contiguous()
        dx, dh, dgate, dshift, dscale, dw, db = _gr_bwd(dx_out, dy, x_out, h, gate, mean, rstd, scale, weight, bias,
                                                        *ctx.args)
        return dx, dh, dgate, dshift, dscale, dw, db, None, None, None, None, None


# ------------------------------------------------------------------------ user-facing functions
def _mod_rows(mods: dict[str, Tensor], B: int, N: int, C: int, x_shape) -> tuple[list[Tensor], int]:
    """DiT's modulation shapes -> ``[R, C]`` rows sharing one row stride, and tokens_per_mod_row.

    Each of ``[B, C]``, ``[B, 1, C]`` (per-sample) or ``[B, N, C]`` (per-token); a batch of 1 broadcasts.
    If any is per-token, all are expanded to per-token. Chunked views of one adaLN output stay views.
    """
    fast = _per_sample_rows(list(mods.values()), B, C)
    if fast is not None:
        return fast, N
    mods = {k: (m.unsqueeze(1) if m.dim() == 2 else m) for k, m in mods.items()}
    for name, m in mods.items():
        if m.dim() != 3 or m.shape[-1] != C or m.shape[0] not in (1, B) or m.shape[1] not in (1, N):
            raise ValueError(f"{name} must be [B, C], [B, 1, C] or [B, N, C] for x {tuple(x_shape)}; "
                             f"got {tuple(m.shape)}")
    per_token = N > 1 and any(m.shape[1] == N for m in mods.values())
    dtype = mods["scale"].dtype
    for m in mods.values():
        dtype = torch.promote_types(dtype, m.dtype)
    shape = (B, N if per_token else 1, C)
    rows = [m.to(dtype).expand(shape).reshape(-1, C) for m in mods.values()]
    rows = [r if r.stride(-1) == 1 else r.contiguous() for r in rows]
    if len({r.stride(0) for r in rows}) > 1 and rows[0].shape[0] > 1:
        rows = [r.contiguous() for r in rows]
    return rows, 1 if per_token else N


def _per_sample_rows(mods: list[Tensor], B: int, C: int) -> Optional[list[Tensor]]:
    """DiT's own case, taken as it is: every modulation ``[B, C]`` of one dtype with unit column stride and one
    row stride (the chunks of one adaLN output); None for anything else (``_mod_rows`` handles it)."""
    first = mods[0]
    for m in mods:
        if m.dim() != 2 or m.shape[0] != B or m.shape[1] != C or m.dtype != first.dtype or m.stride(-1) != 1 \
                or m.stride(0) != first.stride(0):
            return None
    return mods


def _affine(weight: Optional[Tensor], bias: Optional[Tensor]):
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        dtype = torch.promote_types(weight.dtype, bias.dtype)
        weight, bias = weight.to(dtype), bias.to(dtype)
    return (None if weight is None else weight.contiguous()), (None if bias is None else bias.contiguous())


def _tokens(x: Tensor, name: str = "x") -> Tensor:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [B, N, C], got {tuple(x.shape)}")
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def modulated_layer_norm(x: Tensor, shift: Tensor, scale: Tensor, weight: Optional[Tensor] = None,
                         bias: Optional[Tensor] = None, eps: float = 1e-6, rms: bool = False,
                         backend: str = "triton", check: str = "warn") -> Tensor:
    """``norm(x) [* weight + bias] * (1 + scale) + shift`` on the fused kernels (LayerNorm, or RMSNorm).

    ``x`` is ``[B, N, C]`` (any strides); ``shift``/``scale`` ``[B, C]``, ``[B, 1, C]`` or ``[B, N, C]``.
    Statistics are fp32; the result has x's dtype and shape. Differentiable in every tensor input.
    ``check``: the first-use check of the kernels on a GPU, ``warn`` | ``error`` | ``off`` (``fastsemdiff.ops.guard``).
    """
    check_mode(check)
    x2d = _tokens(x)
    B, N, C = x.shape
    (shift, scale), t = _mod_rows({"shift": shift, "scale": scale}, B, N, C, x.shape)
    weight, bias = _affine(weight, bias)
    args = (x2d, shift, scale, weight, bias, float(eps), t, rms, backend, check)
    if torch.compiler.is_compiling() or not _plain(x2d, shift, scale, weight, bias):
        y, _, _ = modulated_norm_fwd(*args)
    else:
        y, _, _ = _ModulatedNormFunction.apply(*args)
    return y.view(B, N, C)


def gated_residual_modulated_norm(x: Tensor, h: Tensor, gate: Tensor, shift: Tensor, scale: Tensor,
                                  weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                                  eps: float = 1e-6, rms: bool = False, backend: str = "triton",
                                  check: str = "warn") -> tuple[Tensor, Tensor]:
    """``(x + gate * h, norm(x + gate * h) [* weight + bias] * (1 + scale) + shift)`` in one pass."""
    check_mode(check)
    x2d, h2d = _tokens(x), _tokens(h, "h")
    B, N, C = x.shape
    if h.shape != x.shape:
        raise ValueError(f"h must be shaped like x {tuple(x.shape)}, got {tuple(h.shape)}")
    (gate, shift, scale), t = _mod_rows({"gate": gate, "shift": shift, "scale": scale}, B, N, C, x.shape)
    weight, bias = _affine(weight, bias)
    args = (x2d, h2d.to(x.dtype), gate, shift, scale, weight, bias, float(eps), t, rms, backend, check)
    if torch.compiler.is_compiling() or not _plain(x2d, h2d, gate, shift, scale, weight, bias):
        x_out, y, _, _ = gated_residual_modulated_norm_fwd(*args)
    else:
        x_out, y, _, _ = _GatedResidualNormFunction.apply(*args)
    return x_out.view(B, N, C), y.view(B, N, C)
