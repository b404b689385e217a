"""Test set-up: Triton's interpreter when no GPU is present (set before triton is
imported anywhere), untuned Triton launches on a GPU, hypothesis settings suited to two
CPU cores, the failure log (FASTATTN_FAILURE_LOG, tests/failure_log.py), and no memoized
Triton launch plans carried from one test into the next."""

import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU each Triton launch takes its first config that fits, untuned, unless the run says
# otherwise (as make gpu-check does): tuning every config of every size bucket would take
# longer than the gpu tests themselves.  The tests of the tuning turn it on.
os.environ.setdefault("FASTATTN_TRITON_AUTOTUNE", "0")

from hypothesis import settings  # noqa: E402

settings.register_profile("default", deadline=None, max_examples=40, derandomize=True)
# HYPOTHESIS_PROFILE=thorough: fresh random examples each run, ten times as many (a search
# for the rare problem the fixed default examples miss; with MALLOC_PERTURB_, as make test).
settings.register_profile("thorough", deadline=None, max_examples=400, derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

pytest_plugins = ["tests.failure_log"]


@pytest.fixture(autouse=True)
def no_memoized_triton_launch_plans(monkeypatch):
    """Each test starts with no memoized Triton plans (``triton_launch.LAUNCH_PLANS``), so a
    test that watches the launchers sees every launch, whatever ran before it."""
    launch = sys.modules.get("fastattn.ops.triton_launch")  # not imported: triton not loaded yet
    if launch is not None:
        monkeypatch.setattr(launch.LAUNCH_PLANS, "plans", {})
