"""Unit tests of the method building blocks (fast; the end-to-end properties are in test_demo.py)."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import torch.nn.functional as F

import fastclu
from fastclu import data as D
from fastclu.methods import common as C
from fastclu.methods import perturb_and_merge, salun, salun_mask, sfron, ug_clu
from fastclu.methods.baselines import gradient_ascent, retrain


def _tiny_split(n_forget: int = 24, n_remain: int = 80) -> tuple[D.Subset, D.Subset]:
    tr, _ = D.train_test(0)
    return tr.take(torch.arange(n_forget)), tr.take(torch.arange(n_forget, n_forget + n_remain))


def _batches(s: D.Subset, bs: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    # A fixed list (no shuffling) so two runs see identical batches in identical order.
    return [(s.x[i : i + bs], s.y[i : i + bs]) for i in range(0, len(s), bs)]


def test_adaptive_forget_loss_matches_float64_formula_and_gradient() -> None:
    logits = torch.randn(9, 10, dtype=torch.float64, requires_grad=True)
    y = torch.randint(10, (9,))
    lam = 0.5
    got = C.adaptive_forget_loss(logits, y, lam)
    # Independent formulation: per-sample losses from log-softmax by hand, weights frozen.
    lse = torch.logsumexp(logits.detach(), 1)
    li = lse - logits.detach()[torch.arange(9), y]
    c = 1.0 / (li**lam + 1e-15)
    w = c / c.sum()
    assert float(got.detach()) == pytest.approx(float((w * li).sum()), rel=1e-12)
    (g,) = torch.autograd.grad(got, logits)
    # d/dz of sum_i w_i l_i with w fixed: w_i (softmax_i - onehot_i).
    p = torch.softmax(logits.detach(), 1)
    want = w[:, None] * (p - F.one_hot(y, 10).double())
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    # lam = 0 is the plain mean.
    assert float(C.adaptive_forget_loss(logits, y, 0.0).detach()) == pytest.approx(float(li.mean()), rel=1e-12)


def test_cosine_schedule() -> None:
    assert C.cosine(0, 10, 25.0) == 25.0
    assert C.cosine(10, 10, 25.0) == pytest.approx(0.0, abs=1e-12)
    assert C.cosine(5, 10, 25.0) == pytest.approx(12.5)
    assert C.cosine(3, 10) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.3)))


def test_use_backend_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    # a scoped override (fastclu.use_backend): the ops see it, the environment is never touched
    from fastclu.ops import current_backend

    monkeypatch.setenv("FASTCLU_BACKEND", "triton")
    with pytest.raises(KeyError), C.use_backend("reference"):
        assert current_backend() == "reference" and os.environ["FASTCLU_BACKEND"] == "triton"
        raise KeyError("body fails")
    assert current_backend() == "triton"
    monkeypatch.delenv("FASTCLU_BACKEND")
    with C.use_backend("reference"):
        pass
    assert "FASTCLU_BACKEND" not in os.environ and current_backend() == "auto"
    with pytest.raises(TypeError, match="backend"), C.use_backend(3):  # type: ignore[arg-type]
        pass


def test_backend_is_passed_through_to_the_ops() -> None:
    f, r = _tiny_split()
    model = C.make_mlp(seed=1)
    res = sfron(model, _batches(f), _batches(r), iters=4, forget_every=2, backend="reference", loop="alternating",
                progress=False)  # fmt: skip
    assert res.steps == 4 and res.wall_s > 0 and res.info["forget_steps"] == 2
    # The official loop: a remain step on every iteration, a forget step before it every K-th.
    res = sfron(C.make_mlp(seed=1), _batches(f), _batches(r), iters=4, forget_every=2, backend="reference",
                progress=False)  # fmt: skip
    assert res.steps == 6 and res.wall_s > 0 and res.info["forget_steps"] == 2 and res.info["remain_steps"] == 4
    if fastclu.backends()["cuda"] is not None:
        # Unavailable here: the request must reach the dispatcher and fail there, loudly.
        with pytest.raises(RuntimeError, match="cuda"):
            sfron(C.make_mlp(seed=1), _batches(f), _batches(r), iters=2, backend="cuda")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"iters": 0}, "iters"), ({"forget_every": 0}, "forget_every"), ({"mask_mode": "x"}, "mask_mode"),
     ({"lam": -1.0}, "lam"), ({"clip": 0.0}, "clip")],
)  # fmt: skip
def test_sfron_bad_arguments_leave_model_untouched(kwargs: dict, match: str) -> None:
    f, r = _tiny_split()
    model = C.make_mlp(seed=2)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=match):
        sfron(model, _batches(f), _batches(r), **kwargs)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_sfron_forgets_a_class_and_gradient_ascent_moves() -> None:
    tr, _ = D.train_test(0)
    tr = tr.take(torch.arange(300))
    f, r = tr.take((tr.y == 0).nonzero().flatten()), tr.take((tr.y != 0).nonzero().flatten())
    model = C.make_mlp(seed=3)
    C.train(model, _batches(tr), 150, lr=0.05)
    from fastclu.metrics import accuracy

    assert accuracy(model, f) > 90
    m1 = copy.deepcopy(model)
    sfron(m1, _batches(f), _batches(r), iters=100)
    assert accuracy(m1, f) < 10 and accuracy(m1, r) > 85
    m2 = copy.deepcopy(model)
    gradient_ascent(m2, _batches(f), steps=30, lr=0.01)
    assert accuracy(m2, f) < accuracy(model, f)


@pytest.mark.parametrize("mode", ["update", "grad"])
def test_salun_mask_modes(mode: str) -> None:
    f, r = _tiny_split()
    model = C.make_mlp(seed=4)
    C.train(model, _batches(D.Subset.cat([f, r])), 60, lr=0.05)
    before = [p.detach().clone() for p in model.parameters()]
    mask = salun_mask(copy.deepcopy(model), _batches(f), 0.3)
    assert mask.density() == pytest.approx(0.3, abs=1e-3)
    res = salun(model, _batches(f), _batches(r), steps=5, density=0.3, mask_mode=mode, weight_decay=5e-4)
    assert res.info["mask_density"] == pytest.approx(mask.density())
    frozen = moved = 0
    n = 0
    for p, b, m in zip(model.parameters(), before, mask.unpack()):
        on = m.reshape(p.shape)
        if on.all() or not on.any():
            continue  # a tensor entirely in or out of the mask says nothing about the mode
        n += 1
        frozen += int(torch.equal(p.detach()[~on], b[~on]))
        moved += int(not torch.equal(p.detach()[on], b[on]))
    assert n >= 3 and moved == n  # salient weights always train
    # update mode: masked-out weights do not move at all; grad mode: weight decay still moves them.
    assert frozen == (n if mode == "update" else 0)


def test_salun_and_sfron_bad_arguments() -> None:
    f, r = _tiny_split()
    with pytest.raises(ValueError, match="density"):
        salun(C.make_mlp(), _batches(f), _batches(r), density=0.0)
    with pytest.raises(ValueError, match="mask_mode"):
        salun(C.make_mlp(), _batches(f), _batches(r), mask_mode="both")
    with pytest.raises(ValueError, match="steps"):
        retrain(C.make_mlp(), _batches(r), steps=-1)


def test_perturb_and_merge_reports_alphas() -> None:
    tasks = D.task_sequence(0)[:3]
    seen = []
    res = perturb_and_merge(C.make_mlp(seed=5), [_batches(t.train.take(torch.arange(40))) for t in tasks],
                            steps_per_task=6, fisher_samples=5, task_classes=[t.classes for t in tasks],
                            after_task=lambda i, m: seen.append(i))  # fmt: skip
    assert seen == [0, 1, 2] and res.steps == 18
    a = res.info["alpha"]
    assert a[0] is None and all(0.0 <= x <= 1.0 for x in a[1:])
    with pytest.raises(ValueError, match="task_classes"):
        perturb_and_merge(C.make_mlp(), [_batches(tasks[0].train)], task_classes=[(0, 1), (2, 3)])


def _pnm_replica_fp64(
    model: torch.nn.Module, tasks: list, classes: list, steps: int, n_fisher: int, head: bool, normalize: bool
) -> tuple[list, list, list]:
    """P&M written out directly: plain SGD per task (no perturbation), per-example Fisher in fp64 at the
    trained weights, the paper's closed-form alpha over every task so far, merge of the non-head weights."""
    ps = list(model.parameters())
    merged_idx = range(len(ps) - 2) if head else range(len(ps))
    fishers, optima, anchor, alphas, traces = [], [], None, [], []
    for t, batches in enumerate(tasks):
        loss_fn = C.task_loss(classes[t])
        opt = torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: C.cosine(i, steps))
        it = C.cycle(batches)
        for _ in range(steps):
            x, y = next(it)
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
            sched.step()
        m64 = copy.deepcopy(model).double()
        p64 = list(m64.parameters())
        xs = torch.cat([b[0] for b in batches])[:n_fisher].double()
        ys = torch.cat([b[1] for b in batches])[:n_fisher]
        f = [torch.zeros_like(p64[i]) for i in merged_idx]
        for x, y in zip(xs, ys):
            m64.zero_grad()
            loss_fn(m64(x[None]), y[None]).backward()
            for fi, i in zip(f, merged_idx):
                fi += p64[i].grad ** 2 / n_fisher
        tr = sum(float(fi.sum()) for fi in f)
        traces.append(tr)
        fishers.append([fi / tr for fi in f] if normalize else f)
        optima.append([p64[i].detach().clone() for i in merged_idx])
        if anchor is None:
            alphas.append(None)
        else:
            s_f = [sum(F[j] for F in fishers) for j in range(len(f))]
            s_ft = [sum(F[j] * O[j] for F, O in zip(fishers, optima)) for j in range(len(f))]
            d = [o - a for o, a in zip(optima[-1], anchor)]
            num = sum((dj * (sft - a * sf)).sum() for dj, a, sf, sft in zip(d, anchor, s_f, s_ft))
            den = sum((dj**2 * sf).sum() for dj, sf in zip(d, s_f))
            a = float((num / den).clamp(0.0, 1.0))
            alphas.append(a)
            with torch.no_grad():
                for j, i in enumerate(merged_idx):
                    ps[i].copy_(anchor[j] + a * d[j])
        anchor = [ps[i].detach().double().clone() for i in merged_idx]
    return alphas, traces, [p.detach().clone() for p in ps]


