"""The timestep-dependent encoder E(x, t) -> z: a ViT built from the denoiser's adaLN block."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import BlockStack, DiTBlock, PatchEmbed, TimestepEmbedder, fixed_pos_embed
from ..diffusion import snap_times
from .code_head import TimeLogVariance, code_from_head, head_output
from .dit import init_dit_weights


class TimeEncoder(BlockStack, nn.Module):
    """Patch tokens pass adaLN blocks conditioned on t only, are mean-pooled, LayerNorm-ed and mapped to d.

    ``time_conditioned=False`` replaces the timestep embedding by one learned vector (a static,
    diffae-style code); ``t_bins`` the times its t is snapped to (none: continuous t). With ``open_gates`` the
    residual gates start at 1 rather than adaLN-Zero's 0: mean pooling of identity blocks would only see the average patch, so a closed-gate encoder starts blind. With ``variational`` the head emits mean and log-variance (VDRL's KL form).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, out_dim: int, mlp_ratio: float = 4.0, time_conditioned: bool = True,
                 normalize: bool = True, variational: bool = False, qk_norm: bool = False, open_gates: bool = True,
                 backend: str = "auto", adaln: str = "stacked", rms_norm: bool = False, fused_check: str = "warn",
                 pos_layout: str = "dit", t_bins: tuple = (), kl_variance: str = "input"):
        super().__init__()
        self.out_dim, self.time_conditioned = out_dim, time_conditioned
        self.t_bins = tuple(float(b) for b in t_bins)
        self.normalize, self.variational = normalize, variational
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.pos_embed = fixed_pos_embed(hidden_size, self.x_embedder.grid, pos_layout)
        if time_conditioned:
            self.t_embedder = TimestepEmbedder(hidden_size, backend=backend, fused_check=fused_check)
        else:
            self.static_cond = nn.Parameter(torch.zeros(hidden_size))
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, backend=backend,
                           modulation=adaln == "per_block", rms_norm=rms_norm, fused_check=fused_check)
                  for _ in range(depth)]
        self._init_blocks(blocks, hidden_size, adaln)
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        per_image = variational and kl_variance == "input"
        self.head = nn.Linear(hidden_size, out_dim * (2 if per_image else 1))
        init_dit_weights(self)
        self.logvar = TimeLogVariance(hidden_size, out_dim) if variational and not per_image else None
        self.zero_adaln_()
        if open_gates:  # start as a plain pre-LN ViT (gates 1, no modulation); t-modulation is learned
            self.open_gates_()
        if not time_conditioned:
            nn.init.normal_(self.static_cond, std=0.02)

    def _cond(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.time_conditioned:
            return self.t_embedder(snap_times(t, self.t_bins))
        return self.static_cond.to(x.dtype).expand(x.shape[0], -1)

    def depends_on_t(self) -> bool:
        """Whether z can change with t: t reaches the blocks only through the adaLN weights."""
        return self.time_conditioned and any(bool(p.detach().ne(0).any()) for n, p in self.named_parameters()
                                             if "adaLN" in n and n.endswith("weight"))

    def features(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Pooled, normalised tokens [B, hidden] before the head."""
        return self._features(x, self._cond(x, t))

    def _features(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for block, mod in zip(self.blocks, self.block_modulations(c)):
            h = block(h, c, mod)
        pooled, n = h.mean(dim=1), self.norm
        # the weights meet the pooled tokens' dtype: under FSDP2's bf16 policy they arrive in bf16 while the
        # pooled residual stream is fp32 (CPU layer_norm refuses the mix); autocast alone keeps them fp32
        return F.layer_norm(pooled, n.normalized_shape, n.weight.to(pooled.dtype), n.bias.to(pooled.dtype), n.eps)

    def forward(self, x: torch.Tensor, t: torch.Tensor, generator: Optional[torch.Generator] = None,
                sample: Optional[bool] = None, noise: Optional[torch.Tensor] = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Returns z [B, d] and the statistics the regulariser needs (``mu``/``logvar`` when variational).

        A variational encoder samples z = mu + std * n when ``sample`` (default: in training mode), else
        returns mu; n is ``noise`` [B, d] when given (drawn outside, so the step traces without a
        generator), else drawn from ``generator``.
        """
        sample = self.training if sample is None else sample
        c = self._cond(x, t)
        out = head_output(self.head, self.logvar, self._features(x, c), c)
        return code_from_head(out, self.variational, self.normalize, sample, generator, noise)
