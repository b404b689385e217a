"""Triton kernels, installed as ``fastattn.kernels``."""
