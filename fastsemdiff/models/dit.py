"""The denoiser: a DiT with adaLN-Zero blocks, conditioned on t and on the encoder's embedding z."""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch
from torch import nn

from ..nn import (BlockStack, DiTBlock, FinalLayer, PatchEmbed, TimestepEmbedder, convert_adaln_state_dict,
                  fixed_pos_embed)


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

    The state-dict keys are facebookresearch/DiT's (``x_embedder.proj``, ``pos_embed``, ``t_embedder.mlp``,
    ``blocks.N``, ``final_layer``), with ``z_embedder``/``null_z`` where DiT has ``y_embedder``; a DiT
    checkpoint's matching parts load with ``load_dit_state_dict``. ``pos_layout`` picks the sin-cos table
    (``"dit"``, or ``"rows_first"`` for models saved before the layout was recorded).
    """

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int, depth: int,
                 num_heads: int, mlp_ratio: float = 4.0, z_dim: Optional[int] = None, cond_merge: str = "add",
                 qk_norm: bool = False, backend: str = "auto", adaln: str = "stacked", rms_norm: bool = False,
                 fused_check: str = "warn", pos_layout: str = "dit", mask_token: bool = False):
        super().__init__()
        self.in_channels, self.patch_size, self.z_dim, self.cond_merge = in_channels, patch_size, z_dim, cond_merge
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        self.pos_embed = fixed_pos_embed(hidden_size, self.x_embedder.grid, pos_layout)
        self.t_embedder = TimestepEmbedder(hidden_size, backend=backend, fused_check=fused_check)
        if z_dim:
            self.z_embedder = nn.Linear(z_dim, hidden_size)
            self.null_z = nn.Parameter(torch.randn(z_dim) / z_dim**0.5)
            if cond_merge == "concat":
                self.cond_proj = nn.Linear(2 * hidden_size, hidden_size)
        if mask_token:  # what a hidden input token reads as (model.token_mask), MAE's initialisation
            self.mask_token = nn.Parameter(torch.randn(hidden_size) * 0.02)
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
                drop: Optional[torch.Tensor] = None, return_block: Optional[int] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Returns the prediction [B, C, H, W], or with ``return_block=k`` the tokens after block k
        (DDAE-style features). ``mask`` [B, N] bool: input tokens replaced by the learned mask token (their
        positions are kept), for a model built with ``mask_token=True``."""
        if return_block is not None and not 0 <= return_block < len(self.blocks):
            raise ValueError(f"return_block={return_block} is out of range; "
                             f"the DiT has blocks 0..{len(self.blocks) - 1}")
        c = self.condition(t, z, drop)
        h = self.x_embedder(x)
        if mask is not None:
            if not hasattr(self, "mask_token"):
                raise ValueError("a token mask needs a DiT built with mask_token=True (model.token_mask > 0)")
            h = torch.where(mask[..., None], self.mask_token.to(h.dtype), h)
        h = h + self.pos_embed.to(x.dtype)
        for i, (block, mod) in enumerate(zip(self.blocks, self.block_modulations(c))):
            h = block(h, c, mod)
            if i == return_block:
                return h
        return unpatchify(self.final_layer(h, c), self.patch_size, self.in_channels)


# The parts of a facebookresearch/DiT state dict that mean the same in this denoiser. DiT's class embedding
# (``y_embedder``) has no counterpart: z enters through ``z_embedder`` instead.
DIT_PARTS = ("x_embedder.", "pos_embed", "t_embedder.", "blocks.", "final_layer.")


def _dit_shape(sd: Mapping[str, torch.Tensor]) -> str:
    """A DiT state dict's size in config terms, for error messages."""
    parts = []
    w = sd.get("x_embedder.proj.weight")
    if w is not None and w.dim() == 4:
        parts.append(f"hidden size {w.shape[0]}, {w.shape[1]} input channels, patch {w.shape[2]}")
    if "pos_embed" in sd:
        parts.append(f"{sd['pos_embed'].shape[-2]} tokens")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if blocks:
        parts.append(f"depth {max(blocks) + 1}")
    return ", ".join(parts) or "unknown size"


