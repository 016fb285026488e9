"""DiT, TimeEncoder and SemanticDiffusion: shapes, initialisation, conditioning, every config switch."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from fastsemdiff.config import load_config
from fastsemdiff.diffusion import get_schedule
from fastsemdiff.models import DiT, SemanticDiffusion, TimeEncoder, images_to_model_range, patchify, unpatchify

from helpers import gen

TINY = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16"]


def tiny(*overrides: str, seed: int = 0) -> SemanticDiffusion:
    torch.manual_seed(seed)
    return SemanticDiffusion(load_config(None, [*TINY, *overrides]))


def wake_(module: torch.nn.Module, std: float = 0.05, seed: int = 1) -> torch.nn.Module:
    """Replace the zero initialisations (adaLN outputs, the final linear) by small random weights, so every
    input and every path matters."""
    g = gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "adaLN_modulation" in name or "adaLN_stack" in name or "final_layer.linear" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return module


def images(n: int, channels: int = 1, size: int = 28, seed: int = 0) -> torch.Tensor:
    """Smooth, image-like values in [-1, 1] (bilinear upsampling of coarse noise)."""
    low = torch.rand(n, channels, 7, 7, generator=gen(seed))
    return F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 2 - 1


def small_dit(**kw) -> DiT:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, z_dim=8)
    args.update(kw)
    return DiT(**args)


# ----------------------------------------------------------------------------------- patchify/unpatchify
@pytest.mark.parametrize("patch,channels,size", [(1, 1, 4), (2, 3, 8), (4, 4, 16), (7, 1, 28), (2, 2, 6)])
def test_patchify_unpatchify_roundtrip_is_exact(patch, channels, size):
    x = torch.randn(3, channels, size, size, generator=gen(1))
    tokens = patchify(x, patch)
    g = size // patch
    assert tokens.shape == (3, g * g, patch * patch * channels)
    assert torch.equal(unpatchify(tokens, patch, channels), x)
    # token r*g + c holds the patch at row r, column c, flattened as (row in patch, column in patch, channel)
    for b, r, c, pi, qi, ch in [(0, 0, 0, 0, 0, 0), (2, g - 1, 0, patch - 1, 0, channels - 1),
                                (1, g // 2, g - 1, patch // 2, patch - 1, channels // 2)]:
        feat = (pi * patch + qi) * channels + ch
        assert tokens[b, r * g + c, feat] == x[b, ch, r * patch + pi, c * patch + qi]
    t2 = torch.randn(3, g * g, patch * patch * channels, generator=gen(2))
    assert torch.equal(patchify(unpatchify(t2, patch, channels), patch), t2)


def test_unpatchify_rejects_non_square_token_count():
    with pytest.raises(ValueError, match="square"):
        unpatchify(torch.randn(1, 12, 4), 2, 1)


# ------------------------------------------------------------------------------------------------ DiT
def test_dit_output_shape_and_zero_at_init():
    dit = small_dit()
    x, t, z = torch.randn(4, 3, 16, 16, generator=gen(3)), torch.rand(4, generator=gen(4)), torch.randn(4, 8)
    out = dit(x, t, z)
    assert out.shape == (4, 3, 16, 16)
    assert torch.count_nonzero(out) == 0  # adaLN-Zero with a zeroed final layer: the design
    assert torch.count_nonzero(dit(x, t, None)) == 0
    assert torch.count_nonzero(dit.adaLN_stack.weight) == 0 and torch.count_nonzero(dit.adaLN_stack.bias) == 0
    assert torch.count_nonzero(dit.final_layer.linear.weight) == 0
    assert torch.count_nonzero(dit.z_embedder.weight) > 0


def test_dit_one_optimizer_step_leaves_zero():
    dit = small_dit()
    x, t, z = torch.randn(4, 3, 16, 16, generator=gen(5)), torch.rand(4, generator=gen(6)), torch.randn(4, 8)
    target = torch.randn(4, 3, 16, 16, generator=gen(7))
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-3)
    loss = (dit(x, t, z) - target).pow(2).mean()
    loss.backward()
    opt.step()
    with torch.no_grad():
        out = dit(x, t, z)
        assert out.abs().max() > 1e-4
        assert (out - target).pow(2).mean() < loss  # and it moved towards the target


def test_dit_condition_add_by_hand_and_depends_on_z():
    dit = wake_(small_dit())
    x, t = torch.randn(3, 3, 16, 16, generator=gen(8)), torch.rand(3, generator=gen(9))
    z1, z2 = torch.randn(3, 8, generator=gen(10)), torch.randn(3, 8, generator=gen(11))
    c = dit.condition(t, z1, None)
    assert_close(c, dit.t_embedder(t) + z1 @ dit.z_embedder.weight.T + dit.z_embedder.bias)
    out1, out2 = dit(x, t, z1), dit(x, t, z2)
    assert (out1 - out2).abs().max() > 1e-3
    assert (dit(x, t.flip(0), z1) - out1).abs().max() > 1e-3  # and on t


@pytest.mark.parametrize("merge", ["add", "concat"])
def test_dit_drop_rows_use_null_z(merge):
    dit = wake_(small_dit(cond_merge=merge))
    x, t = torch.randn(4, 3, 16, 16, generator=gen(12)), torch.rand(4, generator=gen(13))
    z = torch.randn(4, 8, generator=gen(14))
    drop = torch.tensor([True, False, True, False])
    out_drop, out_none, out_z = dit(x, t, z, drop), dit(x, t, None), dit(x, t, z)
    assert_close(out_drop[drop], out_none[drop], rtol=1e-6, atol=1e-6)
    assert_close(out_drop[~drop], out_z[~drop], rtol=1e-6, atol=1e-6)
    assert (out_none - out_z).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # z really matters per row
    # z=None is the learned null vector
    null = dit.null_z.expand(4, -1)
    assert_close(dit(x, t, null), out_none, rtol=1e-6, atol=1e-6)


def test_dit_concat_merge_by_hand():
    dit = wake_(small_dit(cond_merge="concat"))
    assert "cond_proj.weight" in dit.state_dict()
    t, z = torch.rand(3, generator=gen(15)), torch.randn(3, 8, generator=gen(16))
    zc = dit.z_embedder(z)
    expected = torch.cat([dit.t_embedder(t), zc], dim=-1) @ dit.cond_proj.weight.T + dit.cond_proj.bias
    assert_close(dit.condition(t, z, None), expected)
    x = torch.randn(3, 3, 16, 16, generator=gen(17))
    out = dit(x, t, z)
    assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()
    assert (dit(x, t, z.flip(0)) - out).abs().max() > 1e-3


def test_dit_without_z_ignores_it():
    dit = wake_(small_dit(z_dim=None))
    assert not any(k.startswith(("z_embedder", "null_z", "cond_proj")) for k in dit.state_dict())
    x, t = torch.randn(2, 3, 16, 16, generator=gen(18)), torch.rand(2, generator=gen(19))
    assert_close(dit(x, t, torch.randn(2, 8)), dit(x, t, None))


def test_dit_return_block_features():
    dit = wake_(small_dit(depth=3))
    x, t, z = torch.randn(2, 3, 16, 16, generator=gen(20)), torch.rand(2, generator=gen(21)), torch.randn(2, 8)
    c = dit.condition(t, z, None)
    h = dit.x_embedder(x) + dit.pos_embed
    for k, (blk, mod) in enumerate(zip(dit.blocks, dit.block_modulations(c))):
        h = blk(h, c, mod)
        assert_close(dit(x, t, z, return_block=k), h)
    assert dit(x, t, z, return_block=0).shape == (2, 16, 32)
    for bad in (3, -1, 10):
        with pytest.raises(ValueError, match="return_block"):
            dit(x, t, z, return_block=bad)


# --------------------------------------------------------------------------------------- TimeEncoder
def encoder(**kw) -> TimeEncoder:
    torch.manual_seed(kw.pop("seed", 0))
    args = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, out_dim=12)
    args.update(kw)
    return wake_(TimeEncoder(**args))


def test_encoder_normalize_switch():
    x, t = images(5, 3, 16, seed=22), torch.rand(5, generator=gen(23))
    z, stats = encoder(normalize=True)(x, t)
    assert z.shape == (5, 12) and z.dtype == torch.float32 and stats == {}
    assert_close(z.norm(dim=-1), torch.ones(5))
    z_raw, _ = encoder(normalize=False)(x, t)
    assert (z_raw.norm(dim=-1) - 1).abs().max() > 1e-2
    assert_close(z, F.normalize(z_raw, dim=-1))  # same seed: the same network up to the normalisation


def test_encoder_starts_as_plain_vit_with_open_gates():
    """Gates start at 1 (blocks are not the identity), shift/scale at 0; open_gates=False is adaLN-Zero."""
    torch.manual_seed(0)
    args = dict(input_size=16, patch_size=4, in_channels=3, hidden_size=32, depth=2, num_heads=2, out_dim=12)
    enc = TimeEncoder(**args)
    x, c = torch.randn(2, 16, 32, generator=gen(30)), torch.randn(2, 32, generator=gen(31))
    assert torch.count_nonzero(enc.adaLN_stack.weight) == 0
    for blk, bias, mod in zip(enc.blocks, enc.adaLN_stack.block_bias(), enc.block_modulations(c)):
        assert torch.equal(bias[[2, 5]], torch.ones(2, 32)) and torch.count_nonzero(bias[[0, 1, 3, 4]]) == 0
        assert (blk(x, c, mod) - x).abs().max() > 1e-2
    closed = TimeEncoder(**args, open_gates=False)
    for blk, mod in zip(closed.blocks, closed.block_modulations(c)):
        assert_close(blk(x, c, mod), x, rtol=0, atol=0)
    per_block = TimeEncoder(**args, adaln="per_block")  # the same initialisation in DiT's layout
    for blk in per_block.blocks:
        bias = blk.adaLN_modulation[1].bias.view(6, 32)
        assert torch.equal(bias[[2, 5]], torch.ones(2, 32)) and torch.count_nonzero(bias[[0, 1, 3, 4]]) == 0


def test_encoder_time_conditioning_switch():
    x = images(4, 3, 16, seed=24)
    t1, t2 = torch.full((4,), 0.1), torch.full((4,), 0.9)
    static = encoder(time_conditioned=False)
    assert not hasattr(static, "t_embedder") and static.static_cond.abs().max() > 0
    assert_close(static(x, t1)[0], static(x, t2)[0], rtol=0, atol=0)
    dynamic = encoder(time_conditioned=True)
    assert (dynamic(x, t1)[0] - dynamic(x, t2)[0]).abs().max() > 1e-3


def test_encoder_variational():
    x, t = images(6, 3, 16, seed=25), torch.rand(6, generator=gen(26))
    enc = encoder(variational=True, normalize=False)
    assert enc.head.out_features == 24
    enc.train()
    z1, stats = enc(x, t, generator=gen(1))
    z2, _ = enc(x, t, generator=gen(2))
    z1b, _ = enc(x, t, generator=gen(1))
    assert set(stats) == {"mu", "logvar"} and stats["mu"].shape == (6, 12) and stats["logvar"].shape == (6, 12)
    mu, logvar = stats["mu"], stats["logvar"]
    out = enc.head(enc.features(x, t))
    assert_close(mu, out[:, :12])
    assert_close(logvar, out[:, 12:].clamp(-30, 20))
    assert (z1 - z2).abs().max() > 1e-3  # sampled in training
    assert_close(z1, z1b)  # ... from the generator
    noise = torch.randn(mu.shape, generator=gen(1))
    assert_close(z1, mu + (0.5 * logvar).exp() * noise)
    enc.eval()
    e1, _ = enc(x, t, generator=gen(1))
    e2, _ = enc(x, t, generator=gen(2))
    assert_close(e1, e2, rtol=0, atol=0)
    assert_close(e1, mu)
    enc_n = encoder(variational=True, normalize=True).eval()
    zn, st = enc_n(x, t)
    assert_close(zn, F.normalize(st["mu"], dim=-1))


# ----------------------------------------------------------------------------------- SemanticDiffusion
def test_loss_falls_on_a_fixed_batch():
    model = tiny()
    x0 = images(16, seed=30)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for i in range(40):
        loss, parts = model.loss(x0, gen(1000 + i))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.85 * first, (first, last)


ENCODER_SWITCHES = list(itertools.product(["clean", "noisy"], [True, False], [True, False], ["add", "concat"],
                                          ["none", "l1", "kl"]))
SCHEDULE_SWITCHES = [(s, p, lam) for s in ["vp-cosine", "vp-linear", "ve", "flow"]
                     for p in ["eps", "v", "x0", "velocity"] for lam in [0.0, 0.5]]
CASES = ([(*enc, "vp-cosine", "eps", 0.1) for enc in ENCODER_SWITCHES]
         + [(*ENCODER_SWITCHES[i * 7 % len(ENCODER_SWITCHES)], *sch) for i, sch in enumerate(SCHEDULE_SWITCHES)])


@pytest.mark.parametrize("inp,tc,norm,merge,reg,schedule,prediction,lam", CASES)
def test_every_switch_combination_trains(inp, tc, norm, merge, reg, schedule, prediction, lam):
    model = tiny(f"encoder.input={inp}", f"encoder.time_conditioned={str(tc).lower()}",
                 f"encoder.normalize={str(norm).lower()}", f"model.cond_merge={merge}", f"encoder.regularizer={reg}",
                 f"diffusion.schedule={schedule}", f"diffusion.prediction={prediction}",
                 f"diffusion.lambda_cons={lam}", "encoder.reg_weight=0.01")
    wake_(model)
    loss, parts = model.loss(images(4, seed=31), gen(32))
    assert loss.dim() == 0 and torch.isfinite(loss)
    has_cons = lam > 0 and (tc or inp == "noisy")
    assert set(parts) == {"mse"} | ({"cons"} if has_cons else set()) | ({"reg"} if reg != "none" else set())
    assert all(torch.isfinite(v) and not v.requires_grad for v in parts.values())
    expected = parts["mse"] + lam * parts.get("cons", 0.0) + 0.01 * parts.get("reg", 0.0)
    assert_close(loss.detach(), expected)
    loss.backward()

    def grad_norm(module):
        return sum(p.grad.norm() ** 2 for p in module.parameters() if p.grad is not None) ** 0.5

    assert grad_norm(model.encoder) > 0 and grad_norm(model.denoiser) > 0
    assert model.encoder.head.weight.grad.abs().max() > 0
    assert model.denoiser.z_embedder.weight.grad.abs().max() > 0
    assert model.denoiser.final_layer.linear.weight.grad.abs().max() > 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_model_built_as_is_gets_gradients_from_the_first_step():
    model = tiny("encoder.regularizer=kl", "diffusion.lambda_cons=0.1")
    loss, _ = model.loss(images(4, seed=33), gen(34))
    loss.backward()
    assert model.denoiser.final_layer.linear.weight.grad.abs().max() > 0
    assert model.encoder.head.weight.grad.abs().max() > 0


def test_images_to_model_range():
    u8 = torch.tensor([0, 51, 255], dtype=torch.uint8)
    assert_close(images_to_model_range(u8), torch.tensor([-1.0, 51 / 127.5 - 1, 1.0]))
    assert_close(images_to_model_range(torch.tensor([0.0, 0.25, 1.0])), torch.tensor([-1.0, -0.5, 1.0]))
    with pytest.raises(TypeError):
        images_to_model_range(torch.tensor([1, 2], dtype=torch.int32))


@pytest.fixture(scope="module")
def trained_like():
    """A tiny model whose zero-initialised parts are random, so t and z matter everywhere; in eval mode."""
    return wake_(tiny()).eval()


def uint8_images(n: int, seed: int = 40) -> torch.Tensor:
    return ((images(n, seed=seed) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def test_embed_uint8_and_float_agree(trained_like):
    x = uint8_images(5)
    z_u8 = trained_like.embed(x, 0.2)
    z_f = trained_like.embed(x / 255.0, 0.2)
    assert z_u8.shape == (5, 16) and z_u8.dtype == torch.float32
    assert_close(z_u8, z_f, rtol=1e-5, atol=1e-5)
    by_hand, _ = trained_like.encoder(x.float() / 255 * 2 - 1, torch.full((5,), 0.2))
    assert_close(z_u8, by_hand, rtol=1e-5, atol=1e-5)
    assert trained_like.cfg.encoder.normalize == (bool(torch.allclose(z_u8.norm(dim=-1), torch.ones(5))))


def test_embed_time_argument(trained_like):
    x = uint8_images(3, seed=41)
    z_float = trained_like.embed(x, 0.3)
    assert_close(trained_like.embed(x, torch.full((3,), 0.3)), z_float, rtol=0, atol=0)
    assert (trained_like.embed(x, 0.7) - z_float).abs().max() > 1e-3  # t matters, so the check above can fail
    ts = torch.tensor([0.1, 0.5, 0.9])
    mixed = trained_like.embed(x, ts)
    for i, t in enumerate(ts.tolist()):
        assert_close(mixed[i], trained_like.embed(x[i:i + 1], t)[0], rtol=1e-5, atol=1e-6)
    assert_close(trained_like.embed(x, 0.3, batch_size=2), z_float, rtol=1e-5, atol=1e-6)


def test_embed_rejects_bad_inputs(trained_like):
    x = uint8_images(2, seed=42)
    for bad in (torch.zeros(2, 3, 28, 28, dtype=torch.uint8), torch.zeros(2, 1, 32, 32), torch.zeros(1, 28, 28)):
        with pytest.raises(ValueError, match=r"\[B, 1, 28, 28\]"):
            trained_like.embed(bad)
    for t in (1.5, -0.1, float("nan"), torch.tensor([0.2, 1.2])):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            trained_like.embed(x, t)
    with pytest.raises(ValueError, match="shape"):
        trained_like.embed(x, torch.tensor([0.1, 0.2, 0.3]))
    trained_like.embed(x, 0.0)
    trained_like.embed(x, 1.0)  # the closed interval is fine


def test_embed_multi_is_the_concatenation(trained_like):
    x = uint8_images(3, seed=43)
    ts = [0.0, 0.25, 0.6]
    multi = trained_like.embed_multi(x, ts)
    assert multi.shape == (3, len(ts) * 16)
    assert_close(multi, torch.cat([trained_like.embed(x, t) for t in ts], dim=-1), rtol=0, atol=0)


def test_embed_noisy_input_is_repeatable():
    model = wake_(tiny("encoder.input=noisy")).eval()
    x = uint8_images(3, seed=44)
    z1, z2 = model.embed(x, 0.5), model.embed(x, 0.5)
    assert_close(z1, z2, rtol=0, atol=0)
    clean = wake_(tiny("encoder.input=clean")).eval()  # same seed and weights, clean input
    assert (clean.embed(x, 0.5) - z1).abs().max() > 1e-3  # the noise really is applied


@pytest.mark.parametrize("schedule,prediction", [("vp-cosine", "eps"), ("vp-linear", "v"), ("ve", "x0"),
                                                 ("flow", "velocity")])
def test_generate(schedule, prediction):
    model = wake_(tiny(f"diffusion.schedule={schedule}", f"diffusion.prediction={prediction}")).eval()
    out = model.generate(3, steps=2)
    assert out.shape == (3, 1, 28, 28) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    assert_close(model.generate(3, steps=2), out, rtol=0, atol=0)  # seeded
    z = F.normalize(torch.randn(3, 16, generator=gen(45)), dim=-1)
    zout = model.generate(3, z=z, steps=2)
    assert zout.shape == (3, 1, 28, 28) and (zout - out).abs().max() > 0
    with pytest.raises(ValueError, match="rows"):
        model.generate(2, z=z, steps=2)


def test_denoiser_features(trained_like):
    x = uint8_images(4, seed=46)
    feats = trained_like.denoiser_features(x, 0.3, block=1)
    assert feats.shape == (4, 32) and feats.dtype == torch.float32
    x0 = x.float() / 127.5 - 1
    t = torch.full((4,), 0.3)
    eps = torch.randn(x0.shape, generator=gen(0))
    h = trained_like.denoiser(get_schedule("vp-cosine").add_noise(x0, t, eps), t, None, return_block=1)
    assert_close(feats, h.mean(dim=1), rtol=1e-5, atol=1e-5)
    assert (trained_like.denoiser_features(x, 0.3, block=0) - feats).abs().max() > 1e-4
    with pytest.raises(ValueError):
        trained_like.denoiser_features(x, 0.3, block=2)


def test_supervised_objective_learns_labels_and_needs_them():
    """The ceiling baseline: cross-entropy on a linear head over z_t falls on a fixed labelled batch; the
    denoiser is frozen; calling it without labels is a clear error."""
    model = tiny("encoder.objective=supervised", "encoder.num_classes=3")
    assert not any(p.requires_grad for p in model.denoiser.parameters())
    x = images(12, seed=40)
    y = torch.arange(12) % 3
    x = x + 0.8 * F.one_hot(y, 3).float().repeat_interleave(10, 1)[:, :28].view(12, 1, 1, 28)  # learnable signal
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    first = None
    for i in range(30):
        loss, parts = model(x.clamp(-1, 1), torch.Generator().manual_seed(i), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first and set(parts) == {"ce", "train_acc"}
    with pytest.raises(ValueError, match="needs labels"):
        model(x, None)
