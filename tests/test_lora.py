"""LoRA discovery, merged row norms and Flat-LoRA against dense float64 formulas."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from fastclu.lora import LoRALinear, add_lora, find_lora_layers, merged_row_norms
from fastclu.ops.reference.philox import philox_normal
from fastclu.optim import FlatLoRA


def _seed() -> int:
    return int(torch.randint(0, 2**31, (1,)))


def _plain(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))
    add_lora(model, r=3, alpha=6.0, seed=seed)
    with torch.no_grad():
        for p in find_lora_layers(model):
            p.weight.copy_(torch.randn(p.weight.shape, generator=g))
            p.A.copy_(torch.randn(p.A.shape, generator=g))
            p.B.copy_(torch.randn(p.B.shape, generator=g))  # nonzero B: the merged rows differ from W's
    return model.to(dtype)


def _peft(seed: int) -> nn.Module:
    peft = pytest.importorskip("peft")
    g = torch.Generator().manual_seed(seed)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(10, 7), nn.Linear(7, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(torch.relu(self.fc1(x)))

    model = peft.get_peft_model(Net(), peft.LoraConfig(r=2, lora_alpha=5, target_modules=["fc1", "fc2"]))
    with torch.no_grad():
        for p in find_lora_layers(model):
            p.B.copy_(torch.randn(p.B.shape, generator=g))
    return model


def _dense_norms(pairs: list) -> list[torch.Tensor]:
    return [torch.linalg.vector_norm(p.weight.double() + p.scaling * p.B.double() @ p.A.double(), dim=1)
            for p in pairs]  # fmt: skip


def test_discovery_plain_and_peft() -> None:
    pairs = find_lora_layers(_plain())
    assert [p.name for p in pairs] == ["0", "2"] and pairs[0].scaling == 2.0
    assert not pairs[0].weight.requires_grad and pairs[0].A.requires_grad
    ppairs = find_lora_layers(_peft(_seed()))
    assert len(ppairs) == 2 and ppairs[0].adapter == "default" and ppairs[0].scaling == 2.5
    assert ppairs[0].weight.shape == (7, 10) and ppairs[0].A.shape == (2, 10) and ppairs[0].B.shape == (7, 2)
    with pytest.raises(ValueError, match="no LoRA layers"):
        find_lora_layers(nn.Linear(3, 3))


def test_peft_delta_matches_peft_and_scaled_restores() -> None:
    model = _peft(_seed())
    for p in find_lora_layers(model):
        torch.testing.assert_close(p.delta(), p.module.get_delta_weight(p.adapter))
        before = p.scaling
        with p.scaled(1.5):
            assert p.scaling == before * 1.5
        assert p.scaling == before


@pytest.mark.parametrize("which", ["plain", "peft"])
def test_merged_row_norms_match_dense_float64(which: str) -> None:
    model = _plain(seed=_seed()) if which == "plain" else _peft(_seed())
    pairs = find_lora_layers(model)
    got = merged_row_norms(pairs, chunk_elems=25)  # several row blocks
    for g, want in zip(got, _dense_norms(pairs)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_flat_lora_noise_matches_formula_regenerates_and_restores_bit_exact(dtype: torch.dtype) -> None:
    model = _plain(dtype, seed=_seed())
    flat = FlatLoRA(model, rho=0.3, total_steps=7, seed=_seed())
    flat.t = 3
    clean = [w.detach().clone() for w in flat.weights]
    sig = flat.sigmas()
    f = 0.5 * (1 - math.cos(math.pi * 4 / 7))
    for s, w, dense in zip(sig, flat.weights, _dense_norms(flat.pairs)):
        torch.testing.assert_close(s.double(), f * 0.3 * dense / math.sqrt(w.shape[1]), rtol=2e-6, atol=1e-8)
    flat.open()
    first = [w.detach().clone() for w in flat.weights]
    for i, (w0, w1, s) in enumerate(zip(clean, first, sig)):
        z = philox_normal(flat.step_seed(), i, w0.numel()).reshape(w0.shape).double()
        want = (w0.double() + z * s.double()[:, None]).to(dtype)
        tol = {"rtol": 0, "atol": 0} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-6}
        if dtype == torch.bfloat16:  # one rounding of the fp32 sum: allow one bf16 ulp
            assert ((w1.double() - want.double()).abs() <= w1.double().abs() * 2**-7 + 1e-30).all()
        else:
            torch.testing.assert_close(w1.double(), want.double(), **tol)
        assert not torch.equal(w1, w0)
    flat.close()
    for w, w0 in zip(flat.weights, clean):
        assert torch.equal(w.detach(), w0)  # bit-exact removal
    flat.open()
    for w, w1 in zip(flat.weights, first):
        assert torch.equal(w.detach(), w1)  # the same step regenerates the same noise, bit for bit
    flat.close()
    flat.step()
    flat.open()
    assert not torch.equal(flat.weights[0].detach(), first[0])  # a new step, new noise
    flat.close()


@pytest.mark.parametrize("kind", ["torch", "fastclu"])
def test_flat_lora_with_torch_and_fastclu_optimizers_trains_only_adapters(kind: str) -> None:
    from fastclu.optim import SGD

    model = _plain(seed=_seed())
    base = [p.weight.detach().clone() for p in find_lora_layers(model)]
    cls = torch.optim.SGD if kind == "torch" else SGD
    opt = cls([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    flat = FlatLoRA(model, rho=0.05, total_steps=5, seed=1)
    flat.attach(opt)
    x, y = torch.randn(16, 12), torch.randint(0, 5, (16,))
    a0 = find_lora_layers(model)[0].A.detach().clone()
    for _ in range(5):
        flat.open()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()  # the pre-hook removes the noise before the update
        opt.zero_grad()
    assert flat.t == 5 and not flat.is_open
    for p, w0 in zip(find_lora_layers(model), base):
        assert torch.equal(p.weight.detach(), w0)
    assert not torch.equal(find_lora_layers(model)[0].A.detach(), a0)
    flat.detach()


def test_flat_lora_gradient_is_taken_at_the_perturbed_weight() -> None:
    model = _plain(seed=_seed())
    twin = copy.deepcopy(model)
    flat = FlatLoRA(model, rho=0.5, schedule="constant", seed=4)
    x = torch.randn(8, 12)
    with flat.perturbed():
        out = model(x).sum()
        out.backward()
        noisy = [p.weight.detach().clone() for p in find_lora_layers(model)]
    with torch.no_grad():
        for p, w in zip(find_lora_layers(twin), noisy):
            p.weight.copy_(w)
    twin(x).sum().backward()
    for a, b in zip(find_lora_layers(model), find_lora_layers(twin)):
        assert torch.equal(a.A.grad, b.A.grad)


def test_flat_lora_memory_saving_and_errors() -> None:
    model = _plain(seed=_seed())
    flat = FlatLoRA(model, rho=0.2, schedule="constant", exact=False)
    clean = [w.detach().clone() for w in flat.weights]
    with flat.perturbed():
        pass
    for w, w0 in zip(flat.weights, clean):
        ulp = torch.finfo(torch.float32).eps * w0.abs().max()
        assert (w.detach() - w0).abs().max() <= 2 * ulp
    with pytest.raises(ValueError, match="total_steps"):
        FlatLoRA(model)
    with pytest.raises(ValueError, match="rho"):
        FlatLoRA(model, rho=-1.0, schedule="constant")
    flat.open()
    with pytest.raises(RuntimeError, match="already"):
        flat.open()
    with pytest.raises(RuntimeError, match="close"):
        flat.state_dict()
    flat.close()
    assert isinstance(model[0], LoRALinear)


def test_flat_lora_on_peft_layers_sigma_and_exact_restore() -> None:
    model = _peft(_seed())
    flat = FlatLoRA(model, rho=0.1, schedule="constant", seed=_seed())
    clean = [w.detach().clone() for w in flat.weights]
    for s, w, dense in zip(flat.sigmas(), flat.weights, _dense_norms(flat.pairs)):
        torch.testing.assert_close(s.double(), 0.1 * dense / math.sqrt(w.shape[1]), rtol=2e-6, atol=1e-8)
    with flat.perturbed():
        assert all(not torch.equal(w.detach(), c) for w, c in zip(flat.weights, clean))
    assert all(torch.equal(w.detach(), c) for w, c in zip(flat.weights, clean))


def test_attach_with_model_opens_at_training_forward_only() -> None:
    model = _plain(seed=_seed())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    flat = FlatLoRA(model, rho=0.1, schedule="constant", seed=2)
    flat.attach(opt, model)
    clean = flat.weights[0].detach().clone()
    x, y = torch.randn(4, 12), torch.randint(0, 5, (4,))
    for _ in range(2):  # gradient accumulation: one noise for both forwards
        nn.functional.cross_entropy(model(x), y).backward()
        assert flat.is_open and not torch.equal(flat.weights[0].detach(), clean)
    opt.step()
    assert not flat.is_open and flat.t == 1 and torch.equal(flat.weights[0].detach(), clean)
    model.eval()
    with torch.no_grad():
        model(x)
    assert not flat.is_open
    flat.detach()
    model.train()
    model(x)
    assert not flat.is_open


def test_attach_through_an_accelerate_wrapped_optimizer() -> None:
    accelerate = pytest.importorskip("accelerate")
    model = _plain(seed=_seed())
    inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01)
    opt = accelerate.Accelerator(cpu=True).prepare(inner)
    assert not hasattr(opt, "_optimizer_step_pre_hooks")  # why attach() unwraps it
    flat = FlatLoRA(model, rho=0.1, schedule="constant", seed=2)
    flat.attach(opt, model)
    clean = flat.weights[0].detach().clone()
    nn.functional.cross_entropy(model(torch.randn(4, 12)), torch.randint(0, 5, (4,))).backward()
    assert flat.is_open
    opt.step()
    assert not flat.is_open and flat.t == 1 and torch.equal(flat.weights[0].detach(), clean)
    flat.detach()


@pytest.mark.slow
def test_flat_lora_under_hf_trainer(tmp_path) -> None:
    transformers = pytest.importorskip("transformers")
    seen: list[bool] = []

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(12, 9), nn.ReLU(), nn.Linear(9, 5))

        def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict:
            seen.append(flat.is_open)
            logits = self.body(x)
            return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}

    model = Net()
    add_lora(model.body, r=2, alpha=4.0, select=lambda n, _: n == "0")
    flat = FlatLoRA(model, rho=0.1, schedule="constant", seed=1)
    g = torch.Generator().manual_seed(0)
    ds = [{"x": torch.randn(12, generator=g), "labels": torch.tensor(i % 5)} for i in range(16)]
    w0 = find_lora_layers(model)[0].weight.detach().clone()
    a0 = find_lora_layers(model)[0].A.detach().clone()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                                          report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no")  # fmt: skip
    transformers.Trainer(model=model, args=args, train_dataset=ds, callbacks=[flat.hf_callback()]).train()
    assert seen == [True, True, True] and flat.t == 3 and not flat.is_open
    assert torch.equal(find_lora_layers(model)[0].weight.detach(), w0)
    assert not torch.equal(find_lora_layers(model)[0].A.detach(), a0)
