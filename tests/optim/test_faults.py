"""Fault injection inside the wrappers' own loops (RandomPerturb, PerturbMerge, FastSlow) and
load_state_dict: an interrupt at every op call leaves the weights bit-exact, or recoverable
through the documented method (``remove_noise()``, ``restore()``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import fastclu
from fastclu import ops
from fastclu.optim import FastSlow, PerturbMerge, RandomPerturb


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(x), y) for x, y in zip(a, b))


class Fault:
    """``ops.<name>``'s call number ``at`` runs on its first tensor only, then raises KeyboardInterrupt."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, at: int, whole: bool = False) -> None:
        """``whole``: the call runs in full before the interrupt (ops whose lists nest)."""
        self.calls, self.at, self.fired = 0, at, False
        real: Callable = getattr(ops, name)

        def cut(x: object) -> object:
            return x[:1] if isinstance(x, list) else x

        def faulty(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls != self.at:
                return real(*args, **kwargs)
            self.fired = True
            if whole:
                real(*args, **kwargs)
            else:
                real(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
            raise KeyboardInterrupt(f"injected into {name} call {self.at}")

        monkeypatch.setattr(ops, name, faulty)


def _model() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]


def _loss(ps: list[torch.Tensor]) -> torch.Tensor:
    return (ps[0].sum(0) * ps[1]).pow(2).sum()


def _calls(name: str, fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as m:
        f = Fault(m, name, at=-1)
        fn()
        return f.calls


def _random_perturb(ps: list) -> RandomPerturb:
    inner = fastclu.optim.SGD([{"params": ps[:1]}, {"params": ps[1:], "rho": 0.2}], lr=0.1)
    return RandomPerturb(inner, rho=0.1, schedule="constant", seed=5)


def test_random_perturb_apply_and_remove_survive_every_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    injected = 0
    for name in ("perturb_", "restore_"):
        n = _calls(name, lambda: (o := _random_perturb(_model())).apply_noise() or o.remove_noise(), monkeypatch)
        assert n >= 2
        for at in range(1, n + 1):
            ps = _model()
            opt = _random_perturb(ps)
            before = [_bits(p) for p in ps]
            with monkeypatch.context() as m:
                Fault(m, name, at)
                with pytest.raises(KeyboardInterrupt):
                    opt.apply_noise()
                    opt.remove_noise()
            opt.remove_noise()  # completes a removal cut short (no-op when none is pending)
            assert not opt.noise_applied
            assert _same_bits(ps, before), f"{name} call {at}"
            injected += 1
    assert injected == 6  # 2 groups: per group a backup and a restore copy, and a perturb


def _pm(ps: list, fold: bool) -> PerturbMerge:
    opt = PerturbMerge(fastclu.optim.SGD(ps, lr=0.1), eps=0.5, probs=(0, 1, 0), fold_restore=fold)
    opt.end_task()  # records theta_prev
    with torch.no_grad():
        for p in ps:
            p.add_(0.3)  # a nonzero task vector
    return opt


@pytest.mark.parametrize("fold", [False, True])
def test_perturb_merge_block_survives_every_fault(monkeypatch: pytest.MonkeyPatch, fold: bool) -> None:
    def use(opt: PerturbMerge, ps: list) -> None:
        with opt.perturbed():
            _loss(ps).backward()

    injected = 0
    for name in ("perturb_", "restore_"):
        n = _calls(name, lambda: use(_pm(ps := _model(), fold), ps), monkeypatch)
        for at in range(1, n + 1):
            ps = _model()
            opt = _pm(ps, fold)
            before = [_bits(p) for p in ps]
            with monkeypatch.context() as m:
                Fault(m, name, at)
                with pytest.raises(KeyboardInterrupt):
                    use(opt, ps)
            opt.restore()
            assert not opt.restore_pending
            assert _same_bits(ps, before), f"{name} call {at}"
            injected += 1
    assert injected == (2 if fold else 3)  # perturb_, backup copy (and the exit restore unless folded)


def test_folded_step_that_raises_lands_the_clean_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _model()
    opt = _pm(ps, fold=True)
    before = [_bits(p) for p in ps]
    with opt.perturbed():
        _loss(ps).backward()
    assert not _same_bits(ps, before)
    with pytest.raises(ValueError, match="combine"):
        opt.step(combine={"forgt": 1.0})
    assert _same_bits(ps, before) and not opt.restore_pending
    # an interrupt inside the fused step itself
    with opt.perturbed():
        _loss(ps).backward()
    with monkeypatch.context() as m:
        Fault(m, "combine_step_", at=1, whole=True)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    assert _same_bits(ps, before)


def test_perturb_merge_end_task_fault_leaves_state_intact(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _model()
    opt = _pm(ps, fold=False)
    _loss(ps).backward()
    opt.accumulate_fisher()
    before = [_bits(p) for p in ps]
    sums = [_bits(e["fisher_sum"]) for e in opt._pp.values()]
    with monkeypatch.context() as m:
        Fault(m, "merge_stats", at=1)
        with pytest.raises(KeyboardInterrupt):
            opt.end_task()
    assert _same_bits(ps, before)
    assert all(torch.equal(_bits(e["fisher_sum"]), s) for e, s in zip(opt._pp.values(), sums))
    assert opt.task == 1
    assert opt.end_task() is not None  # the task can still be closed


@pytest.mark.parametrize("what", ["fisher", "weights"])
def test_perturb_merge_refuses_a_diverged_task(what: str) -> None:
    ps = _model()
    opt = _pm(ps, fold=False)
    _loss(ps).backward()
    opt.accumulate_fisher()
    with torch.no_grad():
        (opt._pp[ps[1]]["fisher"] if what == "fisher" else ps[1])[0] = float("nan")
    before = [_bits(p) for p in ps]
    anchors = [_bits(a) for a in opt.anchors()]
    with pytest.raises(ValueError, match="task 1"):
        opt.end_task()
    assert _same_bits(ps, before) and _same_bits(opt.anchors(), anchors) and opt.task == 1


def test_fastslow_failing_first_step_records_no_slow_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _model()
    opt = FastSlow(fastclu.optim.SGD(ps, lr=0.1), k=2, beta=0.5)
    _loss(ps).backward()
    with monkeypatch.context() as m:
        Fault(m, "combine_step_", at=1, whole=True)
        with pytest.raises(KeyboardInterrupt):
            opt.step()
    assert opt.slow_weights() == [None, None] and opt.step_count == 0


def test_load_state_dict_fault_keeps_the_old_state(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _model()
    opt = fastclu.optim.AdamW(ps, lr=0.1)
    _loss(ps).backward()
    opt.step()
    good = opt.state_dict()
    old = {k: _bits(v) for k, v in opt.state[ps[0]].items()}
    calls = {"n": 0}
    real = type(opt)._cast_state

    def faulty(self: object, p: torch.Tensor, key: object, v: object) -> object:
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(self, p, key, v)

    other = fastclu.optim.AdamW(_model(), lr=0.2)
    _loss(other.param_groups[0]["params"]).backward()
    other.step()
    other.step()
    sd = other.state_dict()
    monkeypatch.setattr(type(opt), "_cast_state", faulty)
    with pytest.raises(KeyboardInterrupt):
        opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.1
    assert {k: _bits(v) for k, v in opt.state[ps[0]].items()}.keys() == old.keys()
    assert all(torch.equal(_bits(opt.state[ps[0]][k]), v) for k, v in old.items())
    monkeypatch.undo()
    opt.load_state_dict(good)


class Faults:
    """Like :class:`Fault`, at every call number in ``at`` (a fault, then a fault in the recovery)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, at: set[int]) -> None:
        self.calls, self.at, self.fired = 0, at, 0
        real: Callable = getattr(ops, name)

        def cut(x: object) -> object:
            return x[:1] if isinstance(x, list) else x

        def faulty(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls not in self.at:
                return real(*args, **kwargs)
            self.fired += 1
            real(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
            raise KeyboardInterrupt(f"injected into {name} call {self.calls}")

        monkeypatch.setattr(ops, name, faulty)


def _mixed_model() -> list[torch.nn.Parameter]:
    """Several tensors per call: fp32, a bf16 one (fp32 slow weights) and a complex one."""
    torch.manual_seed(1)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3)),
            torch.nn.Parameter(torch.randn(5, 2).to(torch.bfloat16)),
            torch.nn.Parameter(torch.randn(2, 3, dtype=torch.complex64))]  # fmt: skip


def _fastslow_before_sync() -> tuple[FastSlow, list[torch.nn.Parameter]]:
    ps = _mixed_model()
    opt = FastSlow(fastclu.optim.SGD(ps, lr=0.1, momentum=0.9), k=100, beta=0.3)
    for _ in range(2):  # slow weights recorded, fast weights moved away from them
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    return opt, ps


def _fastslow_bits(opt: FastSlow, ps: list) -> list[torch.Tensor]:
    return [_bits(p) for p in ps] + [_bits(s) for s in opt.slow_weights()]


def test_fastslow_sync_survives_every_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    ref, ref_ps = _fastslow_before_sync()
    ref.sync_()
    after = _fastslow_bits(ref, ref_ps)
    opt, ps = _fastslow_before_sync()
    before = _fastslow_bits(opt, ps)
    assert not all(torch.equal(a, b) for a, b in zip(after, before))
    outcomes = {"untouched": 0, "finished": 0, "pending": 0}
    for name, extra in (("restore_", False), ("lerp_sync_", False), ("restore_", True)):
        n = _calls(name, lambda: _fastslow_before_sync()[0].sync_(), monkeypatch)
        assert n >= 1
        for at in range(1, n + 1):
            opt, ps = _fastslow_before_sync()
            with monkeypatch.context() as m:
                f = Faults(m, name, {at, at + 1} if extra else {at})
                with pytest.raises(KeyboardInterrupt) as info:
                    opt.sync_()
            assert f.fired
            now = _fastslow_bits(opt, ps)
            pending = getattr(info.value, "pending_restore", None)
            if pending is not None:  # the commit and its completion were both cut
                outcomes["pending"] += 1
                pending.complete()
            elif all(torch.equal(a, b) for a, b in zip(now, before)):
                outcomes["untouched"] += 1  # cut before the commit: nothing changed
                assert "sync_()" in "".join(getattr(info.value, "__notes__", []))
                opt.sync_()
            else:
                outcomes["finished"] += 1  # the commit was cut and finished before the interrupt propagated
            assert all(torch.equal(a, b) for a, b in zip(_fastslow_bits(opt, ps), after)), f"{name} call {at}"
    # scratch copies (restore_ 1), the sync (lerp_sync_ 1), the commit (restore_ 2): each cut once;
    # the commit cut twice (with its completion) leaves a pending restore
    assert outcomes == {"untouched": 3, "finished": 1, "pending": 1}, outcomes


def test_fastslow_in_place_sync_matches_the_transaction() -> None:
    a, ps_a = _fastslow_before_sync()
    b, ps_b = _fastslow_before_sync()
    b.transactional = False
    a.sync_()
    b.sync_()
    assert _same_bits(ps_a + a.slow_weights(), [_bits(t) for t in ps_b + b.slow_weights()])


def _rp_groups(ps: list, exact: bool) -> RandomPerturb:
    """Two groups of two tensors each: a fault after a call's first tensor cuts inside a group."""
    inner = fastclu.optim.SGD([{"params": ps[:2]}, {"params": ps[2:], "rho": 0.2}], lr=0.1)
    return RandomPerturb(inner, rho=0.1, schedule="constant", seed=5, exact=exact)


def _four() -> list[torch.nn.Parameter]:
    torch.manual_seed(2)
    return [torch.nn.Parameter(torch.randn(s)) for s in ((4, 3), (3,), (2, 5), (6,))]


@pytest.mark.parametrize("exact", [False, True])
def test_random_perturb_fault_inside_a_noise_group(monkeypatch: pytest.MonkeyPatch, exact: bool) -> None:
    ref_ps = _four()
    ref = _rp_groups(ref_ps, exact)
    clean = [_bits(p) for p in ref_ps]
    ref.apply_noise()
    noisy = [_bits(p) for p in ref_ps]
    ref.remove_noise()
    cycled = [_bits(p) for p in ref_ps]  # exact=False: the subtraction's rounding residue included
    injected = 0
    for name in ("perturb_", "restore_"):
        for phase in ("apply", "remove"):
            probe = _rp_groups(_four(), exact)
            if phase == "remove":
                probe.apply_noise()
            n = _calls(name, probe.apply_noise if phase == "apply" else probe.remove_noise, monkeypatch)
            for at in range(1, n + 1):
                ps = _four()
                opt = _rp_groups(ps, exact)
                if phase == "remove":
                    opt.apply_noise()
                with monkeypatch.context() as m:
                    Fault(m, name, at)
                    with pytest.raises(KeyboardInterrupt) as info:
                        opt.apply_noise() if phase == "apply" else opt.remove_noise()
                injected += 1
                pending = getattr(info.value, "pending_restore", None)
                if pending is not None:
                    pending.complete()
                if phase == "apply":
                    assert not opt.noise_applied and _same_bits(ps, clean), f"apply: {name} call {at}"
                else:
                    assert opt.noise_applied
                    if not exact:  # a cut subtraction is put back: each group wholly noisy or wholly removed
                        for g in (slice(0, 2), slice(2, 4)):
                            assert _same_bits(ps[g], noisy[g]) or _same_bits(ps[g], cycled[g]), f"{name} call {at}"
                    opt.remove_noise()  # the documented completion
                    assert _same_bits(ps, cycled), f"remove: {name} call {at}"
    # per group a backup copy and a perturb_ to apply; removal: a restore (exact) or a backup copy
    # and a subtraction (exact=False)
    assert injected == (8 if not exact else 6), injected
