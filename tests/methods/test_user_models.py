"""Every method on the models users bring: a frozen backbone, a peft LoRA model, a channels_last CNN,
and a tiny BERT with dict batches and an HF output. Each must run and move only trainable parameters."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

from fastclu import data as D
from fastclu.losses import ExampleList
from fastclu.methods import (
    finetune,
    gradient_ascent,
    joint,
    naive_sequential,
    perturb_and_merge,
    retrain,
    salun,
    sfron,
    ug_clu,
)

CLASSES = 3


def _digits(n: int, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    s = D.load_digits()
    keep = (s.y < CLASSES).nonzero().flatten()[:n]
    return s.x[keep].reshape(len(keep), *shape), s.y[keep]


def _frozen_backbone() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model, TensorDataset(*_digits(48, (64,)))


def _lora() -> tuple[nn.Module, Dataset]:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0", "2"], init_lora_weights="gaussian")
    model = peft.get_peft_model(base, cfg)
    # LoRA's B starts at zero (kept: the default init is "gaussian" A, zero B): move it off zero so
    # a step on A can be seen too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    return model, TensorDataset(*_digits(48, (64,)))


def _channels_last_cnn() -> tuple[nn.Module, Dataset]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, CLASSES)
    ).to(memory_format=torch.channels_last)  # fmt: skip
    assert model[2].weight.is_contiguous(memory_format=torch.channels_last) and not model[2].weight.is_contiguous()
    x, y = _digits(48, (1, 8, 8))
    return model, TensorDataset(x.contiguous(memory_format=torch.channels_last), y)


def _tiny_bert() -> tuple[nn.Module, Dataset]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=CLASSES)  # fmt: skip
    model = transformers.BertForSequenceClassification(cfg)
    for p in model.bert.embeddings.parameters():  # frozen embeddings: a common fine-tuning setup
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    n, t = 48, 8
    ids = torch.randint(1, 40, (n, t), generator=g)
    labels = ids[:, 0] % CLASSES  # learnable: the first token decides the class
    mask = torch.ones(n, t, dtype=torch.int64)
    ex = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(n)]
    return model, ExampleList(ex)


MODELS: dict[str, Callable[[], tuple[nn.Module, Dataset]]] = {
    "frozen_backbone": _frozen_backbone, "lora": _lora, "channels_last_cnn": _channels_last_cnn,
    "tiny_bert": _tiny_bert,
}  # fmt: skip


def _run(method: str, model: nn.Module, ds: Dataset) -> None:
    n = len(ds)
    forget, remain = Subset(ds, range(8)), Subset(ds, range(8, n))
    tasks = [Subset(ds, range(n // 2)), Subset(ds, range(n // 2, n))]
    kw = {"batch_size": 8, "progress": False, "backend": "reference"}
    if method == "sfron":
        sfron(model, forget, remain, iters=4, forget_every=2, **kw)
    elif method == "salun":
        salun(model, forget, remain, steps=3, classes=CLASSES, density=0.5, **kw)
    elif method == "ug_clu":
        reqs = [D.Request("learn", "a", tasks[0]), D.Request("learn", "b", tasks[1]),
                D.Request("unlearn", "forget", Subset(ds, range(4)))]  # fmt: skip
        ug_clu(model, reqs, learn_steps=2, unlearn_iters=3, forget_every=2, replay_per_class=2, **kw)
    elif method == "perturb_and_merge":
        perturb_and_merge(model, tasks, steps_per_task=2, fisher_samples=3, **kw)
    elif method == "naive_sequential":
        naive_sequential(model, tasks, steps_per_task=2, **kw)
    else:
        fn = {"finetune": finetune, "gradient_ascent": gradient_ascent, "retrain": retrain, "joint": joint}[method]
        fn(model, forget if method == "gradient_ascent" else remain, steps=3, **kw)


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("method", ["sfron", "salun", "ug_clu", "perturb_and_merge", "finetune", "gradient_ascent",
                                    "retrain", "naive_sequential", "joint"])  # fmt: skip
def test_method_moves_only_trainable_parameters(kind: str, method: str) -> None:
    model, ds = MODELS[kind]()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    layout = {n: p.stride() for n, p in model.named_parameters()}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert kind == "channels_last_cnn" or frozen, "the case needs frozen parameters"
    _run(method, model, ds)
    moved = set()
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n
        assert p.stride() == layout[n], n
        if not torch.equal(p.detach(), before[n]):
            moved.add(n)
    assert not moved & frozen, f"{method} moved frozen parameters {sorted(moved & frozen)}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert moved, f"{method} moved nothing"
    assert moved <= trainable
