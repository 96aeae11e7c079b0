"""Splits of the bundled digits: disjoint, complete, deterministic, and what they claim to be."""

from __future__ import annotations

import pytest
import torch

from fastclu import data as D


def _ids(s: D.Subset) -> set[int]:
    return set(s.ids.tolist())


def test_load_digits_scaled_and_labelled() -> None:
    d = D.load_digits()
    assert d.x.shape == (1797, 64) and d.x.dtype == torch.float32
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert sorted(d.y.unique().tolist()) == list(range(10))
    assert torch.equal(d.ids, torch.arange(1797))


@pytest.mark.parametrize("seed", [0, 7])
def test_train_test_disjoint_complete_stratified(seed: int) -> None:
    tr, te = D.train_test(seed)
    assert not (_ids(tr) & _ids(te))
    assert _ids(tr) | _ids(te) == set(range(1797))
    full = D.load_digits()
    # Rows still match their ids (no mix-up between x, y and ids).
    assert torch.equal(full.x[tr.ids], tr.x) and torch.equal(full.y[te.ids], te.y)
    for c in range(10):
        n = int((full.y == c).sum())
        assert abs(int((te.y == c).sum()) - 0.25 * n) <= 1


def test_splits_deterministic_and_seed_dependent() -> None:
    a, b, c = D.random_forgetting(3), D.random_forgetting(3), D.random_forgetting(4)
    assert torch.equal(a.forget.ids, b.forget.ids)
    assert not torch.equal(a.forget.ids, c.forget.ids)


def test_class_forgetting() -> None:
    sp = D.class_forgetting(1, forget_class=4)
    assert set(sp.forget.y.tolist()) == {4}
    assert 4 not in sp.remain.y.tolist() and 4 not in sp.test.y.tolist()
    assert set(sp.test_forget.y.tolist()) == {4}
    tr, te = D.train_test(1)
    assert _ids(sp.forget) | _ids(sp.remain) == _ids(tr)
    assert _ids(sp.test) | _ids(sp.test_forget) == _ids(te)


def test_random_forgetting_fraction() -> None:
    sp = D.random_forgetting(2, frac=0.1)
    n = len(sp.forget) + len(sp.remain)
    assert abs(len(sp.forget) - 0.1 * n) <= 1
    assert not (_ids(sp.forget) & _ids(sp.remain))
    assert len(sp.forget.y.unique()) >= 8  # random examples come from (nearly) every class
    assert len(sp.test_forget) == 0


def test_task_sequence() -> None:
    tasks = D.task_sequence(0)
    assert [t.classes for t in tasks] == [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9)]
    for t in tasks:
        assert set(t.train.y.tolist()) == set(t.classes) == set(t.test.y.tolist())
    tr, _ = D.train_test(0)
    assert sum(len(t.train) for t in tasks) == len(tr)


def test_clu_stream() -> None:
    reqs = D.clu_stream(0)
    assert [r.kind for r in reqs] == ["learn", "learn", "unlearn", "learn", "unlearn"]
    a, b, u1, c, u2 = reqs
    assert set(a.data.y.tolist()) == {0, 1, 2, 3} and set(b.data.y.tolist()) == {3, 4, 5, 6}
    assert not (_ids(a.data) & _ids(b.data))
    # The unlearned digit spans both tasks and is exactly their digit-3 examples.
    assert set(u1.data.y.tolist()) == {3} and u1.forget_class == 3 and u2.forget_class is None
    assert _ids(u1.data) == {i for s in (a.data, b.data) for i, y in zip(s.ids.tolist(), s.y.tolist()) if y == 3}
    assert _ids(u1.data) & _ids(a.data) and _ids(u1.data) & _ids(b.data)
    # Random unlearning only touches what is still learned at that point.
    still = (_ids(a.data) | _ids(b.data) | _ids(c.data)) - _ids(u1.data)
    assert _ids(u2.data) <= still
    assert abs(len(u2.data) - 0.1 * len(still)) <= 1


def test_subset_without() -> None:
    tr, _ = D.train_test(0)
    part = tr.take(torch.arange(10))
    rest = tr.without(part)
    assert len(rest) == len(tr) - 10 and not (_ids(rest) & _ids(part))


@pytest.mark.parametrize(
    ("fn", "kwargs", "exc"),
    [
        (D.train_test, {"seed": 0, "test_frac": 1.5}, ValueError),
        (D.train_test, {"seed": "0"}, TypeError),
        (D.class_forgetting, {"seed": 0, "forget_class": 10}, ValueError),
        (D.random_forgetting, {"seed": 0, "frac": 0.0}, ValueError),
        (D.task_sequence, {"seed": 0, "n_tasks": 3}, ValueError),
        (D.clu_stream, {"seed": 0, "random_frac": 1.0}, ValueError),
        (D.loader, {"data": None, "batch_size": 0}, ValueError),
    ],
)
def test_bad_arguments(fn, kwargs: dict, exc: type) -> None:
    with pytest.raises(exc):
        fn(**kwargs)
