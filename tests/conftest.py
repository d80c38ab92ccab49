import os

# The Triton interpreter is chosen when triton.jit decorates a kernel, i.e. when a kernel module is imported.
# Set it here, before any test module can import triton, so CPU runs exercise the Triton kernels
# (tests/test_linear_loss.py). An explicit TRITON_INTERPRET in the environment wins.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def trainer_env(monkeypatch):
    """For end-to-end trainer tests: the CPU torch loss path, as users get it (the interpreter set above is for
    the kernel tests), and a torn-down process group afterwards so the next run starts a fresh one."""
    from engine.distributed import destroy_distributed

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    yield
    destroy_distributed()
