"""The ops as ``torch.library`` custom ops, so a ``torch.compile``d step does not graph-break.

Each op is registered as ``fastclu::<name>``; its schema, flat argument list and fake (meta)
implementation are derived from the op's spec (:data:`fastclu.ops.SPECS`, see
:mod:`fastclu.ops._spec`), and its body calls the chosen backend's implementation directly.
Dynamo cannot trace a kernel launch that reads ``data_ptr()``, but it keeps a custom op as one
opaque graph node. Schemas know no ``float | Tensor`` union, no nested tensor lists and no
dicts: a scalar travels as ``(float, Tensor?)`` (the tensor, when given, is the value), the role
gradients as one concatenated list plus their count, the state dict as one list per key.

``fastclu.ops`` routes through :func:`run` while compiling; the functions of this module take
the public signatures of :mod:`fastclu.ops` and always go through the custom op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastclu.ops as O
from fastclu._registry import implementation
from fastclu.ops._spec import OpSpec

__all__ = list(O.SPECS)  # one entry per op, generated below


def _register(spec: OpSpec) -> None:
    def body(*flat: object) -> object:
        *args, backend = flat
        out = spec.call(implementation(spec.name, backend), spec.unflatten(tuple(args)))
        if spec.out == "pair":  # outputs of a custom op may not alias each other (kernels return views)
            return out[0].clone(), out[1].clone()
        return out

    def fake(*flat: object) -> object:
        return spec.fake(spec.unflatten(tuple(flat[:-1])))

    op = torch.library.custom_op(f"fastclu::{spec.name}", body, mutates_args=spec.mutated(), schema=spec.schema())
    op.register_fake(fake)


for _spec in O.SPECS.values():
    _register(_spec)


def run(spec: OpSpec, backend: str, values: dict) -> object:
    """Run validated ``values`` on ``backend`` through ``fastclu::<name>``."""
    if spec.has_host_only(values):  # e.g. a seeded perturb_: the schema cannot carry a 64-bit seed
        return spec.call(implementation(spec.name, backend), values)
    return getattr(torch.ops.fastclu, spec.name)(*spec.flatten(values), backend)


def _entry(name: str) -> Callable:
    spec = O.SPECS[name]

    def call(*args: object, backend: str | None = None, **kwargs: object) -> object:
        values = spec.validate(spec.bind(args, kwargs))
        return run(spec, O._route(spec, backend, values), values)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f":func:`fastclu.ops.{name}` through ``fastclu::{name}`` (same arguments)."
    return call


for _name in O.SPECS:
    globals()[_name] = _entry(_name)
