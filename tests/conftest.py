"""Shared pytest setup: repo root on sys.path, the `slow` marker, and the path to ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Triton kernels run on the CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s; still part of the default test run")


def shared_data_dir() -> Path:
    return Path(os.environ.get("NANORLEF_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if not path.is_dir():
        pytest.fail(f"test data not found at {path}: put ../shared beside the repo or set NANORLEF_DATA")
    return path
