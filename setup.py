"""Build script. The pure-Python package installs everywhere; the optional CUDA
extension (csrc/) is added by the CUDA-backend work and is skipped when nvcc is absent."""
from setuptools import setup

setup()
