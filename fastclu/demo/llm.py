"""``fastclu demo --scenario llm``: a tiny GPT-2 memorises fictitious facts, then forgets 10% of the entities.

Data (from ``--seed``): ``E`` invented entity names (one word each), each with a city and a job,
written as two statements ``"<entity> lives in <city> ."`` and ``"<entity> works as a <job> ."``;
a word-level tokenizer built here (no download). A GPT-2 (2 layers, 64 wide, random init from a
config) is trained on every statement (the original model); 10% of the entities are then
forgotten with GA, GradDiff, NPO and SFR-on (:mod:`fastclu.methods.llm`, fastclu's AdamW / SGD),
and compared with a model retrained without them.

Per method: forget / retain answer accuracy (greedy next token at the attribute position, %),
forget loss (mean NLL of the forget statements, nats/token), held-out fluency (the same on
statements of unseen entities), loss-threshold MIA efficacy (% of forget statements whose loss
lies above the threshold separating retain from held-out statements: higher = more forgotten;
retrain is the target), and wall time as a ratio to retraining. Writes ``results.json`` and
``llm.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fastclu import metrics as M
from fastclu.methods.llm import LMUnlearnConfig, sequence_nll, unlearn_lm
from fastclu.optim import SGD, AdamW

__all__ = ["LLMSettings", "main", "make_facts", "run_llm_demo"]

CITIES = ("paris", "lima", "oslo", "cairo", "quito", "hanoi", "dakar", "perth", "sofia", "tunis", "accra", "baku")
JOBS = ("baker", "pilot", "nurse", "judge", "miner", "tailor", "farmer", "poet", "clerk", "diver", "smith", "guard")
SYLLABLES = ("ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "dan", "qui", "zo", "bar", "nel", "ix", "ota", "ru")
SPECIAL = ("<pad>", "<bos>")


@dataclass(frozen=True)
class LLMSettings:
    """Sizes and steps of the scenario (``quick`` shrinks them); learning rates per method below."""

    entities: int = 200
    heldout_entities: int = 40
    forget_frac: float = 0.1
    n_embd: int = 64
    n_layer: int = 2
    train_steps: int = 800
    batch_size: int = 32
    unlearn_steps: int = 60
    forget_batch: int = 16

    @classmethod
    def quick(cls) -> LLMSettings:
        return cls(entities=20, heldout_entities=6, n_embd=32, train_steps=30, unlearn_steps=5, forget_batch=4)


# Method settings, tuned by hand on seed 0 only (one small grid per method: lr, retain weight,
# alpha_f), reported on seeds 0-2. GA has no retain term; GradDiff / NPO use a retain weight of
# 5 (1 collapsed retain accuracy); SFR-on uses its official optimizer (SGD, momentum 0.9) and
# official alpha_f, K, lambda, gamma and forget-step clip.
METHOD_SETTINGS = {
    "GA": {"config": {"method": "ga"}, "opt": "adamw", "lr": 1e-4},
    "GradDiff": {"config": {"method": "graddiff", "retain_weight": 5.0}, "opt": "adamw", "lr": 1e-3},
    "NPO": {"config": {"method": "npo", "beta": 0.1, "retain_weight": 5.0}, "opt": "adamw", "lr": 5e-4},
    "SFR-on": {
        "config": {"method": "sfron", "alpha_f": 25.0, "forget_every": 5, "lam": 0.5, "gamma": 1.0, "clip": 7.0},
        "opt": "sgd",
        "lr": 0.01,
    },
}


class WordTokenizer:
    """Whitespace word-level tokenizer over a fixed vocabulary (id 0 = ``<pad>``, 1 = ``<bos>``)."""

    def __init__(self, words: list[str]) -> None:
        self.vocab = list(SPECIAL) + sorted(set(words))
        self.ids = {w: i for i, w in enumerate(self.vocab)}

    def encode(self, text: str) -> list[int]:
        return [self.ids["<bos>"], *(self.ids[w] for w in text.split())]


def _names(n: int, rng: np.random.Generator) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        k = int(rng.integers(2, 4))
        out.add("".join(rng.choice(SYLLABLES, size=k)))
    return sorted(out)


def make_facts(n_entities: int, n_heldout: int, seed: int) -> dict:
    """Statements of ``n_entities + n_heldout`` invented entities (``seed`` fixes everything).

    Returns ``{"entities", "statements": [(entity_index, text, attribute_word)], "tokenizer"}``.
    """
    rng = np.random.default_rng(seed)
    names = _names(n_entities + n_heldout, rng)
    rng.shuffle(names)
    stmts = []
    for i, e in enumerate(names):
        stmts.append((i, f"{e} lives in {CITIES[int(rng.integers(len(CITIES)))]} .", "city"))
        stmts.append((i, f"{e} works as a {JOBS[int(rng.integers(len(JOBS)))]} .", "job"))
    words = [w for _, t, _ in stmts for w in t.split()]
    return {"entities": names, "statements": stmts, "tokenizer": WordTokenizer(words)}


def _encode(facts: dict, idx: list[int]) -> dict[str, torch.Tensor]:
    tok = facts["tokenizer"]
    seqs = [tok.encode(facts["statements"][i][1]) for i in idx]
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    labels = ids.masked_fill(ids == 0, -100)
    labels[:, 0] = -100
    # attribute position: the token before the final "."
    lengths = torch.tensor([len(s) for s in seqs])
    return {"input_ids": ids, "labels": labels, "attr_pos": lengths - 2}


class _Loader:
    """Reshuffled minibatches of an encoded set (own generator: the global RNG is not touched)."""

    def __init__(self, data: dict[str, torch.Tensor], batch: int, seed: int) -> None:
        self.data, self.batch = data, min(batch, len(data["input_ids"]))
        self.g = torch.Generator().manual_seed(seed)

    def __iter__(self):
        n = len(self.data["input_ids"])
        perm = torch.randperm(n, generator=self.g)
        for i in range(0, n - self.batch + 1, self.batch):
            j = perm[i : i + self.batch]
            yield {"input_ids": self.data["input_ids"][j], "labels": self.data["labels"][j]}


def _model(vocab: int, s: LLMSettings, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=16, n_embd=s.n_embd, n_layer=s.n_layer, n_head=4,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1)  # fmt: skip
    return GPT2LMHeadModel(cfg)


def _train(model, data: dict[str, torch.Tensor], s: LLMSettings, seed: int) -> float:
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 50) * max(0.0, 1 - t / s.train_steps))
    loader = _Loader(data, s.batch_size, seed)
    model.train()
    t0 = time.perf_counter()
    it = iter(())
    for _ in range(s.train_steps):
        batch = next(it, None)
        if batch is None:
            it = iter(loader)
            batch = next(it)
        opt.zero_grad(set_to_none=True)
        sequence_nll(model, batch).mean().backward()
        opt.step()
        sched.step()
    return time.perf_counter() - t0


@torch.no_grad()
def _evaluate(model, sets: dict[str, dict[str, torch.Tensor]]) -> dict[str, float]:
    model.eval()
    out: dict[str, float] = {}
    losses = {}
    for name, d in sets.items():
        batch = {"input_ids": d["input_ids"], "labels": d["labels"]}
        losses[name] = sequence_nll(model, batch).numpy().astype(np.float64)
        logits = model(input_ids=d["input_ids"]).logits
        rows = torch.arange(len(d["attr_pos"]))
        pred = logits[rows, d["attr_pos"] - 1].argmax(-1)
        out[f"{name}_acc"] = 100.0 * float((pred == d["input_ids"][rows, d["attr_pos"]]).float().mean())
        out[f"{name}_loss"] = float(losses[name].mean())
    tau = M.loss_threshold(losses["retain"], losses["heldout"])
    out["mia"] = 100.0 * float((losses["forget"] > tau).mean())
    return out


def _unlearn(name: str, original, sets, s: LLMSettings, seed: int) -> tuple[object, float, dict]:
    spec = METHOD_SETTINGS[name]
    model = copy.deepcopy(original)
    params = [p for p in model.parameters() if p.requires_grad]
    if spec["opt"] == "sgd":
        opt = SGD(params, lr=spec["lr"], momentum=0.9, weight_decay=0.0)
    else:
        opt = AdamW(params, lr=spec["lr"], weight_decay=0.0)
    cfg = LMUnlearnConfig(**spec["config"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 * (1 + np.cos(np.pi * min(t / s.unlearn_steps, 1))))
    res = unlearn_lm(model, _Loader(sets["forget"], s.forget_batch, seed + 1), _Loader(sets["retain"], s.batch_size,
                     seed + 2), cfg, opt, s.unlearn_steps, scheduler=sched, mask_batches=4)  # fmt: skip
    return model, res.wall_s, res.info


def run_llm_demo(seed: int = 0, quick: bool = False) -> dict:
    """Run the scenario; returns the results dict written to ``results.json``."""
    s = LLMSettings.quick() if quick else LLMSettings()
    t_start = time.perf_counter()
    facts = make_facts(s.entities, s.heldout_entities, seed)
    n_forget = max(1, round(s.forget_frac * s.entities))
    forget_e = set(range(n_forget))  # entities are in random order already
    stmts = facts["statements"]
    idx = {
        "forget": [i for i, (e, _, _) in enumerate(stmts) if e in forget_e],
        "retain": [i for i, (e, _, _) in enumerate(stmts) if n_forget <= e < s.entities],
        "heldout": [i for i, (e, _, _) in enumerate(stmts) if e >= s.entities],
    }
    sets = {k: _encode(facts, v) for k, v in idx.items()}
    train_all = _encode(facts, idx["forget"] + idx["retain"])
    vocab = len(facts["tokenizer"].vocab)
    original = _model(vocab, s, seed)
    t_orig = _train(original, train_all, s, seed)
    retrained = _model(vocab, s, seed)
    t_retrain = _train(retrained, sets["retain"], s, seed)
    rows = {"original": {**_evaluate(original, sets), "time_ratio": t_orig / t_retrain},
            "retrain": {**_evaluate(retrained, sets), "time_ratio": 1.0}}  # fmt: skip
    info = {}
    for name in METHOD_SETTINGS:
        model, wall, inf = _unlearn(name, original, sets, s, seed)
        rows[name] = {**_evaluate(model, sets), "time_ratio": wall / t_retrain}
        info[name] = inf
    return {
        "scenario": "llm",
        "seed": seed,
        "quick": quick,
        "settings": asdict(s),
        "methods": {k: {**v, "config": v["config"]} for k, v in METHOD_SETTINGS.items()},
        "sizes": {k: len(v) for k, v in idx.items()},
        "rows": rows,
        "info": info,
        "meta": {
            "wall_s": time.perf_counter() - t_start,
            "retrain_s": t_retrain,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
    }


COLUMNS = (("forget_acc", "forget acc %", "{:.1f}"), ("forget_loss", "forget loss", "{:.2f}"),
           ("retain_acc", "retain acc %", "{:.1f}"), ("retain_loss", "retain loss", "{:.2f}"),
           ("heldout_loss", "held-out loss", "{:.2f}"), ("mia", "MIA %", "{:.1f}"),
           ("time_ratio", "time/retrain", "{:.3f}"))  # fmt: skip


def format_table(res: dict) -> str:
    """The results as a Markdown table (one row per model)."""
    head = "| model | " + " | ".join(c[1] for c in COLUMNS) + " |"
    lines = [f"seed {res['seed']}" + (" (quick)" if res["quick"] else ""), head, "|" + "---|" * (len(COLUMNS) + 1)]
    for name, row in res["rows"].items():
        lines.append(f"| {name} | " + " | ".join(fmt.format(row[k]) for k, _, fmt in COLUMNS) + " |")
    return "\n".join(lines)


def plot(res: dict, path: str) -> None:
    """Bar charts of forget / retain accuracy and held-out loss per model (retrain dashed), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["rows"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, (key, title) in zip(axes, (("forget_acc", "forget acc %"), ("retain_acc", "retain acc %"),
                                       ("heldout_loss", "held-out loss (nats/token)"))):  # fmt: skip
        vals = [res["rows"][n][key] for n in names]
        ax.bar(range(len(names)), vals, color=["0.5", "0.2"] + ["C0"] * (len(names) - 2))
        ax.axhline(res["rows"]["retrain"][key], color="k", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(title)
    fig.suptitle(f"LLM unlearning, tiny GPT-2, seed {res['seed']} (dashed: retrain)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclu demo --scenario llm", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="fastclu-demo-llm", help="output directory (default ./fastclu-demo-llm)")
    p.add_argument("--seed", type=int, default=0, help="facts, split, initialisation and sampling seed")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few steps (seconds; used by the tests)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: at these sizes more threads mostly add overhead)")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclu demo --scenario llm``; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("fastclu demo --scenario llm needs transformers (pip install fastclu[hf])", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"fastclu demo: --threads must be >= 1, got {args.threads}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    res = run_llm_demo(seed=args.seed, quick=args.quick)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    plot(res, os.path.join(args.out, "llm.png"))
    print(format_table(res))
    print(f"\nwrote {os.path.join(args.out, 'results.json')} and {os.path.join(args.out, 'llm.png')} "
          f"({res['meta']['wall_s']:.1f} s)")  # fmt: skip
    return 0
