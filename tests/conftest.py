"""Shared pytest setup: repo root on sys.path, the `slow` marker, the path to ../shared/data, and
`hf_reference` (transformers run in its own process, away from the repository's `kernels/`)."""
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Triton kernels run on the CPU through Triton's interpreter; it must be set before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than ~10 s; still part of the default test run")


# Opt-in runs beyond the default suite's 15-minute budget (README, "Tests"): NANORLEF_FULL=1.
FULL = pytest.mark.skipif(os.environ.get("NANORLEF_FULL") != "1", reason="opt-in: NANORLEF_FULL=1")


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


def hf_reference(jobs: list[dict], tensors: dict | None = None) -> tuple[dict, dict]:
    """Runs tests/hf_reference.py on `jobs` in a fresh `python -I` from a temporary directory, so transformers
    imports Hugging Face's `kernels` package and not this repository's folder. Returns (tensors, results)."""
    from safetensors.torch import load_file, save_file
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (requirements-test.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        jobs_file, out = os.path.join(tmp, "jobs.json"), os.path.join(tmp, "out")
        with open(jobs_file, "w") as f:
            json.dump(jobs, f)
        if tensors:
            save_file({k: v.clone().contiguous() for k, v in tensors.items()}, jobs_file + ".safetensors")
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run([sys.executable, "-I", str(ROOT / "tests" / "hf_reference.py"), jobs_file, out],
                              cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode:
            raise RuntimeError(f"tests/hf_reference.py failed:\n{proc.stderr[-4000:]}")
        results = json.loads(open(out + ".json").read())
        origin = results["_versions"]["kernels_module"]
        assert origin is None or not origin.startswith(str(ROOT)), origin
        return load_file(out + ".safetensors"), results
