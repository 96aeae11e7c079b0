"""Backend selection: argument > FASTCLU_BACKEND > automatic, clear errors, fp64 to the reference."""

from __future__ import annotations

import os

import pytest
import torch

import fastclu
import fastclu.ops as O
from fastclu import _registry


def _lists(dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    sizes = [7, 4097, 1]
    return [torch.randn(n, dtype=dtype) for n in sizes], [torch.randn(n, dtype=dtype) for n in sizes]


@pytest.mark.interpreter
def test_fp64_runs_on_the_reference_whatever_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernels compute in fp32; fp64 tensors must keep fp64 math (bit-identical to reference)."""
    if fastclu.backends()["triton"] is not None:
        pytest.skip(f"triton unavailable: {fastclu.backends()['triton']}")
    called = []
    real = _registry._impls["merge_"]["triton"]
    monkeypatch.setitem(_registry._impls["merge_"], "triton", lambda *a, **k: called.append(1) or real(*a, **k))
    p, a = _lists(torch.float64)
    p1, p2 = [x.clone() for x in p], [x.clone() for x in p]
    O.merge_(p1, a, 0.3, backend="triton")
    O.merge_(p2, a, 0.3, backend="reference")
    assert not called and all(torch.equal(x, y) for x, y in zip(p1, p2))
    q, b = _lists(torch.float32)
    O.merge_(q, b, 0.3, backend="triton")
    assert called  # fp32 does reach the kernel


def test_env_variable_selects_and_argument_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    real = _registry._impls["restore_"]["reference"]
    monkeypatch.setitem(_registry._impls["restore_"], "reference", lambda *a, **k: seen.append(1) or real(*a, **k))
    p, b = _lists(torch.float32)
    monkeypatch.setenv("FASTCLU_BACKEND", "reference")
    O.restore_(p, b)
    assert seen and all(torch.equal(x, y) for x, y in zip(p, b))
    monkeypatch.setenv("FASTCLU_BACKEND", "no-such-backend")
    with pytest.raises(ValueError, match="no-such-backend"):
        O.restore_(p, b)
    O.restore_(p, b, backend="reference")  # the argument overrides the variable


def test_unavailable_backend_names_the_reason() -> None:
    reasons = fastclu.backends()
    assert reasons["reference"] is None
    missing = [b for b, why in reasons.items() if why is not None]
    if not missing:
        pytest.skip("every backend is available here")
    p, b = _lists(torch.float32)
    before = [x.clone() for x in p]
    with pytest.raises(RuntimeError, match=f"{missing[0]}.*unavailable: "):
        O.restore_(p, b, backend=missing[0])
    assert all(torch.equal(x, y) for x, y in zip(p, before))


def test_automatic_choice_on_cpu_is_the_reference() -> None:
    if os.environ.get("FASTCLU_BACKEND"):
        pytest.skip("FASTCLU_BACKEND is set")
    assert _registry.choose("combine_step_", None, "cpu") == "reference"


def test_scoped_override_is_honoured_nests_and_leaves_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLU_BACKEND", "no-such-backend")  # lowest priority: never consulted below
    seen: list[str] = []
    real = _registry._impls["restore_"]["reference"]
    monkeypatch.setitem(_registry._impls["restore_"], "reference", lambda *a, **k: seen.append("ref") or real(*a, **k))
    p, b = _lists(torch.float32)
    with fastclu.use_backend("reference"):
        assert os.environ["FASTCLU_BACKEND"] == "no-such-backend"
        O.restore_(p, b)
        assert _registry.choose("restore_", None, "cuda") == "reference"  # beats automatic choice too
        with O.use_backend("auto"):
            assert O.current_backend() == "auto"
        assert O.current_backend() == "reference"
    assert seen == ["ref"] and all(torch.equal(x, y) for x, y in zip(p, b))
    assert O.current_backend() == "no-such-backend"
    with pytest.raises(ValueError, match="no-such-backend"):
        O.restore_(p, b)


def test_explicit_backend_beats_the_scope_and_bad_names_fail_early() -> None:
    p, b = _lists(torch.float32)
    missing = [n for n, why in fastclu.backends().items() if why is not None]
    if missing:
        with fastclu.use_backend(missing[0]), pytest.raises(RuntimeError, match="unavailable"):
            O.restore_(p, b)
        with fastclu.use_backend(missing[0]):
            O.restore_(p, b, backend="reference")  # the argument wins over the scope
    with pytest.raises(ValueError, match="backend must be"), fastclu.use_backend("gpu"):
        pass
    with pytest.raises(TypeError, match="backend"), fastclu.use_backend(1):  # type: ignore[arg-type]
        pass


def test_scoped_override_is_per_thread() -> None:
    import threading

    got: list[str] = []
    with fastclu.use_backend("reference"):
        t = threading.Thread(target=lambda: got.append(O.current_backend()))
        t.start()
        t.join()
    assert got == [os.environ.get("FASTCLU_BACKEND") or "auto"]
