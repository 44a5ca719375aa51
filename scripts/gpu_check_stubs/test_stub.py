"""Dry-run stand-in for the CUDA test suite of scripts/gpu_check.sh (not part of the suite): real
pytest output with a pass, a skip and a test that fails when GPU_CHECK_STUB_FAIL names `tests`."""
import os

import pytest


def test_stub_passes():
    assert 1 + 1 == 2


@pytest.mark.skip(reason="stands for a skipped CUDA test")
def test_stub_skipped():
    pass


def test_stub_fails_on_request():
    assert "tests" not in os.environ.get("GPU_CHECK_STUB_FAIL", "").split(","), "GPU_CHECK_STUB_FAIL names tests"
