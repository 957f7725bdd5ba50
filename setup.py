"""The optional C extension of the gate (``loraforge.gate._native``); everything else is in pyproject.toml.

``optional=True``: where it does not compile, the install goes on and the gate uses its
pure-Python twins of the same functions (same results, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("loraforge.gate._native", ["src/loraforge/gate/_native.c"], extra_compile_args=["-O3"], optional=True),
    ]
)
