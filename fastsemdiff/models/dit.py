"""The denoiser: a DiT with adaLN-Zero blocks, conditioned on t and on the encoder's embedding z."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..nn import BlockStack, DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedder


def init_dit_weights(module: nn.Module) -> None:
    """DiT's initialisation: Xavier linears, zero biases; callers zero the adaLN outputs afterwards."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    for m in module.modules():
        if isinstance(m, PatchEmbed):
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))
            nn.init.zeros_(m.proj.bias)
        if isinstance(m, TimestepEmbedder):
            nn.init.normal_(m.mlp[0].weight, std=0.02)
            nn.init.normal_(m.mlp[2].weight, std=0.02)


def unpatchify(x: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W]; the inverse of PatchEmbed's patch order."""
    B, N, _ = x.shape
    g = int(N**0.5)
    if g * g != N:
        raise ValueError(f"token count {N} is not a square grid")
    x = x.reshape(B, g, g, patch, patch, channels)
    return torch.einsum("bhwpqc->bchpwq", x).reshape(B, channels, g * patch, g * patch)


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C] in the order unpatchify expects."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch)
    return torch.einsum("bchpwq->bhwpqc", x).reshape(B, (H // patch) * (W // patch), patch * patch * C)


class DiT(BlockStack, nn.Module):
    """D(x_t, t, z): predicts the diffusion target from the noisy image, the time and an embedding.

    Conditioning c = TimestepEmbedder(t) + Linear(z) (``cond_merge="add"``) or
    Linear([TimestepEmbedder(t), Linear(z)]) (``"concat"``). Rows of z flagged in ``drop`` are replaced
    by a learned null vector, so the same network also denoises without an embedding. With
    ``adaln="stacked"`` (default) the blocks' adaLN weights form one matrix (``adaLN_stack``) applied once
    per step; ``"per_block"`` keeps DiT's per-block layout (either loads into either).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, z_dim: Optional[int] = None, cond_merge: str = "add",
                 qk_norm: bool = False, backend: str = "auto", adaln: str = "stacked", rms_norm: bool = False,
                 fused_check: str = "warn"):
        super().__init__()
        self.in_channels, self.patch_size, self.z_dim, self.cond_merge = in_channels, patch_size, z_dim, cond_merge
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, backend=backend, fused_check=fused_check)
        if z_dim:
            self.z_embedder = nn.Linear(z_dim, hidden_size)
            self.null_z = nn.Parameter(torch.randn(z_dim) / z_dim**0.5)
            if cond_merge == "concat":
                self.cond_proj = nn.Linear(2 * hidden_size, hidden_size)
        blocks = [DiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm=qk_norm, backend=backend,
                           modulation=adaln == "per_block", rms_norm=rms_norm, fused_check=fused_check)
                  for _ in range(depth)]
        self._init_blocks(blocks, hidden_size, adaln)
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels, backend=backend, rms_norm=rms_norm,
                                      fused_check=fused_check)
        init_dit_weights(self)
        self.zero_adaln_()
        self.final_layer.adaLN_modulation.zero_()
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def condition(self, t: torch.Tensor, z: Optional[torch.Tensor], drop: Optional[torch.Tensor]) -> torch.Tensor:
        c = self.t_embedder(t)
        if not self.z_dim:
            return c
        null = self.null_z.to(c.dtype).expand(t.shape[0], -1)
        if z is None:
            z = null
        elif drop is not None:
            z = torch.where(drop[:, None], null, z.to(c.dtype))
        zc = self.z_embedder(z.to(c.dtype))
        return c + zc if self.cond_merge == "add" else self.cond_proj(torch.cat([c, zc], dim=-1))

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: Optional[torch.Tensor] = None,
                drop: Optional[torch.Tensor] = None, return_block: Optional[int] = None) -> torch.Tensor:
        """Returns the prediction [B, C, H, W], or with ``return_block=k`` the tokens after block k
        (DDAE-style features)."""
        if return_block is not None and not 0 <= return_block < len(self.blocks):
            raise ValueError(f"return_block={return_block} is out of range; "
                             f"the DiT has blocks 0..{len(self.blocks) - 1}")
        c = self.condition(t, z, drop)
        h = self.x_embedder(x)
        for i, (block, mod) in enumerate(zip(self.blocks, self.block_modulations(c))):
            h = block(h, c, mod)
            if i == return_block:
                return h
        return unpatchify(self.final_layer(h, c), self.patch_size, self.in_channels)
