"""Build hook for the C fusion kernel.

Project metadata lives in pyproject.toml. This file exists only because setuptools
reads cffi's `cffi_modules` from `setup()`: the kernel in csrc/ is compiled once, at
install time, into `coordinator._fusion_c`.
"""

from setuptools import setup

setup(cffi_modules=["csrc/build_fusion.py:ffibuilder"])
