"""model.token_mask: hidden denoiser input tokens, scored on x0, so that z is needed at every t."""
from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.diffusion import target
from fastsemdiff.models import SemanticDiffusion
from fastsemdiff.models.dit import unpatchify
from fastsemdiff.models.semantic import draw_token_mask, mask_to_pixels

from helpers import gen

SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "encoder.arch=cnn",
         "encoder.conv_channels=[8,16]", "encoder.conv_strides=[2,2]"]


def masked_model(*overrides: str) -> SemanticDiffusion:
    """A small model whose zero-initialised outputs are woken, so that every input can move the output."""
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, [*SMALL, *overrides]))
    g = gen(3)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


@pytest.mark.parametrize("patch, grid, channels", [(7, 4, 1), (3, 3, 3), (2, 5, 2)])
def test_pixel_mask_follows_the_denoisers_token_order(patch, grid, channels):
    mask = torch.rand(4, grid * grid, generator=gen(1)) < 0.4
    tokens = mask[..., None].float().expand(4, grid * grid, patch * patch * channels)
    by_unpatchify = unpatchify(tokens, patch, channels).bool()
    pixels = mask_to_pixels(mask, patch)
    assert pixels.shape == (4, 1, grid * patch, grid * patch)
    assert torch.equal(pixels.expand_as(by_unpatchify), by_unpatchify)


def test_draw_hides_exactly_the_asked_tokens_at_random_positions():
    mask = draw_token_mask(256, 16, 5, "cpu", gen(2))
    assert mask.dtype == torch.bool and mask.shape == (256, 16)
    assert (mask.sum(1) == 5).all()
    share = mask.float().mean(0)  # each position hidden about 5/16 of the time
    assert (share - 5 / 16).abs().max() < 0.12, share
    assert len({tuple(row.tolist()) for row in mask}) > 200  # rows differ


def test_hidden_tokens_input_does_not_reach_the_output():
    model = masked_model("model.token_mask=0.5").eval()
    x = torch.randn(3, 1, 28, 28, generator=gen(4))
    t, z = torch.rand(3, generator=gen(5)), torch.randn(3, 16, generator=gen(6))
    mask = draw_token_mask(3, 16, 8, "cpu", gen(7))
    hidden = mask_to_pixels(mask, 7)
    out = model.denoiser(x, t, z, mask=mask)
    changed_hidden = torch.where(hidden, torch.randn(x.shape, generator=gen(8)), x)
    assert_close(model.denoiser(changed_hidden, t, z, mask=mask), out, rtol=1e-5, atol=1e-6)
    changed_visible = torch.where(hidden, x, torch.randn(x.shape, generator=gen(9)))
    assert not torch.allclose(model.denoiser(changed_visible, t, z, mask=mask), out, atol=1e-3)
    assert not torch.allclose(model.denoiser(x, t, z), out, atol=1e-3)  # no mask: every token read


@pytest.mark.parametrize("weight", [1.0, 2.5])
def test_loss_scores_visible_tokens_on_the_target_and_hidden_ones_on_x0(weight):
    model = masked_model("model.token_mask=0.25", f"model.mask_loss_weight={weight}")
    x0 = torch.rand(6, 1, 28, 28, generator=gen(10)) * 2 - 1
    n = model.draw_noise(x0, gen(11))
    assert n.mask is not None and (n.mask.sum(1) == 4).all()
    loss, parts = model.loss(x0, n)

    sch = model.schedule
    with torch.no_grad():
        z, _ = model.encoder(x0, n.t)
        out = model.denoiser(sch.add_noise(x0, n.t, n.eps), n.t, z, n.drop, mask=n.mask)
    hidden = mask_to_pixels(n.mask, 7).expand_as(out)
    eps_err = (out - target("eps", sch, n.t, x0, n.eps)).pow(2)
    x0_err = (out - x0).pow(2)
    assert_close(parts["mse"], eps_err[~hidden].mean())
    assert_close(parts["mask_x0"], x0_err[hidden].mean())
    by_hand = (eps_err[~hidden].sum() + weight * x0_err[hidden].sum()) / out.numel()
    assert_close(loss.detach(), by_hand)
    loss.backward()
    assert model.denoiser.mask_token.grad.abs().sum() > 0


def test_switch_off_draws_what_it_drew_before():
    x0 = torch.rand(5, 1, 28, 28, generator=gen(12)) * 2 - 1
    plain = SemanticDiffusion(load_config(None, SMALL))
    masked = SemanticDiffusion(load_config(None, [*SMALL, "model.token_mask=0.5"]))
    assert not hasattr(plain.denoiser, "mask_token")
    a, b = plain.draw_noise(x0, gen(13)), masked.draw_noise(x0, gen(13))
    assert a.mask is None and b.mask is not None
    for name in ("t", "eps", "drop"):  # the mask is drawn after everything else
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_a_masked_model_trains():
    model = masked_model("model.token_mask=0.5")
    x0 = torch.rand(8, 1, 28, 28, generator=gen(14)) * 2 - 1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for i in range(15):
        loss, parts = model(x0, gen(200 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        assert math.isfinite(parts["mask_x0"].item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses


@pytest.mark.parametrize("override, fragment", [
    (["model.token_mask=1"], "up to, not including, 1"),
    (["model.token_mask=-0.1"], "up to, not including, 1"),
    (["model.token_mask=0.01"], "hides 0 of the denoiser's 16 tokens"),
    (["model.token_mask=0.99"], "hides 16 of the denoiser's 16 tokens"),
    (["model.token_mask=0.5", "model.mask_loss_weight=-1"], "finite weight"),
    (["model.token_mask=0.5", "model.mask_loss_weight=.inf"], "finite weight"),
    (["model.token_mask=0.5", "encoder.objective=supervised"], "supervised baseline"),
])
def test_bad_token_mask_settings_are_refused(override, fragment):
    with pytest.raises(ConfigError, match="model.token_mask|model.mask_loss_weight") as err:
        load_config(None, [*SMALL, *override]).validate()
    assert fragment in str(err.value)


def test_trainer_trains_and_resumes_with_a_token_mask(tmp_path, fake_fmnist):
    from fastsemdiff import train as train_mod

    from conftest import train_args

    run = tmp_path / "masked"
    args = train_args(run, fake_fmnist, "model.token_mask=0.25", "train.ckpt_every=3")
    train_mod.main([*args, "train.steps=3"])
    train_mod.main(["--resume", *args, "train.steps=5"])
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert any('"mask_x0"' in line for line in lines)
