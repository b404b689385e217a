"""Builds and installs fastattn.

The Triton kernels live in the top-level ``kernels/`` folder of the repository and
are installed as ``fastattn.kernels``.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["fastattn", "fastattn.*"]) + ["fastattn.kernels"]

setup(
    packages=packages,
    package_dir={"fastattn.kernels": "kernels"},
)
