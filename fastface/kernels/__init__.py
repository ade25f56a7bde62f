"""Triton kernels of fastface, one op per file; importable as ``fastface.kernels``.

On a CUDA device they run compiled; on a CPU they run under ``TRITON_INTERPRET=1`` (how CI tests them).
"""
