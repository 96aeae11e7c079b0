"""The loss contract shared by :mod:`fastclu.methods` and :func:`fastclu.saliency.fisher`.

A *loss function* is ``loss_fn(model, batch) -> Tensor[B]``: the per-example losses of one
batch (floating point, on the model's device, differentiable). Methods reduce them as they
need (a mean for plain steps, SFR-on's adaptive weights, membership-inference features); a
0-d tensor (an already reduced batch loss) is accepted where only the mean is used
(:func:`reduce_mean`) and refused with an error where per-example losses are needed
(:func:`per_example`).

A *batch* is one of:

* a tuple / list ``(inputs, targets, *extra)``: the model is called as ``model(inputs)``;
  extra fields (e.g. example indices) are ignored by the default loss;
* a mapping in the Hugging Face style: ``labels`` is taken out and the model is called as
  ``model(**rest)``.

A model *output* is a tensor of logits, an object with a ``.logits`` attribute (HF
``ModelOutput``) or a mapping with a ``"logits"`` key.

Data given to a method may be a DataLoader (or any re-iterable of batches), a
:class:`torch.utils.data.Dataset` (wrapped in a DataLoader with the method's batch size and a
seeded generator, see :func:`as_loader`) or a :class:`fastclu.data.Subset`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "IGNORE_INDEX",
    "ExampleList",
    "LossFn",
    "as_dataset",
    "as_loader",
    "batch_size_of",
    "classification_loss",
    "from_criterion",
    "logits_of",
    "masked_classification_loss",
    "per_example",
    "reduce_mean",
    "resolve_loss",
    "run_model",
    "split_batch",
    "to_device",
    "unbatch",
    "with_targets",
]

LossFn = Callable[[nn.Module, Any], Tensor]
IGNORE_INDEX = -100  # targets equal to this take no part in a sequence loss (HF convention)


def split_batch(batch: Any) -> tuple[Any, Tensor | None, Any]:
    """``(inputs, targets, extra)`` of a batch (see the module docstring).

    For a mapping, ``inputs`` is a dict without ``labels`` and ``extra`` is None; for a tuple,
    ``extra`` is the tuple of fields after the targets. ``targets`` is None when absent.
    """
    if isinstance(batch, Mapping):
        rest = {k: v for k, v in batch.items() if k != "labels"}
        return rest, batch.get("labels"), None
    if isinstance(batch, (tuple, list)):
        if len(batch) == 0:
            raise ValueError("a batch tuple must hold at least the inputs")
        return batch[0], batch[1] if len(batch) > 1 else None, tuple(batch[2:])
    raise TypeError(
        f"a batch must be a tuple (inputs, targets, ...) or a mapping with 'labels', got {type(batch).__name__}"
    )


def with_targets(batch: Any, targets: Tensor) -> Any:
    """The same batch with its targets replaced (``labels`` for a mapping, field 1 for a tuple)."""
    if isinstance(batch, Mapping):
        return {**batch, "labels": targets}
    inputs, _, extra = split_batch(batch)
    return (inputs, targets, *extra)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a batch (nested tuples / lists / mappings) to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch) if isinstance(batch, tuple) else [
            to_device(v, device) for v in batch]  # fmt: skip
    return batch


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(**inputs)`` for a mapping, else ``model(inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(inputs)


def logits_of(output: Any) -> Tensor:
    """The logits of a model output: the tensor itself, ``output.logits`` or ``output["logits"]``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    logits = getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(f"model output must be a logits tensor or carry .logits, got {type(output).__name__}")


def batch_size_of(batch: Any) -> int:
    """Number of examples in a batch (leading size of its targets, else of its first tensor input)."""
    inputs, targets, _ = split_batch(batch)
    if isinstance(targets, Tensor):
        return int(targets.shape[0])
    first = next(iter(inputs.values())) if isinstance(inputs, Mapping) else inputs
    if not isinstance(first, Tensor):
        raise TypeError("cannot tell the batch size: no tensor targets or inputs")
    return int(first.shape[0])


def _ce_per_example(logits: Tensor, targets: Tensor) -> Tensor:
    if logits.ndim == 2:
        return F.cross_entropy(logits.float(), targets, reduction="none")
    if logits.ndim == 3 and targets.ndim == 2:
        # Token classification [B, T, C] with targets [B, T]: mean over the counted tokens.
        tok = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none", ignore_index=IGNORE_INDEX)
        keep = (targets != IGNORE_INDEX).to(tok.dtype)
        return (tok * keep).sum(1) / keep.sum(1).clamp_min(1.0)
    raise ValueError(
        f"classification_loss: logits of shape {tuple(logits.shape)} and targets {tuple(targets.shape)}: "
        "expected [B, C] with [B], or [B, T, C] with [B, T]"
    )


def classification_loss(model: nn.Module, batch: Any) -> Tensor:
    """The default loss: cross-entropy per example, fp32 ``[B]``.

    Logits ``[B, C]`` with integer targets ``[B]``, or ``[B, T, C]`` with ``[B, T]`` (mean over
    the tokens whose target is not ``IGNORE_INDEX``; no shift: shift causal-LM labels first).
    """
    inputs, targets, _ = split_batch(batch)
    if targets is None:
        raise ValueError("classification_loss: the batch has no targets (tuple field 1 or 'labels')")
    return _ce_per_example(logits_of(run_model(model, inputs)), targets)


