"""fastsemdiff.flops: the architecture's FLOP count against a hand count and against torch's FlopCounterMode."""
from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fastsemdiff.config import load_config
from fastsemdiff.flops import (DiTShape, block_flops, dit_forward_flops, dit_train_flops, peak_tflops,
                               semantic_train_flops)
from fastsemdiff.models import DiT, SemanticDiffusion


def test_hand_count_small_dit():
    # D = 8, N = 4 tokens (4x4 image, patch 2), 2 channels in and out, one block, MLP 32 wide, z of 3.
    s = DiTShape(hidden=8, depth=1, heads=2, tokens=4, patch=2, in_channels=2, out_channels=2)
    qkv = 2 * 4 * 8 * 24          # [4, 8] @ [8, 24]            = 1536
    attn = 2 * (2 * 4 * 4 * 8)    # q k^T and p v, all heads    = 512
    proj = 2 * 4 * 8 * 8          #                             = 512
    mlp = 2 * (2 * 4 * 8 * 32)    # fc1 and fc2                 = 4096
    adaln = 2 * 8 * 48            # one row of c per sample     = 768
    assert block_flops(8, 4) == qkv + attn + proj + mlp + adaln == 7424
    patch = 2 * 4 * 8 * 8         # 4 tokens, [8 = 2*2*2] @ [8, 8]
    timestep = 2 * (256 * 8 + 8 * 8)
    z = 2 * 3 * 8
    final = 2 * 8 * 16 + 2 * 4 * 8 * 8
    assert dit_forward_flops(s, z_dim=3) == 7424 + patch + timestep + z + final == 12976
    assert dit_forward_flops(s, z_dim=3, cond_merge="concat") == 12976 + 2 * 16 * 8
    assert dit_train_flops(s, z_dim=3) == 3 * 12976


def test_xl2_matches_spec_anchor():
    """SPEC section 6: 50% MFU of DiT-XL/2 at 256 tokens on an H100 is about 690 images/s."""
    s = DiTShape(hidden=1152, depth=28, heads=16, tokens=256, patch=2, in_channels=4, out_channels=4)
    images_per_s = 0.5 * 989.4e12 / dit_train_flops(s)
    assert 680 < images_per_s < 700


def _counted(fn) -> int:
    """Matrix-product FLOPs torch counts for ``fn`` (SDPA through its math path, so its products count)."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("cond_merge", ["add", "concat"])
def test_dit_against_flop_counter(cond_merge):
    torch.manual_seed(0)
    D, depth, heads, img, p, C, B, zd = 64, 2, 4, 16, 2, 4, 3, 16
    model = DiT(img, p, C, D, depth, heads, z_dim=zd, cond_merge=cond_merge, backend="torch", adaln="per_block")
    x, t, z = torch.randn(B, C, img, img), torch.rand(B), torch.randn(B, zd)
    shape = DiTShape(D, depth, heads, (img // p) ** 2, p, C, C)
    ours = dit_forward_flops(shape, zd, cond_merge)
    assert _counted(lambda: model(x, t, z)) == B * ours  # forward: every product counted, exactly

    def step():
        model(x, t, z).float().pow(2).mean().backward()
    counted = _counted(step)
    # 3x the forward over-counts only the input gradients nobody needs (patch embed, timestep MLP's first layer)
    assert counted < B * dit_train_flops(shape, zd, cond_merge) < 1.03 * counted


def test_stacked_adaln_counts_the_same():
    torch.manual_seed(0)
    x, t, z = torch.randn(2, 4, 16, 16), torch.rand(2), torch.randn(2, 8)
    counts = [_counted(lambda: DiT(16, 2, 4, 32, 2, 2, z_dim=8, adaln=a, backend="torch")(x, t, z))
              for a in ("per_block", "stacked")]
    assert counts[0] == counts[1] == 2 * dit_forward_flops(DiTShape(32, 2, 2, 64, 2, 4, 4), 8)


def test_joint_step_against_flop_counter():
    """The method's step with consistency on: encoder + denoiser + the encoder again without gradient."""
    torch.manual_seed(0)
    cfg = load_config(None, ["model.backend=torch", "model.adaln=per_block", "model.patch_size=4",
                             "model.hidden_size=64", "model.depth=2", "encoder.dim=16", "diffusion.lambda_cons=0.1"])
    model = SemanticDiffusion(cfg)
    x0 = torch.rand(3, 1, 28, 28) * 2 - 1
    counted = _counted(lambda: model(x0, torch.Generator().manual_seed(0))[0].backward())
    ours = 3 * semantic_train_flops(cfg)
    assert counted < ours < 1.03 * counted
    no_cons = load_config(None, ["model.patch_size=4", "model.hidden_size=64", "model.depth=2", "encoder.dim=16",
                                 "diffusion.lambda_cons=0"])
    assert semantic_train_flops(no_cons) < semantic_train_flops(cfg)


@pytest.mark.parametrize("name,peak", [("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.5),
                                       ("NVIDIA H200", 989.4), ("NVIDIA A100-SXM4-80GB", 312.0),
                                       ("NVIDIA GeForce RTX 4090", None)])
def test_peak_table(name, peak):
    assert peak_tflops(name) == peak
