"""Triton kernels of kobattr, installed as ``kobattr.kernels``. Each module holds its
``@triton.jit`` kernels and their launcher, nothing else."""
