"""torch.optim contract conformance, modelled on PyTorch's optimizer tests, run on fastclu's optimizers."""

from __future__ import annotations

import copy
import io

import pytest
import torch

import fastclu.optim as fo

OPTS = {
    "SGD": (fo.SGD, torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "AdamW": (fo.AdamW, torch.optim.AdamW, {"lr": 0.01, "weight_decay": 1e-2, "amsgrad": True}),
}
NAMES = list(OPTS)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors: intra-op threads only add contention on a shared CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _unfused(monkeypatch):
    # The bit-for-bit comparisons with torch's foreach=False step are about the reference's
    # formulation without torch's fused kernel (test_parity.py checks it against fused=True).
    monkeypatch.setenv("FASTCLU_REFERENCE_FUSED", "0")


def _make(name, params, **over):
    cls, _, kw = OPTS[name]
    return cls(params, **{**kw, **over})


def _model(dtype=torch.float32):
    return torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2)).to(dtype)


def _loss(model, x):
    return model(x).square().mean() + model(x).sum() * 0.1


def _train(model, opt, xs, **step_kw):
    for x in xs:
        opt.zero_grad()
        _loss(model, x.to(next(model.parameters()).dtype)).backward()
        opt.step(**step_kw)


def _equal_params(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


# ----------------------------------------------------------------------------------- constructor errors


@pytest.mark.parametrize(
    "name,kw,exc",
    [
        ("SGD", {"lr": -0.1}, ValueError), ("SGD", {"momentum": -0.5}, ValueError),
        ("SGD", {"weight_decay": -1.0}, ValueError), ("SGD", {"nesterov": True, "momentum": 0.0}, ValueError),
        ("SGD", {"nesterov": True, "dampening": 0.1}, ValueError), ("SGD", {"lr": torch.ones(2)}, ValueError),
        ("SGD", {"differentiable": True}, ValueError), ("SGD", {"backend": 3}, TypeError),
        ("AdamW", {"lr": -1e-3}, ValueError), ("AdamW", {"betas": (1.0, 0.9)}, ValueError),
        ("AdamW", {"betas": (0.9, -0.1)}, ValueError), ("AdamW", {"eps": -1e-8}, ValueError),
        ("AdamW", {"weight_decay": -0.1}, ValueError), ("AdamW", {"betas": (torch.ones(2), 0.9)}, ValueError),
    ],
)  # fmt: skip
def test_bad_constructor_arguments(name, kw, exc):
    with pytest.raises(exc):
        _make(name, _model().parameters(), **kw)


@pytest.mark.parametrize("name", NAMES)
def test_bad_group_edit_raises_before_any_update(name):
    m = _model()
    ps = list(m.parameters())
    opt = _make(name, [{"params": ps[:2]}, {"params": ps[2:]}])
    opt.param_groups[1]["lr"] = -1.0
    _loss(m, torch.randn(3, 5)).backward()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(ValueError, match="learning rate"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before)), "the first group must not have moved"
    assert len(opt.state) == 0


# ----------------------------------------------------------------------------------- behaviour


@pytest.mark.parametrize("name", NAMES)
def test_goes_right_direction(name):
    w = torch.nn.Parameter(torch.randn(10))
    target = torch.randn(10)
    opt = _make(name, [w], weight_decay=0.0, lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (w - target).square().sum()
        loss.backward()
        return loss

    first = float(closure().detach())
    for _ in range(50):
        opt.step(closure)
    assert float(closure().detach()) < 0.5 * first


@pytest.mark.parametrize("name", NAMES)
def test_maximize_goes_the_other_way(name):
    w = torch.nn.Parameter(torch.randn(10))
    opt = _make(name, [w], weight_decay=0.0, maximize=True)
    first = float(w.detach().square().sum())
    for _ in range(20):
        opt.zero_grad()
        w.square().sum().backward()
        opt.step()
    assert float(w.detach().square().sum()) > first


@pytest.mark.parametrize("name", NAMES)
def test_tensor_lr_equals_float_lr(name):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1 = _make(name, m1.parameters(), lr=0.01)
    o2 = _make(name, m2.parameters(), lr=torch.tensor(0.01))
    xs = [torch.randn(4, 5) for _ in range(10)]
    _train(m1, o1, xs)
    _train(m2, o2, xs)
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b)  # AdamW rounds 1 - lr*wd in fp32 for a tensor lr, as torch does


@pytest.mark.parametrize("name", NAMES)
def test_param_group_lr_and_weight_decay(name):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    _, tcls, kw = OPTS[name]

    def groups(m):
        ps = list(m.parameters())
        return [{"params": ps[:2], "lr": 0.0}, {"params": ps[2:3], "weight_decay": 0.5}, {"params": ps[3:]}]

    o1, o2 = _make(name, groups(m1)), tcls(groups(m2), foreach=False, **kw)
    frozen = [p.detach().clone() for p in list(m1.parameters())[:2]]
    xs = [torch.randn(4, 5) for _ in range(5)]
    _train(m1, o1, xs)
    _train(m2, o2, xs)
    assert _equal_params(m1, m2)
    assert all(torch.equal(p, f) for p, f in zip(list(m1.parameters())[:2], frozen))


