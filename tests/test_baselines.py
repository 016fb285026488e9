"""The probe's baseline features: PCA, the untrained architecture, DDAE block features, label subsets."""
from __future__ import annotations

import torch
from torch.testing import assert_close

from fastsemdiff import baselines
from fastsemdiff.config import load_config
from fastsemdiff.models import SemanticDiffusion

from helpers import gen

FAST = ["model.hidden_size=32", "model.depth=2", "model.num_heads=2", "encoder.dim=16", "model.patch_size=7"]


def small_model(seed: int = 0) -> SemanticDiffusion:
    torch.manual_seed(seed)
    model = SemanticDiffusion(load_config(None, FAST)).eval()
    with torch.no_grad():  # wake the zero-initialised adaLN and output layers so every block matters
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer.linear" in name:
                p.normal_(0, 0.1, generator=gen(len(name)))
    return model


def test_pca_keeps_the_top_variance_directions():
    """Data with three strong directions: the 3-D projection keeps (almost) all the variance, the
    components are orthonormal, and the projected variances are the covariance's top eigenvalues."""
    basis = torch.linalg.qr(torch.randn(20, 3, generator=gen(1)))[0]
    train = torch.randn(500, 3, generator=gen(2)) * torch.tensor([5.0, 3.0, 2.0]) @ basis.T
    train = train + 0.01 * torch.randn(500, 20, generator=gen(3)) + 7.0
    test = torch.randn(50, 20, generator=gen(4))
    p_train, p_test = baselines.pca_features(train, test, 3)
    assert p_train.shape == (500, 3) and p_test.shape == (50, 3)
    _, comps = baselines.pca_projection(train, 3)
    assert_close(comps.T @ comps, torch.eye(3), atol=1e-5, rtol=0)
    eig = torch.linalg.eigvalsh(torch.cov(train.double().T)).flip(0)[:3].float()
    assert_close(p_train.var(0), eig, rtol=1e-4, atol=1e-4)
    assert p_train.var(0).sum() > 0.999 * train.var(0).sum()


def test_pca_keeps_a_subspace_and_fits_only_its_train_rows():
    """Data on a 3-d subspace of 10-d keeps its pairwise distances under the 3-component PCA; the centre and
    directions come from the train rows alone (scripts/readout_checks.py fits it on the held-out split's fit rows)."""
    basis = torch.linalg.qr(torch.randn(10, 3, generator=gen(5), dtype=torch.float64))[0]
    x = (torch.randn(400, 3, generator=gen(6), dtype=torch.float64) * torch.tensor([3.0, 2.0, 1.0], dtype=torch.float64)
         @ basis.T + 5.0).float()
    y, _ = baselines.pca_features(x, x[:10], 3)
    assert y.shape == (400, 3)
    exact = "donot_use_mm_for_euclid_dist"
    assert_close(torch.cdist(y, y, compute_mode=exact), torch.cdist(x, x, compute_mode=exact), atol=1e-4, rtol=1e-4)
    assert y.mean(0).abs().max() < 1e-4  # centred on the train rows
    _, shifted = baselines.pca_features(x[:200] + 1.0, x[:200], 3)  # fitted elsewhere: not centred here
    assert shifted.mean(0).abs().max() > 0.1


def test_untrained_like_is_a_fresh_model_of_the_same_architecture():
    model = small_model()
    before = torch.random.get_rng_state()
    fresh = baselines.untrained_like(model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's random stream is untouched
    sd, fsd = model.state_dict(), fresh.state_dict()
    assert list(sd) == list(fsd) and all(sd[k].shape == fsd[k].shape for k in sd)
    assert not torch.equal(sd["encoder.x_embedder.proj.weight"], fsd["encoder.x_embedder.proj.weight"])
    again = baselines.untrained_like(model, seed=3).state_dict()
    assert all(torch.equal(fsd[k], again[k]) for k in fsd)
    assert not fresh.training


def test_ddae_features_equal_the_denoiser_block_outputs():
    """One hooked forward gives, for every block, what denoiser_features computes block by block."""
    model = small_model()
    images = (torch.rand(6, 1, 28, 28, generator=gen(5)) * 255).to(torch.uint8)
    feats = baselines.ddae_features(model, images, 0.4, batch_size=64, seed=2)
    assert len(feats) == len(model.denoiser.blocks)
    for block, f in enumerate(feats):
        assert f.shape == (6, 32)
        assert_close(f, model.denoiser_features(images, 0.4, block, seed=2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(feats[0], feats[1])
    # batching changes nothing but the noise draws' grouping: same shapes, finite values
    assert all(torch.isfinite(f).all() for f in baselines.ddae_features(model, images, 0.4, batch_size=4))


def test_label_subsets_are_balanced_fixed_and_skip_impossible_sizes():
    labels = torch.arange(10).repeat_interleave(30)[torch.randperm(300, generator=gen(6))]
    subsets = baselines.label_subsets(labels, (100, 1000), seed=1)
    assert set(subsets) == {100}  # 1,000 would need 100 per class; only 30 exist
    idx = subsets[100]
    assert len(idx) == 100 and len(idx.unique()) == 100
    assert torch.equal(torch.bincount(labels[idx], minlength=10), torch.full((10,), 10))
    assert torch.equal(idx, baselines.label_subsets(labels, (100,), seed=1)[100])


def test_project_2d_shape_and_spread():
    pts = baselines.project_2d(torch.randn(40, 7, generator=gen(7)) * 3 + 1)
    assert pts.shape == (40, 2) and pts.std(0).min() > 0.1


def test_random_conv_features_match_an_untrained_conv_layer():
    """The control is exactly nn.Conv2d's default initialisation (from its own seed), ReLU and 4x4 average
    pooling; its width is filters x 16, and the caller's random stream is untouched."""
    images = (torch.rand(6, 1, 28, 28, generator=gen(4)) * 255).to(torch.uint8)
    before = torch.random.get_rng_state()
    feats = baselines.random_conv_features(images, 128, torch.device("cpu"), seed=5, batch_size=4)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert feats.shape == (6, 128) and baselines.random_conv_filters(640) == 40
    conv = torch.nn.Conv2d(1, 8, 5, padding=2)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # nn.Conv2d's bound for weight and bias alike is 1 / sqrt(fan_in) = 1 / 5
        conv.weight.copy_((torch.rand(conv.weight.shape, generator=g) * 2 - 1) / 5)
        conv.bias.copy_((torch.rand(8, generator=g) * 2 - 1) / 5)
        ref = torch.nn.functional.avg_pool2d(torch.relu(conv(images.float() / 127.5 - 1)), 7).flatten(1)
    assert_close(feats, ref)
    bound = 1 / 25**0.5
    fresh = torch.nn.Conv2d(1, 8, 5)  # the default init's range is the one the control draws from
    assert fresh.weight.abs().max() <= bound and fresh.bias.abs().max() <= bound
    other = baselines.random_conv_features(images, 128, torch.device("cpu"), seed=6)
    assert not torch.equal(feats, other)
