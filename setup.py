"""Installs the `pipeline` and `workers` packages; runtime needs are listed in pyproject.toml."""
from setuptools import setup

setup()
