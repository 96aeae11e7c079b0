"""Update rules are pluggable: one registration (fastclu.ops.rules.RULES) and one file per backend."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import fastclu.ops as O
from fastclu.ops.rules import RULES, StepConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("rule", sorted(RULES))
def test_every_rule_has_a_file_per_backend(rule: str) -> None:
    for path in (
        f"fastclu/ops/reference/rules/{rule}.py",
        f"fastclu/ops/triton/rules/{rule}.py",
        f"csrc/rules/{rule}.cuh",
    ):
        assert (ROOT / path).is_file(), f"rule {rule!r}: {path} is missing"
    assert callable(importlib.import_module(f"fastclu.ops.reference.rules.{rule}").update)
    # the CUDA dispatch names the rule's struct (one launch line per rule)
    assert f"rules/{rule}.cuh" in (ROOT / "csrc/combine.cu").read_text()


def test_step_config_is_frozen_and_validates_once() -> None:
    cfg = StepConfig("sgd", 0.1, momentum=0.9)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 0.2  # type: ignore[misc]
    assert cfg.state_keys == ["momentum_buffer"]
    assert StepConfig("adamw", 0.1, amsgrad=True).state_keys == ["exp_avg", "exp_avg_sq", "step", "max_exp_avg_sq"]
    for bad, match in (
        (StepConfig("sgd", 0.1, nesterov=True), "nesterov"),
        (StepConfig("adamw", 0.1, betas=(1.0, 0.9)), "betas"),
        (StepConfig("sgd", 0.1, eps=-1.0), "eps"),
        (StepConfig("lion", 0.1), "rule"),
    ):
        with pytest.raises(ValueError, match=match):
            bad.validate()


def test_rule_choice_comes_from_the_registry() -> None:
    p = [torch.randn(3)]
    with pytest.raises(ValueError, match=r"rule must be one of \['sgd', 'adamw'\]"):
        O.combine_step_(p, [p], {}, rule="lion", lr=0.1)
