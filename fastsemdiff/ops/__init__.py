"""Fused ops as ``torch.library`` custom ops with their autograd, so ``torch.compile`` traces through them.

Importing this package registers the ops but does not import Triton: the kernels
(``fastsemdiff.kernels``) are imported on the first call, so ``TRITON_INTERPRET`` may still be set
after ``fastsemdiff`` has been imported.
"""
from .modulated_norm import gated_residual_modulated_norm, modulated_layer_norm
from .timestep_embedding import timestep_embedding

__all__ = ["gated_residual_modulated_norm", "modulated_layer_norm", "timestep_embedding"]
