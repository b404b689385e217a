"""Test set-up: Triton's interpreter when no GPU is present (set before triton is
imported anywhere), hypothesis settings suited to two CPU cores, and the failure log
(FASTATTN_FAILURE_LOG, tests/failure_log.py)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

pytest_plugins = ["tests.failure_log"]
