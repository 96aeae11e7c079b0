"""Every op is found by its name: one family file per backend, csrc and tests, and a kernel test case."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import fastclu.ops as O
from fastclu import _registry
from fastclu._registry import FAMILIES, OPS

ROOT = Path(__file__).resolve().parents[2]


def _import_backend(backend: str) -> None:
    if backend == "cuda":
        try:
            importlib.import_module("fastclu._C")
        except ImportError as e:
            pytest.skip(f"CUDA extension not built: {e}")
    # imported directly (not through the registry): registering needs no device
    importlib.import_module(f"fastclu.ops.{backend}")


@pytest.mark.parametrize("backend", _registry.BACKENDS)
def test_every_op_has_an_implementation_in_its_family_module(backend: str) -> None:
    if backend == "triton":
        reason = _registry.backends()["triton"]
        if reason is not None:
            pytest.skip(reason)
    _import_backend(backend)
    missing = [op for op in OPS if backend not in _registry._impls.get(op, {})]
    assert not missing, f"ops without a {backend!r} implementation: {missing}"
    for op, family in OPS.items():
        module = _registry._impls[op][backend].__module__
        assert module == f"fastclu.ops.{backend}.{family}", f"{op} on {backend} lives in {module}"


def test_registered_ops_are_declared_and_public() -> None:
    assert set(_registry._impls) <= set(OPS)
    for op in OPS:
        assert op in O.__all__ and callable(getattr(O, op)), op
    with pytest.raises(ValueError, match="not declared"):
        _registry.register("no_such_op_", "reference")


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_has_its_files(family: str) -> None:
    for path in (
        f"fastclu/ops/reference/{family}.py",
        f"fastclu/ops/triton/{family}.py",
        f"fastclu/ops/cuda/{family}.py",
        f"csrc/{family}.cu",
        f"tests/ops/reference/test_ref_{family}.py",
        f"tests/ops/kernels/test_kernel_{family}.py",
    ):
        assert (ROOT / path).is_file(), f"{family}: {path} is missing"


@pytest.mark.parametrize("op", sorted(OPS))
def test_every_op_has_a_kernel_test_case(op: str) -> None:
    """A test function in the family's kernel test file calls the op on a kernel ``backend``."""
    src = (ROOT / f"tests/ops/kernels/test_kernel_{OPS[op]}.py").read_text()
    tests = re.split(r"\n(?=(?:@[^\n]*\n)*def test_)", src)
    calls = [t for t in tests if re.match(r"(?:@[^\n]*\n)*def test_", t) and re.search(rf"\b{op}\(", t)]
    assert any("backend=backend" in t for t in calls), f"no kernel test case calls {op}(..., backend=backend)"


def test_no_other_backend_files() -> None:
    """A backend module that is not a family (or a private helper) would be an op with two homes."""
    shared = {"philox", "bench"}  # the noise contract (reference) and the Triton micro-benchmark: no ops
    for backend in ("reference", "triton", "cuda"):
        for f in (ROOT / "fastclu/ops" / backend).glob("*.py"):
            assert f.stem in FAMILIES or f.stem.startswith("_") or f.stem in shared, f
    for f in (ROOT / "csrc").glob("*.cu"):
        assert f.stem in FAMILIES or f.stem == "tables", f
