"""The host path of a :class:`fastclu.optim._base.RoleOptimizer` step, validated once per layout.

A step's host work splits in two. What depends only on the optimizer's parameters, groups and
state (which tensors share a launch, their state lists, masks, penalty operands, the backend and
its implementation, every argument check of the public op) is a *layout*: built once, cached,
and reused until something it depends on changes. What changes every step (the gradients and
stashed roles, the coefficients, lr, clip, AMP scalars) is gathered with list comprehensions and
handed to the backend implementation directly, without the public op's per-call validation.

Cache keys (see :meth:`RoleOptimizer._structure` / ``_layout_for``):

- ``Structure``: the optimizer's ``epoch`` (bumped by ``add_param_group``, ``load_state_dict``,
  ``__setstate__``, ``set_mask``, ``set_anchor``), the identity of ``state`` and of every group's
  ``params`` list with its length, and the parameters' storage addresses (``data_ptr``; one C
  call per tensor: ``p.data = other`` swaps storage without changing the parameter object).
- ``Layout`` (per structure): the step's role keys, which parameters hold each role, every
  group's layout flags (mask mode and roles, penalty on, the rule's state keys: amsgrad,
  momentum) and the backend scope (``backend=``, :func:`fastclu.use_backend`,
  ``FASTCLU_BACKEND``). A layout with a first-step bucket (SGD's ``init_momentum``) is used once
  and dropped: the step creates the state that changes it.

Not detected (documented, as torch documents its own caches): a state tensor replaced by
assignment into ``optimizer.state[p][key]`` outside the optimizer's methods; call
:meth:`RoleOptimizer.invalidate_layout` after such an edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class Bucket:
    """One launch: parameters of one group on one device and dtype with one state layout."""

    group: dict[str, Any]
    idx: list[int]  # positions in Structure.params
    params: list[Tensor]
    init: bool  # SGD's first step (init_momentum)
    has_mask: bool
    has_pen: bool
    backend: str
    combine: Callable[..., None]
    gram: Callable[..., Tensor]
    masks: list[Tensor] | None = None  # kernel view, None when the mask gates nothing here
    flags: list[bool] = field(default_factory=list)  # per role: gated by the mask
    mode: str = "grad"
    missing: list[list[int]] = field(default_factory=list)  # per role: positions with no tensor
    nonempty: list[int] | None = None  # positions of non-empty tensors; None when all are
    noncontig: list[int] = field(default_factory=list)  # positions of non-contiguous parameters
    kparams: list[Tensor] | None = None  # kernel view of params; None until the layout is finished
    states: dict[str, list[Tensor]] | None = None  # kernel view; None until the state exists
    pen: dict[str, Any] = field(default_factory=dict)
    identity: bool = False  # idx covers Structure.params in order: no picking needed
    complex: bool = False  # complex parameters: the kernels see real views (fastclu.optim._complex)
    # the bucket's device tables, looked up by call shape only (fastclu.ops._table.stable_operands):
    # its params, state, masks and penalty operands are fixed for the layout's life
    tables: dict = field(default_factory=dict)


@dataclass
class Layout:
    buckets: list[Bucket]
    dtensor: bool
    cacheable: bool
    ready: bool = False  # state created and the public op's checks passed once
    struct: Structure | None = None


@dataclass
class Structure:
    sig: tuple
    params: list[Tensor]
    ptrs: list[int] | None  # storage addresses; None with DTensor parameters (local shards checked per step)
    layouts: dict[tuple, Layout] = field(default_factory=dict)
    dicts: list[dict | None] | None = None  # the params' state dicts (None: none); None: not gathered


MAX_LAYOUTS = 16  # alternating step kinds (forget / remain, roles present or not) stay cached


def pick(xs: list, b: Bucket) -> list:
    """``xs`` (aligned with Structure.params) restricted to the bucket, in bucket order."""
    return xs if b.identity else [xs[i] for i in b.idx]
