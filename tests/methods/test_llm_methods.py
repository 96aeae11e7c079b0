"""LLM unlearning losses and loops (fastclu.methods.llm) on a tiny random GPT-2."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel

from fastclu.methods.llm import (
    METHODS,
    LMUnlearnConfig,
    adaptive_weighted,
    lm_saliency_mask,
    npo_loss,
    reference_for,
    sequence_logprob,
    sequence_nll,
    unlearn_lm,
)
from fastclu.optim import SGD, AdamW

VOCAB, LEN = 30, 7


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is much faster than several on a shared CPU (restored after)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _model(seed: int = 0, n_embd: int = 16) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(n_layer=1, n_embd=n_embd, n_head=2, vocab_size=VOCAB, n_positions=16,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _batches(n: int, b: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (b, LEN), generator=g)
        labels = ids.clone()
        labels[:, :3] = -100
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_sequence_nll_matches_a_token_loop() -> None:
    model = _model()
    batch = _batches(1, 3, 0)[0]
    batch["labels"][1, 5] = -100  # an ignored token inside a sequence
    got = sequence_nll(model, batch).detach()
    logits = model(input_ids=batch["input_ids"]).logits.double()
    for b in range(3):
        terms = []
        for t in range(1, LEN):
            y = int(batch["labels"][b, t])
            if y != -100:
                terms.append(-(logits[b, t - 1, y] - torch.logsumexp(logits[b, t - 1], 0)))
        want = torch.stack(terms).mean()
        assert float(got[b]) == pytest.approx(float(want), rel=1e-5)
        assert float(sequence_logprob(model, batch)[b].detach()) == pytest.approx(-float(want) * len(terms), rel=1e-5)
    # Without labels the targets are input_ids, padding (attention_mask 0) ignored.
    ids = batch["input_ids"]
    mask = torch.ones_like(ids)
    mask[:, -2:] = 0
    no_labels = sequence_nll(model, {"input_ids": ids, "attention_mask": mask})
    lab = ids.masked_fill(mask == 0, -100)
    torch.testing.assert_close(
        no_labels, sequence_nll(model, {"input_ids": ids, "attention_mask": mask, "labels": lab})
    )


def test_npo_loss_and_adaptive_weights_formulas() -> None:
    logp = torch.tensor([-3.0, -10.0, -0.5])
    ref = torch.tensor([-4.0, -8.0, -0.5])
    beta = 0.1
    want = (
        -(2 / beta) * sum(math.log(1 / (1 + math.exp(beta * (a - r)))) for a, r in zip(logp.tolist(), ref.tolist())) / 3
    )
    assert float(npo_loss(logp, ref, beta)) == pytest.approx(want, rel=1e-6)
    losses = torch.tensor([1.0, 4.0, 0.25], requires_grad=True)
    c = [1 / (x**0.5 + 1e-15) for x in (1.0, 4.0, 0.25)]
    want_w = sum(ci / sum(c) * x for ci, x in zip(c, (1.0, 4.0, 0.25)))
    out = adaptive_weighted(losses, 0.5)
    assert float(out) == pytest.approx(want_w, rel=1e-6)
    out.backward()  # weights are stop-gradient: d out / d l_i = w_i
    torch.testing.assert_close(losses.grad, torch.tensor([ci / sum(c) for ci in c]))


@pytest.mark.parametrize("method", METHODS)
def test_each_method_raises_forget_loss(method: str) -> None:
    model = _model()
    forget, retain = _batches(2, 4, 1), _batches(2, 4, 2)
    before = float(sequence_nll(model, forget[0]).mean())
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    cfg = LMUnlearnConfig(method=method, alpha_f=5.0, forget_every=2, clip=5.0)
    res = unlearn_lm(model, forget, retain, cfg, opt, 8)
    assert float(sequence_nll(model, forget[0]).mean()) > before
    assert res.steps == 8 and res.info["forget_steps"] == (4 if method == "sfron" else 8)
    assert not opt.stashed_roles()


def test_sfron_mask_covers_only_trainable_parameters() -> None:
    model = _model()
    model.transformer.wte.requires_grad_(False)  # frozen (tied with lm_head)
    model.transformer.wpe.requires_grad_(False)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(trainable, lr=0.05, momentum=0.9)
    forget, retain = _batches(2, 4, 1), _batches(2, 4, 2)
    mask = lm_saliency_mask(model, forget, retain, trainable)
    assert len(mask) == len(trainable) and 0.0 < mask.density() < 1.0
    cfg = LMUnlearnConfig(method="sfron", alpha_f=2.0, forget_every=2, clip=1.0)
    res = unlearn_lm(model, forget, retain, cfg, opt, 4, mask_batches=2)
    assert 0.0 < res.info["mask_density"] < 1.0
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p.detach(), frozen[n]), n


def test_npo_with_lora_uses_the_adapter_disabled_base() -> None:
    peft = pytest.importorskip("peft")
    model = _model()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], lora_dropout=0.0))
    base = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    forget, retain = _batches(2, 4, 1), _batches(2, 4, 2)
    ref = reference_for(lora)
    # A fresh adapter (B = 0) is the base: logp == ref, so the NPO loss is (2/beta) log 2.
    loss = npo_loss(sequence_logprob(lora, forget[0]), ref(forget[0]), 0.1)
    assert float(loss) == pytest.approx(20 * math.log(2), rel=1e-6)
    n_params = sum(1 for _ in lora.parameters())
    trainable = [p for p in lora.parameters() if p.requires_grad]
    opt = AdamW(trainable, lr=1e-2, weight_decay=0.0)
    seen = []
    unlearn_lm(lora, forget, retain, LMUnlearnConfig(method="npo"), opt, 4, callback=lambda t, d: seen.append(d))
    assert seen[0]["forget_loss"] == pytest.approx(20 * math.log(2), rel=1e-6)
    after = npo_loss(sequence_logprob(lora, forget[0]), ref(forget[0]), 0.1)
    assert float(after) < 20 * math.log(2)  # NPO loss descends: forget log-probs fall below the reference
    assert sum(1 for _ in lora.parameters()) == n_params  # no second copy was attached
    for n, p in lora.named_parameters():
        if n in base:
            assert torch.equal(p.detach(), base[n]), n
    # The reference is still the untouched base: disable_adapter() logp differs from the adapted model now.
    assert not torch.allclose(ref(forget[0]), sequence_logprob(lora, forget[0]).detach())


def test_bad_config_and_reference_are_refused() -> None:
    with pytest.raises(ValueError, match="method must be one of"):
        LMUnlearnConfig(method="gradient_ascent")
    with pytest.raises(ValueError, match="forget_every"):
        LMUnlearnConfig(method="sfron", forget_every=0)
    with pytest.raises(ValueError, match="ref_model must have the model's architecture"):
        reference_for(_model(), _model(n_embd=8))
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="fastclu optimizer"):
        unlearn_lm(model, _batches(1, 2, 0), _batches(1, 2, 1), LMUnlearnConfig(), opt, 1)
    with pytest.raises(ValueError, match="input_ids"):
        unlearn_lm(model, [{"labels": torch.zeros(2, 3, dtype=torch.long)}], _batches(1, 2, 1), LMUnlearnConfig(),
                   SGD(model.parameters(), lr=0.1), 1)  # fmt: skip


def test_reference_of_a_lora_model_may_be_its_plain_architecture() -> None:
    peft = pytest.importorskip("peft")
    lora = peft.get_peft_model(_model(), peft.LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.0))
    ref = reference_for(lora, _model(seed=1))  # same architecture as the base: accepted
    assert ref(_batches(1, 2, 0)[0]).shape == (2,)
    with pytest.raises(ValueError, match="ref_model"):
        reference_for(lora, _model(n_embd=8))
