"""Saliency masks for unlearning and continual learning: Fisher accumulation, ratio mask, global top-k.

A :class:`SaliencyMask` holds one bit per weight (the :mod:`fastclu.ops.bits` layout: ``uint8``,
bit ``j % 8`` of byte ``j // 8``, elements in the tensor's logical row-major order whatever its
memory layout) for every tensor of a parameter list, plus the shapes and, optionally, the
parameter names (``model.named_parameters()`` names). It is what
:meth:`fastclu.optim.SGD.set_mask` / :meth:`fastclu.optim.AdamW.set_mask` take; with names it is
matched to the optimizer's parameters by name and a mismatch is an error naming the parameter.

Losses follow the contract of :mod:`fastclu.losses` (``loss_fn(model, batch) -> Tensor[B]``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from fastclu import distributed, ops
from fastclu._scalars import check_scalar
from fastclu.losses import LossFn, reduce_mean, resolve_loss, to_device

__all__ = ["SaliencyMask", "fisher", "ratio_mask", "topk_mask", "trainable_parameters"]


def trainable_parameters(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and parameters of ``model`` that require grad (``named_parameters`` order).

    The set an optimizer built as ``SGD(p for p in model.parameters() if p.requires_grad)``
    holds: score, mask and Fisher over these, so frozen backbones and LoRA work.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [n for n, _ in named], [p for _, p in named]


def _check_names(names: object, n: int) -> list[str] | None:
    if names is None:
        return None
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError("names must be a list of parameter names (str) or None")
    out = list(names)
    if not all(isinstance(x, str) for x in out):
        raise TypeError("names must be a list of parameter names (str)")
    if len(out) != n:
        raise ValueError(f"names has {len(out)} entries for {n} masked tensors")
    if len(set(out)) != len(out):
        dup = sorted({x for x in out if out.count(x) > 1})
        raise ValueError(f"names must be unique, repeated: {dup}")
    return out


class SaliencyMask:
    """Bit-packed binary mask over a list of tensors (1 = salient / may move).

    Attributes:
        packed: one contiguous ``uint8[ceil(numel_i / 8)]`` tensor per masked tensor.
        shapes: the shape of each masked tensor.
        names: the parameter name of each masked tensor, or None (matched by position).
    """

    def __init__(
        self, packed: Sequence[Tensor], shapes: Sequence[Sequence[int]], names: Sequence[str] | None = None
    ) -> None:
        if isinstance(packed, Tensor) or not isinstance(packed, Sequence):
            raise TypeError("packed must be a list of uint8 tensors")
        if len(packed) != len(shapes):
            raise ValueError(f"packed has {len(packed)} tensors but shapes has {len(shapes)}")
        self.shapes = [torch.Size(s) for s in shapes]
        self.packed: list[Tensor] = []
        for i, (m, s) in enumerate(zip(packed, self.shapes)):
            if not isinstance(m, Tensor) or m.dtype != torch.uint8:
                raise TypeError(f"packed[{i}] must be a uint8 tensor")
            if m.numel() != ops.packed_numel(s.numel()):
                raise ValueError(
                    f"packed[{i}] has {m.numel()} bytes, shape {tuple(s)} needs {ops.packed_numel(s.numel())}"
                )
            self.packed.append(m.reshape(-1).contiguous())
        self.names = _check_names(names, len(self.packed))

    @classmethod
    def from_bool(
        cls, masks: Iterable[Tensor] | Mapping[str, Tensor], names: Sequence[str] | None = None
    ) -> SaliencyMask:
        """Pack bool tensors (any shapes): a list (``names`` optional) or a ``{name: mask}`` dict."""
        if isinstance(masks, Mapping):
            if names is not None:
                raise TypeError("names comes from the dict's keys: do not pass both")
            names, masks = list(masks.keys()), list(masks.values())
        masks = list(masks)
        for i, m in enumerate(masks):
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise TypeError(f"masks[{i}] must be a bool tensor")
        return cls([ops.pack_bits(m.contiguous()) for m in masks], [m.shape for m in masks], names)

    def by_name(self) -> dict[str, Tensor]:
        """``{name: packed uint8 tensor}`` (needs names)."""
        if self.names is None:
            raise ValueError("this SaliencyMask has no parameter names (it is matched by position)")
        return dict(zip(self.names, self.packed))

    def __len__(self) -> int:
        return len(self.packed)

    @property
    def numel(self) -> int:
        """Number of masked elements in all tensors (bits, not bytes)."""
        return sum(s.numel() for s in self.shapes)

    def counts(self) -> list[int]:
        """Set bits per tensor (host sync)."""
        return [ops.count_bits(m) for m in self.packed]

    def densities(self) -> list[float]:
        """Fraction of set bits per tensor (an empty tensor has density 0)."""
        return [c / s.numel() if s.numel() else 0.0 for c, s in zip(self.counts(), self.shapes)]

    def density(self) -> float:
        """Fraction of set bits over all tensors (0 when there are no elements)."""
        total = self.numel
        return sum(self.counts()) / total if total else 0.0

    def unpack(self) -> list[Tensor]:
        """The mask as bool tensors shaped like the masked tensors."""
        return [ops.unpack_bits(m, s.numel(), s) for m, s in zip(self.packed, self.shapes)]

    def to(self, device: torch.device | str) -> SaliencyMask:
        """A copy on ``device`` (the same object's data when already there)."""
        return SaliencyMask([m.to(device) for m in self.packed], self.shapes, self.names)

    @property
    def device(self) -> torch.device | None:
        return self.packed[0].device if self.packed else None

    def state_dict(self) -> dict[str, Any]:
        """``{"packed": [uint8 tensors], "shapes": [[int, ...]], "names": [str] | None}``:
        loadable with ``weights_only=True``."""
        return {"packed": [m.clone() for m in self.packed], "shapes": [list(s) for s in self.shapes],
                "names": None if self.names is None else list(self.names)}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Replace this mask's content by a :meth:`state_dict` (validated before anything changes)."""
        new = SaliencyMask.from_state_dict(state_dict)
        self.packed, self.shapes, self.names = new.packed, new.shapes, new.names

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, Any]) -> SaliencyMask:
        return cls(state_dict["packed"], state_dict["shapes"], state_dict.get("names"))

    def __repr__(self) -> str:
        return f"SaliencyMask(tensors={len(self)}, numel={self.numel}, density={self.density():.4f})"


