"""The op specs (fastclu.ops.SPECS) are the one source of each op's arguments: the public
signatures, every backend's signature and the custom-op schemas must agree with them."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import fastclu.ops as O
from fastclu import _registry
from fastclu.ops import library as L
from fastclu.ops._spec import REQUIRED


@pytest.mark.parametrize("op", sorted(O.SPECS))
def test_public_signature_is_the_spec(op: str) -> None:
    spec = O.SPECS[op]
    params = [p for p in inspect.signature(getattr(O, op)).parameters.values() if p.name != "backend"]
    assert [p.name for p in params] == [a.name for a in spec.args]
    for p, a in zip(params, spec.args):
        if a.kind == "hparams":  # the rules' hyperparameters: **hparams, defaults in the spec
            assert p.kind == inspect.Parameter.VAR_KEYWORD, f"{op}: {a.name} must be **{a.name}"
            continue
        want = inspect.Parameter.empty if a.default is REQUIRED else a.default
        assert p.default == want, f"{op}: default of {a.name}"
        assert (p.kind == inspect.Parameter.KEYWORD_ONLY) == a.keyword, f"{op}: {a.name} keyword-only?"


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_backend_signatures_are_the_spec(backend: str) -> None:
    if backend == "cuda":
        pytest.importorskip("fastclu._C")
    elif backend == "triton" and _registry.backends()["triton"] is not None:
        pytest.skip(_registry.backends()["triton"])
    importlib.import_module(f"fastclu.ops.{backend}")
    for op, spec in O.SPECS.items():
        sig = inspect.signature(_registry._impls[op][backend])
        pos = [p.name for p in sig.parameters.values() if p.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD]
        kw = [p.name for p in sig.parameters.values()
              if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.VAR_KEYWORD)]  # fmt: skip
        assert pos == [a.name for a in spec.args if not a.keyword], f"{op} on {backend}"
        assert kw == [a.name for a in spec.args if a.keyword], f"{op} on {backend}"
        for a in spec.args:
            if a.kind == "hparams":  # received as **hparams (every backend builds its StepConfig)
                assert sig.parameters[a.name].kind == inspect.Parameter.VAR_KEYWORD, f"{op} on {backend}"


def test_schemas_come_from_the_specs() -> None:
    for op, spec in O.SPECS.items():
        schema = str(getattr(torch.ops.fastclu, op).default._schema)
        assert schema.startswith(f"fastclu::{op}(") and schema.endswith(spec.schema().split(" -> ")[1])
        assert "str backend" in schema


def test_nan_coefficient_through_the_custom_op_behaves_as_in_eager() -> None:
    """A NaN coefficient is a value, not a "this coefficient is a tensor" marker."""
    params = [torch.randn(5), torch.randn(3)]
    g0, g1 = [torch.randn(5), torch.randn(3)], [torch.randn(5), torch.randn(3)]
    kw = {"lr": 0.1, "coeffs": [float("nan"), torch.tensor(2.0)], "backend": "reference"}
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    O.combine_step_(p1, [g0, g1], {}, **kw)
    L.combine_step_(p2, [g0, g1], {}, **kw)
    assert all(torch.isnan(p).all() for p in p1)
    assert all(torch.allclose(a, b, equal_nan=True) for a, b in zip(p1, p2))
    # and a tensor coefficient next to a float one is honoured in both paths
    kw = {"lr": 0.1, "coeffs": [0.5, torch.tensor(2.0)], "backend": "reference"}
    p1, p2 = [p.clone() for p in params], [p.clone() for p in params]
    O.combine_step_(p1, [g0, g1], {}, **kw)
    L.combine_step_(p2, [g0, g1], {}, **kw)
    want = [p - 0.1 * (0.5 * a + 2.0 * b) for p, a, b in zip(params, g0, g1)]
    for a, b, w in zip(p1, p2, want):
        assert torch.equal(a, b) and torch.allclose(a, w, rtol=1e-6, atol=1e-6)


def test_library_entries_validate_like_the_public_ops() -> None:
    p = [torch.randn(3)]
    with pytest.raises(TypeError, match="lr"):
        L.combine_step_(p, [p], {}, lr="0.1")
    with pytest.raises(TypeError, match="unexpected keyword"):
        L.merge_(p, p, 0.5, alpha2=1.0)
