"""How training draws t and weighs the loss (diffusion.t_sampling / t_shift / loss_weight): the draws against
their distributions, the weights against the formulas, the loss against a hand-weighted mean, the config checks."""
from __future__ import annotations


import pytest
import torch

from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.diffusion import get_schedule, loss_weights, target, train_times
from fastsemdiff.diffusion.timesteps import shift_toward_noise, snap_times, snr
from fastsemdiff.models import SemanticDiffusion

from helpers import gen

SMALL = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.patch_size=7", "encoder.dim=16",
         "encoder.arch=cnn", "encoder.conv_channels=[8,16]", "encoder.conv_strides=[2,2]"]
N = 200_000


@pytest.mark.parametrize("name", ["vp-cosine", "vp-linear", "ve", "flow"])
def test_uniform_draws_what_the_schedule_always_drew(name):
    sch = get_schedule(name)
    torch.testing.assert_close(train_times(sch, 64, "cpu", gen(1)), sch.sample_t(64, "cpu", gen(1)), rtol=0, atol=0)


def test_logit_normal_has_the_asked_mean_and_std_in_logit_space():
    sch = get_schedule("flow")  # t in [0, 0.999]: map back to u to read the logits
    t = train_times(sch, N, "cpu", gen(2), "logit_normal", mean=0.7, std=1.3)
    u = (t - sch.t_min) / (sch.t_max - sch.t_min)
    logit = torch.log(u / (1 - u))
    assert logit.mean().item() == pytest.approx(0.7, abs=0.02)
    assert logit.std().item() == pytest.approx(1.3, abs=0.02)
    assert sch.t_min <= t.min() and t.max() <= sch.t_max


def test_shift_moves_the_draws_toward_noise_and_keeps_the_ends():
    u = torch.linspace(0, 1, 101)
    s = shift_toward_noise(u, 3.0)
    assert s[0] == 0 and s[-1] == 1 and (s[1:] > s[:-1]).all() and (s >= u).all()
    assert torch.equal(shift_toward_noise(u, 1.0), u)
    t = train_times(get_schedule("vp-cosine"), N, "cpu", gen(3), shift=3.0)
    # P(t > t_max / 2) = P(u > 1 / (s + 1)) = s / (s + 1) = 0.75 for uniform u
    assert (t > get_schedule("vp-cosine").t_max / 2).float().mean().item() == pytest.approx(0.75, abs=0.005)


def test_unknown_sampling_and_weighting_are_refused():
    with pytest.raises(ValueError, match="logit_normal"):
        train_times(get_schedule("flow"), 4, "cpu", sampling="beta")
    with pytest.raises(ValueError, match="min_snr"):
        loss_weights("p2", get_schedule("flow"), torch.rand(4), "eps")
    with pytest.raises(ValueError, match="velocity"):
        loss_weights("min_snr", get_schedule("flow"), torch.rand(4), "velocity")


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_min_snr_weights_are_min_snr_gamma_on_the_x0_error(prediction):
    sch = get_schedule("vp-cosine")
    t = torch.tensor([0.01, 0.2, 0.5, 0.8, 0.99])
    w = loss_weights("min_snr", sch, t, prediction, gamma=5.0)
    a, s = sch.alpha_sigma(t)
    r = (a / s) ** 2
    # the x0-error of each target: eps-error = sqrt(snr) x0-error, v-error = sqrt(snr + 1) x0-error
    per_x0 = {"eps": r, "v": r + 1, "x0": torch.ones_like(r)}[prediction]
    torch.testing.assert_close(w * per_x0, torch.minimum(r, torch.tensor(5.0)), rtol=1e-5, atol=0)
    assert loss_weights("none", sch, t, prediction) is None
    assert snr(sch, torch.tensor([0.0])).isfinite().all()


def test_the_loss_is_the_weighted_mean_and_unchanged_without_weights():
    x0 = torch.rand(8, 1, 28, 28, generator=gen(4)) * 2 - 1
    plain = SemanticDiffusion(load_config(None, SMALL))
    weighted = SemanticDiffusion(load_config(None, [*SMALL, "diffusion.loss_weight=min_snr"]))
    weighted.load_state_dict(plain.state_dict())
    noise = plain.draw_noise(x0, gen(5))
    seen = {}
    plain.denoiser.register_forward_hook(lambda mod, args, out: seen.update(out=out.detach().float()))
    loss, parts = plain.loss(x0, noise)
    err = (seen["out"] - target("eps", plain.schedule, noise.t, x0, noise.eps)).pow(2)
    torch.testing.assert_close(loss, err.mean())
    wloss, wparts = weighted.loss(x0, noise)
    w = loss_weights("min_snr", weighted.schedule, noise.t, "eps", 5.0)
    torch.testing.assert_close(wloss, (w * err.flatten(1).mean(1)).mean())
    torch.testing.assert_close(wparts["mse"], parts["mse"])  # the logged MSE stays the plain one
    assert wloss < loss  # min-SNR weights are <= 1 for eps


