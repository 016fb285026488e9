"""A pytest plugin (``-p gpucheck.pytest_progress``) that makes a crash cost one test, not the rest of the run.

It appends one JSON line per event to the file named by ``GPUCHECK_PROGRESS`` and flushes it at once: ``start``
before a test's setup and its ``outcome`` after each phase. A process that dies of a signal inside a test leaves
that test started with no outcome, which is how ``gpucheck.crashsafe`` names it; the output that pytest's summary
would have held dies with the process. ``GPUCHECK_DESELECT`` names a file of node ids to leave out (the tests
already run, and the crashed ones), so the rerun goes on after the crash. Under pytest-xdist only the controller
writes (a worker's crash is reported to it as the test's failure, "worker ... crashed while running ...").
"""
from __future__ import annotations

import json
import os
from typing import Optional, TextIO

_progress: Optional[TextIO] = None  # this process's progress file (None: not asked for, or an xdist worker)


def pytest_configure(config):
    global _progress
    path = os.environ.get("GPUCHECK_PROGRESS")
    if path and not hasattr(config, "workerinput"):  # an xdist worker's events reach the controller, which writes
        _progress = open(path, "a", buffering=1)


def pytest_unconfigure(config):
    global _progress
    if _progress:
        _progress.close()
        _progress = None


def _emit(record: dict) -> None:
    if _progress:
        _progress.write(json.dumps(record) + "\n")
        _progress.flush()  # in the kernel's hands now: a segfault a moment later does not lose it


def pytest_collection_modifyitems(session, config, items):
    path = os.environ.get("GPUCHECK_DESELECT")
    if not path or not os.path.exists(path):
        return
    skip = set(open(path).read().splitlines())
    dropped = [item for item in items if item.nodeid in skip]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item.nodeid not in skip]


def pytest_runtest_logstart(nodeid, location):
    _emit({"start": nodeid})


def pytest_runtest_logreport(report):
    crashed = "crashed while running" in str(getattr(report, "longrepr", "") or "").lower()
    if report.when == "call" or report.failed or crashed or (report.skipped and report.when == "setup"):
        _emit({"test": report.nodeid, "when": report.when, "outcome": "crashed" if crashed else report.outcome})
