"""FASTATTN_FAILURE_LOG=PATH: each test failure or error (setup, call or teardown) appended to
PATH the moment its report arrives, one line each, "NODE_ID<tab>PHASE<tab>REASON", so that a run
stopped by its timeout before pytest's summary still names every failing test
(benchmarks/gpu_check.sh).  Under pytest-xdist the controller alone writes: it receives every
worker's reports, and for a test that crashed its worker a failed report of its own, logged
with the reason "worker crashed (WORKER)" and the phase "???" (xdist cannot tell it)."""

import os
import re

import pytest

REASON_CHARACTERS = 300
WORKER_CRASH = re.compile(r"worker '([^']+)' crashed while running ")  # xdist's report of one


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get("FASTATTN_FAILURE_LOG")
    if path and not hasattr(config, "workerinput"):  # an xdist worker has workerinput
        config.pluginmanager.register(FailureLog(path), "fastattn-failure-log")


class FailureLog:
    def __init__(self, path: str) -> None:
        self.path = path

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            # Opened per line: each line is on disk before the next test runs.
            with open(self.path, "a", encoding="utf-8") as log:
                log.write(f"{report.nodeid}\t{report.when}\t{reason(report)}\n")


def reason(report: pytest.TestReport) -> str:
    """One line: the exception's message (its first line, as pytest's -r summary shows it),
    else the last line of the report's text."""
    crash = getattr(report.longrepr, "reprcrash", None)
    lines = (crash.message if crash else report.longreprtext).strip().splitlines() or ["(no reason given)"]
    line = lines[0] if crash else lines[-1]
    worker_crash = WORKER_CRASH.match(line)
    if worker_crash:
        line = f"worker crashed ({worker_crash[1]})"
    return line[:REASON_CHARACTERS]
