"""Schedules, prediction targets and samplers against hand-written formulas and exact oracles."""
from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from torch.testing import assert_close

from fastsemdiff.diffusion import (
    PREDICTIONS,
    SCHEDULES,
    ddim_sample,
    get_schedule,
    ode_sample,
    sample,
    target,
    to_x0_eps,
)

from helpers import gen

NAMES = ["vp-cosine", "vp-linear", "ve", "flow"]


def alpha_sigma_by_hand(name: str, t: float) -> tuple[float, float]:
    """The published definitions, evaluated in 40-digit arithmetic (mpmath) and rounded to float64."""
    with mpmath.workdps(40):
        t = mpmath.mpf(t)
        if name == "vp-cosine":
            s = mpmath.mpf("0.008")
            abar = mpmath.cos(mpmath.pi / 2 * (t + s) / (1 + s)) ** 2 / mpmath.cos(mpmath.pi / 2 * s / (1 + s)) ** 2
            a, sig = mpmath.sqrt(abar), mpmath.sqrt(1 - abar)
        elif name == "vp-linear":  # DDPM betas 1e-4..0.02 over 1000 steps, beta(t) = 0.1 + 19.9 t
            abar = mpmath.exp(-(mpmath.mpf("0.1") * t + mpmath.mpf("9.95") * t * t))
            a, sig = mpmath.sqrt(abar), mpmath.sqrt(1 - abar)
        elif name == "ve":
            a, sig = mpmath.mpf(1), mpmath.mpf("0.01") * mpmath.mpf(5000) ** t
        elif name == "flow":
            a, sig = 1 - t, t
        else:
            raise AssertionError(name)
        return float(a), float(sig)


def test_registry_and_unknown_names():
    assert sorted(SCHEDULES) == sorted(NAMES)
    assert set(PREDICTIONS) == {"eps", "v", "x0", "velocity"}
    with pytest.raises(ValueError, match="vp-cosine"):
        get_schedule("cosine")
    sch = get_schedule("flow")
    t = torch.full((2,), 0.3)
    with pytest.raises(ValueError, match="velocity"):
        target("score", sch, t, torch.randn(2, 3), torch.randn(2, 3))


# ------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("name", NAMES)
def test_alpha_sigma_match_definitions(name):
    sch = get_schedule(name)
    ts = [0.0, 1e-4, 0.01, 0.1, 0.37, 0.5, 0.81, sch.t_max]
    # fp32: relative 2e-6 plus the absolute rounding of cos near pi/2 (sigma(1e-4) ~ 2e-3 still needs 1e-4 rel)
    for dtype, rtol, atol in [(torch.float64, 1e-12, 1e-300), (torch.float32, 2e-6, 2e-7)]:
        tt = torch.tensor(ts, dtype=dtype)
        a, s = sch.alpha_sigma(tt)
        assert a.dtype == dtype and s.dtype == dtype
        for i, t in enumerate(tt.tolist()):  # t as rounded to dtype
            ea, es = alpha_sigma_by_hand(name, t)
            assert math.isclose(a[i].item(), ea, rel_tol=rtol, abs_tol=atol), (name, t, dtype)
            assert math.isclose(s[i].item(), es, rel_tol=rtol, abs_tol=atol), (name, t, dtype)


