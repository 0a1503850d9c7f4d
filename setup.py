"""Build shim. Metadata lives in pyproject.toml.

csrc/ holds native code only where a measurement says Triton/torch can't do the job; there is
none yet, so this builds a pure-Python package. When csrc/ gains sources, they are compiled
here as an optional torch C++ extension (skipped, with a message, when no compiler is found).
"""
from setuptools import setup

setup()
