"""The convolutional encoder (encoder.arch=cnn): shapes, FiLM by t, the static code, the switches, training."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fastsemdiff.config import ConfigError, load_config
from fastsemdiff.models import SemanticDiffusion
from fastsemdiff.models.conv_encoder import ConvTimeEncoder

from helpers import gen

CNN = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "encoder.arch=cnn",
       "encoder.conv_channels=[8,16]", "encoder.conv_strides=[2,2]"]


def cnn_model(*overrides: str, seed: int = 0) -> SemanticDiffusion:
    torch.manual_seed(seed)
    return SemanticDiffusion(load_config(None, [*CNN, *overrides]))


def wake_films_(encoder: ConvTimeEncoder, std: float = 0.2) -> None:
    g = gen(9)
    with torch.no_grad():
        for film in (stage.film for stage in encoder.blocks if stage.film is not None):  # not the residual branches'
            film.weight.copy_(torch.randn(film.weight.shape, generator=g) * std)


def film_conv_by_hand(layer, h, c, film: bool = True):
    """One FiLMConv (or a stage's own conv) recomputed: conv, GroupNorm, the FiLM map of c unless film=False, GELU."""
    h = layer.norm(layer.conv(h))
    if film:
        scale, shift = layer.film(F.silu(c)).chunk(2, dim=-1)
        h = h * (1 + scale[..., None, None]) + shift[..., None, None]
    return F.gelu(h)


def test_features_by_hand():
    """Two FiLM stages, then 2x2 average pooling, LayerNorm and the head: recomputed here step by step."""
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2], grid=2).eval()
    wake_films_(enc)
    x, t = torch.randn(3, 1, 12, 12, generator=gen(1)), torch.tensor([0.1, 0.5, 0.9])
    c = enc.t_embedder(t)
    h = x
    for stage in enc.blocks:
        scale, shift = stage.film(F.silu(c)).chunk(2, dim=-1)
        h = F.gelu(stage.norm(stage.conv(h)) * (1 + scale[..., None, None]) + shift[..., None, None])
    pooled = F.adaptive_avg_pool2d(h, 2).flatten(1)
    assert pooled.shape == (3, 8 * 4)
    assert_close(enc.features(x, t), enc.norm(pooled))
    z, stats = enc(x, t)
    assert_close(z, enc.head(enc.norm(pooled)))
    assert stats == {}


def test_t_reaches_z_only_through_film_weights():
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2]).eval()
    x = torch.randn(2, 1, 12, 12, generator=gen(2))
    assert not enc.depends_on_t()
    assert torch.equal(enc(x, torch.full((2,), 0.1))[0], enc(x, torch.full((2,), 0.8))[0])
    wake_films_(enc)
    assert enc.depends_on_t()
    assert not torch.allclose(enc(x, torch.full((2,), 0.1))[0], enc(x, torch.full((2,), 0.8))[0])


def test_static_code_ignores_t_even_with_film_weights():
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2], time_conditioned=False).eval()
    wake_films_(enc)
    x = torch.randn(2, 1, 12, 12, generator=gen(3))
    assert not enc.depends_on_t()
    assert torch.equal(enc(x, torch.full((2,), 0.1))[0], enc(x, torch.full((2,), 0.9))[0])


@pytest.mark.parametrize("overrides", [[], ["encoder.time_conditioned=false"], ["encoder.regularizer=kl"],
                                       ["encoder.normalize=true"], ["encoder.pool_grid=1"],
                                       ["encoder.objective=supervised"], ["encoder.conv_residual_blocks=[1,1]"],
                                       ["encoder.conv_film_from=1"]])
