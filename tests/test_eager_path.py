"""The fused norms' two entry points: plain ``autograd.Function``s in eager mode (less host time per call), the
``torch.library`` custom ops under torch.compile, dispatch modes (FakeTensorMode) and tensor subclasses. Both
run the same launchers, so their outputs and gradients must be equal bit for bit; each must be taken where it
is meant to be."""
from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

pytest.importorskip("triton")

from fastsemdiff.ops import gated_residual_modulated_norm, modulated_layer_norm  # noqa: E402
from fastsemdiff.ops import modulated_norm as ops  # noqa: E402

from kernel_helpers import randn  # noqa: E402


def _inputs(residual: bool, affine: bool, per_token: bool, C: int = 72, B: int = 2, N: int = 3):
    mod = (B, N, C) if per_token else (B, C)
    x = randn(B, N, C, seed=1, scale=2.0, offset=0.7)
    h = [randn(B, N, C, seed=2)] if residual else []
    mods = [randn(*mod, seed=3 + k, scale=0.5) for k in range(3 if residual else 2)]
    affine_args = [randn(C, seed=7, scale=0.3, offset=1.0), randn(C, seed=8, scale=0.3)] if affine else []
    return [t.requires_grad_() for t in [x, *h, *mods, *affine_args]]


def _run(residual: bool, inputs):
    fn = gated_residual_modulated_norm if residual else modulated_layer_norm
    out = fn(*inputs, backend="triton")
    outs = out if isinstance(out, tuple) else (out,)
    dys = [randn(*o.shape, seed=20 + k) for k, o in enumerate(outs)]
    grads = torch.autograd.grad(outs, inputs, dys)
    return outs, grads


@pytest.mark.parametrize("residual", [False, True], ids=["mln", "grmln"])
@pytest.mark.parametrize("affine", [False, True], ids=["plain", "affine"])
@pytest.mark.parametrize("per_token", [False, True], ids=["per-sample", "per-token"])
def test_eager_function_equals_the_custom_op(residual, affine, per_token, monkeypatch):
    inputs = _inputs(residual, affine, per_token)
    outs, grads = _run(residual, inputs)
    want_node = "_GatedResidualNormFunctionBackward" if residual else "_ModulatedNormFunctionBackward"
    assert want_node in _graph_nodes(outs[-1]), _graph_nodes(outs[-1])

    monkeypatch.setattr(ops, "_plain", lambda *tensors: False)  # as under a dispatch mode: the custom op
    op_outs, op_grads = _run(residual, inputs)
    assert not any("FunctionBackward" in n for n in _graph_nodes(op_outs[-1])), _graph_nodes(op_outs[-1])
    for a, b in zip([*outs, *grads], [*op_outs, *op_grads]):
        assert torch.equal(a, b)


def _graph_nodes(t: torch.Tensor) -> list[str]:
    names, stack = [], [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None:
            names.append(type(node).__name__)
            stack.extend(n for n, _ in node.next_functions)
    return names


def test_fake_tensors_take_the_custom_op_and_launch_nothing(monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a launcher ran on fake tensors")

    monkeypatch.setattr(ops, "_mn_fwd", launched)
    monkeypatch.setattr(ops, "_gr_fwd", launched)
    with FakeTensorMode():
        x, h = torch.empty(2, 5, 72), torch.empty(2, 5, 72)
        shift, scale, gate = torch.empty(2, 72), torch.empty(2, 72), torch.empty(2, 72)
        assert modulated_layer_norm(x, shift, scale, backend="triton").shape == (2, 5, 72)
        x_out, y = gated_residual_modulated_norm(x, h, gate, shift, scale, backend="triton")
        assert x_out.shape == y.shape == (2, 5, 72)


def test_torch_compile_traces_the_custom_op_not_the_function(monkeypatch):
    def eager_function(*args):
        raise AssertionError("the eager Function ran under torch.compile")

    inputs = _inputs(False, True, False)
    want = ops.modulated_layer_norm_ref(*[t.detach() for t in inputs])
    monkeypatch.setattr(ops._ModulatedNormFunction, "apply", eager_function)
    torch._dynamo.reset()
    compiled = torch.compile(lambda *a: modulated_layer_norm(*a, backend="triton"), backend="eager", fullgraph=True)
    got = compiled(*[t.detach() for t in inputs])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # the op ran, and right


def test_plain_refuses_subclasses_and_dispatch_modes():
    x = torch.randn(2, 3)
    assert ops._plain(x, None, x)
    assert not ops._plain(x, torch.nn.Parameter(torch.randn(3)))  # a subclass: the custom op handles it
    with FakeTensorMode():
        assert not ops._plain(torch.empty(2, 3))
