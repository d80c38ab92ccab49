import os

# The Triton interpreter is chosen when triton.jit decorates a kernel, i.e. when a kernel module is imported.
# Set it here, before any test module can import triton, so CPU runs exercise the Triton kernels
# (tests/test_linear_loss.py). An explicit TRITON_INTERPRET in the environment wins.
os.environ.setdefault("TRITON_INTERPRET", "1")
