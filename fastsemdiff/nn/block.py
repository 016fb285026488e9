"""adaLN-Zero DiT block, its modulation and the final layer (facebookresearch/DiT state-dict keys).

A model's blocks can also take their modulation from one ``StackedAdaLNModulation``: every block's adaLN
weights in one matrix, so SiLU(c) meets all of them in one matrix product per step instead of one per
block. ``convert_adaln_state_dict`` moves weights between the two layouts (exactly: it concatenates or
splits), and models convert on load, so checkpoints of either layout load into either.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, Mlp
from .norm import GatedResidual, GatedResidualModulatedNorm, ModulatedLayerNorm


class AdaLNModulation(nn.Sequential):
    """SiLU(c) @ W + b split into ``chunks`` vectors of width ``dim``.

    A Sequential(SiLU, Linear) so its keys are DiT's ``adaLN_modulation.1.weight/bias``.
    """

    def __init__(self, dim: int, chunks: int, cond_dim: int | None = None):
        super().__init__(nn.SiLU(), nn.Linear(cond_dim or dim, chunks * dim))
        self.chunks = chunks

    def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return super().forward(c).chunk(self.chunks, dim=-1)

    def zero_(self) -> "AdaLNModulation":
        """adaLN-Zero: the block starts as the identity."""
        nn.init.zeros_(self[1].weight)
        nn.init.zeros_(self[1].bias)
        return self


class StackedAdaLNModulation(nn.Module):
    """The adaLN modulation of ``num_blocks`` blocks as one linear map: ``SiLU(c) @ W.T + b`` with ``W``
    ``[num_blocks * chunks * dim, cond_dim]``, row block ``i`` being block ``i``'s ``adaLN_modulation.1``.

    ``forward(c)`` returns, per block, its ``chunks`` modulation vectors ``[B, dim]`` (views of one output).
    """

    def __init__(self, num_blocks: int, dim: int, chunks: int, cond_dim: int | None = None):
        super().__init__()
        self.num_blocks, self.dim, self.chunks = num_blocks, dim, chunks
        linear = nn.Linear(cond_dim or dim, num_blocks * chunks * dim)  # nn.Linear's initialisation, per block
        self.weight, self.bias = linear.weight, linear.bias

    def forward(self, c: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        out = F.linear(F.silu(c), self.weight, self.bias).view(c.shape[0], self.num_blocks, self.chunks, self.dim)
        return [tuple(out[:, i].unbind(1)) for i in range(self.num_blocks)]

    def block_bias(self) -> torch.Tensor:
        """The bias as ``[num_blocks, chunks, dim]`` (a view, for initialisations such as open gates)."""
        return self.bias.view(self.num_blocks, self.chunks, self.dim)

    def zero_(self) -> "StackedAdaLNModulation":
        """adaLN-Zero for every block."""
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        return self

    def extra_repr(self) -> str:
        return f"num_blocks={self.num_blocks}, dim={self.dim}, chunks={self.chunks}"


def convert_adaln_state_dict(state_dict: dict, prefix: str, num_blocks: int, to: str) -> dict:
    """Move adaLN weights between per-block keys (``{prefix}blocks.{i}.adaLN_modulation.1.{weight,bias}``,
    facebookresearch/DiT's layout) and one stacked module (``{prefix}adaLN_stack.{weight,bias}``), in place.

    ``to="stacked"`` concatenates the blocks' rows in block order; ``to="per_block"`` splits them. Keys
    already in the target layout are left alone. Returns the state dict.
    """
    if to not in ("stacked", "per_block"):
        raise ValueError(f"to must be 'stacked' or 'per_block', got {to!r}")
    for kind in ("weight", "bias"):
        block_keys = [f"{prefix}blocks.{i}.adaLN_modulation.1.{kind}" for i in range(num_blocks)]
        stack_key = f"{prefix}adaLN_stack.{kind}"
        if to == "stacked" and all(k in state_dict for k in block_keys):
            state_dict[stack_key] = torch.cat([state_dict.pop(k) for k in block_keys])
        elif to == "per_block" and stack_key in state_dict:
            for k, part in zip(block_keys, state_dict.pop(stack_key).chunk(num_blocks)):
                state_dict[k] = part
    return state_dict


class BlockStack(nn.Module):
    """Mixin for models with ``self.blocks`` (DiT blocks) and, with ``adaln="stacked"``, one
    ``self.adaLN_stack`` feeding them; loading converts a state dict of the other layout."""

    blocks: nn.ModuleList
    adaLN_stack: Optional[StackedAdaLNModulation]

    def _init_blocks(self, blocks: Sequence["DiTBlock"], hidden_size: int, adaln: str) -> None:
        if adaln not in ("stacked", "per_block"):
            raise ValueError(f"adaln must be 'stacked' or 'per_block', got {adaln!r}")
        self.blocks = nn.ModuleList(blocks)
        self.adaLN_stack = StackedAdaLNModulation(len(blocks), hidden_size, 6) if adaln == "stacked" else None
        self._register_load_state_dict_pre_hook(self._convert_adaln)

    def _convert_adaln(self, state_dict, prefix, *args, **kwargs):
        convert_adaln_state_dict(state_dict, prefix, len(self.blocks),
                                 "stacked" if self.adaLN_stack is not None else "per_block")

    def block_modulations(self, c: torch.Tensor) -> list[Optional[tuple[torch.Tensor, ...]]]:
        """Every block's six modulation vectors from one product (stacked), or None per block (each block
        computes its own)."""
        if self.adaLN_stack is None:
            return [None] * len(self.blocks)
        return self.adaLN_stack(c)

    def zero_adaln_(self) -> None:
        if self.adaLN_stack is not None:
            self.adaLN_stack.zero_()
        for block in self.blocks:
            if block.adaLN_modulation is not None:
                block.adaLN_modulation.zero_()

    def open_gates_(self) -> None:
        """Residual gates 1 (bias of chunks 2 and 5), so the blocks start as a plain pre-LN transformer."""
        with torch.no_grad():
            for i, block in enumerate(self.blocks):
                bias = (self.adaLN_stack.block_bias()[i] if self.adaLN_stack is not None
                        else block.adaLN_modulation[1].bias.view(6, -1))
                bias[2].fill_(1.0)
                bias[5].fill_(1.0)


class DiTBlock(nn.Module):
    """x + gate_msa * Attn(modulated LN(x)), then + gate_mlp * MLP(modulated LN(.)), all modulation from c.

    With ``modulation=False`` the block owns no adaLN weights and is given its six modulation vectors
    (``mod``) by a ``StackedAdaLNModulation`` of the model. With ``checkpoint_activations`` set, a
    forward under autograd keeps only the block's inputs and recomputes the rest in the backward
    (``torch.utils.checkpoint``, non-reentrant): memory for compute, the same gradients.
    """

    checkpoint_activations: bool = False

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False,
                 backend: str = "auto", modulation: bool = True, rms_norm: bool = False, fused_check: str = "warn"):
        super().__init__()
        self.norm1 = ModulatedLayerNorm(hidden_size, backend=backend, rms=rms_norm, fused_check=fused_check)
        self.attn = Attention(hidden_size, num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = GatedResidualModulatedNorm(hidden_size, backend=backend, rms=rms_norm, fused_check=fused_check)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.residual = GatedResidual()
        self.adaLN_modulation = AdaLNModulation(hidden_size, 6) if modulation else None

    def forward(self, x: torch.Tensor, c: Optional[torch.Tensor] = None,
                mod: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        if self.checkpoint_activations and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(self._forward, x, c, mod, use_reentrant=False)
        return self._forward(x, c, mod)

    def _forward(self, x: torch.Tensor, c: Optional[torch.Tensor],
                 mod: Optional[Sequence[torch.Tensor]]) -> torch.Tensor:
        if mod is None:
            if self.adaLN_modulation is None:
                raise ValueError("this DiTBlock has no adaLN weights of its own (modulation=False): pass mod=")
            mod = self.adaLN_modulation(c)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = self.attn(self.norm1(x, shift_msa, scale_msa))
        x, y = self.norm2(x, h, gate_msa, shift_mlp, scale_mlp)
        return self.residual(x, self.mlp(y), gate_mlp)


class FinalLayer(nn.Module):
    """Modulated LN then a linear map from tokens to patches of ``out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, backend: str = "auto",
                 rms_norm: bool = False, fused_check: str = "warn"):
        super().__init__()
        self.norm_final = ModulatedLayerNorm(hidden_size, backend=backend, rms=rms_norm, fused_check=fused_check)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = AdaLNModulation(hidden_size, 2)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)
        return self.linear(self.norm_final(x, shift, scale))
