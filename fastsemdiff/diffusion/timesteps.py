"""How training draws t, and how the loss weighs each t: levers on what the encoder must carry.

The encoder is only needed where the denoiser cannot guess x0 from x_t alone, i.e. at high noise; at low
noise the denoiser copies x_t and z is free to carry stroke detail. Drawing more high-noise t (a logit-normal
centred high, or a shift toward t = 1) or down-weighting the low-noise terms (min-SNR) moves the gradient
that reaches z toward the class-level content (l-DAE, Chen et al. 2024; DRL, Mittal et al.).
"""
from __future__ import annotations

from typing import Optional

import torch

from .schedules import Schedule

T_SAMPLINGS = ("uniform", "logit_normal")
LOSS_WEIGHTS = ("none", "min_snr")


def shift_toward_noise(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's time shift, u -> s u / (1 + (s - 1) u): monotone on [0, 1], ends fixed; s > 1 moves mass toward
    1 (noise), s < 1 toward 0, s = 1 is the identity."""
    return u if shift == 1.0 else shift * u / (1 + (shift - 1) * u)


def train_times(schedule: Schedule, n: int, device, generator: Optional[torch.Generator] = None,
                sampling: str = "uniform", mean: float = 0.0, std: float = 1.0, shift: float = 1.0) -> torch.Tensor:
    """[n] training times in the schedule's [t_min, t_max]: u uniform, or sigmoid(mean + std * N(0, 1))
    (logit-normal, SD3), then shifted by ``shift_toward_noise``, then mapped onto the schedule's range."""
    if sampling == "uniform":
        u = torch.rand(n, device=device, generator=generator)
    elif sampling == "logit_normal":
        u = torch.sigmoid(mean + std * torch.randn(n, device=device, generator=generator))
    else:
        raise ValueError(f"unknown t sampling {sampling!r}; choose one of {T_SAMPLINGS}")
    u = shift_toward_noise(u, shift)
    return schedule.t_min + (schedule.t_max - schedule.t_min) * u


def snap_times(t: torch.Tensor, bins) -> torch.Tensor:
    """Each t replaced by the nearest of ``bins`` (the first on a tie); no bins: t unchanged. The encoder's
    t-input snapped this way (encoder.t_bins) makes it a few codes, each trained on the whole range of t it
    serves, rather than a continuum whose readout points are trained only by the draws near them."""
    if not bins:
        return t
    b = torch.tensor(list(bins), device=t.device, dtype=t.dtype)
    return b[(t[..., None] - b).abs().argmin(-1)]


def snr(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    """alpha^2 / sigma^2 (sigma clamped away from 0 so t = 0 gives a large finite number)."""
    a, s = schedule.alpha_sigma(t)
    return a.float().pow(2) / s.float().pow(2).clamp_min(1e-12)


def loss_weights(kind: str, schedule: Schedule, t: torch.Tensor, prediction: str, gamma: float = 5.0
                 ) -> Optional[torch.Tensor]:
    """Per-sample weights [B] of the denoising MSE, or None for the plain mean. ``min_snr`` (Hang et al. 2023)
    is the weight min(SNR, gamma) on the x0-error, written for the network's target: divided by SNR for eps,
    by SNR + 1 for v, as is for x0. It caps the low-noise terms, so high noise weighs relatively more."""
    if kind == "none":
        return None
    if kind != "min_snr":
        raise ValueError(f"unknown loss weighting {kind!r}; choose one of {LOSS_WEIGHTS}")
    r = snr(schedule, t)
    capped = r.clamp(max=gamma)
    if prediction == "eps":
        return capped / r
    if prediction == "v":
        return capped / (r + 1)
    if prediction == "x0":
        return capped
    raise ValueError(f"diffusion.loss_weight=min_snr is defined for eps, v and x0 predictions, not {prediction!r}")
