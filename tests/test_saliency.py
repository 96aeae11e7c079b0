"""fastclu.saliency: Fisher accumulation, ratio mask, exact global top-k, SaliencyMask."""

from __future__ import annotations

import io

import pytest
import torch

import fastclu
import fastclu.optim
from fastclu import saliency
from fastclu.saliency import SaliencyMask

SHAPES = [(5, 7), (13,), (), (0,), (2, 3, 4)]


def _model():
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))


def _loader(n=3):
    return [(torch.randn(5, 4), torch.randint(0, 3, (5,))) for _ in range(n)]


@pytest.mark.parametrize("power", [1, 2])
def test_fisher_is_mean_of_batch_gradient_powers(power):
    model, loader = _model(), _loader()
    loss_fn = torch.nn.CrossEntropyLoss()
    sentinel = [torch.full_like(p, 7.0) for p in model.parameters()]
    for p, s in zip(model.parameters(), sentinel):
        p.grad = s.clone()
    got = saliency.fisher(model, loader, loss_fn, power=power)
    # independent: float64 copy of the model, one autograd pass per batch
    m64 = _model().double()
    m64.load_state_dict(model.state_dict())
    want = [torch.zeros(p.shape, dtype=torch.float64) for p in m64.parameters()]
    for x, y in loader:
        gs = torch.autograd.grad(loss_fn(m64(x.double()), y), list(m64.parameters()))
        for w, g in zip(want, gs):
            w += g.square() if power == 2 else g.abs()
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w / len(loader), rtol=1e-4, atol=1e-7)
    assert all(torch.equal(p.grad, s) for p, s in zip(model.parameters(), sentinel)), ".grad must not be touched"


def test_fisher_frozen_parameter_gets_zeros_and_bad_input():
    model = _model()
    model[0].weight.requires_grad_(False)
    got = saliency.fisher(model, _loader(2), torch.nn.CrossEntropyLoss())
    assert not got[0].any() and got[1].any()
    with pytest.raises(TypeError, match="model"):
        saliency.fisher(lambda x: x, _loader(), torch.nn.CrossEntropyLoss())
    with pytest.raises(ValueError, match="power"):
        saliency.fisher(model, _loader(), torch.nn.CrossEntropyLoss(), power=3)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_ratio_mask_vs_direct(gamma):
    ff = [torch.rand(s) for s in SHAPES]
    fr = [torch.rand(s) for s in SHAPES]
    fr[0].view(-1)[:5] = ff[0].view(-1)[:5] / gamma  # exact-boundary cases
    m = saliency.ratio_mask(ff, fr, gamma=gamma)
    want = [(f.double() + 1e-12) >= gamma * (r.double() + 1e-12) for f, r in zip(ff, fr)]
    for i, (got, w) in enumerate(zip(m.unpack(), want)):
        # the contract compares in fp32: fp64 may disagree only on the constructed boundary elements
        differ = (got != w).reshape(-1)
        if i == 0:
            differ[:5] = False
        assert not differ.any()
    assert m.shapes == [torch.Size(s) for s in SHAPES]
    total = sum(w.numel() for w in want)
    assert m.density() == pytest.approx(sum(int(g.sum()) for g in m.unpack()) / total)


