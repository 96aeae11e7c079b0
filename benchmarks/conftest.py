"""pytest-benchmark microbenchmarks of the fastclu ops (see ``test_bench_ops.py``).

Options select the grid; without a CUDA device the grid shrinks to a tiny CPU check of the
harness (reference backend and peers only). Run on a GPU, e.g.::

    pytest benchmarks --bench-sizes 16,20,24,26,28,models --benchmark-json out.json
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Same switch as tests/conftest.py: it must precede the first triton import.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastclu import bench

GPU_SIZES = "16,20,24,26,28,models"
CPU_SIZES = "10"


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("fastclu bench")
    g.addoption(
        "--bench-sizes", default=None, help=f"log2 sizes / model names (GPU default {GPU_SIZES}; CPU {CPU_SIZES})"
    )
    g.addoption("--bench-dtypes", default="fp32,bf16", help="comma list of fp32, bf16, fp16")
    g.addoption("--bench-ops", default=None, help="comma list of cases or op names (default all)")
    g.addoption("--bench-peers", default=None, help="comma list of peers (default all; on CPU all but compile)")
    g.addoption("--bench-rounds", type=int, default=None, help="timed rounds per benchmark (default 30; CPU 3)")


def pytest_configure(config: pytest.Config) -> None:
    if not torch.cuda.is_available():
        torch.set_num_threads(1)  # CPU mode checks the harness; OpenMP waits dominate tiny sizes under load
    for name, text in {"gpu": "needs a CUDA device", "slow": "long-running"}.items():
        config.addinivalue_line("markers", f"{name}: {text}")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "bench_point" not in metafunc.fixturenames:
        return
    opt = metafunc.config.getoption
    dev = _device()
    on_gpu = dev.type == "cuda"
    sizes = bench._parse_sizes(bench._csv(opt("--bench-sizes") or (GPU_SIZES if on_gpu else CPU_SIZES)))
    dtypes = bench._csv(opt("--bench-dtypes"))
    cases = bench._select_cases(bench._csv(opt("--bench-ops")) if opt("--bench-ops") else None)
    peers = bench._csv(opt("--bench-peers")) if opt("--bench-peers") else [
        p for p in bench.ALL_PEERS if on_gpu or p != "compile"
    ]  # fmt: skip
    backends, _ = bench._usable_backends(list(bench.BACKENDS), dev)
    points, ids = [], []
    for case in cases:
        impls = ["copy", *backends, *[p for p in bench.CASES[case].peers if p in peers]]
        for dtype in dtypes:
            for size in sizes:
                for impl in impls:
                    points.append((case, dtype, size, impl))
                    ids.append(f"{case}-{dtype}-{size}-{impl}")
    metafunc.parametrize("bench_point", points, ids=ids)


@pytest.fixture
def bench_device() -> torch.device:
    return _device()


@pytest.fixture
def bench_rounds(request: pytest.FixtureRequest, bench_device: torch.device) -> int:
    r = request.config.getoption("--bench-rounds")
    return r if r is not None else (30 if bench_device.type == "cuda" else 3)
