"""Deterministic samplers over a ``denoise(x_t, t) -> (x0_hat, eps_hat)`` function.

DDIM (eta = 0) jumps x_t -> a' x0_hat + s' eps_hat and is exact for any (a, s) path; it is the default
for VP. Euler and Heun integrate dx/dt = a'(t) x0_hat + s'(t) eps_hat, the probability-flow ODE of the
same path, for flow and VE.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedules import Schedule, _bc

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def time_grid(schedule: Schedule, steps: int, device) -> torch.Tensor:
    """steps + 1 times from t_max down to 0."""
    ts = torch.linspace(schedule.t_max, 0.0, steps + 1, device=device, dtype=torch.float64)
    return ts.float()


def _full(t: torch.Tensor, n: int) -> torch.Tensor:
    return t.expand(n)


@torch.no_grad()
def ddim_sample(denoise: Denoise, schedule: Schedule, x: torch.Tensor, steps: int, clip_x0: bool = True):
    ts = time_grid(schedule, steps, x.device)
    n = x.shape[0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        x0, eps = denoise(x, _full(t, n))
        if clip_x0:
            x0 = x0.clamp(-1, 1)
        a, s = schedule.alpha_sigma(_full(t_next, n))
        x = _bc(a, x) * x0 + _bc(s, x) * eps
    return x


def _velocity(denoise: Denoise, schedule: Schedule, x, t):
    x0, eps = denoise(x, t)
    da, ds = schedule.derivatives(t)
    return _bc(da, x) * x0 + _bc(ds, x) * eps, x0


@torch.no_grad()
def ode_sample(denoise: Denoise, schedule: Schedule, x: torch.Tensor, steps: int, method: str = "heun"):
    """Euler or Heun (2nd order, Euler on the last step) from t_max to 0; returns x at t = 0 (for VE that
    still holds sigma(0) = 0.01 of noise)."""
    if method not in ("euler", "heun"):
        raise ValueError(f"unknown ODE method {method!r}; choose euler or heun")
    ts = time_grid(schedule, steps, x.device)
    n = x.shape[0]
    x0 = x
    for i, (t, t_next) in enumerate(zip(ts[:-1], ts[1:])):
        dt = float(t_next - t)
        v, x0 = _velocity(denoise, schedule, x, _full(t, n))
        x_euler = x + dt * v
        if method == "heun" and i < steps - 1:
            v2, _ = _velocity(denoise, schedule, x_euler, _full(t_next, n))
            x = x + dt * 0.5 * (v + v2)
        else:
            x = x_euler
    return x


def sample(denoise: Denoise, schedule: Schedule, shape, steps: int = 50, sampler: str = "auto",
           generator: torch.Generator | None = None, device="cpu") -> torch.Tensor:
    """Draw from the prior at t_max and integrate to t = 0; ``auto`` is DDIM for VP, Heun otherwise."""
    if sampler == "auto":
        sampler = "ddim" if schedule.name.startswith("vp") else "heun"
    x = torch.randn(shape, generator=generator, device=device) * schedule.prior_std()
    if sampler == "ddim":
        return ddim_sample(denoise, schedule, x, steps)
    return ode_sample(denoise, schedule, x, steps, method=sampler).clamp(-1, 1)
