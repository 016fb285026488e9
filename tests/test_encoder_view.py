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


# ------------------------------------------------------------------ SODA-style views: resized crop, erasing
from fastsemdiff.models.semantic import ERASE_VALUE, cropped_view, draw_crops, draw_erasures, erased_view  # noqa: E402


def test_a_full_crop_is_the_image_and_a_quarter_crop_reads_the_quarter():
    x = torch.randn(2, 3, 8, 8, generator=gen(10))
    whole = torch.tensor([[1.0, 1.0, 0.0, 0.0]] * 2)
    torch.testing.assert_close(cropped_view(x, whole), x, rtol=1e-5, atol=1e-5)
    # the top-left quarter (w = h = 0.5, centre at -0.5, -0.5) of a 16-wide ramp (pixel value = its column,
    # or its row): bilinear sampling of a linear function is exact, and output pixel j reads the input at
    # (2j - 1) / 4 (align_corners=False), pixel 0 at -1/4, clamped to the border's 0
    ramp = torch.arange(16.0).expand(16, 16)
    both = torch.stack([ramp, ramp.T])[None]  # channel 0: columns, channel 1: rows
    quarter = cropped_view(both, torch.tensor([[0.5, 0.5, -0.5, -0.5]]))
    want = ((2 * torch.arange(16.0) - 1) / 4).clamp_min(0)
    torch.testing.assert_close(quarter[0, 0], want.expand(16, 16), rtol=0, atol=1e-5)
    torch.testing.assert_close(quarter[0, 1], want[:, None].expand(16, 16), rtol=0, atol=1e-5)


def test_crop_draws_lie_inside_the_image_with_the_asked_area():
    c = draw_crops(20000, (0.35, 1.0), "cpu", gen(12))
    w, h, cx, cy = c.unbind(1)
    assert (w <= 1).all() and (h <= 1).all() and (cx.abs() <= 1 - w + 1e-6).all() and (cy.abs() <= 1 - h + 1e-6).all()
    area = w * h
    assert area.min() >= 0.35 * 0.99 and area.max() <= 1.0 + 1e-6
    assert area.mean().item() == pytest.approx(0.675, abs=0.03)  # clamping the sides shaves the top a little


def test_erasing_sets_the_drawn_box_and_only_where_drawn():
    x = torch.randn(3, 2, 10, 10, generator=gen(13))
    erase = torch.tensor([[1.0, 0.2, 0.3, 0.4, 0.5], [0.0, 0.2, 0.3, 0.4, 0.5], [1.0, 0.0, 0.0, 1.0, 1.0]])
    got = erased_view(x, erase)
    ref = x.clone()
    ref[0, :, 2:6, 3:8] = ERASE_VALUE  # rows with centres in [0.2, 0.6), columns in [0.3, 0.8)
    ref[2] = ERASE_VALUE
    torch.testing.assert_close(got, ref, rtol=0, atol=0)
    e = draw_erasures(20000, 0.25, "cpu", gen(14))
    assert e[:, 0].mean().item() == pytest.approx(0.25, abs=0.01)
    assert (e[:, 1] + e[:, 3] <= 1 + 1e-6).all() and (e[:, 2] + e[:, 4] <= 1 + 1e-6).all()


def test_the_loss_feeds_the_soda_view_to_the_encoder_and_x0_to_the_denoiser():
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, [*SMALL, "encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true",
                                                 "encoder.view_erase=0.5"]))
    x0 = torch.rand(6, 1, 28, 28, generator=gen(15)) * 2 - 1
    noise = model.draw_noise(x0, gen(16))
    assert noise.crop.shape == (6, 4) and noise.erase.shape == (6, 5) and noise.view.shape == (6, 3)
    seen = {}
    model.encoder.register_forward_pre_hook(lambda mod, args: seen.update(encoder=args[0].clone()) or None)
    model.denoiser.register_forward_pre_hook(lambda mod, args: seen.update(denoiser=args[0].clone()) or None)
    loss, _ = model.loss(x0, noise)
    want = erased_view(shifted_view(cropped_view(x0, noise.crop), noise.view, 0), noise.erase)
    torch.testing.assert_close(seen["encoder"], want, rtol=0, atol=0)
    torch.testing.assert_close(seen["denoiser"], model.schedule.add_noise(x0, noise.t, noise.eps))
    assert torch.isfinite(loss)
    assert torch.equal(noise.slice(2, 4).crop, noise.crop[2:4]) and torch.equal(noise.slice(2, 4).erase, noise.erase[2:4])
    plain = SemanticDiffusion(load_config(None, SMALL)).draw_noise(x0, gen(16))
    assert plain.crop is None and plain.erase is None