def masked_classification_loss(classes: Iterable[int] | None) -> LossFn:
    """Cross-entropy restricted to ``classes`` (logits of other classes are masked out of the softmax).

    The "labels trick" of class-incremental learning; ``None`` gives :func:`classification_loss`.
    """
    if classes is None:
        return classification_loss
    cls = sorted({int(c) for c in classes})

    def loss(model: nn.Module, batch: Any) -> Tensor:
        inputs, targets, _ = split_batch(batch)
        if targets is None:
            raise ValueError("masked_classification_loss: the batch has no targets")
        logits = logits_of(run_model(model, inputs))
        allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        allowed[cls] = True
        return _ce_per_example(logits.masked_fill(~allowed, -1e4), targets)

    return loss


def from_criterion(criterion: Callable[[Tensor, Tensor], Tensor]) -> LossFn:
    """A contract loss from a ``criterion(logits, targets)`` (e.g. ``nn.CrossEntropyLoss(reduction="none")``).

    A criterion that reduces (returns a 0-d tensor) works where only batch means are used.
    """
    if not callable(criterion):
        raise TypeError("criterion must be callable")

    def loss(model: nn.Module, batch: Any) -> Tensor:
        inputs, targets, _ = split_batch(batch)
        return criterion(logits_of(run_model(model, inputs)), targets)

    return loss


def resolve_loss(loss_fn: LossFn | nn.Module | None) -> LossFn:
    """``None`` -> :func:`classification_loss`; a torch loss module -> :func:`from_criterion`; else as is."""
    if loss_fn is None:
        return classification_loss
    if isinstance(loss_fn, nn.modules.loss._Loss):
        return from_criterion(loss_fn)
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable as loss_fn(model, batch), got {type(loss_fn).__name__}")
    return loss_fn


def _checked(losses: object) -> Tensor:
    if not isinstance(losses, Tensor) or not losses.is_floating_point():
        raise TypeError(f"loss_fn must return a floating-point tensor, got {type(losses).__name__}")
    return losses


def reduce_mean(losses: object) -> Tensor:
    """Batch mean of a loss function's output (``[B]`` or an already reduced 0-d tensor)."""
    losses = _checked(losses)
    if losses.ndim > 1:
        raise ValueError(f"loss_fn must return per-example losses [B], got shape {tuple(losses.shape)}")
    return losses.mean()


def per_example(losses: object, who: str) -> Tensor:
    """Check a loss function returned per-example losses ``[B]`` (``who`` names the caller in the error)."""
    losses = _checked(losses)
    if losses.ndim != 1:
        raise ValueError(f"{who} needs per-example losses of shape [B] from loss_fn, got shape {tuple(losses.shape)}")
    return losses


def as_loader(data: Any, batch_size: int = 64, *, seed: int = 0, shuffle: bool = True, name: str = "data") -> Iterable:
    """A re-iterable of batches: DataLoaders and other iterables unchanged, Datasets wrapped.

    A :class:`torch.utils.data.Dataset` becomes ``DataLoader(data, batch_size, shuffle,
    generator=torch.Generator().manual_seed(seed))``; a :class:`fastclu.data.Subset` its
    :func:`fastclu.data.loader`.
    """
    from fastclu import data as D

    if isinstance(data, D.Subset):
        return D.loader(data, batch_size, shuffle=shuffle, seed=seed)
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, Dataset):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(seed))
    if isinstance(data, Iterable) and not isinstance(data, (Tensor, str, Mapping)):
        return data
    raise TypeError(f"{name} must be a DataLoader, a Dataset or an iterable of batches, got {type(data).__name__}")


def unbatch(batch: Any) -> list[Any]:
    """The single examples of a batch: ``(x[i], y[i], ...)`` tuples or ``{k: v[i]}`` dicts
    (what a DataLoader's default collate stacks back into the batch)."""
    n = batch_size_of(batch)
    if isinstance(batch, Mapping):
        return [{k: v[i] for k, v in batch.items()} for i in range(n)]
    return [tuple(f[i] for f in batch) for i in range(n)]


class ExampleList(Dataset):
    """A map-style Dataset over a list of single examples (see :func:`unbatch`)."""

    def __init__(self, examples: list[Any]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Any:
        return self.examples[i]


def as_dataset(data: Any, name: str = "data") -> Dataset:
    """A map-style Dataset of single examples: Datasets as they are, a DataLoader's ``.dataset``,
    any other iterable of batches materialised example by example."""
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return data
    if isinstance(data, DataLoader) and hasattr(data.dataset, "__len__"):
        return data.dataset
    if isinstance(data, Iterable) and not isinstance(data, (Tensor, str, Mapping)):
        return ExampleList([ex for batch in data for ex in unbatch(batch)])
    raise TypeError(f"{name} must be a Dataset, a DataLoader or an iterable of batches, got {type(data).__name__}")
