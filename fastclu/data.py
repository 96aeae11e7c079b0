"""Digits data (scikit-learn's bundled 8x8 images: no download) and the splits the demo uses.

Every split is a deterministic function of its ``seed``. Images are float32 ``[N, 64]``
scaled to [0, 1]; labels int64 ``[N]`` in 0..9.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = [
    "ForgetSplit",
    "Request",
    "Subset",
    "Task",
    "class_forgetting",
    "clu_stream",
    "load_digits",
    "loader",
    "random_forgetting",
    "task_sequence",
    "train_test",
]


@dataclass
class Subset(Dataset):
    """A labelled set of examples: ``x`` float32 ``[N, 64]``, ``y`` int64 ``[N]``.

    A map-style Dataset (``subset[i] == (x[i], y[i])``), so methods take it like any other.

    ``ids`` int64 ``[N]`` are the examples' indices in :func:`load_digits`, so that a stream can
    tell which stored examples a request refers to.
    """

    x: Tensor
    y: Tensor
    ids: Tensor

    def __len__(self) -> int:
        return int(self.y.numel())

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.x[i], self.y[i]

    def take(self, idx: Tensor) -> Subset:
        return Subset(self.x[idx], self.y[idx], self.ids[idx])

    def without(self, other: Subset) -> Subset:
        """The examples of ``self`` whose ids are not in ``other``."""
        return self.take((~torch.isin(self.ids, other.ids)).nonzero().flatten())

    def to(self, device: torch.device | str) -> Subset:
        return Subset(self.x.to(device), self.y.to(device), self.ids.to(device))

    @staticmethod
    def cat(parts: list[Subset]) -> Subset:
        return Subset(
            torch.cat([p.x for p in parts]), torch.cat([p.y for p in parts]), torch.cat([p.ids for p in parts])
        )


@dataclass
class ForgetSplit:
    """An unlearning problem: the training set is ``forget`` + ``remain``; ``test`` is held out.

    For class forgetting ``test`` holds only the remaining classes and ``test_forget`` the
    held-out images of the forgotten class (for random forgetting ``test_forget`` is empty).
    """

    forget: Subset
    remain: Subset
    test: Subset
    test_forget: Subset
    kind: str
    info: dict = field(default_factory=dict)


@dataclass
class Task:
    """One task of a sequence: its classes, training and test examples."""

    classes: tuple[int, ...]
    train: Subset
    test: Subset


@dataclass
class Request:
    """One request of a continual learning-unlearning stream.

    ``kind`` is ``"learn"`` (``data`` are new training examples, ``test`` their held-out
    counterparts) or ``"unlearn"`` (``data`` are examples learned earlier that must be forgotten;
    ``forget_class`` names the class when the request removes all of its examples).
    """

    kind: str
    name: str
    data: Subset
    test: Subset | None = None
    forget_class: int | None = None  # set when an unlearn request removes a whole class


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return seed


def load_digits() -> Subset:
    """All 1797 digits, pixels scaled from 0..16 to [0, 1]."""
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    return Subset(x, y, torch.arange(y.numel()))


def train_test(seed: int = 0, test_frac: float = 0.25) -> tuple[Subset, Subset]:
    """Stratified random train/test split of the digits (``test_frac`` of each class held out)."""
    _check_seed(seed)
    if not 0.0 < test_frac < 1.0:
        raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
    data = load_digits()
    g = torch.Generator().manual_seed(seed)
    tr, te = [], []
    for c in range(10):
        idx = (data.y == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_te = round(test_frac * idx.numel())
        te.append(idx[:n_te])
        tr.append(idx[n_te:])
    # Shuffle across classes so that sequential slicing never sees a sorted stream.
    tr_idx, te_idx = torch.cat(tr), torch.cat(te)
    tr_idx = tr_idx[torch.randperm(tr_idx.numel(), generator=g)]
    te_idx = te_idx[torch.randperm(te_idx.numel(), generator=g)]
    return data.take(tr_idx), data.take(te_idx)


def class_forgetting(seed: int = 0, forget_class: int | None = None) -> ForgetSplit:
    """Forget every training image of one class (drawn from ``seed`` unless given)."""
    _check_seed(seed)
    train, test = train_test(seed)
    if forget_class is None:
        forget_class = int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(seed + 1)))
    if isinstance(forget_class, bool) or not isinstance(forget_class, int) or not 0 <= forget_class <= 9:
        raise ValueError(f"forget_class must be an int in 0..9, got {forget_class!r}")
    f = train.y == forget_class
    tf = test.y == forget_class
    return ForgetSplit(
        forget=train.take(f.nonzero().flatten()),
        remain=train.take((~f).nonzero().flatten()),
        test=test.take((~tf).nonzero().flatten()),
        test_forget=test.take(tf.nonzero().flatten()),
        kind="class",
        info={"forget_class": forget_class},
    )


def random_forgetting(seed: int = 0, frac: float = 0.1) -> ForgetSplit:
    """Forget a uniformly random ``frac`` of the training images (all classes)."""
    _check_seed(seed)
    if not 0.0 < frac < 1.0:
        raise ValueError(f"frac must be in (0, 1), got {frac}")
    train, test = train_test(seed)
    g = torch.Generator().manual_seed(seed + 2)
    perm = torch.randperm(len(train), generator=g)
    n_f = round(frac * len(train))
    empty = test.take(torch.arange(0))
    return ForgetSplit(
        forget=train.take(perm[:n_f]),
        remain=train.take(perm[n_f:]),
        test=test,
        test_forget=empty,
        kind="random",
        info={"frac": frac},
    )


def task_sequence(seed: int = 0, n_tasks: int = 5) -> list[Task]:
    """Class-incremental sequence: task i holds digits ``(2i, 2i+1)`` when ``n_tasks=5``.

    The digits are split into ``n_tasks`` consecutive groups of ``10 // n_tasks``.
    """
    _check_seed(seed)
    if n_tasks not in (1, 2, 5, 10):
        raise ValueError(f"n_tasks must divide 10 (1, 2, 5 or 10), got {n_tasks}")
    train, test = train_test(seed)
    per = 10 // n_tasks
    tasks = []
    for t in range(n_tasks):
        cls = tuple(range(t * per, (t + 1) * per))
        ctr = torch.isin(train.y, torch.tensor(cls))
        cte = torch.isin(test.y, torch.tensor(cls))
        tasks.append(Task(cls, train.take(ctr.nonzero().flatten()), test.take(cte.nonzero().flatten())))
    return tasks


def clu_stream(seed: int = 0, unlearn_class: int = 3, random_frac: float = 0.1) -> list[Request]:
    """A continual learning-unlearning stream over the digits.

    Three learn requests over overlapping digit groups ``{0..3}``, ``{3..6}``, ``{6..9}``
    (the training images of a shared digit are split between the two tasks, so that digit
    spans tasks), interleaved with two unlearn requests::

        learn A{0-3}, learn B{3-6}, unlearn digit ``unlearn_class`` (in A and B),
        learn C{6-9}, unlearn ``random_frac`` of everything still learned (random samples).

    ``unlearn_class`` must be 3 (shared by A and B) or 6 (shared by B and C would be
    unlearned before C is learned, so only 3 gives "a class across tasks" here).
    """
    _check_seed(seed)
    if unlearn_class != 3:
        raise ValueError(f"unlearn_class must be 3 (the digit shared by the first two tasks), got {unlearn_class!r}")
    if not 0.0 < random_frac < 1.0:
        raise ValueError(f"random_frac must be in (0, 1), got {random_frac}")
    train, test = train_test(seed)
    g = torch.Generator().manual_seed(seed + 3)
    groups = {"A": (0, 1, 2, 3), "B": (3, 4, 5, 6), "C": (6, 7, 8, 9)}
    owner: dict[int, list[str]] = {}
    for name, cls in groups.items():
        for c in cls:
            owner.setdefault(c, []).append(name)

    def assign(s: Subset) -> dict[str, Subset]:
        parts: dict[str, list[Tensor]] = {k: [] for k in groups}
        for c in range(10):
            idx = (s.y == c).nonzero().flatten()
            idx = idx[torch.randperm(idx.numel(), generator=g)]
            names = owner[c]
            for j, chunk in enumerate(torch.tensor_split(idx, len(names))):
                parts[names[j]].append(chunk)
        return {
            k: s.take(torch.cat(v)[torch.randperm(sum(t.numel() for t in v), generator=g)]) for k, v in parts.items()
        }

    tr, te = assign(train), assign(test)
    reqs = [Request("learn", "learn A{0-3}", tr["A"], te["A"]), Request("learn", "learn B{3-6}", tr["B"], te["B"])]
    learned = Subset.cat([tr["A"], tr["B"]])
    cls_sel = learned.y == unlearn_class
    reqs.append(Request("unlearn", f"unlearn digit {unlearn_class}", learned.take(cls_sel.nonzero().flatten()),
                        forget_class=unlearn_class))  # fmt: skip
    reqs.append(Request("learn", "learn C{6-9}", tr["C"], te["C"]))
    # Random samples are drawn from what is still learned at that point (A, B minus the digit, C).
    still = Subset.cat([learned.take((~cls_sel).nonzero().flatten()), tr["C"]])
    perm = torch.randperm(len(still), generator=g)
    n_r = round(random_frac * len(still))
    reqs.append(Request("unlearn", f"unlearn {int(random_frac * 100)}% random", still.take(perm[:n_r])))
    return reqs


def loader(
    data: Subset, batch_size: int = 64, *, shuffle: bool = True, seed: int = 0, drop_last: bool = False
) -> DataLoader:
    """A DataLoader over ``data`` yielding ``(x, y)``; shuffling is driven by ``seed``."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    g = torch.Generator().manual_seed(seed)
    return DataLoader(
        TensorDataset(data.x, data.y), batch_size=batch_size, shuffle=shuffle, generator=g, drop_last=drop_last
    )
