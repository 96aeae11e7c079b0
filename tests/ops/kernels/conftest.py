"""Every kernel test proves its kernel backend ran: no silent fallback to the reference.

For a test parametrized with a kernel ``backend``, every registered implementation of that
backend is wrapped with a call counter; a test that passes without one kernel-backend call
fails at teardown. A test about routing *away* from the kernels (fp64) says so with
``kernel_calls.expect_reference()`` and then asserts the count is zero.

Without a GPU, the ``cuda`` cases run the csrc kernels on the CPU.

The CPU module ``fastclu._C_cpu`` is built (incrementally) from csrc/ by csrc/cpu/build.py the
first time a cuda case runs, and the cuda backend is switched to it for that case only, so the
rest of the suite sees the backend as it is. FASTCLU_CPU_SEED fixes the block and thread orders
(random per run otherwise; the header of the run prints it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from fastclu import _registry

KERNEL_BACKENDS = ("triton", "cuda")


class KernelCalls:
    """How often each op's ``backend`` implementation ran during the test."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.counts: dict[str, int] = {}
        self.reference_only = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def expect_reference(self) -> None:
        """This test checks that its calls do not reach the kernel backend."""
        self.reference_only = True

    def wrap(self, op: str, fn: Callable) -> Callable:
        def counted(*args: object, **kwargs: object) -> object:
            self.counts[op] = self.counts.get(op, 0) + 1
            return fn(*args, **kwargs)

        return counted


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"_report_{report.when}", report)


@pytest.fixture(autouse=True)
def kernel_calls(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, _cuda_on_cpu: None
) -> Iterator[KernelCalls | None]:
    callspec = getattr(request.node, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    if backend not in KERNEL_BACKENDS:
        yield None
        return
    calls = KernelCalls(backend)
    if _registry._load(backend) is None:  # unavailable: the test skips itself (need())
        for op, impls in _registry._impls.items():
            if backend in impls:
                monkeypatch.setitem(impls, backend, calls.wrap(op, impls[backend]))
    yield calls
    report = getattr(request.node, "_report_call", None)
    if report is None or not report.passed:
        return
    if calls.reference_only:
        assert calls.total == 0, f"expected the reference only, but {backend} ran: {calls.counts}"
    else:
        assert calls.total > 0, f"the {backend} backend never ran (silent fallback to the reference?)"


import os

import pytest
from _cpu_module import build_cpu_module
from _kernel_cases import CUDA_ON_CPU

os.environ.setdefault("FASTCLU_CPU_SEED", str(int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config: pytest.Config) -> str | None:
    if not CUDA_ON_CPU:
        return None
    return f"cuda cases on the CPU (fastclu._C_cpu), FASTCLU_CPU_SEED={os.environ['FASTCLU_CPU_SEED']}"


@pytest.fixture(autouse=True)
def _cuda_on_cpu(request: pytest.FixtureRequest) -> Iterator[None]:
    callspec = getattr(request.node, "callspec", None)
    if not CUDA_ON_CPU or callspec is None or callspec.params.get("backend") != "cuda":
        yield
        return
    build_cpu_module()
    from fastclu.ops import _cuda_cpu_mode

    undo = _cuda_cpu_mode.enable()
    try:
        yield
    finally:
        undo()
