"""The published loops written out by hand with torch.optim, callbacks / history, optimizer choice, data composition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import ConcatDataset, TensorDataset

from fastclu import data as D
from fastclu.methods import common as C
from fastclu.methods import salun, sfron
from fastclu.methods.salun import _official_data
from fastclu.methods.sfron import balanced_mask


def _split(n_forget: int = 24, n_remain: int = 64) -> tuple[list, list]:
    tr, _ = D.train_test(0)
    perm = torch.randperm(len(tr))
    f, r = tr.take(perm[:n_forget]), tr.take(perm[n_forget : n_forget + n_remain])
    bs = 16
    return ([(f.x[i : i + bs], f.y[i : i + bs]) for i in range(0, len(f), bs)],
            [(r.x[i : i + bs], r.y[i : i + bs]) for i in range(0, len(r), bs)])  # fmt: skip


def _official_sfron_by_hand(model, fb, rb, mask, iters, k, lr, alpha_f, clip, lam):
    """K1nght/Unified-Unlearning-w-Remain-Geometry's loop with torch.optim.SGD: a remain step every
    iteration, before it every K-th iteration a forget step: loss * alpha, clip_grad_norm_, grad *= mask."""
    ps = list(model.parameters())
    opt = torch.optim.SGD(ps, lr=lr, momentum=0.9, weight_decay=5e-4, foreach=False)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: C.cosine(t, iters))
    fit, rit = C.cycle(fb), C.cycle(rb)
    for t in range(iters):
        if t % k == 0:
            x, y = next(fit)
            opt.zero_grad()
            li = F.cross_entropy(model(x), y, reduction="none")
            c = 1.0 / (li.detach() ** lam + 1e-15)
            (-alpha_f * C.cosine(t, iters) * (c / c.sum() * li).sum()).backward()
            torch.nn.utils.clip_grad_norm_(ps, clip)
            for p, m in zip(ps, mask):
                p.grad *= m
            opt.step()
        x, y = next(rit)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("clip", [0.5, 50.0])  # the clip binding and not
def test_official_sfron_loop_matches_the_loop_written_with_torch_sgd(clip: float) -> None:
    fb, rb = _split()
    model = C.make_mlp(seed=int(torch.randint(1000, ())))
    C.train(model, fb + rb, 20, lr=0.05)
    mask = [m.float() for m in balanced_mask(copy.deepcopy(model), fb, rb).unpack()]
    assert 0.05 < sum(float(m.sum()) for m in mask) / sum(m.numel() for m in mask) < 0.95
    replica = copy.deepcopy(model)
    res = sfron(model, fb, rb, iters=7, forget_every=3, alpha_f=5.0, clip=clip, backend="reference", progress=False)
    assert res.info["loop"] == "official" and res.steps == 7 + 3
    _official_sfron_by_hand(replica, fb, rb, mask, 7, 3, 0.01, 5.0, clip, 0.5)
    for p, q in zip(model.parameters(), replica.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_callback_history_and_progress_flag() -> None:
    fb, rb = _split()
    model = C.make_mlp(seed=3)
    seen = []

    def cb(step: int, losses: dict, m: torch.nn.Module) -> dict:
        seen.append((step, m.training, sorted(losses)))
        return {"remain_acc": 12.5}

    res = sfron(model, fb, rb, iters=6, forget_every=3, callback=cb, log_every=2, progress=False)
    assert [s for s, _, _ in seen] == [2, 4, 6]
    assert all(not training for _, training, _ in seen), "the callback sees the model in eval mode"
    assert all(keys == ["forget_loss", "remain_loss"] for _, _, keys in seen)
    assert model.training
    assert [h["step"] for h in res.history] == [2, 4, 6] and all(h["remain_acc"] == 12.5 for h in res.history)
    with pytest.raises(TypeError, match="callback"):
        sfron(model, fb, rb, iters=2, callback=lambda *a: 3, log_every=1, progress=False)
    with pytest.raises(TypeError, match="progress"):
        sfron(model, fb, rb, iters=2, progress="yes")


def test_optimizer_choice_adamw_and_bad_factory() -> None:
    fb, rb = _split()
    model = C.make_mlp(seed=4)
    before = [p.detach().clone() for p in model.parameters()]
    res = sfron(model, fb, rb, iters=3, optimizer="adamw", lr=1e-3, progress=False)
    assert res.steps == 4 and all(not torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(TypeError, match="fastclu SGD / AdamW"):
        sfron(model, fb, rb, iters=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), progress=False)
    with pytest.raises(ValueError, match="optimizer"):
        sfron(model, fb, rb, iters=2, optimizer="lion", progress=False)


def test_salun_official_composition_draws_labels_once_and_joins_the_sets() -> None:
    tr, _ = D.train_test(0)
    f, r = tr.take(torch.arange(30)), tr.take(torch.arange(30, 100))
    a = _official_data(f, r, 10, torch.Generator().manual_seed(5))
    b = _official_data(f, r, 10, torch.Generator().manual_seed(5))
    assert len(a) == 100 and torch.equal(a.y, b.y) and torch.equal(a.y[30:], r.y) and torch.equal(a.x[:30], f.x)
    assert not torch.equal(a.y[:30], f.y)
    # Generic Datasets: the same composition as a ConcatDataset, targets replaced in the forget part.
    fd, rd = TensorDataset(f.x, f.y), TensorDataset(r.x, r.y)
    c = _official_data(fd, rd, 10, torch.Generator().manual_seed(5))
    assert isinstance(c, ConcatDataset) and len(c) == 100
    assert torch.equal(torch.stack([c[i][1] for i in range(30)]), a.y[:30])
    assert torch.equal(c[40][0], r.x[10]) and int(c[40][1]) == int(r.y[10])
    model = C.make_mlp(seed=5)
    res = salun(model, fd, rd, steps=4, batch_size=16, progress=False)
    assert res.info["composition"] == "official" and res.steps == 4
    with pytest.raises(ValueError, match="composition"):
        salun(model, fd, rd, composition="mixed")
