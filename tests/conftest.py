"""Test configuration shared by the whole suite.

Without a CUDA device, Triton kernels run on the CPU through its interpreter; the variable
must be set before the first import of any triton-decorated code, hence here.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

MARKERS = {
    "gpu": "needs a CUDA device",
    "interpreter": "runs Triton kernels under TRITON_INTERPRET=1 on the CPU",
    "cuda_cpu": "runs the csrc CUDA kernels on the CPU (fastclu._C_cpu, FASTCLU_CUDA_ON_CPU)",
    "slow": "long-running; excluded from the default run",
    "distributed": "needs several processes / devices",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, text in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A gpu test without a GPU cannot run here; say so in the skip reason rather than fail.
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed() -> None:
    # Fresh random data each run (the seed differs per run), but reproducible from the log:
    # FASTCLU_TEST_SEED=<the logged seed> reruns a test on the same data.
    given = os.environ.get("FASTCLU_TEST_SEED")
    seed = int(given) if given else int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    print(f"torch seed {seed}")
