"""The loss contract: batch forms, outputs, per-example losses, Datasets vs loaders."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fastclu import losses as L


class _DictModel(nn.Module):
    """HF-style: keyword inputs, an output object with .logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, features: torch.Tensor, scale: torch.Tensor | None = None) -> types.SimpleNamespace:
        return types.SimpleNamespace(logits=self.lin(features) * (1.0 if scale is None else scale[:, None]))


def test_tuple_dict_and_extra_fields_give_the_same_per_example_losses() -> None:
    torch.manual_seed(int(torch.randint(1 << 30, ())))
    lin = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(3, (6,))
    want = F.cross_entropy(lin(x).double(), y, reduction="none")
    got = L.classification_loss(lin, (x, y))
    assert got.shape == (6,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(L.classification_loss(lin, (x, y, torch.arange(6))), got)  # (x, y, idx)
    dm = _DictModel()
    dm.lin.load_state_dict(lin.state_dict())
    batch = {"features": x, "labels": y}
    torch.testing.assert_close(L.classification_loss(dm, batch), got)
    assert "labels" in batch, "the caller's batch is not modified"
    # a mapping output with "logits" works too
    torch.testing.assert_close(L.logits_of({"logits": lin(x)}), lin(x))


def test_sequence_targets_mean_over_counted_tokens() -> None:
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    y = torch.randint(7, (2, 5))
    y[0, 3:] = L.IGNORE_INDEX
    got = L._ce_per_example(logits, y)
    want = torch.stack([F.cross_entropy(logits[0, :3], y[0, :3]), F.cross_entropy(logits[1], y[1])])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


def test_masked_classification_loss_restricts_the_softmax() -> None:
    lin = nn.Linear(4, 5)
    x, y = torch.randn(6, 4), torch.tensor([1, 3, 1, 3, 3, 1])
    z = lin(x).double()
    want = F.cross_entropy(z[:, [1, 3]], (y == 3).long(), reduction="none")
    torch.testing.assert_close(L.masked_classification_loss([3, 1])(lin, (x, y)).double(), want, rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_bad_batches_and_losses_are_clear_errors() -> None:
    lin = nn.Linear(4, 3)
    with pytest.raises(TypeError, match="batch"):
        L.classification_loss(lin, torch.randn(3, 4))
    with pytest.raises(ValueError, match="targets"):
        L.classification_loss(lin, (torch.randn(3, 4),))
    with pytest.raises(TypeError, match="logits"):
        L.logits_of((torch.randn(2),))
    with pytest.raises(ValueError, match=r"per-example losses of shape \[B\]"):
        L.per_example(torch.tensor(1.0), "SFR-on")
    assert float(L.reduce_mean(torch.tensor([1.0, 3.0]))) == 2.0
    assert float(L.reduce_mean(torch.tensor(2.5))) == 2.5  # an already reduced loss is a batch mean
    with pytest.raises(TypeError, match="loss_fn"):
        L.resolve_loss(3)
    crit = L.resolve_loss(nn.CrossEntropyLoss(reduction="none"))
    x, y = torch.randn(3, 4), torch.randint(3, (3,))
    torch.testing.assert_close(crit(lin, (x, y)), F.cross_entropy(lin(x), y, reduction="none"))


def test_as_loader_wraps_datasets_with_a_seeded_generator_and_keeps_loaders() -> None:
    ds = TensorDataset(torch.arange(20.0)[:, None], torch.arange(20))
    a = [b[1].tolist() for b in L.as_loader(ds, 6, seed=3)]
    b = [b[1].tolist() for b in L.as_loader(ds, 6, seed=3)]
    c = [b[1].tolist() for b in L.as_loader(ds, 6, seed=4)]
    assert a == b and a != c and sorted(v for batch in a for v in batch) == list(range(20)) and len(a[0]) == 6
    dl = DataLoader(ds, batch_size=5)
    assert L.as_loader(dl) is dl
    batches = [(torch.randn(2, 1), torch.zeros(2))]
    assert L.as_loader(batches) is batches
    with pytest.raises(TypeError, match="forget"):
        L.as_loader(3, name="forget")
    with pytest.raises(ValueError, match="batch_size"):
        L.as_loader(ds, 0)


def test_unbatch_and_as_dataset_round_trip() -> None:
    batches = [{"a": torch.randn(3, 2), "labels": torch.arange(3)}, {"a": torch.randn(2, 2), "labels": torch.arange(2)}]
    ds = L.as_dataset(batches)
    assert len(ds) == 5 and torch.equal(ds[4]["a"], batches[1]["a"][1])
    again = next(iter(DataLoader(ds, batch_size=3)))
    assert torch.equal(again["a"], batches[0]["a"]) and torch.equal(again["labels"], batches[0]["labels"])
    assert L.batch_size_of((torch.randn(4, 2), torch.zeros(4))) == 4
