"""The algorithms of DESIGN §1 as runnable procedures, with their baselines.

Every method takes a model (modified in place; only its trainable parameters move) and data
(DataLoaders, Datasets or iterables of batches; the loss contract of :mod:`fastclu.losses`),
runs on fastclu's optimizers (SGD or AdamW; on whichever op backend is active, or
``backend=``), shows a progress bar, calls an optional ``callback`` every ``log_every`` steps
and returns a :class:`MethodResult` with its wall time, optimizer steps and history.
"""

from __future__ import annotations

from fastclu.methods.baselines import finetune, gradient_ascent, joint, naive_sequential, retrain
from fastclu.methods.clu import ug_clu
from fastclu.methods.common import MethodResult, Monitor, make_mlp, make_optimizer
from fastclu.methods.ewc import ewc
from fastclu.methods.pnm import perturb_and_merge
from fastclu.methods.pnm_lora import pnm_lora
from fastclu.methods.salun import salun, salun_mask
from fastclu.methods.sfron import balanced_mask, sfron

__all__ = [
    "MethodResult",
    "Monitor",
    "balanced_mask",
    "ewc",
    "finetune",
    "gradient_ascent",
    "joint",
    "make_mlp",
    "make_optimizer",
    "naive_sequential",
    "perturb_and_merge",
    "pnm_lora",
    "retrain",
    "salun",
    "salun_mask",
    "sfron",
    "ug_clu",
]
