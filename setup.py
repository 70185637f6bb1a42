"""Builds the optional CPU kernels (``resu_tensor.kernels._bitmap_cpu``); everything else is in
pyproject.toml. Without a C compiler the install still succeeds and the plain-PyTorch kernels run."""
import sys

from setuptools import Extension, setup

# -ffp-contract=off: no fused multiply-adds, so results equal torch's CPU ops bit for bit.
FLAGS = [] if sys.platform == "win32" else ["-O3", "-ffp-contract=off"]

setup(ext_modules=[Extension("resu_tensor.kernels._bitmap_cpu", ["resu_tensor/kernels/_bitmap_cpu.c"],
                             extra_compile_args=FLAGS, optional=True)])
