"""``torch.optim.Optimizer`` subclasses built on :mod:`fastclu.ops` (see DESIGN.md section 4)."""

from fastclu.optim._base import RoleOptimizer, SparseGradientError
from fastclu.optim._wrapper import OptimizerWrapper
from fastclu.optim.adamw import AdamW
from fastclu.optim.classp import CLASSP
from fastclu.optim.fastslow import FastSlow
from fastclu.optim.flat_lora import FlatLoRA
from fastclu.optim.perturb_merge import PerturbMerge
from fastclu.optim.random_perturb import RandomPerturb
from fastclu.optim.sgd import SGD

__all__ = [
    "CLASSP",
    "SGD",
    "AdamW",
    "FastSlow",
    "FlatLoRA",
    "OptimizerWrapper",
    "PerturbMerge",
    "RandomPerturb",
    "RoleOptimizer",
    "SparseGradientError",
]
