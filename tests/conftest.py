"""In CI (DDP_TUTORIAL_NO_SKIP=1, set by .ci/run) a skipped test is a failure: the multi-host and
Slurm tests skip on a laptop without root, but CI must really run them."""

import os
import sys

import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("DDP_TUTORIAL_NO_SKIP") == "1":
        report.outcome = "failed"
        report.longrepr = f"skipped in CI, where every test must run: {report.longrepr}"


def pytest_terminal_summary(terminalreporter):
    """List the README blocks that the README test did not run as written, and why."""
    readme_test = sys.modules.get("test_readme")
    if readme_test and readme_test.SKIPPED:
        terminalreporter.section("README blocks not run as written")
        for block, reason in readme_test.SKIPPED:
            terminalreporter.write_line(f"{block}  [{reason}]")
    if readme_test and readme_test.TIMES:
        terminalreporter.section("README blocks run, with their time")
        for block, seconds in readme_test.TIMES:
            terminalreporter.write_line(f"{seconds:6.1f} s  {block}")
