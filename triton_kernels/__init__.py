"""Triton kernels: linear_loss.py (the fused LM-head loss: kernels, launchers, autograd.Function), gemm.py (how its
three GEMMs run on each device), reference.py (plain-torch references).

Import kernel modules lazily (after TRITON_INTERPRET is decided): `from ceiling_kernels.linear_loss import ...`.
"""
