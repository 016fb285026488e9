"""The probe's baselines as feature extractors: what the embedding must beat, through the same probe code.

* raw pixels, and PCA of the pixels at the embedding's width (fitted on the train split only);
* the same model architecture untrained (the run's config, a fixed seed): what the architecture and the
  multi-t readout give without any learning;
* DDAE features: the trained denoiser's block outputs, mean-pooled, at a time t, with the null embedding
  (the denoiser as its own representation learner, as in "Denoising Diffusion Autoencoders are Unified
  Self-supervised Learners");
* random convolutional features of a given width: one untrained 5x5 convolution, ReLU, average pooling to
  a 4x4 grid. No learning at all, yet on Fashion-MNIST it beats pixels, PCA and a weak learned embedding:
  the control that says whether training taught the encoder anything a probe can use.

Label-efficiency subsets and the 2-D projection used by the report live here too.
"""
from __future__ import annotations

import torch

from .probe import class_balanced_subset


def pixel_features(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, C*H*W] in [0, 1]."""
    return images.to(device).flatten(1).float() / 255.0


def pca_projection(train: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, components [D, dim]) of the train features' top principal directions (fp64 covariance)."""
    x = train.double()
    mean = x.mean(0)
    cov = (x - mean).T @ (x - mean) / max(1, x.shape[0] - 1)
    _, vectors = torch.linalg.eigh(cov)  # ascending eigenvalues
    dim = min(dim, vectors.shape[1])
    return mean.float(), vectors[:, -dim:].flip(1).float()


def pca_features(train: torch.Tensor, test: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean, comps = pca_projection(train, dim)
    return (train - mean) @ comps, (test - mean) @ comps


RANDOM_CONV_GRID = 4  # pooled map is 4x4, so a width w takes w // 16 filters (28x28 images: 7x7 pooling)


def random_conv_filters(width: int) -> int:
    """Filters of the random-conv control whose pooled features have ``width`` dimensions (at least one)."""
    return max(1, round(width / RANDOM_CONV_GRID**2))


@torch.no_grad()
def random_conv_features(images: torch.Tensor, width: int, device: torch.device, seed: int = 0,
                         kernel: int = 5, batch_size: int = 4096) -> torch.Tensor:
    """uint8 [N, C, H, W] -> float [N, filters * 16]: an untrained ``kernel`` x ``kernel`` convolution
    (PyTorch's default initialisation from ``seed``; the caller's random stream is untouched) on images
    scaled to [-1, 1], ReLU, and average pooling to a 4x4 grid."""
    gen = torch.Generator().manual_seed(seed)
    fan_in = images.shape[1] * kernel * kernel
    bound = 1.0 / fan_in**0.5  # nn.Conv2d's default (kaiming_uniform with a = sqrt(5)) gives U(-1/sqrt(fan_in), ..)
    filters = random_conv_filters(width)
    weight = ((torch.rand(filters, images.shape[1], kernel, kernel, generator=gen) * 2 - 1) * bound).to(device)
    bias = ((torch.rand(filters, generator=gen) * 2 - 1) * bound).to(device)
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = images[i:i + batch_size].to(device).float() / 127.5 - 1.0
        h = torch.relu(torch.nn.functional.conv2d(x, weight, bias, padding=kernel // 2))
        out.append(torch.nn.functional.adaptive_avg_pool2d(h, RANDOM_CONV_GRID).flatten(1))
    return torch.cat(out)


def untrained_like(model, seed: int = 0):
    """A freshly initialised model of the same config (same architecture, no training), in eval mode."""
    from .models import SemanticDiffusion

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        fresh = SemanticDiffusion(model.cfg)
    finally:
        torch.random.set_rng_state(state)
    return fresh.to(model.device).eval()


@torch.no_grad()
def ddae_features(model, images: torch.Tensor, t: float, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """Every denoiser block's output tokens, mean-pooled, for x_t of the images at time t with the null
    embedding (one forward per batch; fixed-seed noise, so features are repeatable). A list per block of
    float32 [N, hidden]."""
    den = model.denoiser
    pooled: list[list[torch.Tensor]] = [[] for _ in den.blocks]
    hooks = [blk.register_forward_hook(lambda _m, _i, out, k=k: pooled[k].append(out.mean(dim=1).float()))
             for k, blk in enumerate(den.blocks)]
    gen = torch.Generator(model.device).manual_seed(seed)
    try:
        x = model._prepare(images)
        tt = model._times(t, x.shape[0])
        for i in range(0, x.shape[0], batch_size):
            x0, tb = x[i:i + batch_size], tt[i:i + batch_size]
            eps = torch.randn(x0.shape, device=model.device, generator=gen)
            den(model.schedule.add_noise(x0, tb, eps), tb, None)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(parts) for parts in pooled]


def label_subsets(labels: torch.Tensor, sizes: tuple[int, ...] = (100, 1000), seed: int = 0
                  ) -> dict[int, torch.Tensor]:
    """Fixed class-balanced train subsets of each total size (size // classes per class), by seed."""
    classes = int(labels.max()) + 1
    return {n: class_balanced_subset(labels, max(1, n // classes), seed) for n in sizes
            if n // classes <= int(torch.bincount(labels.long()).min())}


def project_2d(features: torch.Tensor) -> torch.Tensor:
    """The first two principal components of standardised features, [N, 2] (for a scatter plot)."""
    x = features.float()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    _, comps = pca_projection(x, 2)
    return x @ comps