@pytest.mark.parametrize("density", [0.0, 0.137, 0.5, 1.0])
def test_topk_mask_exact_with_ties(density):
    scores = [torch.randint(0, 6, s).float() for s in SHAPES]  # many ties
    m = saliency.topk_mask(scores, density)
    total = sum(s.numel() for s in scores)
    k = round(density * total)
    flat = torch.cat([s.reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices  # ties: earlier element first
    want = torch.zeros(total, dtype=torch.bool)
    want[order[:k]] = True
    got = torch.cat([b.reshape(-1) for b in m.unpack()])
    assert torch.equal(got, want)
    assert m.density() == pytest.approx(k / total)
    with pytest.raises(ValueError, match="density"):
        saliency.topk_mask(scores, 1.5)


def test_saliency_mask_container():
    bools = [torch.rand(s) < 0.3 for s in SHAPES]
    m = SaliencyMask.from_bool(bools)
    assert len(m) == len(SHAPES) and m.numel == sum(b.numel() for b in bools)
    assert all(x.dtype == torch.uint8 for x in m.packed)
    assert all(torch.equal(a, b) for a, b in zip(m.unpack(), bools))
    dens = m.densities()
    for d, b in zip(dens, bools):
        assert d == (pytest.approx(float(b.float().mean())) if b.numel() else 0.0)
    assert m.density() == pytest.approx(sum(int(b.sum()) for b in bools) / m.numel)
    assert m.to("cpu").device == torch.device("cpu")
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    m2 = SaliencyMask.from_state_dict(torch.load(buf, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(m2.unpack(), bools))
    m3 = SaliencyMask.from_bool([torch.ones(2, dtype=torch.bool)])
    m3.load_state_dict(m.state_dict())
    assert m3.shapes == m.shapes
    with pytest.raises(ValueError, match="bytes"):
        SaliencyMask([torch.zeros(3, dtype=torch.uint8)], [(40,)])
    with pytest.raises(TypeError):
        SaliencyMask([torch.zeros(5)], [(40,)])
    assert "SaliencyMask" in repr(m)


def _frozen_model():
    m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    m[0].weight.requires_grad_(False)
    return m


def test_fisher_over_given_params_and_contract_losses():
    model = _frozen_model()
    names, params = saliency.trainable_parameters(model)
    assert names == ["0.bias", "2.weight", "2.bias"]
    loader = _loader(2)
    got = saliency.fisher(model, loader, params=params)  # default loss: cross-entropy on (x, y)
    full = saliency.fisher(model, loader, torch.nn.CrossEntropyLoss())
    assert len(got) == 3
    for g, f in zip(got, full[1:]):
        torch.testing.assert_close(g, f)
    # dict batches through an HF-style loss
    dict_loader = [{"x": x, "labels": y} for x, y in loader]

    def loss_fn(m, batch):
        return torch.nn.functional.cross_entropy(m(batch["x"]), batch["labels"], reduction="none")

    for g, f in zip(saliency.fisher(model, dict_loader, loss_fn, params=params), got):
        torch.testing.assert_close(g, f)


def test_named_mask_matches_by_name_and_refuses_mismatches():
    model = _frozen_model()
    names, params = saliency.trainable_parameters(model)
    keep = {n: torch.rand(p.shape) < 0.5 for n, p in zip(names, params)}
    mask = saliency.SaliencyMask.from_bool(keep)
    assert mask.names == names and list(mask.by_name()) == names
    again = saliency.SaliencyMask.from_state_dict(mask.state_dict())
    assert again.names == names
    # the optimizer lists the parameters in another order: matched by name, not position
    opt = fastclu.optim.SGD(params[::-1], lr=0.1, backend="reference")
    opt.set_mask(mask, mode="update", names=model)
    for n, p in zip(names, params):
        assert torch.equal(fastclu.ops.unpack_bits(opt.state[p]["mask"], p.numel(), p.shape), keep[n])
    # a {name: mask} dict needs names, and every optimizer parameter needs an entry
    opt.set_mask(None)
    with pytest.raises(TypeError, match="names"):
        opt.set_mask(keep)
    with pytest.raises(ValueError, match=r"'2.bias'"):
        opt.set_mask({k: v for k, v in keep.items() if k != "2.bias"}, names=dict(model.named_parameters()))
    with pytest.raises(ValueError, match=r"'0.weight'"):
        opt.set_mask({**keep, "0.weight": torch.ones(6, 4, dtype=torch.bool)}, names=model)
    # shapes: a mask of the right size but the wrong shape names the parameter
    bad = saliency.SaliencyMask.from_bool({**keep, "2.weight": torch.ones(6, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask\['2.weight'\] has shape \(6, 3\) but 2.weight has \(3, 6\)"):
        opt.set_mask(bad, names=model)
    assert all("mask" not in opt.state.get(p, {}) for p in params), "nothing installed by a refused mask"
    # positional (no names): count and shape still checked against the mask's own shapes
    with pytest.raises(ValueError, match="entries"):
        fastclu.optim.SGD(params[:2], lr=0.1).set_mask(mask)
    with pytest.raises(ValueError, match="shape"):
        fastclu.optim.SGD(params[::-1], lr=0.1).set_mask(saliency.SaliencyMask.from_bool(list(keep.values())))
    with pytest.raises(ValueError, match="unique"):
        saliency.SaliencyMask.from_bool(list(keep.values()), names=["a", "a", "b"])
