"""How unlearning and continual learning are measured (as in the SalUn / SFR-on / CL literature).

Accuracies are percentages in [0, 100]. Membership inference (MIA) efficacy is the percentage
of forget examples that a loss-based attack, fitted to tell remain examples (members) from
test examples (non-members), classifies as non-members: 100 means the model treats the
forget set like data it never saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "accuracy",
    "attack_features",
    "average_gap",
    "cl_summary",
    "loss_threshold",
    "mia_efficacy",
    "unlearning_metrics",
]

UNLEARN_KEYS = ("forget_acc", "remain_acc", "test_acc", "mia")


def _batches(data: object) -> Iterable[tuple[Tensor, Tensor]]:
    # A loader yields (x, y) batches; a Subset-like object (with .x and .y) is one batch.
    if hasattr(data, "x") and hasattr(data, "y"):
        return [(data.x, data.y)]
    return data  # type: ignore[return-value]


@torch.no_grad()
def _outputs(model: nn.Module, data: object, device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    was_training = model.training
    model.eval()
    dev = device if device is not None else next(model.parameters()).device
    logits, labels = [], []
    try:
        for x, y in _batches(data):
            logits.append(model(x.to(dev)).float().cpu())
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


def unlearning_metrics(
    model: nn.Module,
    forget: object,
    remain: object,
    test: object,
    *,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """The four unlearning numbers: ``forget_acc``, ``remain_acc``, ``test_acc``, ``mia`` (all %)."""
    return {
        "forget_acc": accuracy(model, forget, device=device),
        "remain_acc": accuracy(model, remain, device=device),
        "test_acc": accuracy(model, test, device=device),
        "mia": mia_efficacy(model, forget, remain, test, device=device),
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
