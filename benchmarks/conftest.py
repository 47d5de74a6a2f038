"""Benchmark helpers: a session-wide list of summary lines (ratios, memory) that benchmark
modules fill and that is printed after pytest-benchmark's table."""
import pytest

_SUMMARY = []


@pytest.fixture(scope="session")
def summary():
    """list[str]: append lines to print at the end of the run."""
    return _SUMMARY


def pytest_terminal_summary(terminalreporter):
    if _SUMMARY:
        terminalreporter.section("benchmark ratios")
        for line in _SUMMARY:
            terminalreporter.write_line(line)
