"""pytest plugin of `make gpu-check` (-p scripts.pytest_failure_log): each failing test's report is
appended to $LLAMA_EXT_FAILURE_LOG as it fails, so that a run stopped at its time limit, before
pytest prints its own summary, still says why each test failed. Under pytest-xdist the
controller writes, the workers (which see their own reports too) do not."""
import os


def pytest_runtest_logreport(report):
    path = os.environ.get("LLAMA_EXT_FAILURE_LOG")
    if not path or not report.failed or os.environ.get("PYTEST_XDIST_WORKER"):
        return
    text = report.longreprtext
    if len(text) > 6000:  # the assertion and its context come last
        text = "...\n" + text[-6000:]
    with open(path, "a") as f:
        f.write(f"=== {report.nodeid} ({report.when})\n{text}\n")