@pytest.mark.parametrize(("head", "normalize"), [(False, False), (True, False), (False, True), (True, True)])
def test_perturb_and_merge_matches_fp64_replica_of_the_paper(head: bool, normalize: bool) -> None:
    tasks = D.task_sequence(0)[:3]
    batches = [_batches(t.train.take(torch.randperm(len(t.train))[:40])) for t in tasks]
    classes = [t.classes for t in tasks]
    seed = int(torch.randint(1000, ()))
    model = C.make_mlp(seed=seed)
    replica = copy.deepcopy(model)
    # probs (1, 0, 0): k = 0 on every step, so the training itself is plain SGD and the comparison
    # isolates what P&M adds (Fisher at the trained weights, the sums over tasks, alpha, the merge).
    res = perturb_and_merge(model, batches, steps_per_task=6, fisher_samples=5, probs=(1, 0, 0), seed=seed,
                            task_classes=classes, head=list(model[-1].parameters()) if head else None,
                            normalize_fisher=normalize)  # fmt: skip
    want_a, want_tr, want_w = _pnm_replica_fp64(replica, batches, classes, 6, 5, head, normalize)
    got_a = res.info["alpha"]
    assert got_a[0] is None and want_a[0] is None
    for g, w in zip(got_a[1:], want_a[1:]):
        assert g == pytest.approx(w, rel=1e-3, abs=1e-4), (got_a, want_a)
    assert any(0.0 < w < 1.0 for w in want_a[1:]), want_a  # the clamp did not decide everything
    assert res.info["fisher_trace"] == pytest.approx(want_tr, rel=1e-3)
    assert all(x > 0 for x in res.info["fit_loss"])
    for p, w in zip(model.parameters(), want_w):
        torch.testing.assert_close(p.detach(), w, rtol=1e-4, atol=1e-5)


