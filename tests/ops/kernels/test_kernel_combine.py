"""combine_step_ kernels against the reference: every flag of the contract, every rule."""

from __future__ import annotations

import pytest
import torch
from _kernel_cases import (
    BACKENDS,
    BIG,
    DEVICE,
    FLOATS,
    HAS_GPU,
    SIZES,
    assert_close,
    assert_equal,
    clone,
    many_sizes,
    need,
    poison_alloc,  # noqa: F401
    rand,
    randn,
    random_masks,
)

from fastclu.ops import combine_step_, gram


def _t(x: float) -> torch.Tensor:
    return torch.tensor(x, device=DEVICE)


# (name, rule, roles, options); the extra keys mask/pen/restore are expanded in _inputs
CASES = [
    ("sgd-plain", "sgd", 1, {"lr": 0.1}),
    ("sgd-mom-wd-coeffs-mask", "sgd", 2,
     {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01, "coeffs": [1.0, -0.5], "scale": 0.7, "mask": True}),
    ("sgd-nesterov-update-pen-max", "sgd", 3,
     {"lr": _t(0.1), "momentum": 0.9, "nesterov": True, "mask": True, "mask_mode": "update", "pen": True,
      "maximize": True, "coeffs": [_t(2.0), 1.0, -1.0]}),
    ("sgd-init-damp-restore-amp", "sgd", 4,
     {"lr": 0.1, "momentum": 0.8, "dampening": 0.1, "init_momentum": True, "restore": True,
      "grad_scale": _t(8.0), "found_inf": _t(0.0), "mask": True, "masked": [True, False, True, False]}),
    ("sgd-init-update", "sgd", 1, {"lr": 0.1, "momentum": 0.9, "init_momentum": True, "mask": True,
                                   "mask_mode": "update"}),
    ("sgd-found-inf-restore", "sgd", 2, {"lr": 0.1, "momentum": 0.9, "restore": True, "found_inf": _t(1.0)}),
    ("adamw-plain", "adamw", 1, {"lr": 1e-2, "weight_decay": 0.01}),
    ("adamw-ams-update-pen", "adamw", 2,
     {"lr": 1e-2, "weight_decay": 0.1, "amsgrad": True, "mask": True, "mask_mode": "update", "pen": True,
      "betas": (0.5, 0.99), "eps": 1e-6}),
    ("adamw-tensor-scalars-amp-max", "adamw", 3,
     {"lr": _t(3e-3), "scale": _t(0.5), "penalty": _t(0.2), "pen": True, "grad_scale": _t(1024.0),
      "found_inf": _t(0.0), "maximize": True, "mask": True, "restore": True}),
    ("adamw-found-inf", "adamw", 2, {"lr": 1e-2, "found_inf": _t(1.0)}),
    ("classp-plain", "classp", 1, {"lr": 0.2, "threshold": 0.5}),
    ("classp-p2-coeffs-mask", "classp", 2,
     {"lr": 0.1, "power": 2.0, "threshold": 0.3, "coeffs": [1.0, -0.5], "scale": 0.7, "mask": True}),
    ("classp-p1.5-update-pen-max-restore", "classp", 3,
     {"lr": _t(0.1), "power": 1.5, "threshold": 0.2, "eps": 1e-4, "mask": True, "mask_mode": "update", "pen": True,
      "maximize": True, "restore": True, "coeffs": [_t(2.0), 1.0, -1.0]}),
    ("classp-unscaled-amp", "classp", 4,
     {"lr": 0.05, "apply_scaling": False, "threshold": 0.01, "grad_scale": _t(8.0), "found_inf": _t(0.0),
      "mask": True, "masked": [True, False, True, False]}),
    ("classp-found-inf-restore", "classp", 2, {"lr": 0.1, "restore": True, "found_inf": _t(1.0)}),
    # the clip formed in the kernel from the roles' gram ("gram": ops.gram of the case's grads)
    ("sgd-clip-mask", "sgd", 2, {"lr": 0.1, "momentum": 0.9, "mask": True, "coeffs": [-25.0, 1.0], "gram": True,
                                 "clip": 0.5}),
    ("adamw-clip-tensors-amp-scale", "adamw", 3,
     {"lr": 1e-2, "gram": True, "clip": _t(0.3), "grad_scale": _t(64.0), "found_inf": _t(0.0), "scale": 0.7,
      "coeffs": [_t(2.0), 1.0, -1.0], "mask": True, "masked": [True, False, False]}),
    ("classp-clip-4roles", "classp", 4, {"lr": 0.1, "threshold": 0.0, "gram": True, "clip": 1e-3}),
    ("adamw-clip-inactive", "adamw", 1, {"lr": 1e-2, "gram": True, "clip": 1e6}),
    # the clip's gram formed by the op (clip_own): the kernels' gram, the reference's combination norm
    ("adamw-clip-own-mask-amp", "adamw", 2, {"lr": 1e-2, "weight_decay": 0.1, "mask": True, "coeffs": [-1.0, 1.0],
                                             "masked": [True, False], "clip_own": True, "clip": 0.05,
                                             "grad_scale": _t(16.0)}),
    ("sgd-clip-own-update-mode", "sgd", 2, {"lr": 0.1, "momentum": 0.9, "mask": True, "mask_mode": "update",
                                            "clip_own": True, "clip": _t(0.02)}),
]  # fmt: skip


