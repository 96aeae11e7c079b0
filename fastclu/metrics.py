"""How unlearning and continual learning are measured (as in the SalUn / SFR-on / CL literature).

Accuracies are percentages in [0, 100]. Membership inference (MIA) efficacy is the percentage
of forget examples that an attack, fitted to tell remain examples (members) from test examples
(non-members), classifies as non-members: 100 means the model treats the forget set like data
it never saw. The standard of the field (SalUn, SFR-on: ``evaluation/svc_mia.py``) is
:func:`svc_mia`, an RBF SVC on one output feature (confidence, entropy, modified entropy);
:func:`mia_efficacy`, a one-dimensional loss threshold, is kept beside it.

Data may be a :class:`fastclu.data.Subset` (one batch), a DataLoader or any iterable of
batches in the :mod:`fastclu.losses` forms (tuples or HF-style dicts).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, IterableDataset

from fastclu.losses import logits_of, run_model, split_batch, to_device

__all__ = [
    "accuracy",
    "attack_features",
    "average_gap",
    "cl_summary",
    "loss_threshold",
    "mia_efficacy",
    "svc_mia",
    "unlearning_metrics",
]

# The average gap's keys: the SVC MIA-efficacy (confidence feature) is the standard one.
UNLEARN_KEYS = ("forget_acc", "remain_acc", "test_acc", "mia_svc")
SVC_FEATURES = ("confidence", "entropy", "m_entropy")


def _batches(data: object) -> Iterable[Any]:
    # A loader yields batches; a Subset-like object (with .x and .y) is one batch.
    if hasattr(data, "x") and hasattr(data, "y"):
        return [(data.x, data.y)]
    if isinstance(data, Dataset) and not isinstance(data, IterableDataset):
        return DataLoader(data, batch_size=256, shuffle=False)
    return data  # type: ignore[return-value]


@torch.no_grad()
def _outputs(model: nn.Module, data: object, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    was_training = model.training
    model.eval()
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    logits, labels = [], []
    try:
        for batch in _batches(data):
            inputs, y, _ = split_batch(batch)
            if y is None:
                raise ValueError("metrics need labelled batches (tuple field 1 or 'labels')")
            logits.append(logits_of(run_model(model, to_device(inputs, dev))).float().cpu())
            labels.append(y.cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.zeros(0, 1), torch.zeros(0, dtype=torch.int64)
    return torch.cat(logits), torch.cat(labels)


def accuracy(
    model: nn.Module,
    data: object,
    *,
    classes: Sequence[int] | None = None,
    device: torch.device | str | None = None,
) -> float:
    """Top-1 accuracy in percent of ``model`` on ``data`` (a loader of ``(x, y)`` or a Subset).

    ``classes``: predict among these classes only (task-incremental evaluation, where the task
    is known at test time); None: among all. An empty set gives NaN.
    """
    logits, y = _outputs(model, data, device)
    if y.numel() == 0:
        return float("nan")
    if classes is not None:
        allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
        allowed[list(classes)] = True
        logits = logits.masked_fill(~allowed, float("-inf"))
    return 100.0 * float((logits.argmax(1) == y).double().mean())


def attack_features(model: nn.Module, data: object, *, device: torch.device | str | None = None) -> np.ndarray:
    """Per-example attack features ``[N, 3]`` float64: loss, prediction entropy, true-class confidence."""
    logits, y = _outputs(model, data, device)
    logits = logits.double()
    logp = F.log_softmax(logits, dim=1)
    loss = F.nll_loss(logp, y, reduction="none")
    ent = -(logp.exp() * logp).sum(1)
    conf = logp.gather(1, y[:, None]).exp().squeeze(1)
    return torch.stack([loss, ent, conf], 1).numpy()


def loss_threshold(member_losses: np.ndarray, nonmember_losses: np.ndarray) -> float:
    """The loss threshold ``tau`` that best separates members (loss <= tau) from non-members.

    Maximises the balanced accuracy ``(P_member(loss <= tau) + P_nonmember(loss > tau)) / 2``
    over every candidate cut; ties go to the lowest cut; the threshold is placed midway
    between the two neighbouring losses.
    """
    m = np.sort(np.asarray(member_losses, dtype=np.float64))
    n = np.sort(np.asarray(nonmember_losses, dtype=np.float64))
    if m.size == 0 or n.size == 0:
        raise ValueError("loss_threshold needs non-empty member and non-member losses")
    cuts = np.unique(np.concatenate([m, n]))
    # Candidate tau = each distinct loss, plus one below everything (all called non-members).
    score = 0.5 * (
        np.searchsorted(m, cuts, side="right") / m.size + 1.0 - np.searchsorted(n, cuts, side="right") / n.size
    )
    below = 0.5
    best = int(np.argmax(score))
    if score[best] <= below:
        return float(cuts[0] - 1.0)
    upper = cuts[best + 1] if best + 1 < cuts.size else cuts[best] + 1.0
    return float(0.5 * (cuts[best] + upper))


def mia_efficacy(
    model: nn.Module,
    forget: object,
    remain: object,
    test: object,
    *,
    device: torch.device | str | None = None,
) -> float:
    """Membership-inference efficacy on ``forget``, in percent.

    A loss-threshold attack (Yeom et al. 2018): members are assumed to have the lower loss;
    the threshold is fitted to separate remain examples (members) from test examples
    (non-members) at the best balanced accuracy (so the sets' sizes do not bias it). Returns
    the share of forget examples whose loss is above it, i.e. predicted non-members (higher =
    better forgotten). The direction is fixed on purpose: a fitted classifier (e.g. logistic
    regression) on a well-generalising model, whose remain and test losses are nearly
    indistinguishable, can flip its sign on noise and call a forgotten set with huge losses
    "members".
    """
    fr, ft, ff = (attack_features(model, d, device=device)[:, 0] for d in (remain, test, forget))
    if len(ff) == 0:
        return float("nan")
    if len(fr) == 0 or len(ft) == 0:
        raise ValueError("mia_efficacy needs non-empty remain and test sets to fit the attack")
    tau = loss_threshold(fr, ft)
    return 100.0 * float((ff > tau).mean())


def _svc_features(model: nn.Module, data: object, device: torch.device | str | None) -> dict[str, np.ndarray]:
    """``[N, 1]`` float64 per feature: true-class confidence, entropy, modified entropy (Song & Mittal 2021)."""
    logits, y = _outputs(model, data, device)
    p = torch.softmax(logits.double(), 1)
    logp = torch.log(p.clamp_min(1e-30))
    log1mp = torch.log((1.0 - p).clamp_min(1e-30))
    py = p.gather(1, y[:, None]).squeeze(1)
    onehot = F.one_hot(y, p.shape[1]).bool()
    # Mentr = -(1 - p_y) log p_y - sum_{i != y} p_i log(1 - p_i)
    m_ent = -(1.0 - py) * logp.gather(1, y[:, None]).squeeze(1) - (p * log1mp).masked_fill(onehot, 0.0).sum(1)
    feats = {"confidence": py, "entropy": -(p * logp).sum(1), "m_entropy": m_ent}
    return {k: v.numpy()[:, None] for k, v in feats.items()}


def svc_mia(
    model: nn.Module,
    forget: object,
    remain: object,
    test: object,
    *,
    features: Sequence[str] = SVC_FEATURES,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """SVC MIA-efficacy on ``forget``, in percent, per feature (SalUn / SFR-on ``svc_mia.py``).

    For each feature an RBF SVC (scikit-learn, ``C=3, gamma="auto"``) is trained to tell remain
    examples (members, label 1) from test examples (non-members, label 0); as in that code the
    remain set is first subsampled (seeded) to the test set's size, so the classes are
    balanced. The efficacy is the share of forget examples it predicts non-members.
    """
    from sklearn.svm import SVC

    unknown = [f for f in features if f not in SVC_FEATURES]
    if unknown or not features:
        raise ValueError(f"features must be a non-empty subset of {SVC_FEATURES}, got {list(features)}")
    fr, ft, ff = (_svc_features(model, d, device) for d in (remain, test, forget))
    n_r, n_t, n_f = (len(x["confidence"]) for x in (fr, ft, ff))
    if n_f == 0:
        return {f: float("nan") for f in features}
    if n_r == 0 or n_t == 0:
        raise ValueError("svc_mia needs non-empty remain and test sets to fit the attack")
    keep = np.random.default_rng(seed).permutation(n_r)[: min(n_r, n_t)]
    out = {}
    for f in features:
        x = np.concatenate([fr[f][keep], ft[f]])
        y = np.concatenate([np.ones(len(keep)), np.zeros(n_t)])
        clf = SVC(C=3, gamma="auto", kernel="rbf").fit(x, y)
        out[f] = 100.0 * float(1.0 - clf.predict(ff[f]).mean())
    return out


def unlearning_metrics(
    model: nn.Module,
    forget: object,
    remain: object,
    test: object,
    *,
    attack_test: object = None,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The unlearning numbers (all %): ``forget_acc``, ``remain_acc``, ``test_acc``, ``mia_svc``
    (SVC MIA-efficacy on the confidence feature, the standard), ``mia_svc_entropy``,
    ``mia_svc_m_entropy`` and ``mia`` (the loss-threshold attack).

    ``attack_test``: the non-members the attacks are fitted on (default ``test``). For class
    forgetting pass the whole test set (with the forgotten class): fitted on the remaining
    classes only, the attacks never see a low-confidence non-member and their verdict on the
    forget set is an extrapolation (an RBF SVC's far field is the sign of its intercept).
    """
    attack_test = test if attack_test is None else attack_test
    svc = svc_mia(model, forget, remain, attack_test, seed=seed, device=device)
    return {
        "forget_acc": accuracy(model, forget, device=device),
        "remain_acc": accuracy(model, remain, device=device),
        "test_acc": accuracy(model, test, device=device),
        "mia_svc": svc["confidence"],
        "mia_svc_entropy": svc["entropy"],
        "mia_svc_m_entropy": svc["m_entropy"],
        "mia": mia_efficacy(model, forget, remain, attack_test, device=device),
    }


def average_gap(result: Mapping[str, float], oracle: Mapping[str, float], keys: Sequence[str] = UNLEARN_KEYS) -> float:
    """Mean absolute difference, in points, between ``result`` and the retrained ``oracle`` over ``keys``."""
    missing = [k for k in keys if k not in result or k not in oracle]
    if missing:
        raise ValueError(f"average_gap: keys {missing} missing from result or oracle")
    return float(np.mean([abs(float(result[k]) - float(oracle[k])) for k in keys]))


def cl_summary(matrix: Sequence[Sequence[float]] | np.ndarray) -> dict[str, float]:
    """Continual-learning summary of an accuracy matrix.

    ``matrix[i][j]``: accuracy (%) on task ``j`` after training through task ``i`` (``T x T``).
    Returns ``avg_acc`` (mean of the last row), ``bwt`` (backward transfer: mean over
    ``j < T-1`` of ``R[T-1, j] - R[j, j]``, negative = forgetting) and ``forgetting`` (mean over
    ``j < T-1`` of ``max_{i<T-1} R[i, j] - R[T-1, j]``). With one task bwt and forgetting are 0.
    """
    r = np.asarray(matrix, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise ValueError(f"matrix must be a non-empty square T x T array, got shape {r.shape}")
    t = r.shape[0]
    if t == 1:
        return {"avg_acc": float(r[0, 0]), "bwt": 0.0, "forgetting": 0.0}
    last = r[-1]
    bwt = float(np.mean(last[:-1] - np.diag(r)[:-1]))
    forgetting = float(np.mean([r[: t - 1, j].max() - last[j] for j in range(t - 1)]))
    return {"avg_acc": float(last.mean()), "bwt": bwt, "forgetting": forgetting}
