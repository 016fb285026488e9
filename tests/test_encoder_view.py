"""The encoder's own view of x0 (encoder.view_shift / encoder.view_flip): the transform against a per-sample
reference, the draws, that the loss feeds the view to E (and x0 to the denoiser's target), the config checks."""
from __future__ import annotations

import pytest
import torch

from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.models import SemanticDiffusion
from fastsemdiff.models.semantic import shifted_view

from helpers import gen

SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=7", "encoder.dim=16",
         "encoder.arch=cnn", "encoder.conv_channels=[8,16]", "encoder.conv_strides=[2,2]"]


def reference_view(x: torch.Tensor, dy: int, dx: int, flip: bool) -> torch.Tensor:
    """One image [C, H, W] moved by (dy, dx) with a -1 border, pixel by pixel, then flipped."""
    C, H, W = x.shape
    out = torch.full_like(x, -1.0)
    for i in range(H):
        for j in range(W):
            si, sj = i - dy, j - dx
            if 0 <= si < H and 0 <= sj < W:
                out[:, i, j] = x[:, si, sj]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("pad", [1, 3])
def test_shifted_view_matches_the_per_pixel_reference(pad):
    B, H, W = 7, 9, 11
    x = torch.randn(B, 2, H, W, generator=gen(1))
    g = gen(2)
    view = torch.cat([torch.randint(-pad, pad + 1, (B, 2), generator=g), torch.randint(0, 2, (B, 1), generator=g)], 1)
    view[0] = torch.tensor([pad, -pad, 1])  # the extremes, flipped
    got = shifted_view(x, view, pad)
    for b in range(B):
        dy, dx, flip = (int(v) for v in view[b])
        torch.testing.assert_close(got[b], reference_view(x[b], dy, dx, bool(flip)), rtol=0, atol=0)


def test_flip_alone_needs_no_padding():
    x = torch.randn(4, 1, 5, 5, generator=gen(3))
    view = torch.tensor([[0, 0, 1], [0, 0, 0], [0, 0, 1], [0, 0, 0]])
    got = shifted_view(x, view, 0)
    assert torch.equal(got[0], x[0].flip(-1)) and torch.equal(got[1], x[1])


def test_draws_only_when_a_view_is_asked_for():
    x0 = torch.rand(16, 1, 28, 28, generator=gen(4)) * 2 - 1
    off = SemanticDiffusion(load_config(None, SMALL))
    assert off.draw_noise(x0, gen(5)).view is None
    on = SemanticDiffusion(load_config(None, [*SMALL, "encoder.view_shift=2", "encoder.view_flip=true"]))
    view = on.draw_noise(x0, gen(5)).view
    assert view.shape == (16, 3) and view[:, :2].abs().max() <= 2 and set(view[:, 2].tolist()) <= {0, 1}
    assert len({tuple(v) for v in view.tolist()}) > 1, "every sample drew the same view"
    shift_only = SemanticDiffusion(load_config(None, [*SMALL, "encoder.view_shift=2"]))
    assert not shift_only.draw_noise(x0, gen(5)).view[:, 2].any(), "flipped without encoder.view_flip"


def test_the_loss_feeds_the_view_to_the_encoder_and_x0_to_the_denoiser():
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, [*SMALL, "encoder.view_shift=3", "encoder.view_flip=true",
                                                 "diffusion.prediction=x0"]))
    x0 = torch.rand(6, 1, 28, 28, generator=gen(6)) * 2 - 1
    noise = model.draw_noise(x0, gen(7))
    seen = {}
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.update(encoder=args[0].clone()) or None)
    model.denoiser.register_forward_pre_hook(lambda mod, args: seen.update(denoiser=args[0].clone()) or None)
    loss, _ = model.loss(x0, noise)
    torch.testing.assert_close(seen["encoder"], shifted_view(x0, noise.view, 3), rtol=0, atol=0)
    assert not torch.equal(seen["encoder"], x0)
    torch.testing.assert_close(seen["denoiser"], model.schedule.add_noise(x0, noise.t, noise.eps))
    assert torch.isfinite(loss)
    # a micro-batch is a slice of the step's draws, the view included
    assert torch.equal(noise.slice(2, 4).view, noise.view[2:4])


def test_embeddings_read_the_plain_image():
    """The view is a training-time draw: embed() sees x0 as it is."""
    model = SemanticDiffusion(load_config(None, [*SMALL, "encoder.view_shift=3", "encoder.view_flip=true"])).eval()
    images = torch.rand(3, 1, 28, 28, generator=gen(8))
    seen = []
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()) or None)
    model.embed(images, 0.5)
    torch.testing.assert_close(seen[0], images * 2 - 1)


@pytest.mark.parametrize("shift", [-1, 14])
def test_bad_view_shift_is_refused(shift):
    with pytest.raises(ConfigError, match="encoder.view_shift"):
        load_config(None, [*SMALL, f"encoder.view_shift={shift}"])
