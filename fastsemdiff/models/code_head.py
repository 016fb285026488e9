"""What both encoders do with their head's output: sample a variational code, optionally L2-normalise it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


class TimeLogVariance(nn.Module):
    """The log-variance of a variational code as a function of the encoder's conditioning vector alone (t, or a
    static encoder's learned vector): one value per dimension and t, the same for every image (``encoder.kl_variance=
    time``). Why: in the main job's per-image head, 82-98 % of the log-variance's spread at a given t is between
    dimensions, and that head's second half (0.8M parameters on the 6,272 features) costs 5-8 % of the compiled
    CPU step; the probes read a little lower without it, so the recipe keeps the per-image head (docs/ABLATIONS.md,
    "The bottleneck's variance per t"). Starts at log-variance 0."""

    def __init__(self, cond_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, out_dim)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.proj(F.silu(c))


def head_output(head: nn.Linear, logvar: Optional[TimeLogVariance], features: torch.Tensor,
                c: torch.Tensor) -> torch.Tensor:
    """The head's output as ``code_from_head`` reads it: the head alone, or its mean beside the t-only log-variance."""
    out = head(features)
    return out if logvar is None else torch.cat([out, logvar(c).to(out.dtype)], dim=-1)


def kl_to_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) in nats, summed over the code's dimensions and averaged over the batch."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1).mean()


def code_from_head(out: torch.Tensor, variational: bool, normalize: bool, sample: bool,
                   generator: Optional[torch.Generator] = None,
                   noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(z, stats): a variational head's output is (mu, logvar), sampled as mu + std * n when ``sample`` and
    mu otherwise (n is ``noise`` when given, drawn outside so the step traces without a generator,
    else drawn from ``generator``), with the statistics the KL regulariser needs; ``normalize`` puts z on the unit sphere."""
    stats: dict[str, torch.Tensor] = {}
    if variational:
        mu, logvar = out.float().chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)
        stats = {"mu": mu, "logvar": logvar}
        if sample:
            if noise is None:
                noise = torch.randn(mu.shape, device=mu.device, dtype=mu.dtype, generator=generator)
            out = mu + (0.5 * logvar).exp() * noise
        else:
            out = mu
    if normalize:
        out = F.normalize(out.float(), dim=-1)
    return out, stats
