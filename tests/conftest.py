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


@pytest.fixture(scope="module")
def module_trainer_env():
    """`trainer_env` for a module-scoped fixture that runs a job once for the module's tests (a module fixture is
    set up before the function-scoped `trainer_env` of its first test)."""
    from engine.distributed import destroy_distributed

    patch = pytest.MonkeyPatch()
    patch.delenv("TRITON_INTERPRET", raising=False)
    yield
    patch.undo()
    destroy_distributed()
