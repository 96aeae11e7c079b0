"""Model soups: the uniform soup and MEHL-Soup / MEHL-Soup+ (nblt/MEHL-Soup, ECCV'24).

MEHL-Soup learns mixing coefficients on a held-out loader. The soup is a point of the
hyperplane through a reference ``c`` spanned by the ingredients::

    theta = c + sum_k x_k (theta_k - c)                  (MEHL-Soup: one x_k per ingredient)
    theta_l = c_l + sum_k x_{k,l} (theta_{k,l} - c_l)    (MEHL-Soup+: one per layer l)

solved by block coordinate descent as the official code does: the ingredients are visited
in shuffled blocks of ``block_size``; for a block, ``x`` starts at 0 (``theta = c``), and each
step on a held-out batch forms ``theta``, back-propagates, takes
``dL/dx_{k,l} = <grad theta_l, theta_{k,l} - c_l>`` and steps an optimizer on ``x``; after the
block ``c`` moves to the new soup. ``c`` starts as the uniform soup. "Layer" here is one
parameter tensor of the model.

Memory: only ``c``, the current block's differences ``theta_k - c`` and the model (with its
gradients) are on the device. Ingredients stay where the caller keeps them: CPU state dicts,
or files loaded with ``torch.load(mmap=True)`` (pages read when a block is loaded). The soup
counts the bytes of the ingredient-sized tensors it holds (``info["peak_held_bytes"]``),
to compare with ``K`` times the model (loading all ingredients at once, as the official
code's learned-soup baseline does).

The weighted combination and the coefficient gradients are the fused multi-tensor ops
:func:`fastclu.ops.soup_combine_` (every parameter tensor in one launch per dtype group) and
:func:`fastclu.ops.soup_coef_grads` (all ``K x L`` inner products in one pass, deterministic);
``backend=`` selects their backend as everywhere in fastclu (CPU tensors: the reference).
Departure from the official code: it flattens every gradient with ``torch.cat`` and reallocates
the parameters each step; here the model's parameters are written in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastclu import ops

__all__ = ["SoupResult", "load_ingredient", "mehl_soup", "uniform_soup"]

Ingredient = Mapping[str, Tensor] | str | os.PathLike


@dataclass
class SoupResult:
    """Learned coefficients (``[K, L]``, per visit order folded into one soup) and numbers."""

    coefficients: list[list[float]]
    info: dict = field(default_factory=dict)


def load_ingredient(src: Ingredient, names: Sequence[str]) -> list[Tensor]:
    """The tensors ``names`` of one ingredient: a state dict, or a file (``torch.load(mmap=True)``)."""
    if isinstance(src, (str, os.PathLike)):
        sd = torch.load(Path(src), map_location="cpu", mmap=True, weights_only=True)
    elif isinstance(src, Mapping):
        sd = src
    else:
        raise TypeError(f"an ingredient must be a state dict or a file path, got {type(src).__name__}")
    missing = [n for n in names if n not in sd]
    if missing:
        raise KeyError(f"ingredient {src if not isinstance(src, Mapping) else '(state dict)'} lacks {missing[:3]}")
    return [sd[n] for n in names]


def _targets(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    named = [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        raise ValueError("model has no floating-point parameters to soup")
    return [n for n, _ in named], [p for _, p in named]


def _cycle(loader: Iterable) -> Iterator:
    """Endless passes over ``loader`` (kept here: the soup sits below fastclu.methods)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("loader is empty")


def _nbytes(xs: Iterable[Tensor]) -> int:
    return sum(x.numel() * x.element_size() for x in xs)


def uniform_soup(model: nn.Module, ingredients: Sequence[Ingredient]) -> None:
    """``model``'s parameters <- the mean of the ingredients, streamed one at a time (fp32 sum)."""
    names, params = _targets(model)
    if len(ingredients) == 0:
        raise ValueError("ingredients is empty")
    acc = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
    for src in ingredients:
        torch._foreach_add_(acc, [t.to(p.device, torch.float32) for t, p in zip(load_ingredient(src, names), params)])
    torch._foreach_div_(acc, float(len(ingredients)))
    with torch.no_grad():
        for p, a in zip(params, acc):
            p.copy_(a)


def _compose_(
    params: list[Tensor], c: list[Tensor], diffs: list[list[Tensor]], x: Tensor, backend: str | None = None
) -> None:
    """``params <- c + sum_k x[k, l] * diffs[k][l]`` (x ``[k, L]``, or ``[k, 1]`` for one per ingredient)."""
    ops.soup_combine_(params, c, diffs, x.detach(), backend=backend)


