"""Property suite over the public API: a random bad input raises TypeError/ValueError naming the
argument, and leaves params, grads, stashes, masks and optimizer/wrapper state bit-identical.

``COUNTS`` tallies the inputs tried and those refused cleanly; ``test_zz_counts`` prints them
(run with ``-s`` to see the tally).
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastclu.ops
import fastclu.optim
from fastclu.optim import FastSlow, PerturbMerge, RandomPerturb
from fastclu.perturb import hvp, perturbed

COUNTS: Counter = Counter()
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# -- bad scalars ------------------------------------------------------------------------------
NONFINITE = st.sampled_from([float("nan"), float("inf"), -float("inf")])
WRONG_TYPE = st.sampled_from(["0.1", None, [0.1], (0.1,), 1j, True, object(), torch.tensor([0.1, 0.2])])


def as_tensor(x: float) -> torch.Tensor:
    return torch.tensor(x)


def bad(lo: float | None = None, hi: float | None = None, *, open_lo: bool = False, open_hi: bool = False,
        nonzero: bool = False) -> st.SearchStrategy:  # fmt: skip
    """Values outside [lo, hi] (or non-finite, or the wrong type), as floats, numpy and 0-d tensors."""
    outs = [NONFINITE]
    # margins of 1e-3 keep the values out of range after rounding to float32 (tensors, numpy)
    if lo is not None:
        outs.append(st.floats(min_value=lo - 1e6, max_value=lo if open_lo else lo - 1e-3))
    if hi is not None:
        outs.append(st.floats(min_value=hi if open_hi else hi + 1e-3, max_value=hi + 1e6))
    if nonzero:
        outs.append(st.just(0.0))
    numbers = st.one_of(*outs)
    return st.one_of(numbers, numbers.map(as_tensor), numbers.map(np.float32), WRONG_TYPE)


# -- snapshots --------------------------------------------------------------------------------
def _bits(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", x.dtype, tuple(x.shape), x.detach().reshape(-1).contiguous().view(torch.uint8).clone())
    if isinstance(x, dict):
        return {k if not isinstance(k, torch.Tensor) else id(k): _bits(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_bits(v) for v in x]
    return repr(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, tuple) and a and a[0] == "T":
        return isinstance(b, tuple) and a[:3] == b[:3] and torch.equal(a[3], b[3])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def snapshot(opt: Any, params: list[torch.Tensor]) -> Any:
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    extra = {k: v for k, v in vars(opt).items() if k in ("k", "beta", "step_count", "rho", "eps", "probs", "task")}
    slow = getattr(opt, "_slow", None)
    return _bits({"params": list(params), "grads": [p.grad for p in params], "state": dict(opt.state),
                  "groups": groups, "extra": extra, "slow": dict(slow) if slow else None})  # fmt: skip


def refused(fn: Callable[[], Any], name: str, opt: Any = None, params: list | None = None) -> None:
    """``fn()`` must raise TypeError/ValueError mentioning ``name`` and change nothing."""
    COUNTS["tried"] += 1
    before = snapshot(opt, params) if opt is not None else None
    pbefore = _bits(list(params)) if params is not None else None
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    assert name in str(info.value), f"error does not name {name!r}: {info.value}"
    if opt is not None:
        assert _same(before, snapshot(opt, params)), "state changed by a refused call"
    if params is not None:
        assert _same(pbefore, _bits(list(params))), "params changed by a refused call"
    COUNTS["clean"] += 1


# -- fixtures ---------------------------------------------------------------------------------
def _model() -> tuple[list[torch.nn.Parameter], Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    x = torch.randn(5, 4)

    def loss() -> torch.Tensor:
        return (x @ ps[0] + ps[1]).pow(2).mean()

    return ps, loss


def _stepped(cls: str) -> tuple[Any, list, Callable]:
    """An optimizer after one step, with live grads, a stashed role and a mask."""
    ps, loss = _model()
    opt = getattr(fastclu.optim, cls)(ps, lr=0.1, **({"momentum": 0.9} if cls == "SGD" else {}))
    loss().backward()
    opt.step()
    opt.set_mask([torch.rand(p.shape) > 0.3 for p in ps], mode="grad", roles=["forget"])
    loss().backward()
    opt.stash("forget")
    loss().backward()
    return opt, ps, loss


# -- constructors -----------------------------------------------------------------------------
@SETTINGS
@given(v=bad(lo=0.0))
def test_sgd_constructor(v: Any) -> None:
    for name in ("lr", "momentum", "dampening", "weight_decay"):
        ps, _ = _model()
        refused(lambda ps=ps, name=name: fastclu.optim.SGD(ps, **{name: v}), name, params=ps)


@SETTINGS
@given(v=bad(lo=0.0), b=bad(lo=0.0, hi=1.0, open_hi=True))
def test_adamw_constructor(v: Any, b: Any) -> None:
    for name in ("lr", "eps", "weight_decay"):
        ps, _ = _model()
        refused(lambda ps=ps, name=name: fastclu.optim.AdamW(ps, **{name: v}), name, params=ps)
    ps, _ = _model()
    refused(lambda: fastclu.optim.AdamW(ps, betas=(b, 0.999)), "beta", params=ps)
    refused(lambda: fastclu.optim.AdamW(ps, betas=(0.9, b)), "beta", params=ps)


@pytest.mark.parametrize("backend", ["nosuch", "", "Triton", 3])
def test_backend_name_checked_in_the_constructor(backend: Any) -> None:
    ps, _ = _model()
    refused(lambda: fastclu.optim.SGD(ps, lr=0.1, backend=backend), "backend", params=ps)


@pytest.mark.parametrize("dtype", [torch.int64, torch.complex32])
def test_bad_param_in_a_later_group_refused_before_any_state(dtype: torch.dtype) -> None:
    ps, _loss = _model()
    opt = fastclu.optim.SGD([{"params": ps}], lr=0.1, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch: "ComplexHalf support is experimental"
        bad_p = torch.zeros(3, dtype=dtype)
    refused(lambda: opt.add_param_group({"params": [bad_p]}), "dtype", opt, ps)
    assert len(opt.param_groups) == 1
    refused(lambda: fastclu.optim.SGD([{"params": ps}, {"params": [bad_p]}], lr=0.1), "dtype", params=ps)


# -- step ---------------------------------------------------------------------------------------
@SETTINGS
@given(clip=bad(lo=0.0, open_lo=True).filter(lambda x: x is not None), c=bad())
def test_step_clip_and_combine(clip: Any, c: Any) -> None:
    for cls in ("SGD", "AdamW"):
        opt, ps, _ = _stepped(cls)
        refused(lambda opt=opt: opt.step(combine={"grad": 1.0, "forget": -1.0}, clip=clip), "clip", opt, ps)
        if not isinstance(c, torch.Tensor) or c.numel() == 1:
            refused(lambda opt=opt: opt.step(combine={"grad": c, "forget": -1.0}), "combine", opt, ps)


def test_clip_zero_tensor_and_negative_tensor() -> None:
    for clip in (torch.tensor(0.0), torch.tensor(-1.0), 0.0, -1.0):
        opt, ps, _ = _stepped("SGD")
        refused(lambda opt=opt, clip=clip: opt.step(combine={"grad": 1.0, "forget": -1.0}, clip=clip), "clip", opt, ps)


@SETTINGS
@given(v=bad(lo=0.0), b=bad(lo=0.0, hi=1.0, open_hi=True))
def test_edited_group_hyperparameters_refused_at_step(v: Any, b: Any) -> None:
    for cls, names in (("SGD", ("lr", "momentum", "dampening", "weight_decay")), ("AdamW", ("lr", "eps", "betas"))):
        for name in names:
            opt, ps, _ = _stepped(cls)
            opt.param_groups[0][name] = (b, 0.999) if name == "betas" else v
            refused(lambda opt=opt: opt.step(combine={"grad": 1.0, "forget": -1.0}), name[:4], opt, ps)


def test_misspelt_mask_role_refused_at_a_role_step() -> None:
    opt, ps, _ = _stepped("SGD")
    opt.set_mask([torch.ones(p.shape, dtype=torch.bool) for p in ps], mode="grad", roles=["forgt"])
    refused(lambda: opt.step(combine={"grad": 1.0, "forget": -1.0}), "forgt", opt, ps)


@SETTINGS
@given(lam=bad(lo=0.0))
def test_set_anchor_lam(lam: Any) -> None:
    opt, ps, _ = _stepped("AdamW")
    refused(lambda: opt.set_anchor([torch.ones_like(p) for p in ps], lam=lam), "lam", opt, ps)


def test_set_anchor_nonfinite_importance() -> None:
    opt, ps, _ = _stepped("SGD")
    imp = [torch.ones_like(p) for p in ps]
    imp[1][0] = float("nan")
    refused(lambda: opt.set_anchor(imp, lam=1.0), "importance[1]", opt, ps)


# -- complex parameters (stepped as real views) ------------------------------------------------
def _complex_stepped(cls: str) -> tuple[Any, list, Callable]:
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64)), torch.nn.Parameter(torch.randn(3))]

    def loss() -> torch.Tensor:
        return ps[0].abs().pow(2).sum() + (ps[0].real.sum(0) * ps[1]).sum()

    opt = getattr(fastclu.optim, cls)(ps, lr=0.1, **({"momentum": 0.9} if cls == "SGD" else {}))
    loss().backward()
    opt.step()
    opt.set_mask([torch.rand(p.shape) > 0.3 for p in ps], mode="update")
    loss().backward()
    return opt, ps, loss


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_complex_masks_take_the_complex_shape(cls: str) -> None:
    opt, ps, _ = _complex_stepped(cls)
    rm = torch.rand(3) > 0.5
    for label, bad_mask in (
        ("transposed", torch.rand(3, 4) > 0.5),  # the same element count, another shape
        ("real view", torch.rand(4, 3, 2) > 0.5),  # one bit per real part: not the complex shape
    ):
        refused(lambda m=bad_mask: opt.set_mask([m, rm], mode="update"), "mask[0]", opt, ps)
        assert label
    packed_real_view = fastclu.ops.pack_bits(torch.rand(24) > 0.5)  # 3 bytes: the view's 24 bits, not 12
    refused(lambda: opt.set_mask([packed_real_view, rm], mode="update"), "mask[0]", opt, ps)


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_complex_anchor_state_and_restore_from_must_be_complex(cls: str) -> None:
    opt, ps, _ = _complex_stepped(cls)
    refused(lambda: opt.set_anchor([torch.rand(4, 3), torch.rand(3)]), "importance[0]", opt, ps)
    refused(lambda: opt.set_anchor([torch.rand(4, 3, dtype=torch.complex64), torch.rand(3)],
                                   anchor=[torch.rand(4, 3), torch.rand(3)]), "anchor[0]", opt, ps)  # fmt: skip
    sd = opt.state_dict()
    buf = "momentum_buffer" if cls == "SGD" else "exp_avg"
    broken = {**sd, "state": {**sd["state"], 0: {**sd["state"][0], buf: torch.zeros(4, 3)}}}
    refused(lambda: opt.load_state_dict(broken), buf, opt, ps)
    view = torch.view_as_real(ps[0].detach()).clone()
    refused(lambda: opt.step(restore_from=[view, ps[1].detach().clone()]), "restore_from[0]", opt, ps)
    refused(lambda: opt.step(restore_from=[ps[0].detach().to(torch.complex128), ps[1]]), "restore_from[0]", opt, ps)


# -- ops: restore_from dtype, packed-mask shape -------------------------------------------------
def _op_args() -> tuple[list, list, dict]:
    torch.manual_seed(1)
    ps = [torch.randn(4, 3), torch.randn(5)]
    return ps, [[torch.randn_like(p) for p in ps]], {"momentum_buffer": [torch.randn_like(p) for p in ps]}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_ops_restore_from_of_another_dtype_refused(dtype: torch.dtype) -> None:
    ps, gs, st = _op_args()
    src = [ps[0].clone(), ps[1].to(dtype)]
    refused(lambda: fastclu.ops.combine_step_(ps, gs, st, lr=0.1, momentum=0.9, restore_from=src),
            "restore_from[1]", params=ps + gs[0] + st["momentum_buffer"])  # fmt: skip


@pytest.mark.parametrize("shape", [(1, 2), (2, 1), (2, 1, 1)])
def test_ops_packed_mask_of_another_shape_refused(shape: tuple[int, ...]) -> None:
    ps, gs, st = _op_args()
    masks = [fastclu.ops.pack_bits(torch.rand(p.shape) < 0.5) for p in ps]
    masks[0] = masks[0].reshape(shape)
    refused(lambda: fastclu.ops.combine_step_(ps, gs, st, lr=0.1, momentum=0.9, mask=masks, mask_mode="update"),
            "mask[0]", params=ps + gs[0] + st["momentum_buffer"])  # fmt: skip
    refused(lambda: fastclu.ops.gram(gs, mask=masks), "mask[0]", params=gs[0])


def test_ops_take_no_complex_tensors() -> None:
    ps, gs, st = _op_args()
    z = [torch.randn(4, 3, dtype=torch.complex64), ps[1]]
    refused(lambda: fastclu.ops.combine_step_(z, gs, st, lr=0.1), "params[0]", params=z + gs[0])


# -- wrappers -----------------------------------------------------------------------------------
@SETTINGS
@given(k=st.one_of(st.integers(max_value=0), WRONG_TYPE, NONFINITE), beta=bad(lo=0.0, hi=1.0))
def test_fastslow_arguments(k: Any, beta: Any) -> None:
    ps, _ = _model()
    inner = fastclu.optim.SGD(ps, lr=0.1)
    refused(lambda: FastSlow(inner, k=k), "k", params=ps)
    refused(lambda: FastSlow(inner, beta=beta), "beta", params=ps)
    opt = FastSlow(inner, k=2)
    opt.beta = beta  # edited later: re-checked at the next step
    refused(lambda: opt.step(), "beta", opt, ps)


@SETTINGS
@given(rho=st.one_of(NONFINITE, st.floats(max_value=-1e-9, min_value=-1e6), WRONG_TYPE))
def test_random_perturb_rho_rechecked_when_edited(rho: Any) -> None:
    ps, _loss = _model()
    opt = RandomPerturb(fastclu.optim.SGD(ps, lr=0.1), rho=0.1, schedule="constant")
    refused(lambda: RandomPerturb(fastclu.optim.SGD(ps, lr=0.1), rho=rho, schedule="constant"), "rho", params=ps)
    opt.param_groups[0]["rho"] = rho
    refused(opt.apply_noise, "rho", opt, ps)
    assert not opt.noise_applied


@SETTINGS
@given(eps=bad(lo=0.0), p=st.one_of(NONFINITE, st.floats(max_value=-1e-9, min_value=-1e6), WRONG_TYPE))
def test_perturb_merge_eps_and_probs(eps: Any, p: Any) -> None:
    ps, _ = _model()
    inner = fastclu.optim.SGD(ps, lr=0.1)
    if not isinstance(eps, torch.Tensor):
        refused(lambda: PerturbMerge(inner, eps=eps), "eps", params=ps)
    refused(lambda: PerturbMerge(inner, probs=(p, 0.5, 0.5)), "probs", params=ps)
    opt = PerturbMerge(inner, eps=0.5)
    opt.end_task()
    opt.eps = float("nan")

    def enter() -> None:
        with opt.perturbed():
            pass

    refused(enter, "eps", opt, ps)


def test_wrapper_state_with_wrong_types_is_refused() -> None:
    ps, loss = _model()
    opt = FastSlow(fastclu.optim.SGD(ps, lr=0.1), k=2)
    loss().backward()
    opt.step()
    sd = opt.state_dict()
    for field, value in (("slow", [1, 2]), ("k", "2"), ("beta", float("nan")), ("step", -1)):
        broken = {**sd, "fastslow": {**sd["fastslow"], field: value}}
        refused(lambda broken=broken: opt.load_state_dict(broken), field, opt, ps)
    pm = PerturbMerge(fastclu.optim.SGD(ps, lr=0.1))
    sd = pm.state_dict()
    for field, value in (("params", [1]), ("generator", torch.zeros(3, dtype=torch.uint8)), ("eps", -1.0)):
        broken = {**sd, "perturb_merge": {**sd["perturb_merge"], field: value}}
        refused(lambda broken=broken: pm.load_state_dict(broken), field, pm, ps)


# -- load_state_dict ----------------------------------------------------------------------------
def _broken_state_dicts(opt: Any, ps: list) -> list[tuple[str, dict]]:
    sd = opt.state_dict()
    g0 = sd["param_groups"][0]
    st0 = sd["state"][0]
    buf = next(k for k in st0 if k != "step" and k != "mask" and not str(k).startswith("stash."))
    out = [
        ("parameter groups", {**sd, "param_groups": sd["param_groups"] * 2}),
        ("parameters", {**sd, "param_groups": [{**g0, "params": g0["params"][:1]}]}),
        ("lr", {**sd, "param_groups": [{k: v for k, v in g0.items() if k != "lr"}]}),
        ("lr", {**sd, "param_groups": [{**g0, "lr": float("nan")}]}),
        ("mask_mode", {**sd, "param_groups": [{**g0, "mask_mode": "bogus"}]}),
        ("shape", {**sd, "state": {**sd["state"], 0: {**st0, buf: torch.zeros(3, 4)}}}),
        ("mask", {**sd, "state": {**sd["state"], 0: {**st0, "mask": torch.zeros(5, dtype=torch.uint8)}}}),
        ("stash.forget", {**sd, "state": {**sd["state"], 0: {**st0, "stash.forget": torch.zeros(12)}}}),
        ("state_dict['state'][0]", {**sd, "state": {**sd["state"], 0: [1, 2]}}),
    ]
    return out


@pytest.mark.parametrize("cls", ["SGD", "AdamW"])
def test_load_state_dict_validates_everything_first(cls: str) -> None:
    opt, ps, _ = _stepped(cls)
    for name, broken in _broken_state_dicts(opt, ps):
        refused(lambda broken=broken: opt.load_state_dict(broken), name, opt, ps)


def test_adamw_state_into_sgd_refused() -> None:
    a, ps_a, _ = _stepped("AdamW")
    s, ps_s, _ = _stepped("SGD")
    refused(lambda: s.load_state_dict(a.state_dict()), "state_dict['param_groups'][0] lacks", s, ps_s)
    refused(lambda: a.load_state_dict(s.state_dict()), "state_dict['param_groups'][0] lacks", a, ps_a)
    # with the groups made to fit, the per-parameter state itself is refused
    sd = a.state_dict()
    sd["param_groups"] = s.state_dict()["param_groups"]
    refused(lambda: s.load_state_dict(sd), "exp_avg", s, ps_s)


def test_load_state_dict_hooks_are_honoured() -> None:
    opt, _ps, _ = _stepped("SGD")
    sd = opt.state_dict()
    calls = []

    def pre(o: Any, d: dict) -> dict:
        d = dict(d)
        d["param_groups"] = [{**g, "lr": 0.5} for g in d["param_groups"]]
        return d

    opt.register_load_state_dict_pre_hook(pre)
    opt.register_load_state_dict_post_hook(lambda o: calls.append(o.param_groups[0]["lr"]))
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["lr"] == 0.5 and calls == [0.5]


# -- perturb / hvp ------------------------------------------------------------------------------
@SETTINGS
@given(scale=bad(), eps=bad(nonzero=True))
def test_perturbed_and_hvp(scale: Any, eps: Any) -> None:
    ps, loss = _model()
    if not isinstance(scale, torch.Tensor) or scale.numel() == 1:

        def enter() -> None:
            with perturbed(ps, scale, seed=1):
                pass

        refused(enter, "scale", params=ps)
    refused(lambda: hvp(ps, loss, [torch.ones_like(p) for p in ps], eps=eps), "eps", params=ps)


@pytest.mark.filterwarnings("ignore::UserWarning")
@SETTINGS
@given(gamma=bad(lo=0.0), eps=bad(lo=0.0))
def test_ratio_mask_gamma_and_eps(gamma: Any, eps: Any) -> None:
    from fastclu.saliency import ratio_mask

    f = [torch.rand(4, 3), torch.rand(3)]
    if not isinstance(gamma, torch.Tensor) or gamma.numel() == 1:
        refused(lambda: ratio_mask(f, f, gamma), "gamma", params=f)
    refused(lambda: ratio_mask(f, f, 1.0, eps=eps), "eps", params=f)


def test_zz_counts() -> None:
    print(f"\nbad inputs tried: {COUNTS['tried']}, refused cleanly with state bit-identical: {COUNTS['clean']}")
    assert COUNTS["tried"] == COUNTS["clean"] or COUNTS["tried"] == 0
    assert not math.isnan(float(COUNTS["tried"]))
