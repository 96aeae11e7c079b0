"""Fault injection inside fastclu.perturb: an interrupt at every op call (also between two tensors
of one call) leaves the weights bit-exact, or recoverable through ``exc.pending_restore``."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fastclu import ops
from fastclu.perturb import hvp, perturbed

OPS = ("perturb_", "restore_", "fd_hvp_")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8).clone()


def _same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(_bits(x), y) for x, y in zip(a, b))


class Fault:
    """Patch ``ops.<name>`` to count calls; call number ``at`` applies the op to its first tensor
    only (the other list arguments sliced alike) and then raises ``KeyboardInterrupt``: a fault
    between two tensors of one call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str, at: int) -> None:
        self.calls, self.at, self.fired = 0, at, False
        real: Callable = getattr(ops, name)

        def cut(x: object) -> object:
            return x[:1] if isinstance(x, list) else x

        def faulty(*args: object, **kwargs: object) -> object:
            self.calls += 1
            if self.calls != self.at:
                return real(*args, **kwargs)
            self.fired = True
            real(*[cut(a) for a in args], **{k: cut(v) for k, v in kwargs.items()})
            raise KeyboardInterrupt(f"injected into {name} call {self.at}")

        monkeypatch.setattr(ops, name, faulty)


def _params() -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3)),
            torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64))]  # fmt: skip


def _count(name: str, fn: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> int:
    with monkeypatch.context() as m:
        f = Fault(m, name, at=-1)
        fn()
        return f.calls


def _run_faults(fn: Callable[[list], object], monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Inject a fault at every call of every op ``fn`` makes; returns (injected, survived)."""
    injected = survived = 0
    for name in OPS:
        ps = _params()
        n = _count(name, lambda ps=ps: fn(ps), monkeypatch)
        for at in range(1, n + 1):
            ps = _params()
            before = [_bits(p) for p in ps]
            with monkeypatch.context() as m:
                f = Fault(m, name, at)
                with pytest.raises(KeyboardInterrupt) as info:
                    fn(ps)
            assert f.fired
            injected += 1
            pending = getattr(info.value, "pending_restore", None)
            if pending is not None:
                pending.complete()
            assert _same_bits(ps, before), f"{name} call {at}: weights not restored"
            survived += 1
    return injected, survived


def test_perturbed_survives_a_fault_at_every_op_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def use(ps: list) -> None:
        d = [torch.randn_like(p) for p in ps]
        with perturbed(ps, 0.5, direction=d):
            pass
        with perturbed(ps, 0.1, seed=7):
            pass

    injected, survived = _run_faults(use, monkeypatch)
    assert injected == survived == 6  # 2 perturb_ + 4 restore_ (backup, exit) calls


def test_hvp_survives_a_fault_at_every_op_call(monkeypatch: pytest.MonkeyPatch) -> None:
    def use(ps: list) -> None:
        hvp(ps, lambda: sum((p.double() ** 3).sum() for p in ps), [torch.ones_like(p) for p in ps], eps=1e-3)

    injected, survived = _run_faults(use, monkeypatch)
    assert injected == survived == 7  # + 1 fd_hvp_


def test_restore_interrupted_is_completed_by_pending_restore(monkeypatch: pytest.MonkeyPatch) -> None:
    ps = _params()
    before = [_bits(p) for p in ps]
    with monkeypatch.context() as m:
        Fault(m, "restore_", at=2)  # call 1 writes the backup, call 2 is the exit restore
        with pytest.raises(KeyboardInterrupt) as info, perturbed(ps, 1.0, seed=3):
            pass
    assert not _same_bits(ps, before)  # the fault really left the weights moved
    info.value.pending_restore.complete()
    assert _same_bits(ps, before)


def test_body_error_still_restores_bit_exact() -> None:
    ps = _params()
    before = [_bits(p) for p in ps]
    with pytest.raises(SystemExit), perturbed(ps, 3.0, seed=1):
        raise SystemExit
    assert _same_bits(ps, before)


@pytest.mark.parametrize("eps", [torch.tensor(0.0), torch.tensor(float("nan")), float("inf"), 0.0, "a"])
def test_hvp_bad_eps_refused_before_anything_moves(eps: object) -> None:
    ps = _params()
    before = [_bits(p) for p in ps]
    calls = []
    with pytest.raises((ValueError, TypeError), match="eps"):
        hvp(ps, lambda: calls.append(1) or sum(p.sum() for p in ps), [torch.ones_like(p) for p in ps], eps=eps)
    assert not calls and _same_bits(ps, before)


@pytest.mark.parametrize("ret", [None, "x", "vector"])
def test_hvp_bad_loss_names_loss_fn(ret: str | None) -> None:
    ps = _params()
    before = [_bits(p) for p in ps]

    def loss_fn() -> object:
        return torch.cat([p.reshape(-1).float() for p in ps]) if ret == "vector" else ret

    with pytest.raises(TypeError, match="loss_fn"):
        hvp(ps, loss_fn, [torch.ones_like(p) for p in ps], eps=1e-3)
    assert _same_bits(ps, before)


@pytest.mark.parametrize("scale", [float("nan"), torch.tensor(float("inf")), "1", True])
def test_perturbed_bad_scale_refused(scale: object) -> None:
    ps = _params()
    before = [_bits(p) for p in ps]
    with pytest.raises((ValueError, TypeError), match="scale"), perturbed(ps, scale, seed=0):
        pass
    assert _same_bits(ps, before)