@pytest.mark.parametrize("name", NAMES)
def test_no_op_on_zero_and_missing_grads(name):
    m = _model()
    opt = _make(name, m.parameters(), weight_decay=0.0)
    before = [p.detach().clone() for p in m.parameters()]
    opt.step()  # no grads at all
    assert len(opt.state) == 0
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    ps = list(m.parameters())
    opt.zero_grad()
    ps[0].grad = torch.randn_like(ps[0])
    opt.step()
    assert not torch.equal(ps[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(ps[1:], before[1:]))


@pytest.mark.parametrize("name", NAMES)
def test_sparse_gradient_error_before_any_change(name):
    m = _model()
    ps = list(m.parameters())
    opt = _make(name, ps)
    for p in ps:
        p.grad = torch.randn_like(p)
    ps[-1].grad = ps[-1].grad.to_sparse()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(ps, before))
    assert len(opt.state) == 0


@pytest.mark.parametrize("name", NAMES)
def test_closure_returns_loss_and_matches_plain_step(name):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _make(name, m1.parameters()), _make(name, m2.parameters())
    x = torch.randn(4, 5)

    def closure():
        o1.zero_grad()
        loss = _loss(m1, x)
        loss.backward()
        return loss

    for _ in range(3):
        loss = o1.step(closure)
        assert isinstance(loss, torch.Tensor)
        _train(m2, o2, [x])
    assert _equal_params(m1, m2)


@pytest.mark.parametrize("name", NAMES)
def test_lr_scheduler_matches_torch(name):
    m1 = _model()
    m2 = copy.deepcopy(m1)
    _, tcls, kw = OPTS[name]
    o1, o2 = _make(name, m1.parameters()), tcls(m2.parameters(), foreach=False, **kw)
    s1 = torch.optim.lr_scheduler.CosineAnnealingLR(o1, T_max=6)
    s2 = torch.optim.lr_scheduler.CosineAnnealingLR(o2, T_max=6)
    for _ in range(6):
        x = torch.randn(4, 5)
        _train(m1, o1, [x])
        _train(m2, o2, [x])
        s1.step()
        s2.step()
    assert o1.param_groups[0]["lr"] == o2.param_groups[0]["lr"]
    assert _equal_params(m1, m2)


@pytest.mark.parametrize("name", NAMES)
def test_add_param_group_and_swapping_params(name):
    m = _model()
    ps = list(m.parameters())
    opt = _make(name, ps[:2])
    _train(m, opt, [torch.randn(3, 5)])
    opt.add_param_group({"params": ps[2:], "lr": 0.2})
    assert opt.param_groups[1]["lr"] == 0.2 and opt.param_groups[1]["mask_mode"] is None
    before = [p.detach().clone() for p in ps]
    _train(m, opt, [torch.randn(3, 5)])
    assert all(not torch.equal(p, b) for p, b in zip(ps, before))
    # a continual-learning framework swaps the parameters of a group and drops their state
    new = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(2)]
    for p in opt.param_groups[0]["params"]:
        opt.state.pop(p, None)
    opt.param_groups[0]["params"] = new
    for p in new:
        p.grad = torch.randn_like(p)
    keep = [p.detach().clone() for p in new]
    opt.step()
    assert all(not torch.equal(p, k) for p, k in zip(new, keep))


