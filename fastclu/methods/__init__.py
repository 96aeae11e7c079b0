"""The algorithms of DESIGN §1 as runnable procedures, with their baselines.

Every method takes a model (modified in place) and data loaders, runs on fastclu's
optimizers (so on whichever op backend is active; each accepts ``backend=``) and returns a
:class:`MethodResult` with its wall time and number of optimizer steps.
"""

from __future__ import annotations

from fastclu.methods.baselines import finetune, gradient_ascent, joint, naive_sequential, retrain
from fastclu.methods.clu import ug_clu
from fastclu.methods.common import MethodResult, make_mlp
from fastclu.methods.ewc import ewc
from fastclu.methods.pnm import perturb_and_merge
from fastclu.methods.pnm_lora import pnm_lora
from fastclu.methods.salun import salun, salun_mask
from fastclu.methods.sfron import balanced_mask, sfron

__all__ = [
    "MethodResult",
    "balanced_mask",
    "ewc",
    "finetune",
    "gradient_ascent",
    "joint",
    "make_mlp",
    "naive_sequential",
    "perturb_and_merge",
    "pnm_lora",
    "retrain",
    "salun",
    "salun_mask",
    "sfron",
    "ug_clu",
]