def _params_list(name: str, xs: object) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, Iterable):
        raise TypeError(f"{name} must be a list of tensors")
    out = list(xs)
    for i, x in enumerate(out):
        if not isinstance(x, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
    return out


def fisher(
    model: nn.Module,
    loader: Iterable[Any],
    loss_fn: LossFn | nn.Module | None = None,
    *,
    params: Sequence[Tensor] | None = None,
    power: int = 2,
    backend: str | None = None,
    group: Any = None,
) -> list[Tensor]:
    """Diagonal empirical Fisher: the mean over batches of the squared batch gradient ``g_b**2``.

    Args:
        model: the network. The model's mode (train/eval) is left as the caller set it.
        loader: iterable of batches (tuples or HF-style mappings, moved to the parameters' device).
        loss_fn: ``loss_fn(model, batch) -> Tensor[B]`` (:mod:`fastclu.losses`; its mean is the
            batch loss); None: cross-entropy on ``(inputs, targets)``; a torch loss module such
            as ``nn.CrossEntropyLoss()`` is taken as a ``criterion(logits, targets)``.
        params: the parameters to score, e.g. an optimizer's (``trainable_parameters(model)[1]``);
            None: every ``model.parameters()`` entry.
        power: 2 for ``g**2`` (Fisher), 1 for ``|g|``.
        group: DDP: the process group whose ranks' Fishers are summed (each rank's batches count
            as batches of one Fisher); None: the DDP model's own group; ``distributed.LOCAL``:
            this rank's Fisher only. FSDP2 (DTensor parameters): the Fisher is kept as DTensor
            shards and a batch is one data-parallel step (FSDP averages the ranks' gradients).
    Returns:
        one fp32 tensor per entry of ``params`` (same shapes and devices); parameters that do
        not require grad, or get none, have zeros. The model's ``.grad`` is not touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError("loss_fn must be callable")
    loss_fn = resolve_loss(loss_fn)
    if power not in (1, 2):
        raise ValueError(f"power must be 1 or 2, got {power!r}")
    params = list(model.parameters()) if params is None else _params_list("params", params)
    if not params:
        raise ValueError("params is empty: nothing to score")
    # zeros_like keeps a DTensor parameter's sharding; contiguous whatever the parameter's layout
    acc = [torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for p in params]
    net, reduce_over = distributed.forward_module(model), distributed.fisher_group(model, group)
    live = [i for i, p in enumerate(params) if p.requires_grad]
    dev = params[0].device
    batches = 0
    for batch in loader:
        with torch.enable_grad():
            loss = reduce_mean(loss_fn(net, to_device(batch, dev)))
            grads = distributed.fisher_grads(model, loss, [params[i] for i in live])
        by_device: dict[torch.device, list[tuple[int, Tensor]]] = {}
        for i, g in zip(live, grads):
            if g is not None:
                by_device.setdefault(g.device, []).append((i, g))
        for pairs in by_device.values():
            ops.fisher_accumulate_([distributed.local(acc[i]) for i, _ in pairs],
                                   [distributed.local(g.contiguous()) for _, g in pairs], 1.0,
                                   power=power, backend=backend)  # fmt: skip
        batches += 1
    batches = distributed.reduce_fisher_([distributed.local(a) for a in acc], batches, reduce_over)
    if batches:
        for a in acc:
            a.div_(batches)
    return acc


def ratio_mask(
    f_forget: Sequence[Tensor],
    f_remain: Sequence[Tensor],
    gamma: float | Tensor = 1.0,
    *,
    eps: float = 1e-12,
    names: Sequence[str] | None = None,
    backend: str | None = None,
    group: Any = None,
) -> SaliencyMask:
    """SFR-on's balanced mask ``m = (F_f + eps) >= gamma * (F_r + eps)`` per element.

    Args:
        f_forget, f_remain: aligned lists of importances (e.g. from :func:`fisher`), one device.
        gamma: threshold ratio (float or 0-d tensor).
        names: parameter names of the tensors, carried by the mask (None: matched by position).
        group: on several ranks, plain importances must be equal on every rank of ``group``
            (default: the world), else ``ValueError``; ``distributed.LOCAL`` skips the check.
            DTensor importances give the masks of the local shards.
    """
    f_forget = _params_list("f_forget", f_forget)
    f_remain = _params_list("f_remain", f_remain)
    names = _check_names(names, len(f_forget))
    # gamma and eps finite and >= 0 (a 0-d CPU tensor read here; device tensors trusted)
    check_scalar("gamma", gamma, lo=0.0)
    check_scalar("eps", eps, lo=0.0, tensor_ok=False)
    packed = distributed.ratio_mask(f_forget, f_remain, gamma, eps=eps, group=group, backend=backend)
    return SaliencyMask(packed, [distributed.local(f).shape for f in f_forget], names)


def topk_mask(
    scores: Sequence[Tensor],
    density: float,
    *,
    names: Sequence[str] | None = None,
    backend: str | None = None,
    group: Any = None,
) -> SaliencyMask:
    """Exact global top-k over all elements of ``scores``, ``k = round(density * total)``.

    Ties go to the earlier element in (tensor index, flat index) order (see :func:`fastclu.ops.topk_mask`).

    Args:
        scores: list of float tensors on one device (e.g. ``|summed gradient|`` for SalUn).
        density: fraction of elements to keep, in ``[0, 1]``.
        names: parameter names of the tensors, carried by the mask (None: matched by position).
        group: as in :func:`ratio_mask`. DTensor scores: a distributed radix select over the
            shards (:func:`fastclu.distributed.topk_mask`); the mask covers the local shards and
            exactly ``k`` bits are set over all ranks.
    """
    scores = _params_list("scores", scores)
    names = _check_names(names, len(scores))
    if isinstance(density, bool) or not isinstance(density, (int, float)):
        raise TypeError(f"density must be a float, got {type(density).__name__}")
    if not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    total = sum(s.numel() for s in scores)
    k = min(total, round(float(density) * total))
    packed = distributed.topk_mask(scores, k, group=group, backend=backend)
    return SaliencyMask(packed, [distributed.local(s).shape for s in scores], names)