# ----------------------------------------------------------------------------------- state_dict


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_roundtrip_continues_identically(name):
    m1 = _model()
    o1 = _make(name, m1.parameters())
    _train(m1, o1, [torch.randn(4, 5) for _ in range(3)])
    m2 = copy.deepcopy(m1)
    o2 = _make(name, m2.parameters(), lr=123.0)  # overwritten by the load
    o2.load_state_dict(_roundtrip(o1.state_dict()))
    assert o2.param_groups[0]["lr"] == o1.param_groups[0]["lr"]
    xs = [torch.randn(4, 5) for _ in range(3)]
    _train(m1, o1, xs)
    _train(m2, o2, xs)
    assert _equal_params(m1, m2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("direction", ["torch->fastclu", "fastclu->torch"])
def test_state_dict_loads_across_torch_and_fastclu(name, direction):
    _, tcls, kw = OPTS[name]
    m1 = _model()
    m2 = copy.deepcopy(m1)
    ours, theirs = _make(name, m1.parameters()), tcls(m2.parameters(), foreach=False, **kw)
    src, dst = (theirs, ours) if direction == "torch->fastclu" else (ours, theirs)
    src_m = m2 if src is theirs else m1
    _train(src_m, src, [torch.randn(4, 5) for _ in range(3)])
    with torch.no_grad():
        for a, b in zip((m1 if src_m is m2 else m2).parameters(), src_m.parameters()):
            a.copy_(b)
    dst.load_state_dict(_roundtrip(src.state_dict()))
    assert set(dst.state_dict()["state"][0]) == set(src.state_dict()["state"][0])
    xs = [torch.randn(4, 5) for _ in range(3)]
    _train(m1, ours, xs)
    _train(m2, theirs, xs)
    assert _equal_params(m1, m2)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_state_dict_across_dtypes(name, dtype):
    m1 = _model()
    o1 = _make(name, m1.parameters())
    _train(m1, o1, [torch.randn(4, 5) for _ in range(3)])
    m2 = copy.deepcopy(m1).to(dtype)
    o2 = _make(name, m2.parameters())
    o2.load_state_dict(_roundtrip(o1.state_dict()))
    want = torch.float64 if dtype == torch.float64 else torch.float32
    for k, st in o2.state_dict()["state"].items():
        for key, v in st.items():
            assert v.dtype == (torch.float32 if key == "step" else want), key
            assert torch.equal(v.double(), o1.state_dict()["state"][k][key].double()), "no precision lost on load"
    _train(m2, o2, [torch.randn(4, 5)])
    assert all(torch.isfinite(p).all() and p.dtype == dtype for p in m2.parameters())
    for st in o2.state.values():
        assert all(v.dtype == (torch.float32 if k == "step" else want) for k, v in st.items())


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_state_dict_across_devices(name):
    m1 = _model()
    o1 = _make(name, m1.parameters())
    _train(m1, o1, [torch.randn(4, 5) for _ in range(3)])
    m2 = copy.deepcopy(m1).cuda()
    o2 = _make(name, m2.parameters())
    o2.load_state_dict(o1.state_dict())
    assert all(v.device.type == "cuda" for st in o2.state.values() for v in st.values())
    xs = [torch.randn(4, 5) for _ in range(3)]
    _train(m1, o1, xs)
    _train(m2, o2, [x.cuda() for x in xs])
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b.cpu(), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------------- hooks, copies, repr


@pytest.mark.parametrize("name", NAMES)
def test_hook_order(name):
    m = _model()
    opt = _make(name, m.parameters())
    log = []
    opt.register_step_pre_hook(lambda o, a, k: log.append(("pre1", dict(k))))
    opt.register_step_pre_hook(lambda o, a, k: log.append(("pre2", None)))
    opt.register_step_post_hook(lambda o, a, k: log.append(("post", len(o.state))))
    opt.register_state_dict_pre_hook(lambda o: log.append(("sd_pre", None)))
    opt.register_state_dict_post_hook(lambda o, sd: log.append(("sd_post", len(sd["state"]))))
    opt.register_load_state_dict_pre_hook(lambda o, sd: log.append(("load_pre", None)))
    opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post", None)))
    _loss(m, torch.randn(3, 5)).backward()
    opt.step(clip=10.0)
    assert log[0] == ("pre1", {"clip": 10.0}) and log[1][0] == "pre2" and log[2] == ("post", 4)
    sd = opt.state_dict()
    opt.load_state_dict(sd)
    assert [e[0] for e in log[3:]] == ["sd_pre", "sd_post", "load_pre", "load_post"]


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_is_independent(name):
    m = _model()
    opt = _make(name, m.parameters())
    _train(m, opt, [torch.randn(4, 5)])
    clone = copy.deepcopy(opt)
    key = next(iter(opt.state))
    buf = "momentum_buffer" if name == "SGD" else "exp_avg"
    snap = opt.state[key][buf].clone()
    cp = next(iter(clone.state))
    clone.state[cp][buf].add_(1.0)
    assert torch.equal(opt.state[key][buf], snap)
    assert clone.backend == opt.backend and clone.defaults == opt.defaults


@pytest.mark.parametrize("name", NAMES)
def test_repr(name):
    opt = _make(name, _model().parameters(), lr=0.0123)
    text = repr(opt)
    assert text.startswith(name) and "lr: 0.0123" in text and "mask_mode" in text


@pytest.mark.parametrize("name", NAMES)
def test_zero_grad_set_to_none(name):
    m = _model()
    opt = _make(name, m.parameters())
    _loss(m, torch.randn(3, 5)).backward()
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in m.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_grad_scaler_skip_on_inf(name):
    m = _model()
    opt = _make(name, m.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _train(m, opt, [torch.randn(3, 5)])
    scaler.scale(_loss(m, torch.randn(3, 5))).backward()
    next(m.parameters()).grad.view(-1)[0] = float("inf")
    before = [p.detach().clone() for p in m.parameters()]
    sd = copy.deepcopy(opt.state_dict())
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() < 1024.0
    assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
    for k, st in opt.state_dict()["state"].items():
        assert all(torch.equal(v, sd["state"][k][key]) for key, v in st.items())


@pytest.mark.parametrize("name", NAMES)
def test_torch_compile_of_a_training_step(name):
    # dynamo must trace (or cleanly break around) the step; the eager backend keeps the numbers exact
    m1 = _model()
    m2 = copy.deepcopy(m1)
    o1, o2 = _make(name, m1.parameters()), _make(name, m2.parameters())

    def train_step(x):
        o1.zero_grad()
        _loss(m1, x).backward()
        o1.step()

    compiled = torch.compile(train_step, backend="eager")
    for _ in range(3):
        x = torch.randn(4, 5)
        compiled(x)
        _train(m2, o2, [x])
    # Under dynamo AdamW's Python-float bias corrections may be evaluated as fp32 tensor math
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