def test_perturb_and_merge_rejects_bad_head_and_normalize() -> None:
    tasks = D.task_sequence(0)[:2]
    batches = [_batches(t.train.take(torch.arange(20))) for t in tasks]
    model = C.make_mlp(seed=1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="head"):
        perturb_and_merge(model, batches, steps_per_task=2, fisher_samples=2, head=[torch.nn.Parameter(torch.ones(3))])
    with pytest.raises(ValueError, match="head"):
        perturb_and_merge(model, batches, steps_per_task=2, fisher_samples=2, head=list(model.parameters()))
    with pytest.raises(TypeError, match="head"):
        perturb_and_merge(model, batches, steps_per_task=2, fisher_samples=2, head=model[-1].weight)
    with pytest.raises(TypeError, match="normalize_fisher"):
        perturb_and_merge(model, batches, steps_per_task=2, fisher_samples=2, normalize_fisher=1)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_perturb_merge_fisher_trace_and_normalized_end_task() -> None:
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = fastclu.optim.PerturbMerge(torch.optim.SGD(ps, lr=0.1))
    grads = []
    for _ in range(3):
        opt.zero_grad()
        (ps[0].sum(1) * torch.randn(4)).sum().backward()
        (ps[1] * torch.randn(3)).sum().backward()
        grads.append([p.grad.double().clone() for p in ps])
        opt.accumulate_fisher()
    want = sum(float((g**2).sum()) for gs in grads for g in gs) / 3
    assert float(opt.fisher_trace()) == pytest.approx(want, rel=1e-5)
    with pytest.raises(TypeError, match="normalize"):
        opt.end_task(normalize=1)
    assert opt.task == 0 and float(opt.fisher_trace()) == pytest.approx(want, rel=1e-5)
    opt.end_task(normalize=True)
    s_f = opt.state_dict()["perturb_merge"]["params"]
    total = sum(float(s_f[i]["fisher_sum"].double().sum()) for i in range(2))
    assert total == pytest.approx(1.0, rel=1e-5)  # the task entered with unit trace
    assert float(opt.fisher_trace()) == 0.0