def _inputs(rule: str, R: int, opts: dict, sizes: list[int], dtype: torch.dtype):
    opts = dict(opts)
    params = randn(sizes, dtype)
    grads = [randn(sizes, dtype) for _ in range(R)]
    if rule == "sgd":
        state = {"momentum_buffer": randn(sizes)}
    elif rule == "classp":
        state = {"acc": rand(sizes, lo=0.0, hi=2.0),
                 "step": [torch.tensor(float(torch.randint(0, 20, ())), device=DEVICE) for _ in sizes]}  # fmt: skip
    else:
        state = {"exp_avg": randn(sizes, scale=0.1), "exp_avg_sq": rand(sizes, lo=0.01, hi=0.1),
                 "max_exp_avg_sq": rand(sizes, lo=0.01, hi=0.2),
                 "step": [torch.tensor(float(torch.randint(0, 20, ())), device=DEVICE) for _ in sizes]}  # fmt: skip
    if opts.pop("mask", False):
        opts["mask"] = random_masks(sizes)
    if opts.pop("pen", False):
        opts.update(importance=rand(sizes), anchor=randn(sizes, dtype))
        opts.setdefault("penalty", 0.3)
    if opts.pop("restore", False):
        opts["restore_from"] = randn(sizes, dtype)
    if opts.pop("gram", False):
        opts["clip_gram"] = gram(grads, mask=opts.get("mask"), masked=opts.get("masked"), backend="reference")
    return params, grads, state, opts


