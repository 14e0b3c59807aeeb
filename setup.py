"""Builds the C++ CPU kernels (csrc/) as `lrfluct_fast._C`.

Portable flags only (-O3, OpenMP, no -march=native) so a wheel runs on any x86-64 machine.
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
"""
import glob
import sys

from setuptools import setup

try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    sys.exit("lrfluct_fast: install torch first (e.g. `pip install torch==2.13.0`), then "
             "`pip install --no-build-isolation -e .`")

extra = ["-O3", "-fno-trapping-math", "-fopenmp", "-DAT_PARALLEL_OPENMP=1"] if sys.platform != "win32" else ["/O2", "/openmp"]
link = ["-fopenmp"] if sys.platform != "win32" else []

setup(
    ext_modules=[
        CppExtension(
            "lrfluct_fast._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=extra,
            extra_link_args=link,
        )
    ],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
