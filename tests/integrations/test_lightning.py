"""fastclu optimizers and Flat-LoRA under a Lightning Trainer equal the plain loops, bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

pl = pytest.importorskip("lightning.pytorch")

from fastclu.integrations.lightning import FlatLoRACallback
from fastclu.lora import add_lora
from fastclu.optim import AdamW, FlatLoRA

STEPS = 6


class Module(pl.LightningModule):
    def __init__(self, model: nn.Module, params: list[nn.Parameter], seen: list | None = None) -> None:
        super().__init__()
        self.model, self._params, self.seen = model, params, seen
        self.seen_at_update: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        if self.seen is not None:  # the base weight the forward sees
            self.seen.append(self.model[0].base.weight.detach().clone())
        return F.cross_entropy(self.model(x), y)

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.seen is not None:  # runs after the callbacks' hook: what the update and clipping see
            self.seen_at_update.append(self.model[0].base.weight.detach().clone())

    def configure_optimizers(self):
        return AdamW(self._params, lr=0.05, weight_decay=0.01)


def _data(seed: int, n: int = STEPS * 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 10, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i : i + 8], y[i : i + 8]) for i in range(0, n, 8)]


def _loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None)  # the batches as they are, in order


def _trainer(accumulate: int = 1, callbacks=()) -> pl.Trainer:
    return pl.Trainer(max_steps=STEPS, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate,
                      callbacks=list(callbacks), num_sanity_val_steps=0)  # fmt: skip


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 4))


def _lora_mlp(seed: int) -> tuple[nn.Module, list[nn.Parameter]]:
    model = _mlp(seed)
    add_lora(model, r=2, alpha=4.0, seed=seed)
    for n, p in model.named_parameters():
        p.requires_grad_(".A" in n or ".B" in n or n.endswith((".lora_A", ".lora_B")))
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # B starts at 0: move it so the merged weight (and its row norms) depend on it
        with torch.no_grad():
            p.add_(0.1 * torch.randn(p.shape))
    return model, trainable


def test_fastclu_adamw_under_lightning_equals_a_manual_loop() -> None:
    seed = int(torch.randint(0, 2**31, ()))
    data = _data(seed)
    model = _mlp(seed)
    manual = copy.deepcopy(model)
    _trainer().fit(Module(model, list(model.parameters())), _loader(data))
    opt = AdamW(manual.parameters(), lr=0.05, weight_decay=0.01)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(manual(x), y).backward()
        opt.step()
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(model.parameters()), next(_mlp(seed).parameters()))  # it trained


@pytest.mark.parametrize("accumulate", [1, 2])
def test_flat_lora_callback_equals_the_manual_flat_lora_loop(accumulate: int) -> None:
    seed = int(torch.randint(0, 2**31, ()))
    data = _data(seed, STEPS * 8 * accumulate)
    model, trainable = _lora_mlp(seed)
    manual = copy.deepcopy(model)
    clean = [p.base.weight.detach().clone() for p in (model[0], model[2])]
    flat = FlatLoRA(model, rho=0.5, total_steps=STEPS, seed=seed % 1000)
    seen: list[torch.Tensor] = []
    module = Module(model, trainable, seen)
    _trainer(accumulate, [FlatLoRACallback(flat)]).fit(module, _loader(data))
    assert flat.t == STEPS and not flat.is_open
    # the manual loop the callback stands for: noise open over the step's forwards and backwards,
    # removed before the update, the step counted after it
    m_trainable = [p for p in manual.parameters() if p.requires_grad]
    m_flat = FlatLoRA(manual, rho=0.5, total_steps=STEPS, seed=seed % 1000)
    opt = AdamW(m_trainable, lr=0.05, weight_decay=0.01)
    m_seen = []
    for s in range(STEPS):
        with m_flat.perturbed():
            for x, y in data[s * accumulate : (s + 1) * accumulate]:
                m_seen.append(manual[0].base.weight.detach().clone())
                (F.cross_entropy(manual(x), y) / accumulate).backward()
        opt.step()
        m_flat.step()
        opt.zero_grad()
    for a, b in zip(model.parameters(), manual.parameters()):
        assert torch.equal(a, b)
    # the base weights carry noise during the forwards (the same within a step), none afterwards
    assert len(seen) == len(m_seen) == STEPS * accumulate
    assert all(torch.equal(a, b) for a, b in zip(seen, m_seen))
    assert all(not torch.equal(w, clean[0]) for w in seen)
    assert len(module.seen_at_update) == STEPS and all(torch.equal(w, clean[0]) for w in module.seen_at_update)
    if accumulate == 2:
        assert all(torch.equal(seen[2 * s], seen[2 * s + 1]) for s in range(STEPS))
    for layer, w in zip((model[0], model[2]), clean):
        assert torch.equal(layer.base.weight, w)


def test_flat_lora_callback_refuses_two_optimizers() -> None:
    model, trainable = _lora_mlp(0)

    class Two(Module):
        def configure_optimizers(self):
            return [AdamW(trainable[:1], lr=0.1), AdamW(trainable[1:], lr=0.1)]

        def training_step(self, batch, batch_idx):
            return None

    module = Two(model, trainable)
    module.automatic_optimization = False
    with pytest.raises(ValueError, match="exactly one optimizer"):
        _trainer(1, [FlatLoRACallback(FlatLoRA(model, rho=0.1, total_steps=STEPS))]).fit(module, _loader(_data(0)))
    with pytest.raises(TypeError, match="FlatLoRA"):
        FlatLoRACallback(object())
