"""The optional C extension (fxqbn._ckernels); everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and fxqbn runs its pure-torch
kernels (same results, slower).
"""

from setuptools import Extension, setup

KERNELS = Extension(
    "fxqbn._ckernels", ["fxqbn/_ckernels.c"], extra_compile_args=["-O3", "-std=c11", "-pthread"],
    extra_link_args=["-pthread"], optional=True,
)
setup(ext_modules=[KERNELS])
