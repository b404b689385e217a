"""Datasets of the model zoo, generated in-process or shipped by a package (no downloads)."""