def test_ug_clu_drops_unlearned_examples_from_replay() -> None:
    reqs = D.clu_stream(0)
    small = [D.Request(r.kind, r.name, r.data.take(torch.arange(min(len(r.data), 60))), r.test) for r in reqs[:3]]
    log = []
    res = ug_clu(C.make_mlp(seed=6), small, learn_steps=3, unlearn_iters=5, replay_per_class=4,
                 after_request=lambda i, r, m: log.append(r.kind))  # fmt: skip
    assert log == ["learn", "learn", "unlearn"]
    per_class = [len(r.data.y.unique()) * 4 for r in small[:2]]
    n3 = sum(int((r.data.y == 3).sum().clamp(max=4)) for r in small[:2])
    # The buffer loses exactly the examples it held that the unlearn request names (at most n3).
    held = sum(per_class)
    assert held - n3 <= res.info["replay_size"] <= held
    assert res.info["requests"][2]["mask_density"] is not None
    with pytest.raises(ValueError, match="requests"):
        ug_clu(C.make_mlp(), [D.Request("forget", "x", small[0].data)])


def test_sfron_update_mode_freezes_masked_out_weights_grad_mode_does_not() -> None:
    from fastclu.methods import balanced_mask

    f, r = _tiny_split()
    base = C.make_mlp(seed=7)
    C.train(base, _batches(D.Subset.cat([f, r])), 40, lr=0.05)
    mask = balanced_mask(copy.deepcopy(base), _batches(f), _batches(r), gamma=1.0)
    assert 0.0 < mask.density() < 1.0
    for mode in ("update", "grad"):
        model = copy.deepcopy(base)
        res = sfron(model, _batches(f), _batches(r), iters=6, forget_every=3, mask_mode=mode)
        assert res.info["mask_density"] == pytest.approx(mask.density())
        same = [
            torch.equal(p.detach()[~m.reshape(p.shape)], b.detach()[~m.reshape(p.shape)])
            for p, b, m in zip(model.parameters(), base.parameters(), mask.unpack())
            if not m.all()
        ]
        # update: nothing outside the mask moves; grad: remain steps and weight decay move everything.
        assert all(same) if mode == "update" else not any(same)


@pytest.mark.interpreter
@pytest.mark.parametrize("method", ["sfron", "salun"])
def test_methods_on_triton_backend_match_reference(method: str) -> None:
    why = fastclu.backends()["triton"]
    if why is not None:
        pytest.skip(f"triton backend unavailable here: {why}")
    f, r = _tiny_split(20, 60)
    models = [C.make_mlp(seed=8) for _ in range(2)]
    for model, backend in zip(models, ("reference", "triton")):
        if method == "sfron":
            sfron(model, _batches(f), _batches(r), iters=6, forget_every=3, backend=backend)
        else:
            salun(model, _batches(f), _batches(r), steps=3, density=0.4, seed=1, backend=backend)
    for p, q in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
