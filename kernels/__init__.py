"""Triton kernels and their launchers, installed as ``fastsemdiff.kernels``.

No autograd lives here: ``fastsemdiff.ops`` wraps each launcher as a custom op.
"""
