"""Triton kernels, each file with its kernels, launcher, autograd.Function; plain-torch references in reference.py.

Import kernel modules lazily (after TRITON_INTERPRET is decided): `from ceiling_kernels.linear_loss import ...`.
"""