def _run(backend: str, rule: str, R: int, opts: dict, sizes: list[int], dtype: torch.dtype) -> None:
    params, grads, state, opts = _inputs(rule, R, opts, sizes, dtype)
    grads_before = [clone(g) for g in grads]
    out = {}
    for b in (backend, "reference"):
        p, s = clone(params), {k: clone(v) for k, v in state.items()}
        combine_step_(p, grads, s, rule=rule, backend=b, **opts)
        out[b] = (p, s)
    (p_got, s_got), (p_want, s_want) = out[backend], out["reference"]
    # AdamW moves weights by ~lr: compare the weights at their own scale
    assert_close(p_got, p_want, dtype)
    for k in state:
        assert_close(s_got[k], s_want[k], torch.float32, scale=4.0)
    for g, g0 in zip(grads, grads_before):
        assert_equal(g, g0)  # the role gradients are inputs only
    skipped = "found_inf" in opts and float(opts["found_inf"]) != 0
    moved = any(not torch.equal(a, b) for a, b in zip(p_got, params) if a.numel())
    assert moved != (skipped and "restore_from" not in opts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_combine_matches_reference(backend: str, case, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _, rule, R, opts = case
    _run(backend, rule, R, opts, SIZES, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS[1:])
@pytest.mark.parametrize("rule", ["sgd", "adamw", "classp"])
def test_combine_low_precision(backend: str, dtype: torch.dtype, rule: str) -> None:
    need(backend)
    case = {"sgd": CASES[1], "adamw": CASES[7], "classp": CASES[11]}[rule]
    _run(backend, rule, case[2], case[3], SIZES, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_many_tensors(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _run(backend, "sgd", 2, CASES[1][3], many_sizes(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rule", ["sgd", "adamw", "classp"])
def test_combine_one_tensor(backend: str, rule: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    case = {"sgd": CASES[3], "adamw": CASES[8], "classp": CASES[12]}[rule]
    _run(backend, rule, case[2], case[3], [4097], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_big_tensor(backend: str, poison_alloc) -> None:  # noqa: F811
    need(backend)
    _run(backend, "adamw", 2, CASES[7][3], [BIG, 7], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_many_tensors_adamw(backend: str) -> None:
    need(backend)
    _run(backend, "adamw", 3, CASES[8][3], many_sizes(), torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_mixed_dtypes(backend: str) -> None:
    """Params of several dtypes in one call (one launch per dtype group), grads of another."""
    need(backend)
    params = randn([7, 4097], torch.float16) + randn([33], torch.bfloat16) + randn([5], torch.float32)
    grads = [[torch.randn_like(p, dtype=torch.float32) for p in params]]
    state = {"momentum_buffer": [torch.randn_like(p, dtype=torch.float32) for p in params]}
    got, want = clone(params), clone(params)
    s_got, s_want = {k: clone(v) for k, v in state.items()}, {k: clone(v) for k, v in state.items()}
    combine_step_(got, grads, s_got, lr=0.1, momentum=0.9, backend=backend)
    combine_step_(want, grads, s_want, lr=0.1, momentum=0.9, backend="reference")
    for a, b in zip(got, want):
        assert_close(a, b, a.dtype)
    assert_close(s_got["momentum_buffer"], s_want["momentum_buffer"], torch.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="CUDA graph capture needs a CUDA device")
@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_cuda_graph_capture_replay(backend: str) -> None:
    """A whole AdamW combine step (tensor scalars, AMP inputs) captured once and replayed."""
    need(backend)
    sizes = [1, 7, 4097, 0, 100003]
    params, grads, state, opts = _inputs("adamw", 2, CASES[8][3], sizes, torch.float32)
    ref_p, ref_s = clone(params), {k: clone(v) for k, v in state.items()}
    lr = opts["lr"]
    combine_step_(params, grads, state, rule="adamw", backend=backend, **opts)  # warm-up builds the tables
    combine_step_(ref_p, grads, ref_s, rule="adamw", backend="reference", **opts)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(graph):
        combine_step_(params, grads, state, rule="adamw", backend=backend, **opts)
    torch.cuda.current_stream().wait_stream(stream)
    for step in range(3):
        lr.fill_(1e-3 * (step + 1))  # a scheduler writing the device lr between replays
        for g in grads:
            for t in g:
                t.normal_()
        graph.replay()
        combine_step_(ref_p, grads, ref_s, rule="adamw", backend="reference", **opts)
        torch.cuda.synchronize()
        assert_close(params, ref_p, torch.float32, scale=4.0)
        for k in state:
            assert_close(state[k], ref_s[k], torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_adamw_cpu_step_counters(backend: str) -> None:
    """torch.optim keeps (non-capturable) step counters on the CPU; the step must still match."""
    need(backend)
    params, grads, state, opts = _inputs("adamw", 2, CASES[7][3], SIZES, torch.float32)
    state["step"] = [s.cpu() for s in state["step"]]
    p_got, p_want = clone(params), clone(params)
    s_got, s_want = {k: clone(v) for k, v in state.items()}, {k: clone(v) for k, v in state.items()}
    combine_step_(p_got, grads, s_got, rule="adamw", backend=backend, **opts)
    combine_step_(p_want, grads, s_want, rule="adamw", backend="reference", **opts)
    assert_close(p_got, p_want, torch.float32)
    for k in state:
        assert_close(s_got[k], s_want[k], torch.float32, scale=4.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_adamw_step_counter_at_fp32_limit(backend: str) -> None:
    """An fp32 step counter stops at 2**24 (2**24 + 1 rounds back): the bias corrections there must
    still be those of step 2**24 (about 1), not of step 0 (a zero divisor)."""
    need(backend)
    sizes = [7, 4097]
    params, grads, state, opts = _inputs("adamw", 1, CASES[6][3], sizes, torch.float32)
    state["step"] = [torch.tensor(float(2**24 - 1), device=DEVICE), torch.tensor(float(2**24), device=DEVICE)]
    out = {}
    for b in (backend, "reference"):
        p, s = clone(params), {k: clone(v) for k, v in state.items()}
        combine_step_(p, grads, s, rule="adamw", backend=b, **opts)
        out[b] = (p, s)
    assert all(bool(torch.isfinite(x).all()) for x in out[backend][0])
    assert_close(out[backend][0], out["reference"][0], torch.float32)
    assert [float(x) for x in out[backend][1]["step"]] == [float(2**24)] * 2
    # a step skipped by AMP leaves the stuck counter where it is
    s = {k: clone(v) for k, v in out[backend][1].items()}
    p = clone(out[backend][0])
    combine_step_(p, grads, s, rule="adamw", backend=backend, found_inf=torch.tensor(1.0, device=DEVICE), **opts)
    assert [float(x) for x in s["step"]] == [float(2**24)] * 2
    assert_equal(p, out[backend][0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_clip_gram_nan_poisons_every_weight(backend: str) -> None:
    """A NaN gram gives a NaN clip factor (torch.clamp keeps NaN): not a max() that drops it."""
    need(backend)
    params, grads = randn(SIZES), [randn(SIZES)]
    combine_step_(params, grads, {}, rule="sgd", lr=0.1, clip_gram=torch.full((1, 1), float("nan"), device=DEVICE),
                  clip=1.0, backend=backend)  # fmt: skip
    assert all(bool(p.isnan().all()) for p in params if p.numel())
