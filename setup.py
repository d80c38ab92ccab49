"""Builds the C++ extension `engine._packing` (csrc/, pybind11). Everything else is in pyproject.toml.

The extension is optional at run time: `engine.data.packing` falls back to an identical pure-Python
implementation when it is absent (and says so once in the log). A failed compile therefore does not
fail the install; it prints a warning instead.
"""

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # no compiler: the pure-Python fallback is used
            print(f"WARNING: building the C++ packer failed ({exc}); the pure-Python fallback will be used")


setup(
    # The repository keeps the kernels in triton_kernels/ (the design card's layout); they install under the
    # import name `ceiling_kernels` so that vLLM's `import triton_kernels` never picks up ours.
    packages=find_packages(include=["engine", "engine.*"]) + ["ceiling_kernels"],
    package_dir={"ceiling_kernels": "triton_kernels"},
    ext_modules=[
        Pybind11Extension("engine._packing", ["csrc/packing.cpp"], cxx_std=17, extra_compile_args=["-O3"]),
    ],
    cmdclass={"build_ext": OptionalBuildExt},
)
