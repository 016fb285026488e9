"""Fused ops as ``torch.library`` custom ops with their autograd, so ``torch.compile`` traces through them.

One op is one unit: its kernels (``kernels/<op>.py`` for Triton, ``csrc/<op>.cu`` for CUDA), one op file
here (the plain-PyTorch reference that defines it, custom op, fake, autograd, the first-use check's case),
its layer in ``fastsemdiff.nn`` (which imports this package, never the reverse), its test and its benchmark:

* modulated norm and gated residual + modulated norm: ``kernels/modulated_layer_norm.py``, ``csrc/adaln.cu``,
  ``modulated_norm.py`` (with ``torch_launchers.py``, its kernels' contract in plain torch),
  the layers in ``nn/norm.py``, ``tests/test_kernel_modulated_layer_norm.py`` and
  ``tests/test_kernel_gated_residual_norm.py``, ``bench/test_bench_adaln.py``;
* timestep embedding: ``kernels/timestep_embedding.py``, ``csrc/timestep_embedding.cu``,
  ``timestep_embedding.py``, ``nn/embedding.py``, ``tests/test_kernel_timestep_embedding.py``,
  ``bench/test_bench_timestep_embedding.py``.

Shared by all: ``dispatch.py`` (the only place that decides which backend runs a call), ``guard.py`` (the
first-use check) and ``_cuda.py`` (loads ``fastsemdiff._C``).

Importing this package registers the ops but does not import Triton: the kernels (``fastsemdiff.kernels``)
are imported on the first call, so ``TRITON_INTERPRET`` may still be set after ``fastsemdiff`` has been
imported.
"""
from .modulated_norm import gated_residual_modulated_norm, modulated_layer_norm
from .timestep_embedding import timestep_embedding

__all__ = ["gated_residual_modulated_norm", "modulated_layer_norm", "timestep_embedding"]
