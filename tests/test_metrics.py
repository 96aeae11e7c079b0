"""Metrics against independent formulations (numpy / float64 loops) on fresh random data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fastclu import metrics as M
from fastclu.data import Subset


def _subset(n: int, d: int = 5, classes: int = 4) -> Subset:
    return Subset(torch.randn(n, d), torch.randint(classes, (n,)), torch.arange(n))


def _loader(s: Subset, bs: int = 7):
    return [(s.x[i : i + bs], s.y[i : i + bs]) for i in range(0, len(s), bs)]


def test_accuracy_matches_numpy_and_loader_equals_subset() -> None:
    model = nn.Linear(5, 4)
    s = _subset(53)
    w = model.weight.detach().double().numpy()
    b = model.bias.detach().double().numpy()
    pred = (s.x.double().numpy() @ w.T + b).argmax(1)
    want = 100.0 * np.mean(pred == s.y.numpy())
    assert M.accuracy(model, s) == pytest.approx(want, abs=1e-9)
    assert M.accuracy(model, _loader(s)) == pytest.approx(want, abs=1e-9)


def test_accuracy_restricted_to_classes() -> None:
    model = nn.Linear(5, 4)
    s = _subset(61)
    logits = model(s.x).detach().double().numpy()
    allowed = [1, 3]
    pred = np.array(allowed)[logits[:, allowed].argmax(1)]
    want = 100.0 * np.mean(pred == s.y.numpy())
    assert M.accuracy(model, s, classes=allowed) == pytest.approx(want, abs=1e-9)


def test_accuracy_empty_is_nan_and_mode_restored() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5))
    model.train()
    assert math.isnan(M.accuracy(model, _subset(0)))
    M.accuracy(model, _subset(9))
    assert model.training


def test_attack_features_match_float64_formulas() -> None:
    model = nn.Linear(5, 4)
    s = _subset(17)
    f = M.attack_features(model, s)
    z = model(s.x).detach().double().numpy()
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = s.y.numpy()
    np.testing.assert_allclose(f[:, 0], -np.log(p[np.arange(17), y]), rtol=1e-6)
    np.testing.assert_allclose(f[:, 1], -(p * np.log(p)).sum(1), rtol=1e-6)
    np.testing.assert_allclose(f[:, 2], p[np.arange(17), y], rtol=1e-6)


def _brute_threshold(m: np.ndarray, n: np.ndarray) -> float:
    # Best balanced accuracy of "loss <= tau means member" by brute force over every observed cut
    # and, first, a cut below every loss (all called non-members: score 0.5), which the lowest-cut
    # tie rule makes the answer whenever no observed cut beats chance.
    best, best_tau = -1.0, None
    for tau in [-math.inf, *sorted(set(m.tolist()) | set(n.tolist()))]:
        score = 0.5 * (np.mean(m <= tau) + np.mean(n > tau))
        if score > best + 1e-15:
            best, best_tau = score, tau
    return best, best_tau


def test_loss_threshold_maximises_balanced_accuracy() -> None:
    g = torch.Generator().manual_seed(int(torch.randint(1 << 30, (1,))))
    m = torch.randn(40, generator=g, dtype=torch.float64).numpy()
    n = (torch.randn(55, generator=g, dtype=torch.float64) + 0.7).numpy()
    tau = M.loss_threshold(m, n)
    got = 0.5 * (np.mean(m <= tau) + np.mean(n > tau))
    best, cut = _brute_threshold(m, n)
    assert got == pytest.approx(best, abs=1e-12)
    assert tau >= cut  # placed at or above the chosen cut, below the next loss


def test_mia_efficacy_separates_forgotten_from_remembered() -> None:
    # A model whose forget set has huge losses (certainly wrong) must be called "non-member";
    # one where the forget set is fit like the remain set must not.
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    model = nn.Linear(5, 4)
    # Members (remain) are fit: their label is the model's prediction; non-members are not.
    xr = torch.randn(80, 5)
    remain, test = Subset(xr, model(xr).detach().argmax(1), torch.arange(80)), _subset(80)
    x = torch.randn(30, 5)
    logits = model(x).detach()
    forgot = Subset(x, logits.argmin(1), torch.arange(30))
    fitted = Subset(x, logits.argmax(1), torch.arange(30))
    hi = M.mia_efficacy(model, forgot, remain, test)
    lo = M.mia_efficacy(model, fitted, remain, test)
    # Independent check: share of forget losses above the brute-force threshold.
    feats = [M.attack_features(model, s)[:, 0] for s in (remain, test, forgot)]
    _, cut = _brute_threshold(feats[0], feats[1])
    above = [v for v in np.concatenate(feats[:2]) if v > cut]
    tau = cut if cut == -math.inf else 0.5 * (cut + min(above)) if above else cut + 1.0
    assert hi == pytest.approx(100.0 * np.mean(feats[2] > tau), abs=1e-9)
    assert hi > lo


def test_mia_efficacy_errors() -> None:
    model = nn.Linear(5, 4)
    assert math.isnan(M.mia_efficacy(model, _subset(0), _subset(5), _subset(5)))
    with pytest.raises(ValueError, match="remain and test"):
        M.mia_efficacy(model, _subset(5), _subset(0), _subset(5))


def test_average_gap() -> None:
    keys = M.UNLEARN_KEYS
    a = {k: float(v) for k, v in zip(keys, torch.rand(4).tolist())}
    b = {k: float(v) for k, v in zip(keys, torch.rand(4).tolist())}
    want = sum(abs(a[k] - b[k]) for k in keys) / 4
    assert M.average_gap(a, b) == pytest.approx(want)
    with pytest.raises(ValueError, match="mia"):
        M.average_gap({k: 1.0 for k in keys[:3]}, b)


def test_cl_summary_against_loops() -> None:
    t = 5
    r = (torch.rand(t, t, dtype=torch.float64) * 100).numpy()
    got = M.cl_summary(r)
    bwt = sum(r[t - 1, j] - r[j, j] for j in range(t - 1)) / (t - 1)
    fg = sum(max(r[i, j] for i in range(t - 1)) - r[t - 1, j] for j in range(t - 1)) / (t - 1)
    assert got["avg_acc"] == pytest.approx(sum(r[t - 1]) / t)
    assert got["bwt"] == pytest.approx(bwt)
    assert got["forgetting"] == pytest.approx(fg)
    assert M.cl_summary([[42.0]]) == {"avg_acc": 42.0, "bwt": 0.0, "forgetting": 0.0}
    with pytest.raises(ValueError, match="matrix"):
        M.cl_summary(np.zeros((2, 3)))


def test_svc_mia_features_and_verdicts() -> None:
    torch.manual_seed(int(torch.randint(1 << 30, (1,))))
    model = nn.Linear(5, 4)
    x = torch.randn(40, 5)
    z = model(x).detach().double()
    y = torch.randint(4, (40,))
    feats = M._svc_features(model, Subset(x, y, torch.arange(40)), None)
    p = torch.softmax(z, 1).numpy()
    yy = y.numpy()
    py = p[np.arange(40), yy]
    others = np.ones_like(p, dtype=bool)
    others[np.arange(40), yy] = False
    m_ent = -(1 - py) * np.log(py) - np.where(others, p * np.log(1 - p), 0.0).sum(1)
    np.testing.assert_allclose(feats["confidence"][:, 0], py, rtol=1e-9)
    np.testing.assert_allclose(feats["entropy"][:, 0], -(p * np.log(p)).sum(1), rtol=1e-9)
    np.testing.assert_allclose(feats["m_entropy"][:, 0], m_ent, rtol=1e-9)
    # Members fit (label = prediction), non-members mislabelled: a forget set like the non-members is
    # called non-member (efficacy high), one like the members is not. Inputs scaled so that most
    # predictions are confident (a near-uniform softmax makes a member look like a non-member: 75%
    # on one seed in 40 at scale 3).
    xr, xt, xf = torch.randn(120, 5) * 10, torch.randn(120, 5) * 10, torch.randn(60, 5) * 10

    def pred(v: torch.Tensor) -> torch.Tensor:
        return model(v).detach().argmax(1)

    remain = Subset(xr, pred(xr), torch.arange(120))
    test = Subset(xt, pred(xt).add(1).remainder(4), torch.arange(120))
    hi = M.svc_mia(model, Subset(xf, pred(xf).add(2).remainder(4), torch.arange(60)), remain, test)
    lo = M.svc_mia(model, Subset(xf, pred(xf), torch.arange(60)), remain, test)
    assert set(hi) == {"confidence", "entropy", "m_entropy"}
    assert hi["confidence"] > 80 and lo["confidence"] < 20 and hi["m_entropy"] > 80 and lo["m_entropy"] < 20
    assert math.isnan(M.svc_mia(model, _subset(0), remain, test)["confidence"])
    with pytest.raises(ValueError, match="features"):
        M.svc_mia(model, remain, remain, test, features=["loss"])
    out = M.unlearning_metrics(model, Subset(xf, pred(xf), torch.arange(60)), remain, test)
    assert out["mia_svc"] == pytest.approx(lo["confidence"]) and set(M.UNLEARN_KEYS) <= set(out)
