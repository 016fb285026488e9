"""What both encoders do with their head's output: sample a variational code, optionally L2-normalise it."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


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