def test_draw_noise_uses_the_configured_sampling():
    x0 = torch.zeros(4096, 1, 28, 28)
    shifted = SemanticDiffusion(load_config(None, [*SMALL, "diffusion.t_shift=4"]))
    plain = SemanticDiffusion(load_config(None, SMALL))
    assert shifted.draw_noise(x0, gen(6)).t.mean() > plain.draw_noise(x0, gen(6)).t.mean() + 0.1


@pytest.mark.parametrize("override, fragment", [
    ("diffusion.t_std=0", "must be positive"), ("diffusion.t_shift=-1", "must be positive"),
    ("diffusion.min_snr_gamma=0", "must be positive"), ("diffusion.t_sampling=beta", "logit_normal"),
    ("diffusion.loss_weight=p2", "min_snr"),
])
def test_bad_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_min_snr_with_velocity_prediction_is_refused():
    with pytest.raises(ConfigError, match="prediction=velocity"):
        load_config(None, ["diffusion.schedule=flow", "diffusion.prediction=velocity", "diffusion.loss_weight=min_snr"])


def test_snap_times_picks_the_nearest_bin_and_the_first_on_a_tie():
    t = torch.tensor([0.0, 0.1, 0.25, 0.26, 0.6, 0.74, 0.76, 0.9946])
    assert snap_times(t, [0.0, 0.5, 1.0]).tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.5, 1.0, 1.0]
    assert snap_times(t, []) is t
    by_hand = torch.tensor([min((0.2, 0.7), key=lambda b: abs(v - b)) for v in t.tolist()])
    torch.testing.assert_close(snap_times(t, (0.2, 0.7)), by_hand)


@pytest.mark.parametrize("arch", [["encoder.arch=cnn", "encoder.conv_channels=[8,16]", "encoder.conv_strides=[2,2]"],
                                  ["encoder.arch=vit", "encoder.depth=1"]])
def test_t_bins_make_the_encoder_a_few_codes(arch):
    """With encoder.t_bins the code at any t is the code at its bin, in both encoders; without them, t between
    the bins gives codes of its own. FiLM / adaLN weights woken from their zero start so that t reaches z."""
    cfg = [o for o in SMALL if not o.startswith("encoder.")] + ["encoder.dim=16", *arch]
    torch.manual_seed(0)
    model = SemanticDiffusion(load_config(None, [*cfg, "encoder.t_bins=[0,0.5,1]"])).eval()
    plain = SemanticDiffusion(load_config(None, cfg)).eval()
    with torch.no_grad():
        for name, p in model.encoder.named_parameters():
            if ("film" in name or "adaLN" in name) and name.endswith("weight"):
                p.copy_(torch.randn(p.shape, generator=gen(4)) * 0.2)
        plain.load_state_dict(model.state_dict())
    x = torch.randn(3, 1, 28, 28, generator=gen(5))
    code = {t: model.encoder(x, torch.full((3,), t))[0] for t in (0.0, 0.2, 0.5, 0.7, 0.8, 1.0)}
    assert torch.equal(code[0.2], code[0.0]) and torch.equal(code[0.7], code[0.5]) and torch.equal(code[0.8], code[1.0])
    assert not torch.allclose(code[0.0], code[0.5]) and not torch.allclose(code[0.5], code[1.0])
    for t in (0.0, 0.5, 1.0):  # at the bins themselves the snapped encoder is the plain one
        torch.testing.assert_close(code[t], plain.encoder(x, torch.full((3,), t))[0], rtol=0, atol=0)
    assert not torch.allclose(plain.encoder(x, torch.full((3,), 0.2))[0], code[0.0])


@pytest.mark.parametrize("bins", ["[0,1.5]", "[-0.1,0.5]", "[0.5,0.5]"])
def test_bad_t_bins_are_a_clear_error(bins):
    with pytest.raises(ConfigError, match="encoder.t_bins"):
        load_config(None, [*SMALL, f"encoder.t_bins={bins}"])
    with pytest.raises(ConfigError, match="encoder.t_bins"):
        load_config(None, [*SMALL, "encoder.t_bins=[0,1]", "encoder.time_conditioned=false"])
