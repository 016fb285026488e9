"""adaLN-Zero DiT block, its modulation and the final layer (facebookresearch/DiT state-dict keys)."""
from __future__ import annotations

import torch
from torch import nn

from .attention import Attention, Mlp
from .backend import check_backend
from .norm import GatedResidual, GatedResidualModulatedNorm, ModulatedLayerNorm


class AdaLNModulation(nn.Sequential):
    """SiLU(c) @ W + b split into ``chunks`` vectors of width ``dim``.

    A Sequential(SiLU, Linear) so its keys are DiT's ``adaLN_modulation.1.weight/bias``.
    """

    def __init__(self, dim: int, chunks: int, cond_dim: int | None = None, backend: str = "auto"):
        super().__init__(nn.SiLU(), nn.Linear(cond_dim or dim, chunks * dim))
        self.chunks = chunks
        self.backend = check_backend(backend)

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(c).chunk(self.chunks, dim=-1)

    def zero_(self) -> "AdaLNModulation":
        """adaLN-Zero: the block starts as the identity."""
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)
        return self


class DiTBlock(nn.Module):
    """x + gate_msa * Attn(modulated LN(x)), then + gate_mlp * MLP(modulated LN(.)), all modulation from c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 backend: str = "auto"):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, backend=backend)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = GatedResidualModulatedNorm(hidden_size, backend=backend)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.residual = GatedResidual(backend=backend)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6, backend=backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c)
        h = self.attn(self.norm1(x, shift_msa, scale_msa))
        x, y = self.norm2(x, h, gate_msa, shift_mlp, scale_mlp)
        return self.residual(x, self.mlp(y), gate_mlp)


class FinalLayer(nn.Module):
    """Modulated LN then a linear map from tokens to patches of ``out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, backend: str = "auto"):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, backend=backend)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 2, backend=backend)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)
        return self.linear(self.norm_final(x, shift, scale))