@pytest.mark.parametrize("override, fragment", [
    ("encoder.view_crop_scale=[0.5]", "view_crop_scale"), ("encoder.view_crop_scale=[0.9,0.5]", "view_crop_scale"),
    ("encoder.view_crop_scale=[0,1]", "view_crop_scale"), ("encoder.view_erase=1.5", "view_erase"),
    ("encoder.view_erase=-0.1", "view_erase"),
])
def test_bad_soda_views_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


# ------------------------------------------------------------------------------ the cross-view invariance term
INV = [*SMALL, "encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true", "encoder.invariance_weight=0.5"]


def test_the_invariance_term_is_the_predictor_against_the_second_view():
    """loss = mse + w * (1 - cos(predictor(z), sg(z_b))), z of the first view and z_b of an independent second
    draw of the same views; the gradient reaches the encoder through z only."""
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, INV))
    x0 = torch.rand(6, 1, 28, 28, generator=gen(21)) * 2 - 1
    noise = model.draw_noise(x0, gen(22))
    assert noise.crop_b.shape == (6, 4) and noise.view_b.shape == (6, 3) and noise.erase_b is None
    assert not torch.equal(noise.crop, noise.crop_b), "the second view repeated the first"
    loss, parts = model.loss(x0, noise)

    def code(view, crop):
        return model.encoder(model.encoder_input(x0, noise.t, noise.eps, view, crop), noise.t)[0]

    z, z_b = code(noise.view, noise.crop), code(noise.view_b, noise.crop_b).detach()
    want = (1 - torch.nn.functional.cosine_similarity(model.predictor(z), z_b, dim=-1)).mean()
    torch.testing.assert_close(parts["inv"], want.detach())
    torch.testing.assert_close(loss, parts["mse"] + 0.5 * want, rtol=1e-6, atol=1e-6)

    model.zero_grad()
    model.invariance(x0, noise.t, noise.eps, z, noise).backward(retain_graph=True)
    got = [p.grad.clone() for p in model.encoder.parameters() if p.grad is not None]
    model.zero_grad()
    want.backward()  # the same expression, its target detached by hand
    ref = [p.grad for p in model.encoder.parameters() if p.grad is not None]
    assert len(got) == len(ref) > 0 and any(g.abs().sum() > 0 for g in got)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_the_invariance_switch_off_draws_what_it_drew_before():
    x0 = torch.rand(5, 1, 28, 28, generator=gen(23)) * 2 - 1
    views = [*SMALL, "encoder.view_crop_scale=[0.35,1.0]", "encoder.view_flip=true"]
    off = SemanticDiffusion(load_config(None, views)).draw_noise(x0, gen(24))
    on = SemanticDiffusion(load_config(None, [*views, "encoder.invariance_weight=0.1"])).draw_noise(x0, gen(24))
    assert off.view_b is None and off.crop_b is None and not hasattr(SemanticDiffusion(load_config(None, views)),
                                                                     "predictor")
    for a, b in zip(off[:9], on[:9]):  # every draw of the first view is the same; the second comes after
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("override, fragment", [
    (["encoder.invariance_weight=0.1"], "no view is drawn"),
    (["encoder.invariance_weight=-1", "encoder.view_flip=true"], "invariance_weight=-1"),
    (["encoder.invariance_weight=0.1", "encoder.view_flip=true", "encoder.objective=supervised"], "supervised"),
])
def test_bad_invariance_settings_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, override)