@pytest.mark.parametrize("name", NAMES)
def test_forward_marginal_statistics(name):
    sch = get_schedule(name)
    n = 200_000
    x0_value = 0.63
    for i, t0 in enumerate([0.05, 0.3, 0.6, 0.9]):
        eps = torch.randn(n, generator=gen(100 + i))
        x_t = sch.add_noise(torch.full((n,), x0_value), torch.full((n,), t0), eps).double()
        ea, es = alpha_sigma_by_hand(name, t0)
        # mean within 5 standard errors, variance within 5 standard errors of a Gaussian's variance
        assert abs(x_t.mean().item() - ea * x0_value) < 5 * es / math.sqrt(n), (name, t0)
        assert abs(x_t.var().item() / es**2 - 1) < 5 * math.sqrt(2 / n), (name, t0)


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_broadcasts_per_sample(name):
    sch = get_schedule(name)
    x0 = torch.rand(4, 2, 3, 3, generator=gen(1)) * 2 - 1
    eps = torch.randn(4, 2, 3, 3, generator=gen(2))
    t = torch.tensor([0.1, 0.4, 0.55, 0.9])
    x_t = sch.add_noise(x0, t, eps)
    for b in range(4):
        ea, es = alpha_sigma_by_hand(name, t[b].item())
        assert_close(x_t[b], ea * x0[b] + es * eps[b], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vp-cosine", "vp-linear"])
def test_vp_preserves_variance(name):
    sch = get_schedule(name)
    t = torch.rand(1000, generator=gen(3), dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-12)
    a, s = sch.alpha_sigma(t.float())
    assert_close(a**2 + s**2, torch.ones_like(a), rtol=0, atol=2e-6)


@pytest.mark.parametrize("name", NAMES)
def test_monotone_and_endpoints(name):
    sch = get_schedule(name)
    t = torch.linspace(0, sch.t_max, 2001, dtype=torch.float64)
    a, s = sch.alpha_sigma(t)
    assert torch.all(a[1:] <= a[:-1])
    assert torch.all(s[1:] > s[:-1])
    if name != "ve":
        assert torch.all(a[1:] < a[:-1])
    a0, s0 = sch.alpha_sigma(torch.zeros(1))
    assert abs(a0.item() - 1) < 1e-6
    assert s0.item() == pytest.approx(0.01 if name == "ve" else 0.0, abs=1e-6)
    assert sch.prior_std() == pytest.approx(alpha_sigma_by_hand(name, sch.t_max)[1], rel=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_sample_t_range(name):
    sch = get_schedule(name)
    t = sch.sample_t(5000, "cpu", gen(4))
    assert t.shape == (5000,)
    assert t.min() >= sch.t_min and t.max() <= sch.t_max
    assert t.max() - t.min() > 0.9 * (sch.t_max - sch.t_min)


@pytest.mark.parametrize("name", NAMES)
def test_derivatives_match_finite_differences(name):
    sch = get_schedule(name)
    t = torch.tensor([0.02, 0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    h = 1e-6
    (ap, sp), (am, sm) = sch.alpha_sigma(t + h), sch.alpha_sigma(t - h)
    da, ds = sch.derivatives(t)
    assert_close(da, (ap - am) / (2 * h), rtol=1e-6, atol=1e-9)
    assert_close(ds, (sp - sm) / (2 * h), rtol=1e-6, atol=1e-9)


def test_vp_linear_matches_ddpm_discrete_alpha_bar():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    alpha_bar = np.cumprod(1 - betas)  # alpha_bar[k - 1]: after k DDPM steps
    sch = get_schedule("vp-linear")
    for step in (10, 100, 300):
        a, _ = sch.alpha_sigma(torch.tensor([step / 1000], dtype=torch.float64))
        rel = abs(a.item() ** 2 / alpha_bar[step - 1] - 1)
        assert rel < 1e-3 * max(1, step / 100), (step, rel)


# ----------------------------------------------------------------------------------------- predictions
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("prediction", ["eps", "v", "x0", "velocity"])
def test_target_matches_definition_and_inverts(name, prediction):
    sch = get_schedule(name)
    B = 6
    x0 = torch.rand(B, 2, 4, 4, generator=gen(5), dtype=torch.float64) * 2 - 1
    eps = torch.randn(B, 2, 4, 4, generator=gen(6), dtype=torch.float64)
    t = 0.03 + 0.94 * torch.rand(B, generator=gen(7), dtype=torch.float64)
    out = target(prediction, sch, t, x0, eps)
    for b in range(B):
        tb = t[b].item()
        a, s = alpha_sigma_by_hand(name, tb)
        if prediction == "eps":
            expected = eps[b]
        elif prediction == "x0":
            expected = x0[b]
        elif prediction == "v":
            expected = a * eps[b] - s * x0[b]
        else:  # velocity = d x_t / dt by a central difference of the definition
            h = 1e-6
            (ap, sp), (am, sm) = alpha_sigma_by_hand(name, tb + h), alpha_sigma_by_hand(name, tb - h)
            expected = (ap - am) / (2 * h) * x0[b] + (sp - sm) / (2 * h) * eps[b]
        assert_close(out[b], expected, rtol=1e-6, atol=1e-7)
    x_t = sch.add_noise(x0, t, eps)
    x0_hat, eps_hat = to_x0_eps(prediction, sch, t, x_t, out)
    assert_close(x0_hat, x0, rtol=1e-9, atol=1e-9)
    assert_close(eps_hat, eps, rtol=1e-9, atol=1e-9)
    # fp32 too, at a looser but still tight tolerance
    x0_hat, eps_hat = to_x0_eps(prediction, sch, t.float(), x_t.float(), out.float())
    assert_close(x0_hat, x0.float(), rtol=1e-4, atol=2e-4)
    assert_close(eps_hat, eps.float(), rtol=1e-4, atol=2e-4)


# -------------------------------------------------------------------------------------------- samplers
class PointOracle:
    """The exact denoiser for a data distribution that is one image x0*; records every call."""

    def __init__(self, schedule, x_star):
        self.schedule, self.x_star, self.calls = schedule, x_star, []

    def __call__(self, x, t):
        a, s = self.schedule.alpha_sigma(t)
        x0 = self.x_star.expand_as(x)
        eps = (x - a.view(-1, 1, 1, 1) * x0) / s.view(-1, 1, 1, 1)
        self.calls.append((t.clone(), x.clone(), eps.clone()))
        return x0, eps


class GaussianOracle:
    """The exact denoiser for x0 ~ N(mu, tau^2) per pixel: x0_hat = E[x0 | x_t]."""

    def __init__(self, schedule, mu, tau):
        self.schedule, self.mu, self.tau = schedule, mu, tau

    def __call__(self, x, t):
        a, s = (v.view(-1, 1, 1, 1).double() for v in self.schedule.alpha_sigma(t.double()))
        x = x.double()
        x0 = self.mu + a * self.tau**2 / (a**2 * self.tau**2 + s**2) * (x - a * self.mu)
        return x0.float(), ((x - a * x0) / s).float()

    def flow_map(self, x_start, t_start, t_end):
        """The exact probability-flow ODE solution: x_t = a mu + r(t) u with u fixed, r = sqrt(a^2 tau^2 + s^2)."""
        a0, s0 = alpha_sigma_by_hand(self.schedule.name, t_start)
        a1, s1 = alpha_sigma_by_hand(self.schedule.name, t_end)
        u = (x_start.double() - a0 * self.mu) / math.sqrt(a0**2 * self.tau**2 + s0**2)
        return a1 * self.mu + math.sqrt(a1**2 * self.tau**2 + s1**2) * u


def _x_star():
    return (torch.rand(1, 3, 8, 8, generator=gen(8)) * 1.6 - 0.8)


@pytest.mark.parametrize("name,steps", [("vp-cosine", 10), ("vp-linear", 7), ("vp-cosine", 1)])
def test_ddim_with_point_oracle_follows_the_path_to_x0(name, steps):
    sch = get_schedule(name)
    x_star = _x_star()
    x = torch.randn(4, 3, 8, 8, generator=gen(9)) * sch.prior_std()
    oracle = PointOracle(sch, x_star)
    out = ddim_sample(oracle, sch, x, steps)
    assert out.shape == x.shape
    assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-5)
    # one call per step, at t_max .. down to the last step before 0
    ts = [c[0][0].item() for c in oracle.calls]
    assert len(ts) == steps
    assert ts == pytest.approx(np.linspace(sch.t_max, 0, steps + 1)[:-1].tolist(), abs=1e-6)
    # deterministic DDIM with the exact denoiser stays on x_t = a x0* + s eps0 for the starting eps0
    eps0 = oracle.calls[0][2]
    for _, _, eps in oracle.calls[1:]:
        assert_close(eps, eps0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,method,steps", [("flow", "heun", 10), ("flow", "euler", 6), ("flow", "heun", 1)])
def test_ode_with_point_oracle_reaches_x0(name, method, steps):
    sch = get_schedule(name)
    x_star = _x_star()
    x = torch.randn(4, 3, 8, 8, generator=gen(10)) * sch.prior_std()
    oracle = PointOracle(sch, x_star)
    out = ode_sample(oracle, sch, x, steps, method=method)
    assert_close(out, x_star.expand_as(out), rtol=0, atol=1e-4)
    expected_calls = 2 * steps - 1 if method == "heun" else steps
    assert len(oracle.calls) == expected_calls
    assert min(c[0].min().item() for c in oracle.calls) > 0  # never evaluated at t = 0
    eps0 = oracle.calls[0][2]
    for _, _, eps in oracle.calls[1:]:
        assert_close(eps, eps0, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name,sampler,steps,order,tol", [
    ("vp-cosine", "ddim", 80, 1, 2e-2), ("vp-linear", "ddim", 80, 1, 4e-2), ("flow", "euler", 80, 1, 1.5e-2),
    ("flow", "heun", 40, 2, 2e-3), ("ve", "heun", 40, 2, 1e-2), ("vp-cosine", "heun", 40, 2, 3e-3),
])
def test_samplers_converge_to_the_probability_flow_of_a_gaussian(name, sampler, steps, order, tol):
    """Non-trivial denoiser: the exact posterior mean of Gaussian data, whose ODE solution is known in
    closed form. The error must be small and shrink at the method's order (DDIM/Euler 1, Heun 2)."""
    sch = get_schedule(name)
    oracle = GaussianOracle(sch, mu=0.1, tau=0.2)
    x = torch.randn(2, 3, 8, 8, generator=gen(11)).clamp(-3, 3) * sch.prior_std()
    expected = oracle.flow_map(x, sch.t_max, 0.0)
    assert (expected - 0.1).abs().max() > 0.3  # far from the data mean, so collapsing there fails

    def err(n):
        out = ddim_sample(oracle, sch, x, n) if sampler == "ddim" else ode_sample(oracle, sch, x, n, method=sampler)
        return (out.double() - expected).abs().max().item()

    coarse, fine = err(steps), err(2 * steps)
    assert fine < tol
    assert 0.75 * 2**order < coarse / fine < 1.3 * 2**order, (coarse, fine)


def test_ode_rejects_unknown_method():
    sch = get_schedule("flow")
    with pytest.raises(ValueError, match="heun"):
        ode_sample(PointOracle(sch, _x_star()), sch, torch.randn(1, 3, 8, 8), 2, method="rk4")


@pytest.mark.parametrize("name", NAMES)
def test_sample_returns_shape_and_uses_the_right_sampler(name):
    sch = get_schedule(name)
    x_star = _x_star()
    oracle = PointOracle(sch, x_star)
    steps = 40 if name == "ve" else 5  # VE's sigma spans 0.01..50: Heun needs small steps
    out = sample(oracle, sch, (3, 3, 8, 8), steps=steps, generator=gen(12))
    assert out.shape == (3, 3, 8, 8) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    # VE ends at sigma_min = 0.01, the others at sigma = 0
    assert_close(out, x_star.expand_as(out), rtol=0, atol=0.06 if name == "ve" else 1e-4)
    assert len(oracle.calls) == (steps if name.startswith("vp") else 2 * steps - 1)
    first_x = oracle.calls[0][1]
    assert first_x.std().item() == pytest.approx(sch.prior_std(), rel=0.15)
    # the generator makes it repeatable
    again = sample(PointOracle(sch, x_star), sch, (3, 3, 8, 8), steps=steps, generator=gen(12))
    assert_close(again, out, rtol=0, atol=0)