def test_model_with_cnn_encoder_trains(overrides):
    model = cnn_model(*overrides)
    x0 = torch.rand(8, 1, 28, 28, generator=gen(4)) * 2 - 1
    labels = torch.arange(8) % 10
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first_conv = model.encoder.blocks[0].conv.weight.detach().clone()
    losses = []
    for i in range(15):
        loss, _ = model(x0, gen(100 + i), labels=labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    assert not torch.equal(model.encoder.blocks[0].conv.weight, first_conv)  # the loss reaches the first conv
    z = model.eval().embed((torch.rand(5, 1, 28, 28, generator=gen(5)) * 255).to(torch.uint8), 0.5)
    assert z.shape == (5, 16) and torch.isfinite(z).all()
    if "encoder.normalize=true" in overrides:
        assert_close(z.norm(dim=1), torch.ones(5))


def test_trained_film_makes_the_model_t_dependent():
    model = cnn_model()
    assert not model.embedding_depends_on_t()
    wake_films_(model.encoder)
    assert model.embedding_depends_on_t()


@pytest.mark.parametrize("bad", [["encoder.conv_channels=[8]"], ["encoder.conv_channels=[]", "encoder.conv_strides=[]"],
                                 ["encoder.conv_strides=[0,2]"], ["encoder.pool_grid=0"], ["encoder.arch=resnet"],
                                 ["encoder.conv_residual_blocks=[1]"], ["encoder.conv_residual_blocks=[1,-1]"],
                                 ["encoder.conv_film_from=2"], ["encoder.conv_film_from=-1"]])
def test_bad_cnn_config_is_a_clear_error(bad):
    with pytest.raises(ConfigError, match="encoder"):
        load_config(None, [*CNN, *bad]).validate()


def test_residual_stage_by_hand_and_starting_as_the_plain_stage():
    """encoder.conv_residual_blocks: each branch is a FiLM conv added to its input. At initialisation the branches
    add exactly 0 (their GroupNorm weights start at zero), so the encoder computes what the plain one with the
    same first convs does; with the branches trained, the stage is h + f(h) recomputed here by hand."""
    torch.manual_seed(0)
    plain = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2], grid=2).eval()
    torch.manual_seed(0)
    deep = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2], grid=2, residual_blocks=[0, 2]).eval()
    assert [len(s.residual) for s in deep.blocks] == [0, 2]
    missing = deep.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all(".residual." in k for k in missing)
    wake_films_(plain)
    wake_films_(deep)
    x, t = torch.randn(3, 1, 12, 12, generator=gen(11)), torch.tensor([0.1, 0.5, 0.9])
    assert torch.equal(deep(x, t)[0], plain(x, t)[0])

    g = gen(12)
    with torch.no_grad():
        for branch in deep.blocks[1].residual:
            for p in (branch.norm.weight, branch.film.weight, branch.conv.weight):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    assert deep.depends_on_t()
    c = deep.t_embedder(t)
    h = film_conv_by_hand(deep.blocks[0], x, c)
    h = film_conv_by_hand(deep.blocks[1], h, c)
    for branch in deep.blocks[1].residual:
        h = h + film_conv_by_hand(branch, h, c)
    assert_close(deep.features(x, t), deep.norm(F.adaptive_avg_pool2d(h, 2).flatten(1)))
    assert not torch.allclose(deep(x, t)[0], plain(x, t)[0])


def test_t_reaches_a_residual_encoder_through_the_branch_films_alone():
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[1, 2], residual_blocks=[1, 0]).eval()
    assert not enc.depends_on_t()
    with torch.no_grad():
        enc.blocks[0].residual[0].norm.weight.fill_(1.0)
        enc.blocks[0].residual[0].film.weight.copy_(torch.randn(enc.blocks[0].residual[0].film.weight.shape,
                                                                generator=gen(13)))
    x = torch.randn(2, 1, 12, 12, generator=gen(14))
    assert enc.depends_on_t()
    assert not torch.allclose(enc(x, torch.full((2,), 0.1))[0], enc(x, torch.full((2,), 0.8))[0])


def test_trainer_trains_resumes_and_exports_a_cnn_encoder(tmp_path, fake_fmnist):
    """The trainer's wrapping (per-block compile units, FSDP units) takes the CNN's stages as its blocks."""
    import fastsemdiff
    from fastsemdiff import train as train_mod

    from conftest import train_args

    run = tmp_path / "cnn"
    args = train_args(run, fake_fmnist, "encoder.arch=cnn", "encoder.conv_channels=[8,16]",
                      "encoder.conv_strides=[2,2]", "train.ckpt_every=3")
    train_mod.main([*args, "train.steps=3"])
    train_mod.main(["--resume", *args, "train.steps=5"])
    model = fastsemdiff.load(str(run), device="cpu")
    assert isinstance(model.encoder, ConvTimeEncoder)
    assert model.embed((torch.rand(3, 1, 28, 28, generator=gen(6)) * 255).to(torch.uint8), 0.2).shape == (3, 16)


def test_grid_of_the_map_size_skips_the_pool_with_the_same_features(monkeypatch):
    """pool_grid equal to the last map's side (the main job's 7) reads the map as it is: the same features as
    the identity pooling it replaces, and no pooling runs (2 ms of each 100 ms CPU step went to it)."""
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[2, 2], grid=7).eval()
    wake_films_(enc)
    x, t = torch.randn(3, 1, 28, 28, generator=gen(10)), torch.tensor([0.2, 0.6, 0.9])
    maps = []
    enc.blocks[-1].register_forward_hook(lambda mod, args, out: maps.append(out))
    features = enc.features(x, t)
    assert maps[0].shape == (3, 8, 7, 7)
    expected = enc.norm(F.adaptive_avg_pool2d(maps[0], 7).flatten(1))
    pooled = []
    real_pool = F.adaptive_avg_pool2d
    monkeypatch.setattr(F, "adaptive_avg_pool2d", lambda *a, **k: pooled.append(1) or real_pool(*a, **k))
    assert_close(features, expected)
    assert pooled == [] and torch.equal(enc.features(x, t), features)
    coarse = ConvTimeEncoder(1, 6, 16, channels=[4, 8], strides=[2, 2], grid=3).eval()  # a coarser grid pools
    assert coarse.features(x, t).shape == (3, 8 * 9) and pooled == [1]


