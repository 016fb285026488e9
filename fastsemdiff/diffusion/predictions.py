"""What the denoiser predicts, and the conversion of any prediction back to (x0, eps).

With x_t = a x0 + s eps, each prediction is a linear map of (x0, eps), so one 2x2 solve recovers
both from x_t and the network output, for every schedule:
- eps: eps;   x0: x0;   v: a eps - s x0 (Salimans & Ho);   velocity: a' x0 + s' eps (dx_t/dt).
"""
from __future__ import annotations

import torch

from .schedules import Schedule, _bc

PREDICTIONS = ("eps", "v", "x0", "velocity")


def _coeffs(prediction: str, schedule: Schedule, t: torch.Tensor):
    """(p, q) with target = p * x0 + q * eps."""
    a, s = schedule.alpha_sigma(t)
    if prediction == "eps":
        return torch.zeros_like(a), torch.ones_like(a)
    if prediction == "x0":
        return torch.ones_like(a), torch.zeros_like(a)
    if prediction == "v":
        return -s, a
    if prediction == "velocity":
        return schedule.derivatives(t)
    raise ValueError(f"unknown prediction {prediction!r}; choose one of {PREDICTIONS}")


def target(prediction: str, schedule: Schedule, t, x0, eps) -> torch.Tensor:
    p, q = _coeffs(prediction, schedule, t)
    return _bc(p, x0) * x0 + _bc(q, x0) * eps


def to_x0_eps(prediction: str, schedule: Schedule, t, x_t, out) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve [a s; p q] [x0; eps] = [x_t; out] for x0 and eps."""
    a, s = schedule.alpha_sigma(t)
    p, q = _coeffs(prediction, schedule, t)
    det = a * q - s * p
    x0 = (_bc(q / det, x_t) * x_t) - _bc(s / det, x_t) * out
    eps = _bc(a / det, x_t) * out - _bc(p / det, x_t) * x_t
    return x0, eps
