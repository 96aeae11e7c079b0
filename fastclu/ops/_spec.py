"""One spec per op: its operands, scalars and flags, written once.

From an :class:`OpSpec` are derived the generic part of input validation (:meth:`OpSpec.validate`,
then the op's own ``check``), the backend call (:meth:`OpSpec.call`: the same positional /
keyword split for every backend), and the ``torch.library`` schema, flat argument list and fake
of the op's ``fastclu::`` custom op (:mod:`fastclu.ops.library`).

Argument kinds (``Arg.kind``) and their custom-op schema:

=========== ============================== ===========================================
kind        Python value                   schema (``n`` = the argument's name)
=========== ============================== ===========================================
tensors     list[Tensor] (or None if opt)  ``Tensor[] n`` (empty list = None)
masks       bit-packed uint8 list or None  ``Tensor[] n`` (checked by the op's ``check``)
roles       list of <= 4 tensor lists      ``Tensor[] n, int n_roles`` (concatenated)
state       dict[str, list[Tensor]]        ``Tensor[] n_<key>`` per key of ``state_keys``
flags       list[bool]                     ``bool[] n``
scalar      float or 0-d Tensor            ``float n, Tensor? n_t`` (the tensor wins)
scalars     list of float or 0-d Tensor    ``float[] n, Tensor?[] n_t``
tensor      Tensor or None                 ``Tensor? n``
float/int/  Python value                   ``float n`` / ``int n`` / ``bool n`` / ``str n``
bool/str
floats      tuple[float, ...]              ``float[] n``
hparams     ``**n``: {name: value}, names and  one ``float`` / ``bool`` / ``float[]`` per name,
            defaults from ``Arg.default``  typed by its default; the backends get ``**n``
host        Python object (seed, ...)      not in the schema: a call that sets it runs the
                                           backend directly (``Arg.host``)
=========== ============================== ===========================================
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fastclu.ops import _checks as C

REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    """One argument of an op, in the order of the public signature."""

    name: str
    kind: str
    default: object = REQUIRED
    like: str | None = None  # tensor lists: aligned with this earlier list (same length, shapes, devices)
    optional: bool = False  # tensor lists: None allowed
    one_device: bool = False  # tensor lists: every tensor on one device
    mutable: bool = False  # written by the op (custom-op alias annotation)
    keyword: bool = False  # passed to the backends by keyword (after the ``*``)


@dataclass(frozen=True)
class OpSpec:
    """Everything about one op's arguments and result."""

    name: str
    args: tuple[Arg, ...]
    out: str = "none"  # "none" | "masks" (like the first list) | "gram" | "pair" | "coefs" ([K, L or 1])
    check: Callable[[dict], None] | None = None  # op-specific validation after the generic one
    state_keys: tuple[str, ...] = ()
    by_name: Mapping[str, Arg] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "by_name", {a.name: a for a in self.args})

    @property
    def main(self) -> str:
        """The argument whose tensors drive dispatch (device) and scalar placement."""
        return self.args[0].name

    # ------------------------------------------------------------------ binding and validation
    def bind(self, args: tuple, kwargs: dict) -> dict:
        """``(args, kwargs)`` of a call with the public signature -> ``{name: value}``, defaults filled."""
        if len(args) > len(self.args):
            raise TypeError(f"{self.name}() takes at most {len(self.args)} positional arguments")
        values = dict(zip([a.name for a in self.args], args))
        extra = next((a for a in self.args if a.kind == "hparams"), None)
        for k, v in kwargs.items():
            if extra is not None and k not in self.by_name and k in extra.default:
                values.setdefault(extra.name, {})[k] = v
                continue
            if k not in self.by_name:
                raise TypeError(f"{self.name}() got an unexpected keyword argument {k!r}")
            if k in values:
                raise TypeError(f"{self.name}() got multiple values for argument {k!r}")
            values[k] = v
        for a in self.args:
            if a.name not in values:
                if a.kind == "hparams":
                    values[a.name] = {}
                    continue
                if a.default is REQUIRED:
                    raise TypeError(f"{self.name}() missing required argument {a.name!r}")
                values[a.name] = a.default
        return values

    def validate(self, values: dict) -> dict:
        """Check and normalise every argument (raises before anything is modified)."""
        out = dict(values)
        main = None
        for a in self.args:
            v = out[a.name]
            if a.kind == "tensors":
                if v is None and a.optional:
                    continue
                v = C.tensor_list(a.name, v) if a.like is None else C.aligned(a.name, v, a.like, out[a.like])
                if a.one_device:
                    C.one_device(a.name, v)
                if main is None:
                    main = v
            elif a.kind == "scalar":
                v = C.scalar(a.name, v, main[0].device if main else None)
            elif a.kind == "float":
                v = float(v)
            elif a.kind == "bool":
                v = bool(v)
            out[a.name] = v
        if self.check is not None:
            self.check(out)
        return out

    # ------------------------------------------------------------------ the backend call
    def call(self, impl: Callable, values: dict) -> object:
        """Call a backend implementation: positional arguments first, then the keyword ones."""
        pos = [values[a.name] for a in self.args if not a.keyword]
        kw = {a.name: values[a.name] for a in self.args if a.keyword and a.kind != "hparams"}
        for a in self.args:
            if a.kind == "hparams":
                kw.update(values[a.name])
        return impl(*pos, **kw)

    def has_host_only(self, values: dict) -> bool:
        """True when an argument the custom-op schema cannot carry is set (e.g. a 64-bit seed)."""
        return any(a.kind == "host" and values[a.name] is not None for a in self.args)

    # ------------------------------------------------------------------ the custom op
    def schema(self) -> str:
        """The ``torch.library`` schema of ``fastclu::<name>`` (a ``str backend`` comes last)."""
        parts: list[str] = []
        letters = iter("abcdefghijklmnopqrstuvwxyz")

        def tl(name: str, mutable: bool) -> str:
            return f"Tensor({next(letters)}!)[] {name}" if mutable else f"Tensor[] {name}"

        for a in self.args:
            k, n = a.kind, a.name
            if k in ("tensors", "masks"):
                parts.append(tl(n, a.mutable))
            elif k == "roles":
                parts += [f"Tensor[] {n}", f"int {n}_roles"]
            elif k == "state":
                parts += [tl(f"{n}_{key}", True) for key in self.state_keys]
            elif k == "flags":
                parts.append(f"bool[] {n}")
            elif k == "scalar":
                parts += [f"float {n}", f"Tensor? {n}_t"]
            elif k == "scalars":
                parts += [f"float[] {n}", f"Tensor?[] {n}_t"]
            elif k == "tensor":
                parts.append(f"Tensor? {n}")
            elif k == "floats":
                parts.append(f"float[] {n}")
            elif k == "hparams":
                parts += [f"{_hparam_type(d)} {h}" for h, d in a.default.items()]
            elif k in ("float", "int", "bool", "str"):
                parts.append(f"{k} {n}")
        parts.append("str backend")
        returns = {"none": "()", "masks": "Tensor[]", "gram": "Tensor", "pair": "(Tensor, Tensor)", "coefs": "Tensor"}
        ret = returns[self.out]
        return f"({', '.join(parts)}) -> {ret}"

    def mutated(self) -> tuple[str, ...]:
        """Schema names of the arguments the op writes."""
        names: list[str] = []
        for a in self.args:
            if a.kind == "tensors" and a.mutable:
                names.append(a.name)
            elif a.kind == "state":
                names += [f"{a.name}_{key}" for key in self.state_keys]
        return tuple(names)

    def flatten(self, values: dict) -> list:
        """Validated values -> the custom op's flat argument list (without ``backend``)."""
        flat: list = []
        for a in self.args:
            k, v = a.kind, values[a.name]
            if k in ("tensors", "masks"):
                flat.append([] if v is None else list(v))
            elif k == "roles":
                flat += [[t for role in v for t in role], len(v)]
            elif k == "state":
                flat += [list(v.get(key, [])) for key in self.state_keys]
            elif k == "flags":
                flat.append([bool(f) for f in v])
            elif k == "scalar":
                flat += [0.0, v] if isinstance(v, Tensor) else [float(v), None]
            elif k == "scalars":
                flat += [[0.0 if isinstance(c, Tensor) else float(c) for c in v],
                         [c if isinstance(c, Tensor) else None for c in v]]  # fmt: skip
            elif k == "floats":
                flat.append([float(x) for x in v])
            elif k == "hparams":
                flat += [_hparam_value(v.get(h, d), d) for h, d in a.default.items()]
            elif k != "host":
                flat.append(v)
        return flat

    def unflatten(self, flat: tuple) -> dict:
        """The custom op's flat arguments (without ``backend``) -> values for :meth:`call`."""
        values: dict = {}
        it = iter(flat)
        for a in self.args:
            k = a.kind
            if k in ("tensors", "masks"):
                v = next(it)
                values[a.name] = None if a.optional and not v else list(v)
            elif k == "roles":
                ts, n = next(it), next(it)
                size = len(ts) // n
                values[a.name] = [list(ts[r * size : (r + 1) * size]) for r in range(n)]
            elif k == "state":
                lists = [next(it) for _ in self.state_keys]
                values[a.name] = {key: list(v) for key, v in zip(self.state_keys, lists) if v}
            elif k == "scalar":
                v, t = next(it), next(it)
                values[a.name] = t if t is not None else v
            elif k == "scalars":
                vs, ts = next(it), next(it)
                values[a.name] = [t if t is not None else v for v, t in zip(vs, ts)]
            elif k == "floats":
                values[a.name] = tuple(next(it))
            elif k == "hparams":
                values[a.name] = {h: _hparam_value(next(it), d) for h, d in a.default.items()}
            elif k == "flags":
                values[a.name] = list(next(it))
            elif k == "host":
                values[a.name] = None
            else:
                values[a.name] = next(it)
        return values

    def fake(self, values: dict) -> object:
        """Shapes and dtypes of the result, for the custom op's fake (meta) kernel."""
        if self.out == "none":
            return None
        first = values[self.main]
        if self.out == "masks":
            return [torch.empty((x.numel() + 7) // 8, dtype=torch.uint8, device=x.device) for x in first]
        if self.out == "gram":
            n = len(first)
            dev = first[0][0].device if first[0] else None
            return torch.empty((n, n), dtype=torch.float32, device=dev)
        dev = first[0].device if first else None
        if self.out == "coefs":  # soup_coef_grads: [K, L] per layer, [K, 1] summed
            cols = len(first) if values["layerwise"] else 1
            return torch.empty((len(values["diffs"]), cols), dtype=torch.float32, device=dev)
        return torch.empty((), dtype=torch.float32, device=dev), torch.empty((), dtype=torch.float32, device=dev)


def _hparam_type(default: object) -> str:
    """Schema type of a hyperparameter, from its default's type."""
    if isinstance(default, bool):
        return "bool"
    return "float[]" if isinstance(default, tuple) else "float"


def _hparam_value(v: object, default: object) -> object:
    """``v`` as the type of ``default`` (bool, float, or a tuple of floats)."""
    if isinstance(default, bool):
        return bool(v)
    if isinstance(default, tuple):
        return tuple(float(x) for x in v)  # type: ignore[union-attr]
    return float(v)  # type: ignore[arg-type]