def test_film_from_makes_the_early_stages_a_trunk_every_t_shares():
    """encoder.conv_film_from=1: the first stage is conv -> GroupNorm -> GELU with no FiLM map at all, the same
    for every t; t modulates the second stage only, and the features are that computation by hand."""
    enc = ConvTimeEncoder(1, 6, 16, channels=[4, 8, 8], strides=[1, 2, 1], grid=2, residual_blocks=[1, 0, 1],
                          film_from=1).eval()
    assert [len(s.films()) for s in enc.blocks] == [0, 1, 2]
    assert enc.blocks[0].film is None and enc.blocks[0].residual[0].film is None
    g = gen(13)
    with torch.no_grad():
        for p in (enc.blocks[0].residual[0].norm.weight, enc.blocks[2].residual[0].norm.weight):
            p.copy_(torch.randn(p.shape, generator=g))  # wake the residual branches
        enc.blocks[2].residual[0].film.weight.normal_(0, 0.2, generator=g)
    wake_films_(enc)
    assert enc.depends_on_t()
    x, t = torch.randn(3, 1, 12, 12, generator=gen(14)), torch.tensor([0.1, 0.5, 0.9])
    c = enc.t_embedder(t)
    trunk = film_conv_by_hand(enc.blocks[0], x, c, film=False)
    trunk = trunk + film_conv_by_hand(enc.blocks[0].residual[0], trunk, c, film=False)
    assert torch.equal(enc.blocks[0](x, c), enc.blocks[0](x, c.flip(0)))  # the trunk ignores t
    h = film_conv_by_hand(enc.blocks[1], trunk, c)
    h = film_conv_by_hand(enc.blocks[2], h, c)
    h = h + film_conv_by_hand(enc.blocks[2].residual[0], h, c)
    assert_close(enc.features(x, t), enc.norm(F.adaptive_avg_pool2d(h, 2).flatten(1)))
    assert not torch.allclose(enc(x, torch.full((3,), 0.1))[0], enc(x, torch.full((3,), 0.9))[0])


@pytest.mark.parametrize("arch", ["cnn", "vit"])
@pytest.mark.parametrize("time_conditioned", [True, False])
def test_kl_variance_time_is_one_log_variance_per_t(arch, time_conditioned):
    """encoder.kl_variance=time: the head emits the mean alone, and the log-variance is a map of the conditioning
    vector, so every image at one t gets the same one (differing between t once that map is trained, never for a
    static code), z is mu + sigma(t) * n, the KL term reads it, and the loss's gradient reaches it."""
    overrides = ["encoder.regularizer=kl", "encoder.kl_variance=time", "encoder.reg_weight=0.01",
                 f"encoder.time_conditioned={str(time_conditioned).lower()}"]
    model = cnn_model(*overrides, *([] if arch == "cnn" else ["encoder.arch=vit"]))
    enc = model.encoder
    assert enc.head.out_features == 16 and enc.logvar is not None
    per_image = cnn_model("encoder.regularizer=kl", *([] if arch == "cnn" else ["encoder.arch=vit"])).encoder
    assert per_image.head.out_features == 32 and per_image.logvar is None
    g = gen(40)
    with torch.no_grad():
        for p in enc.logvar.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    x = torch.randn(4, 1, 28, 28, generator=gen(41))
    noise = torch.randn(4, 16, generator=gen(42))
    t = torch.tensor([0.2, 0.2, 0.7, 0.7])
    z, stats = enc(x, t, sample=True, noise=noise)
    lv = stats["logvar"]
    assert_close(lv[0], lv[1])
    assert_close(lv[2], lv[3])
    assert not torch.allclose(stats["mu"][0], stats["mu"][1])  # the mean still reads the image
    assert torch.allclose(lv[0], lv[2]) != time_conditioned
    c = enc._cond(x, t)
    assert_close(lv, enc.logvar.proj(F.silu(c)))
    assert_close(z, stats["mu"] + (0.5 * lv).exp() * noise)
    assert torch.equal(enc(x, t, sample=False)[0], stats["mu"])
    loss, parts = model.loss(torch.rand(4, 1, 28, 28, generator=gen(43)) * 2 - 1, gen(44))
    assert "reg" in parts
    loss.backward()
    assert enc.logvar.proj.bias.grad.abs().max() > 0 and enc.head.weight.grad.abs().max() > 0


def test_kl_variance_is_checked():
    with pytest.raises(ConfigError, match="encoder.kl_variance"):
        load_config(None, [*CNN, "encoder.kl_variance=image"]).validate()
