"""Triton kernels, each file with its kernels, launcher, autograd.Function; plain-torch references in reference.py.

Import kernel modules lazily (after TRITON_INTERPRET is decided): `from triton_kernels.linear_loss import ...`.
"""
