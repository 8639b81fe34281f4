import os
import re

import pytest
import torch

from quantkit.testing import NANO_PATH, llamacpp_bin, shared_data


@pytest.fixture(scope="session")
def nano_path():
    if not (NANO_PATH / "config.json").exists():
        pytest.skip("models/mistral-nano is missing")
    return NANO_PATH


@pytest.fixture(scope="session")
def wikitext_path():
    path = shared_data("wikitext-2-raw", "wiki.test.raw")
    if path is None:
        pytest.skip("../shared/data/wikitext-2-raw is absent (shared data is only on development machines)")
    return path


@pytest.fixture(scope="session")
def pg_calib_dir():
    path = shared_data("pg-english", "calib")
    if path is None:
        pytest.skip("../shared/data/pg-english/calib is absent (shared data is only on development machines)")
    return path


def require_llamacpp(*tools: str):
    for tool in tools:
        if llamacpp_bin(tool) is None:
            pytest.skip(f"llama.cpp tool {tool} not built (run scripts/build_llamacpp.sh)")
    return {tool: llamacpp_bin(tool) for tool in tools}


@pytest.fixture
def single_thread():
    """Small tensors: one torch thread is faster, and far faster on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# Skips that are legitimate on a CI machine: data that only development machines have, hardware (or kernel
# features such as mount namespaces, for the small-tmpfs disk-full tests) it lacks.
# With CI=true every other skip (a missing tool, client, compiler or extension that .ci/run installs) fails.
CI_SKIP_REASONS = re.compile(r"shared data|\.\./shared/data|needs? a GPU|needs? a CUDA|CUDA GPU|no CUDA|"
                             r"AVX512|on the GPU only|interpreter only|mount namespaces")


def _fail_tool_skip(report) -> None:
    if os.environ.get("CI") != "true" or not report.skipped or hasattr(report, "wasxfail"):
        return
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
    if not CI_SKIP_REASONS.search(reason):
        report.outcome = "failed"
        report.longrepr = f"CI=true: this test would skip for a reason CI must not have: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_tool_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_tool_skip(outcome.get_result())
