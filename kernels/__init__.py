"""Triton kernels of mtlface_fast, one file per fused op. Installed as ``mtlface_fast.kernels``.

Importing this package does not import triton; each op module does, when it is first used.
"""