def _drop_sigma(t: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """final_layer.linear rows are ordered (p, q, c) over 2C channels with learn_sigma: keep c < C (the
    mean prediction), dropping the variance channels."""
    return t.reshape(patch, patch, 2 * channels, *t.shape[1:])[:, :, :channels].reshape(-1, *t.shape[1:])


def load_dit_state_dict(model: DiT, state_dict: Mapping[str, torch.Tensor], drop_sigma: bool = False
                        ) -> list[str]:
    """Copy a facebookresearch/DiT state dict's ``x_embedder``, ``pos_embed``, ``t_embedder``, ``blocks``
    and ``final_layer`` into ``model`` (either adaLN layout); z's parts (``z_embedder``, ``null_z``) are left
    as they are. Returns the checkpoint keys that were not used (``y_embedder.*``).

    DiT's t is the integer step 0..999; this model's t is that step / 1000 (it scales by 1000 itself).
    A DiT trained with ``learn_sigma`` predicts 2C channels; ``drop_sigma=True`` keeps the first C (its
    mean / eps output). Any shape that differs raises ValueError naming the keys and both sizes.
    """
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    taken = {k: v for k, v in sd.items() if k.startswith(DIT_PARTS)}
    unused = sorted(set(sd) - set(taken))
    if not taken:
        raise ValueError("no facebookresearch/DiT keys (x_embedder.*, pos_embed, t_embedder.*, blocks.*, "
                         "final_layer.*) in this state dict: is it a DiT checkpoint? (an EMA checkpoint's "
                         "weights may sit under a key such as 'ema')")
    own = model.state_dict()
    out_key = "final_layer.linear."
    rows = own[out_key + "weight"].shape[0]
    if drop_sigma:
        for kind in ("weight", "bias"):
            k = out_key + kind
            if k in taken and taken[k].shape[0] == 2 * rows:
                taken[k] = _drop_sigma(taken[k], model.patch_size, model.in_channels)
    elif taken.get(out_key + "weight") is not None and taken[out_key + "weight"].shape[0] == 2 * rows:
        raise ValueError(f"this DiT predicts {2 * model.in_channels} channels (learn_sigma: mean and variance), "
                         f"the denoiser {model.in_channels}; pass drop_sigma=True to keep the mean channels")
    taken = convert_adaln_state_dict(taken, "", len(model.blocks),
                                     "stacked" if model.adaLN_stack is not None else "per_block")
    wanted = {k for k in own if k.startswith((*DIT_PARTS, "adaLN_stack."))}
    missing, extra = sorted(wanted - set(taken)), sorted(set(taken) - wanted)
    shapes = sorted(k for k in wanted & set(taken) if own[k].shape != taken[k].shape)
    if missing or extra or shapes:
        detail = "; ".join(
            f"{name}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for name, keys in (("missing in the checkpoint", missing), ("not in the denoiser", extra),
                               ("shape differs", [f"{k} {list(taken[k].shape)} vs {list(own[k].shape)}"
                                                  for k in shapes])) if keys)
        raise ValueError(f"the DiT checkpoint ({_dit_shape(sd)}) does not fit this denoiser "
                         f"({_dit_shape(own)}): {detail}; build the denoiser with the checkpoint's sizes")
    if not torch.allclose(taken["pos_embed"].float(), own["pos_embed"].float(), atol=1e-5, rtol=0):
        raise ValueError("the checkpoint's pos_embed is not this denoiser's sin-cos table: DiT's table puts the "
                         "column in the first half of the channels; build the denoiser with pos_layout='dit'")
    with torch.no_grad():
        for k, v in taken.items():
            own[k].copy_(v)
    return unused

