"""Shared pytest setup: repo root on sys.path, the `slow` marker, and the path to ../shared/data."""
import os
import sys
from pathlib import Path

import pytest
import torch

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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core box OpenMP spin-waiting makes them ~20x
    slower. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
