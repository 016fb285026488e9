"""Whole DiT blocks and models on the Triton backend: equal to the torch backend, and torch.compile-able.

A DiTBlock on ``backend="triton"`` runs norm1 on the fused modulated norm and norm2 on the fused gated
residual + modulated norm, fed DiT's chunked adaLN views; ``torch.compile(fullgraph=True)`` must trace the
custom ops with no graph break and match eager.
"""
from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

pytest.importorskip("triton")

from fastsemdiff.config import load_config  # noqa: E402
from fastsemdiff.models import SemanticDiffusion  # noqa: E402
from fastsemdiff.nn import DiTBlock  # noqa: E402

from helpers import gen  # noqa: E402
from kernel_helpers import DEVICE, randn  # noqa: E402


def block_pair(C=64, heads=4, rms=False):
    blocks = {b: DiTBlock(C, heads, backend=b, rms_norm=rms).to(DEVICE) for b in ("torch", "triton")}
    with torch.no_grad():
        for i, p in enumerate(blocks["torch"].parameters()):
            p.copy_(torch.randn(p.shape, generator=gen(120 + i)).to(DEVICE) * 0.2)
    blocks["triton"].load_state_dict(blocks["torch"].state_dict())
    return blocks


def run(block, x, c, dy):
    xl = x.clone().requires_grad_()
    y = block(xl, c)
    return [y, *torch.autograd.grad(y, [xl, *block.parameters()], dy)]


def assert_all_close(got, want, tol=1e-5):
    """fp32 agreement to ``tol`` relative to each tensor's scale (rounding differs by summation order)."""
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
@pytest.mark.parametrize("B,N", [(1, 9), (3, 16)])
def test_dit_block_triton_equals_torch(B, N, rms):
    C = 64
    blocks = block_pair(C, rms=rms)
    x, c, dy = randn(B, N, C, seed=121), randn(B, C, seed=122), randn(B, N, C, seed=123)
    assert_all_close(run(blocks["triton"], x, c, dy), run(blocks["torch"], x, c, dy))


def test_torch_compile_fullgraph_block_matches_eager():
    """fullgraph=True fails on any graph break, so this also proves the custom ops trace cleanly."""
    C, B, N = 72, 2, 9
    blocks = block_pair(C, heads=4)
    torch._dynamo.reset()
    compiled = torch.compile(blocks["triton"], fullgraph=True, dynamic=False)
    x, c, dy = randn(B, N, C, seed=131), randn(B, C, seed=132), randn(B, N, C, seed=133)
    eager = run(blocks["triton"], x, c, dy)
    assert_all_close(run(compiled, x, c, dy), eager)
    assert_all_close(run(blocks["torch"], x, c, dy), eager)


def test_semantic_diffusion_loss_and_grads_triton_equals_torch():
    """The whole method (encoder + stacked-adaLN DiT, timestep kernel included) on both backends."""
    common = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "encoder.depth=2",
              "model.patch_size=7"]
    models = {}
    for b in ("torch", "triton"):
        torch.manual_seed(0)
        models[b] = SemanticDiffusion(load_config(None, [*common, f"model.backend={b}"])).to(DEVICE)
    with torch.no_grad():
        for name, p in models["torch"].named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                # drawn on the CPU generator, then moved: the same values on every device (a CPU generator
                # cannot fill a CUDA tensor in place)
                p.copy_(torch.randn(p.shape, generator=gen(len(name))).to(p.device) * 0.1)
    models["triton"].load_state_dict(models["torch"].state_dict())
    x0 = randn(4, 1, 28, 28, seed=140).clamp(-1, 1)
    res = {}
    for b, m in models.items():
        loss, _ = m(x0, generator=torch.Generator(DEVICE).manual_seed(5))
        res[b] = [loss, *torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad])]
    assert_all_close(res["triton"], res["torch"], tol=1e-4)
