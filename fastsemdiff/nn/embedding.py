"""Patch and timestep embeddings (DiT's x_embedder / t_embedder, same state-dict keys)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .. import ops
from ..ops.dispatch import check_backend, resolve_backend
from ..ops.guard import check_mode
from ..ops.timestep_embedding import timestep_embedding_ref as timestep_embedding  # the reference, lives with its op


POS_LAYOUTS = ("dit", "rows_first")


def sincos_pos_embed_2d(dim: int, grid: int, layout: str = "dit") -> torch.Tensor:
    """Fixed 2-D sine-cosine positions, [grid*grid, dim], token ``r * grid + c`` for row r, column c.

    Each half of the channels is a 1-D table ``[sin(p * w_k), cos(p * w_k)]``, ``w_k = 10000^(-k / (dim/4))``.
    ``layout="dit"``: the column's table in the first half, the row's in the second, as facebookresearch/DiT
    (MAE's ``get_2d_sincos_pos_embed``), so DiT weights see the positions they were trained with.
    ``"rows_first"``: the row first, the layout of models saved before ``model.pos_layout`` existed.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos positions need a width divisible by 4, got {dim}")
    if layout not in POS_LAYOUTS:
        raise ValueError(f"position layout {layout!r} is unknown; choose one of {list(POS_LAYOUTS)}")

    def axis(pos: np.ndarray, d: int) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    first, second = (cols, rows) if layout == "dit" else (rows, cols)
    emb = np.concatenate([axis(first, dim // 2), axis(second, dim // 2)], axis=1)
    return torch.from_numpy(emb).float()


def fixed_pos_embed(dim: int, grid: int, layout: str = "dit") -> nn.Parameter:
    """The sin-cos table as DiT holds it: a frozen parameter [1, grid*grid, dim] (a state-dict entry
    ``pos_embed`` of the model, beside ``x_embedder``), added to the patch tokens."""
    return nn.Parameter(sincos_pos_embed_2d(dim, grid, layout)[None], requires_grad=False)


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, (H/p)*(W/p), D] by a strided convolution (DiT's ``x_embedder``, timm's PatchEmbed:
    no positions; the model adds its ``pos_embed``)."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(
                f"image size {img_size} is not divisible by patch size {patch_size}; "
                "choose a patch size that divides the image size"
            )
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid = img_size // patch_size
        self.num_patches = self.grid**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1:] != (self.in_chans, self.img_size, self.img_size):
            raise ValueError(
                f"expected images of shape [B, {self.in_chans}, {self.img_size}, {self.img_size}], "
                f"got {list(x.shape)}"
            )
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> [B, hidden]. Times are scaled by ``time_scale`` (1000, DDPM's step count) before the
    sinusoid, so the frequencies resolve neighbouring steps as in DiT. The sinusoid runs where
    ``fastsemdiff.ops.dispatch`` says: ``auto`` keeps it on torch (on the H200 measured, compiled torch was as
    fast as its CUDA kernel and faster than the Triton one), ``triton`` / ``cuda`` run them."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0,
                 backend: str = "auto", fused_check: str = "warn"):
        super().__init__()
        self.backend, self.fused_check = check_backend(backend), check_mode(fused_check)
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        scaled = t * self.time_scale
        backend = resolve_backend(self.backend, "timestep_embedding", scaled)
        if backend == "torch":
            freq = timestep_embedding(scaled, self.frequency_embedding_size)
        else:
            freq = ops.timestep_embedding(scaled, self.frequency_embedding_size, backend=backend,
                                          check=self.fused_check)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))
