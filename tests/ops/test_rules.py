"""Update rules are pluggable: one registration (fastclu.ops.rules.RULES) and one file per backend."""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import pytest
import torch

import fastclu.ops as O
from fastclu.ops.rules import HPARAMS, N_FLAGS, N_SLOTS, RULES, StepConfig

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
    cu = (ROOT / "csrc/combine.cu").read_text()
    assert f"rules/{rule}.cuh" in cu
    assert f'{{"{rule}", launch_rule<' in cu


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
    with pytest.raises(ValueError, match=r"rule must be one of \['sgd', 'adamw', 'classp'\]"):
        O.combine_step_(p, [p], {}, rule="lion", lr=0.1)


@pytest.mark.parametrize("module", ["fastclu._C_cpu", "fastclu._C"])
def test_cuda_rule_ids_are_the_registry(module: str) -> None:
    """The CUDA rule table (csrc/combine.cu) dispatches by the ids RULES declares."""
    C = pytest.importorskip(module)
    assert dict(C.COMBINE_RULES) == {name: r.id for name, r in RULES.items()}
    assert (C.RULE_SLOTS, C.RULE_FLAGS) == (N_SLOTS, N_FLAGS)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rule_declarations_fit_the_kernels(rule: str) -> None:
    r = RULES[rule]
    cfg = StepConfig(rule, 0.1)
    assert len(r.slots(cfg)) <= N_SLOTS and len(r.flags(cfg)) <= N_FLAGS
    assert len(cfg.slots) == N_SLOTS and len(cfg.flags) == N_FLAGS
    assert set(cfg.state_keys) <= set(r.state) and len(r.buffers) <= 3
    assert all(h in HPARAMS for h in r.hparams)
    # a rule's state rows follow its declared order, None where this configuration uses none
    assert [k for k in cfg.state_rows if k is not None] == [k for k in r.buffers if k in cfg.state_keys]


def test_hyperparameters_of_another_rule_are_refused() -> None:
    p = [torch.randn(3)]
    before = p[0].clone()
    with pytest.raises(ValueError, match=r"betas is not a hyperparameter of rule='sgd'"):
        O.combine_step_(p, [[torch.randn(3)]], {}, rule="sgd", lr=0.1, betas=(0.5, 0.5))
    with pytest.raises(ValueError, match=r"weight_decay is not a hyperparameter of rule='classp'"):
        O.combine_step_(p, [[torch.randn(3)]], {"acc": [torch.zeros(3)], "step": [torch.zeros(())]}, rule="classp",
                        lr=0.1, weight_decay=0.1)  # fmt: skip
    with pytest.raises(TypeError, match="unexpected keyword argument 'betaz'"):
        O.combine_step_(p, [[torch.randn(3)]], {}, rule="sgd", lr=0.1, betaz=(0.5, 0.5))
    assert torch.equal(p[0], before)
    # the default of another rule's hyperparameter is accepted (the optimizers pass init_momentum always)
    O.combine_step_(p, [[torch.randn(3)]], {"acc": [torch.zeros(3)], "step": [torch.zeros(())]}, rule="classp",
                    lr=0.1, init_momentum=False)  # fmt: skip
