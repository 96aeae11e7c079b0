"""LoRA layers as fastclu sees them: discovery (peft ``LoraLayer`` or :class:`LoRALinear`) and
the merged weight's row norms without a dense ``W + s*B@A``.

A LoRA layer computes ``y = x W^T + s * (x A^T) B^T (+ bias)`` with the frozen base weight
``W`` ``[out, in]``, ``A`` ``[r, in]``, ``B`` ``[out, r]`` and the scaling ``s`` (peft:
``lora_alpha / r``). Its merged weight is ``W + s * B @ A``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["LoRALinear", "LoRAPair", "add_lora", "find_lora_layers", "merged_row_norms"]


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank adapter (the plain, peft-free form).

    ``forward(x) = base(x) + scaling * (x @ lora_A.T) @ lora_B.T``. ``lora_A`` ``[r, in]`` starts
    Kaiming-uniform (``a = sqrt(5)``, as peft), ``lora_B`` ``[out, r]`` at zero, so a fresh adapter
    leaves the output unchanged. ``scaling = alpha / r``.
    """

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0, *, seed: int = 0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be a torch.nn.Linear, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be an int >= 1, got {r!r}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=w.device, dtype=w.dtype))
        self.scaling = float(alpha) / r
        self.reset_adapter(seed)

    def reset_adapter(self, seed: int) -> None:
        """A fresh adapter: ``A`` Kaiming-uniform from ``seed`` (global RNG untouched), ``B = 0``."""
        g = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(self.lora_A.shape[1])  # kaiming_uniform_(a=sqrt(5)) bound
        with torch.no_grad():
            a = torch.empty(self.lora_A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=g)
            self.lora_A.copy_(a)
            self.lora_B.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.scaling * ((x @ self.lora_A.t()) @ self.lora_B.t())


@dataclass
class LoRAPair:
    """One LoRA layer: its name, frozen base weight ``[out, in]``, ``A`` ``[r, in]``, ``B`` ``[out, r]``.

    ``scaling`` is read and written through the owning module (peft keeps it per adapter).
    """

    name: str
    module: nn.Module
    weight: Tensor
    A: Tensor
    B: Tensor
    adapter: str | None = None  # peft adapter name; None for LoRALinear

    @property
    def scaling(self) -> float:
        if self.adapter is None:
            return float(self.module.scaling)
        return float(self.module.scaling[self.adapter])

    @scaling.setter
    def scaling(self, value: float) -> None:
        if self.adapter is None:
            self.module.scaling = value
        else:
            self.module.scaling[self.adapter] = value

    def delta(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The dense ``s * B @ A`` in ``dtype`` (allocates ``[out, in]``)."""
        return self.scaling * (self.B.detach().to(dtype) @ self.A.detach().to(dtype))

    @contextmanager
    def scaled(self, factor: float) -> Iterator[None]:
        """Context: the adapter's contribution scaled by ``factor`` (``s -> factor * s``), restored exactly."""
        old = self.scaling
        self.scaling = old * factor
        try:
            yield
        finally:
            self.scaling = old


def _peft_pair(name: str, mod: nn.Module) -> LoRAPair:
    active = list(mod.active_adapters)
    if len(active) != 1:
        raise ValueError(f"LoRA layer {name!r} has {len(active)} active adapters; exactly one is supported")
    ad = active[0]
    base = mod.get_base_layer()
    if not isinstance(base, nn.Linear) or getattr(mod, "fan_in_fan_out", False):
        raise TypeError(f"LoRA layer {name!r}: only nn.Linear base layers (fan_in_fan_out=False) are supported")
    if getattr(mod, "merged", False):
        raise ValueError(f"LoRA layer {name!r} has its adapter merged into the base weight; unmerge it first")
    if ad not in mod.lora_A or ad not in mod.lora_B:
        raise ValueError(f"LoRA layer {name!r}: active adapter {ad!r} is not a LoRA (A, B) adapter")
    return LoRAPair(name, mod, base.weight, mod.lora_A[ad].weight, mod.lora_B[ad].weight, ad)


def find_lora_layers(model: nn.Module) -> list[LoRAPair]:
    """Every LoRA layer of ``model`` in ``named_modules`` order: peft ``LoraLayer``s over
    ``nn.Linear`` (the active adapter; exactly one per layer) and :class:`LoRALinear` modules.

    Raises ValueError when there is none, or a layer's adapter is merged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    # A model can only hold peft layers when peft is imported: do not pay its import otherwise.
    lora_mod = sys.modules.get("peft.tuners.lora") if "peft" in sys.modules else None
    LoraLayer = getattr(lora_mod, "LoraLayer", ()) if lora_mod is not None else ()
    pairs = []
    for name, mod in model.named_modules():
        if isinstance(mod, LoRALinear):
            pairs.append(LoRAPair(name, mod, mod.base.weight, mod.lora_A, mod.lora_B))
        elif LoraLayer and isinstance(mod, LoraLayer):
            pairs.append(_peft_pair(name, mod))
    if not pairs:
        raise ValueError("model has no LoRA layers (peft LoraLayer over nn.Linear, or fastclu.lora.LoRALinear)")
    return pairs


def add_lora(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    *,
    select: Callable[[str, nn.Linear], bool] | None = None,
    seed: int = 0,
) -> list[LoRAPair]:
    """Replace the ``nn.Linear`` children chosen by ``select(name, linear)`` (default: all) with
    :class:`LoRALinear` in place (layer ``j`` gets adapter seed ``seed + j``); returns the pairs."""
    chosen = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and (select is None or select(n, m))]
    if not chosen:
        raise ValueError("add_lora: select chose no nn.Linear module")
    for j, (name, lin) in enumerate(chosen):
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LoRALinear(lin, r, alpha, seed=seed + j))
    return find_lora_layers(model)


def merged_row_norms(pairs: list[LoRAPair], *, chunk_elems: int = 1 << 20) -> list[Tensor]:
    """fp32 ``||(W + s*B@A)[row]||`` per output row of each pair, without the dense merged weight.

    Per row ``||W_r||^2 + 2s <W_r, (BA)_r> + s^2 ||(BA)_r||^2`` with ``<W_r, (BA)_r> = sum_k B_rk (W A^T)_rk``
    and ``||(BA)_r||^2 = B_r (A A^T) B_r^T``: products with ``A`` (``[out, r]``, ``[r, r]``), done in
    fp64 over blocks of rows of at most ``chunk_elems`` elements (the only transient copy of ``W``).
    """
    out = []
    for p in pairs:
        w, a, b, s = p.weight.detach(), p.A.detach().double(), p.B.detach(), p.scaling
        rows, n = w.shape
        gram = a @ a.t()
        step = max(1, chunk_elems // max(n, 1))
        sq = torch.empty(rows, dtype=torch.float64, device=w.device)
        for r0 in range(0, rows, step):
            wc = w[r0 : r0 + step].double()
            bc = b[r0 : r0 + step].double()
            cross = ((wc @ a.t()) * bc).sum(1)
            bab = ((bc @ gram) * bc).sum(1)
            sq[r0 : r0 + step] = (wc * wc).sum(1) + 2.0 * s * cross + s * s * bab
        out.append(sq.clamp_min(0.0).sqrt().to(torch.float32))
    return out
