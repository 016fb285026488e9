"""The Triton sinusoidal timestep embedding against the reference (and an fp64 evaluation of the formula)."""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from fastsemdiff.nn import TimestepEmbedder, timestep_embedding  # noqa: E402
from fastsemdiff.ops import timestep_embedding as fused_timestep_embedding  # noqa: E402

from helpers import gen  # noqa: E402
from kernel_helpers import DEVICE  # noqa: E402

pytestmark = pytest.mark.usefixtures("poison_kernel_outputs")


def times(B: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Scaled diffusion times in [0, 1000), as TimestepEmbedder passes them."""
    return (torch.rand(B, generator=gen(seed), dtype=torch.float64) * 1000).to(DEVICE, dtype)


def embedding64(t: torch.Tensor, dim: int, max_period: float) -> torch.Tensor:
    half = dim // 2
    j = torch.arange(half, dtype=torch.float64, device=t.device)
    arg = t.double()[:, None] * torch.exp(-math.log(max_period) * j / half)
    emb = torch.cat([torch.cos(arg), torch.sin(arg), torch.zeros(t.shape[0], dim % 2, dtype=torch.float64,
                                                                 device=t.device)], dim=-1)
    return emb


@pytest.mark.parametrize("max_period", [10000.0, 100.0])
@pytest.mark.parametrize("dim", [1, 7, 64, 256, 257, 1152])
@pytest.mark.parametrize("B", [1, 3, 256])
def test_matches_reference(B, dim, max_period):
    """fp32 arguments up to 1000 radians lose ~1e-4 in any fp32 evaluation, so the rule is the low-precision
    one: the kernel's error against fp64 is at most twice the fp32 reference's, plus a floor."""
    t = times(B, seed=B * dim)
    got = fused_timestep_embedding(t, dim, max_period)
    ref = timestep_embedding(t, dim, max_period)
    exact = embedding64(t, dim, max_period)
    assert got.dtype == torch.float32 and got.shape == (B, dim) and torch.isfinite(got).all()
    err, ref_err = (got.double() - exact).abs().max().item(), (ref.double() - exact).abs().max().item()
    assert err <= 2 * ref_err + 1e-6, f"kernel error {err:.3g} vs reference {ref_err:.3g}"
    if dim % 2:
        assert (got[:, -1] == 0).all()


def test_strided_and_half_precision_times():
    t = times(12, seed=5)
    for tt in (t[::3], t.half(), t.bfloat16()):
        torch.testing.assert_close(fused_timestep_embedding(tt, 96), timestep_embedding(tt, 96), rtol=0, atol=2e-4)


def test_gradient_wrt_t():
    t = times(4, seed=6, dtype=torch.float64).float().requires_grad_()
    dy = torch.randn(4, 33, generator=gen(7)).to(DEVICE)
    (g,) = torch.autograd.grad(fused_timestep_embedding(t, 33), t, dy)
    t2 = t.detach().requires_grad_()
    (g_ref,) = torch.autograd.grad(timestep_embedding(t2, 33), t2, dy)
    torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-3)


def test_timestep_embedder_backends_agree():
    m = {b: TimestepEmbedder(64, frequency_embedding_size=100, backend=b).to(DEVICE) for b in ("torch", "triton")}
    m["triton"].load_state_dict(m["torch"].state_dict())
    t = times(5, seed=8) / 1000
    torch.testing.assert_close(m["triton"](t), m["torch"](t), rtol=1e-4, atol=1e-5)


def test_opcheck():
    torch.library.opcheck(torch.ops.fastsemdiff.timestep_embedding.default, (times(3, seed=9), 16, 10000.0, "triton"))


def test_bad_input():
    with pytest.raises(ValueError, match=r"t must be \[B\]"):
        fused_timestep_embedding(times(6, seed=1).view(2, 3), 8)