def _coef_grads(grads: list[Tensor], diffs: list[list[Tensor]], layerwise: bool, backend: str | None = None) -> Tensor:
    """``[k, L]`` (or ``[k, 1]``) inner products ``<grad_l, diff_{k,l}>``: fp32 (fp64 for fp64 inputs)."""
    return ops.soup_coef_grads(grads, diffs, layerwise=layerwise, backend=backend)


def mehl_soup(
    model: nn.Module,
    ingredients: Sequence[Ingredient],
    loader: Iterable,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    *,
    layerwise: bool = False,
    block_size: int = 3,
    epochs: int = 2,
    steps_per_block: int = 10,
    lr: float = 0.05,
    seed: int = 0,
    backend: str | None = None,
) -> SoupResult:
    """Learn a MEHL-Soup (``layerwise=True``: MEHL-Soup+) of ``ingredients`` into ``model``, in place.

    Args:
        model: the architecture; its floating-point parameters (by name) are souped, on their
            device; buffers are left as they are.
        ingredients: ``K`` state dicts (CPU tensors) or paths of ``torch.save``'d state dicts.
        loader: held-out ``(x, y)`` batches for the coefficients.
        loss_fn: ``loss_fn(model(x), y)`` -> scalar.
        block_size: ingredients per block (loaded together), at most
            :data:`fastclu.ops.SOUP_MAX_INGREDIENTS` (12).
        epochs: passes over the shuffled ingredients.
        steps_per_block: Adam steps on the block's coefficients.
        lr: Adam learning rate on ``x``.
        seed: the shuffles of the ingredients.
        backend: backend of the combination and coefficient-gradient ops (None: automatic).

    Returns:
        SoupResult: ``coefficients[k][l]``, the weight of ingredient ``k`` in the final soup
        ``theta = sum_k w_k theta_k`` (per layer; the weights of each layer sum to 1, since every
        step stays on the hyperplane through ``c``), and ``info`` with ``peak_held_bytes``
        (ingredient-sized tensors held at once), ``all_loaded_bytes`` (``K`` ingredients),
        ``steps`` and the held-out loss per block.
    """
    for name, v, lo in (("block_size", block_size, 1), ("epochs", epochs, 0), ("steps_per_block", steps_per_block, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if block_size > ops.SOUP_MAX_INGREDIENTS:
        raise ValueError(
            f"block_size must be <= {ops.SOUP_MAX_INGREDIENTS} (ingredients per fused call), got {block_size}"
        )
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    K = len(ingredients)
    if K == 0:
        raise ValueError("ingredients is empty")
    names, params = _targets(model)
    L = len(params) if layerwise else 1
    uniform_soup(model, ingredients)
    c = [p.detach().to(torch.float32, copy=True) for p in params]
    # The weight of each ingredient in c, per layer (c = sum_k w_k theta_k), kept exactly in fp64.
    w = torch.full((K, L), 1.0 / K, dtype=torch.float64)
    one = _nbytes(c)
    peak = 2 * one  # c plus the summand being added in uniform_soup
    gen = torch.Generator().manual_seed(seed)
    it = _cycle(loader)
    losses: list[float] = []
    steps = 0
    dev = params[0].device
    for _ in range(epochs):
        order = torch.randperm(K, generator=gen).tolist()
        for b0 in range(0, K, block_size):
            idx = order[b0 : b0 + block_size]
            diffs = []
            for k in idx:
                tk = [t.to(dev, torch.float32) for t in load_ingredient(ingredients[k], names)]
                diffs.append(torch._foreach_sub(tk, c))
            peak = max(peak, one * (1 + len(diffs)))
            x = torch.zeros(len(idx), L, dtype=torch.float32, requires_grad=True)
            opt = torch.optim.Adam([x], lr=lr)
            for _ in range(steps_per_block):
                xb, yb = next(it)
                with torch.no_grad():
                    _compose_(params, c, diffs, x, backend)
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(xb.to(dev)), yb.to(dev))
                loss.backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                x.grad = _coef_grads(grads, diffs, layerwise, backend).to("cpu", x.dtype)
                opt.step()
                steps += 1
                losses.append(float(loss.detach()))
            with torch.no_grad():
                _compose_(c, c, diffs, x, backend)  # c moves to the new soup in place (fp32)
            xd = x.detach().double()
            # c_new = c + sum_j x_j (theta_j - c): the weights follow the same affine map.
            w = w * (1.0 - xd.sum(0, keepdim=True))
            for j, k in enumerate(idx):
                w[k] += xd[j]
            del diffs
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        for p, ci in zip(params, c):
            p.copy_(ci)
    info = {"K": K, "layers": L, "layerwise": layerwise, "steps": steps, "block_size": block_size,
            "peak_held_bytes": peak, "all_loaded_bytes": K * one, "model_bytes": one, "loss": losses}  # fmt: skip
    return SoupResult(w.tolist(), info)
