"""Noise schedules in continuous time t in [0, 1] (0 = clean, 1 = pure noise), x_t = alpha(t) x0 + sigma(t) eps.

Every schedule exposes alpha, sigma and their time derivatives, which is all the predictions and
samplers need; t keeps one meaning across schedules, so embeddings are compared at the same t.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class Schedule:
    name = "base"
    t_min, t_max = 0.0, 1.0  # the range training draws t from

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def derivatives(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(d alpha / dt, d sigma / dt), the velocity of x_t along the path at fixed x0 and eps."""
        raise NotImplementedError

    def sample_t(self, n: int, device, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = torch.rand(n, device=device, generator=generator)
        return self.t_min + (self.t_max - self.t_min) * u

    def add_noise(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        return _bc(a, x0) * x0 + _bc(s, x0) * eps

    def prior_std(self) -> float:
        """Std of x at t_max, where sampling starts."""
        return float(self.alpha_sigma(torch.tensor([self.t_max]))[1])


def _bc(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


class VPCosine(Schedule):
    """Improved-DDPM cosine schedule: alpha_bar(t) = cos^2(pi/2 (t + s)/(1 + s)) / cos^2(pi/2 s/(1 + s))."""

    name = "vp-cosine"
    s = 0.008
    t_max = 0.9946  # alpha_bar(t_max) ~ 2e-5: keeps the x0 <-> eps conversions finite at the noisy end

    def _f(self, t):
        return torch.cos((t + self.s) / (1 + self.s) * math.pi / 2)

    def alpha_sigma(self, t):
        t = t.float() if not t.is_floating_point() else t
        k = math.pi / (2 * (1 + self.s))
        f0 = math.cos(self.s * k)
        f = self._f(t)
        alpha = (f / f0).clamp(0.0, 1.0)
        # sigma^2 = 1 - alpha^2 = (f0 - f)(f0 + f) / f0^2 with f0 - f = 2 sin((t + 2s) k / 2) sin(t k / 2):
        # no cancellation near t = 0, where 1 - alpha**2 in fp32 loses most digits of sigma.
        diff = 2 * torch.sin((t + 2 * self.s) * (k / 2)) * torch.sin(t * (k / 2))
        sigma = ((diff * (f0 + f)).clamp_min(0.0).sqrt() / f0).clamp(max=1.0)
        return alpha, sigma

    def derivatives(self, t):
        f0 = math.cos(self.s / (1 + self.s) * math.pi / 2)
        k = math.pi / (2 * (1 + self.s))
        da = -k * torch.sin((t + self.s) * k) / f0
        a, s = self.alpha_sigma(t)
        return da, -a * da / s.clamp_min(1e-12)


class VPLinear(Schedule):
    """DDPM's linear betas (1e-4 .. 0.02 over T = 1000) in continuous time: t = step / 1000, so
    log alpha_bar(t) = -(b0 t + (b1 - b0) t^2 / 2) with b0 = 0.1, b1 = 20."""

    name = "vp-linear"
    b0, b1 = 0.1, 20.0
    t_min = 1e-3  # one DDPM step

    def _log_abar(self, t):
        return -(self.b0 * t + 0.5 * (self.b1 - self.b0) * t**2)

    def alpha_sigma(self, t):
        log_abar = self._log_abar(t)
        # 1 - abar as -expm1(log abar): exact near t = 0, where 1 - exp(.) in fp32 cancels
        return torch.exp(0.5 * log_abar), (-torch.expm1(log_abar)).clamp_min(0.0).sqrt()

    def derivatives(self, t):
        a, s = self.alpha_sigma(t)
        dlog = -(self.b0 + (self.b1 - self.b0) * t)  # d log alpha_bar / dt
        da = 0.5 * a * dlog
        return da, -a * da / s.clamp_min(1e-12)


class VE(Schedule):
    """Variance exploding (DRL): alpha = 1, sigma(t) = 0.01 * 5000^t, t ~ U(1e-5, 1)."""

    name = "ve"
    sigma_min, sigma_max = 0.01, 50.0
    t_min = 1e-5

    def alpha_sigma(self, t):
        s = self.sigma_min * (self.sigma_max / self.sigma_min) ** t
        return torch.ones_like(s), s

    def derivatives(self, t):
        _, s = self.alpha_sigma(t)
        return torch.zeros_like(s), s * math.log(self.sigma_max / self.sigma_min)


class Flow(Schedule):
    """Rectified flow: x_t = (1 - t) x0 + t eps."""

    name = "flow"
    t_max = 0.999  # keeps eps and x0 predictions invertible at the noisy end

    def alpha_sigma(self, t):
        return 1 - t, t

    def derivatives(self, t):
        return -torch.ones_like(t), torch.ones_like(t)


SCHEDULES = {cls.name: cls for cls in (VPCosine, VPLinear, VE, Flow)}


def get_schedule(name: str) -> Schedule:
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {sorted(SCHEDULES)}")
    return SCHEDULES[name]()
