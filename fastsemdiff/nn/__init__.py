"""Drop-in DiT layers with a ``backend=`` switch; the torch path defines each layer's meaning.

Which backend runs a call is decided in ``fastsemdiff.ops.dispatch`` (re-exported here: ``BACKENDS``,
``resolve_backend``).
"""
from ..ops.dispatch import BACKENDS, resolve_backend
from .attention import Attention, Mlp
from .block import AdaLNModulation, BlockStack, DiTBlock, FinalLayer, StackedAdaLNModulation, convert_adaln_state_dict
from .embedding import (POS_LAYOUTS, PatchEmbed, TimestepEmbedder, fixed_pos_embed, sincos_pos_embed_2d,
                        timestep_embedding)
from .norm import (
    GatedResidual,
    GatedResidualModulatedNorm,
    ModulatedLayerNorm,
    gated_residual_modulated_norm_ref,
    gated_residual_ref,
    modulate,
    modulated_layer_norm_ref,
)

__all__ = [
    "BACKENDS", "resolve_backend", "Attention", "Mlp", "AdaLNModulation", "BlockStack", "DiTBlock", "FinalLayer",
    "StackedAdaLNModulation", "convert_adaln_state_dict",
    "POS_LAYOUTS", "PatchEmbed", "TimestepEmbedder", "fixed_pos_embed", "sincos_pos_embed_2d", "timestep_embedding",
    "GatedResidual",
    "GatedResidualModulatedNorm", "ModulatedLayerNorm", "gated_residual_modulated_norm_ref",
    "gated_residual_ref", "modulate", "modulated_layer_norm_ref",
]
