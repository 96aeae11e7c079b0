"""UnlearningTrainer and PerturbationCallback under transformers.Trainer (tiny random GPT-2, CPU)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from fastclu.integrations.hf import PerturbationCallback, UnlearningTrainer
from fastclu.methods.llm import LMUnlearnConfig, sequence_nll
from fastclu.optim import AdamW, FastSlow, PerturbMerge, RandomPerturb

VOCAB, LEN = 40, 8


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is much faster than several on a shared CPU (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(seed: int = 0, n_embd: int = 32) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=2, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _data(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LEN), generator=g)
    out = []
    for row in ids:
        labels = row.clone()
        labels[:2] = -100  # a prompt part that is not scored
        out.append({"input_ids": row, "labels": labels})
    return out


def _args(tmp_path, **kw) -> TrainingArguments:
    base = {
        "output_dir": str(tmp_path),
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 1000,
        "train_sampling_strategy": "sequential",
        "seed": 0,
        "disable_tqdm": True,
    }
    base.update(kw)
    return TrainingArguments(**base)


def _stack(examples) -> dict[str, torch.Tensor]:
    return {k: torch.stack([e[k] for e in examples]) for k in examples[0]}


def _side_indices(n: int, b: int, seed: int, k: int) -> list[int]:
    epoch, j = divmod(k, n // b)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    return perm[j * b : (j + 1) * b].tolist()


def test_graddiff_trainer_equals_hand_written_steps(tmp_path) -> None:
    forget, retain = _data(8, 1), _data(12, 2)
    steps, acc, b = 3, 2, 4
    model = _model()
    init = {k: v.clone() for k, v in model.state_dict().items()}
    args = _args(tmp_path, max_steps=steps, gradient_accumulation_steps=acc, max_grad_norm=0.5)
    tr = UnlearningTrainer(model, args, forget_dataset=forget, retain_dataset=retain, method="graddiff",
                           config=LMUnlearnConfig(forget_weight=0.7, retain_weight=1.3))  # fmt: skip
    tr.train()

    hand = _model()
    hand.load_state_dict(init)
    hand.train()
    decay = tr.get_decay_parameter_names(hand)
    named = list(hand.named_parameters())
    opt = AdamW([{"params": [p for n, p in named if n in decay], "weight_decay": 0.0},
                 {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}], lr=1e-3)  # fmt: skip
    for t in range(steps):
        for i in range(acc):
            k = t * acc + i
            fb = _stack([forget[j % len(forget)] for j in range(k * b, (k + 1) * b)])
            (sequence_nll(hand, fb).mean() / acc).backward()
            opt.stash("forget")
            rb = _stack([retain[j] for j in _side_indices(len(retain), b, 0, k)])
            (sequence_nll(hand, rb).mean() / acc).backward()
            opt.stash("retain")
        opt.step(combine={"forget": -0.7, "retain": 1.3}, clip=0.5)
        opt.zero_grad()
    moved = False
    # The loss is the package's sequence_nll (checked against an independent formula in
    # tests/methods/test_llm_methods.py); data order, accumulation scaling, roles, clip and step are
    # written here. Same ops in the same order: bit-identical.
    for (n, p), q in zip(tr.model.named_parameters(), hand.parameters()):
        assert torch.equal(p.detach(), q.detach()), n
        moved |= not torch.equal(p.detach(), init[n])
    assert moved


def test_sfron_trainer_resumes_bit_identically(tmp_path) -> None:
    forget, retain = _data(8, 3), _data(16, 4)
    cfg = LMUnlearnConfig(alpha_f=2.0, forget_every=2, gamma=1.0)

    def trainer(out, **kw):
        args = _args(out, max_steps=4, gradient_accumulation_steps=2, max_grad_norm=1.0, **kw)
        return UnlearningTrainer(_model(), args, forget_dataset=forget, retain_dataset=retain, method="sfron",
                                 config=cfg, mask_batches=2)  # fmt: skip

    full = trainer(tmp_path / "a", save_strategy="steps", save_steps=2)
    full.train()
    assert 0.0 < full.mask_density < 1.0
    ckpt = tmp_path / "a" / "checkpoint-2"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert all("mask" in st for st in saved["state"].values())
    assert saved["param_groups"][0]["mask_roles"] == ["forget"]
    assert saved["unlearning_roles"] == {"method": "sfron"}
    resumed = trainer(tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(ckpt))
    for (n, p), q in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(p.detach(), q.detach()), n


def test_bf16_autocast_runs(tmp_path) -> None:
    if not torch.backends.mkldnn.is_available():  # pragma: no cover
        pytest.skip("no CPU bf16 autocast")
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    dtypes = []
    model.lm_head.register_forward_hook(lambda mod, a, out: dtypes.append(out.dtype))
    args = _args(tmp_path, max_steps=2, bf16=True)
    tr = UnlearningTrainer(model, args, forget_dataset=_data(8, 5), retain_dataset=_data(8, 6), method="npo")
    tr.train()
    assert torch.bfloat16 in dtypes  # the role forwards ran under autocast
    ps = list(tr.model.parameters())
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in ps)
    assert any(not torch.equal(p.detach(), b) for p, b in zip(ps, before))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "npo_typo"}, "method must be one of"),
        ({"forget_dataset": [{"input_ids": torch.zeros(LEN, dtype=torch.long)}] * 4}, "forget_dataset.*labels"),
        ({"forget_dataset": [{"labels": torch.zeros(LEN, dtype=torch.long)}] * 4}, "forget_dataset.*input_ids"),
        ({"retain_dataset": None}, "retain_dataset"),
        ({"method": "npo", "ref_model": "other"}, "ref_model must have the model's architecture"),
    ],
)
def test_bad_input_is_refused_before_training(tmp_path, kwargs, match) -> None:
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    kw = {"forget_dataset": _data(8, 1), "retain_dataset": _data(8, 2), "method": "graddiff", **kwargs}
    if kw.get("ref_model") == "other":
        kw["ref_model"] = _model(n_embd=16)
    with pytest.raises(ValueError, match=match):
        UnlearningTrainer(model, _args(tmp_path, max_steps=1), **kw)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def _count_noisy_forwards(model, wrapper):
    counts = {"all": 0, "noisy": 0}

    def pre_hook(module, args, kwargs):
        counts["all"] += 1
        inside = wrapper.noise_applied if isinstance(wrapper, RandomPerturb) else wrapper._inside
        counts["noisy"] += int(inside)

    model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    return counts


def test_random_perturb_under_trainer_perturbs_every_forward(tmp_path) -> None:
    model = _model()
    wrapper = RandomPerturb(AdamW(model.parameters(), lr=1e-3), rho=0.1, schedule="constant", seed=3)
    counts = _count_noisy_forwards(model, wrapper)
    args = _args(tmp_path, max_steps=3, gradient_accumulation_steps=2)
    cb = PerturbationCallback(wrapper)
    tr = Trainer(model, args, train_dataset=_data(16, 1), optimizers=(wrapper, None), callbacks=[cb])
    tr.train()
    assert counts == {"all": 6, "noisy": 6}
    assert cb.windows == 3 and wrapper.step_count == 3 and not wrapper.noise_applied


def test_random_perturb_under_trainer_without_callback_refuses(tmp_path) -> None:
    model = _model()
    wrapper = RandomPerturb(AdamW(model.parameters(), lr=1e-3), rho=0.1, schedule="constant")
    counts = _count_noisy_forwards(model, wrapper)
    tr = Trainer(model, _args(tmp_path, max_steps=2), train_dataset=_data(8, 1), optimizers=(wrapper, None))
    with pytest.raises(RuntimeError, match="PerturbationCallback"):
        tr.train()
    assert counts["noisy"] == 0


@pytest.mark.parametrize("callback", [True, False])
def test_perturb_merge_under_trainer(tmp_path, callback: bool) -> None:
    model = _model()
    wrapper = PerturbMerge(AdamW(model.parameters(), lr=1e-2), eps=0.5, probs=(0.0, 0.5, 0.5), seed=1)
    first = Trainer(model, _args(tmp_path, max_steps=2), train_dataset=_data(8, 1), optimizers=(wrapper, None),
                    callbacks=[PerturbationCallback(wrapper, accumulate_fisher=True)])  # fmt: skip
    first.train()
    wrapper.end_task()  # second task: a task vector exists, every window perturbs (p0 = 0)
    counts = _count_noisy_forwards(model, wrapper)
    cbs = [PerturbationCallback(wrapper, accumulate_fisher=True)] if callback else []
    second = Trainer(model, _args(tmp_path, max_steps=2), train_dataset=_data(8, 2), optimizers=(wrapper, None),
                     callbacks=cbs)  # fmt: skip
    if callback:
        second.train()
        assert counts == {"all": 2, "noisy": 2} and wrapper.draws == 2
    else:
        with pytest.raises(RuntimeError, match="PerturbationCallback"):
            second.train()


def test_perturbation_callback_rejects_other_optimizers() -> None:
    with pytest.raises(TypeError, match="wrapper"):
        PerturbationCallback(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1))


def test_sfron_trainer_on_lora_masks_and_moves_only_the_adapter(tmp_path) -> None:
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    adapter = {n: p.detach().clone() for n, p in lora.named_parameters() if p.requires_grad}
    cfg = LMUnlearnConfig(alpha_f=2.0, forget_every=1)
    tr = UnlearningTrainer(lora, _args(tmp_path, max_steps=2, learning_rate=1e-2), forget_dataset=_data(8, 1),
                           retain_dataset=_data(8, 2), method="sfron", config=cfg, mask_batches=1)  # fmt: skip
    tr.train()
    inner = tr.optimizer.optimizer.optimizer  # AcceleratedOptimizer -> RoleStep -> fastclu AdamW
    masked = [p for g in inner.param_groups for p in g["params"] if "mask" in inner.state[p]]
    assert len(masked) == len(adapter) and 0.0 < tr.mask_density <= 1.0
    for n, p in tr.model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n
    assert any(not torch.equal(p.detach(), adapter[n]) for n, p in tr.model.named_parameters() if n in adapter)


def test_fastslow_under_trainer_needs_no_window(tmp_path) -> None:
    model = _model()
    wrapper = FastSlow(AdamW(model.parameters(), lr=1e-2), k=2, beta=0.5)
    tr = Trainer(model, _args(tmp_path, max_steps=4), train_dataset=_data(16, 1), optimizers=(wrapper, None))
    tr.train()
    assert wrapper.step_count == 4
    # Right after a sync (step 4 is one) the fast weights are the slow weights.
    assert all(torch.equal(p.detach(), s) for p, s in zip(wrapper.params(), wrapper.slow_weights()))
