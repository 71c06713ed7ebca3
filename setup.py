"""The optional C extension (fxqbn._ckernels); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and fxqbn runs its pure-torch
kernels (same results, slower).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("fxqbn._ckernels", ["fxqbn/_ckernels.c"], extra_compile_args=["-O3", "-std=c11"], optional=True)])
