"""Demo rows for Flat-LoRA, MEHL-Soup(+), CLASSP, EWC and P&M-LoRA on the digits.

``fastclu demo --scenario seeds [--seed N] [--out DIR] [--quick]`` (also
``python -m fastclu.demo.seeds``, which writes no file without ``--out``) prints the tables and
writes ``DIR/seeds_seed{N}.json``. Every number is as it comes out of one run (CPU, deterministic
per seed); nothing is tuned per seed.

Scenarios:
  * **LoRA adaptation**: a backbone MLP is pretrained on digits 0-4, then adapted to digits
    5-9 from a few examples per class (``Settings.lora_shots``) with rank-4 LoRA on its two
    hidden layers and a trainable head; Flat-LoRA (rho 0.05, the paper's default; 0.2 as a
    named option) beside plain LoRA, same data, seeds and steps.
  * **Soups**: K fine-tunes (different learning rates, weight decays and data orders) of one
    model pretrained on half of the training split; coefficients learned on a held-out
    validation split; test accuracy of the best single ingredient (chosen on validation), the
    uniform soup, MEHL-Soup and MEHL-Soup+, and the soup's held bytes against loading all K.
  * **Continual learning**: the five 2-digit tasks of :func:`fastclu.data.task_sequence` from
    scratch: naive, EWC and CLASSP (paper defaults, plus a lower threshold as a named option).
  * **LoRA continual learning**: the same five tasks from a backbone pretrained on mirrored
    digits (a shifted domain): full-model naive and P&M, sequential LoRA (each task's adapter
    added, alpha = 1) and P&M-LoRA.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastclu import data as D
from fastclu import metrics as M
from fastclu._cli_checks import check_seeds_args
from fastclu._registry import use_backend
from fastclu.demo.tables import table as text_table
from fastclu.lora import add_lora
from fastclu.losses import masked_classification_loss
from fastclu.methods.baselines import naive_sequential
from fastclu.methods.common import cycle, make_mlp, task_loss, train
from fastclu.methods.ewc import ewc
from fastclu.methods.pnm import perturb_and_merge
from fastclu.methods.pnm_lora import pnm_lora
from fastclu.optim import CLASSP, SGD, FlatLoRA
from fastclu.soup import mehl_soup, uniform_soup

__all__ = ["Settings", "main", "run_seeds_demo"]


@dataclass(frozen=True)
class Settings:
    """Step counts and sizes (``quick`` shrinks them)."""

    batch_size: int = 32
    pretrain_steps: int = 300
    lora_shots: int = 10  # training examples per class for the LoRA adaptation
    lora_steps: int = 200
    lora_rank: int = 4
    soup_k: int = 8
    soup_finetune_steps: int = 100
    task_steps: int = 100
    ewc_lam: float = 1000.0
    lora_cl_lr: float = 0.01
    fisher_samples: int = 64

    @staticmethod
    def quick() -> Settings:
        return Settings(pretrain_steps=40, lora_steps=20, soup_k=4, soup_finetune_steps=15, task_steps=10,
                        fisher_samples=8)  # fmt: skip


def _split(sub: D.Subset, classes: tuple[int, ...]) -> D.Subset:
    return sub.take(torch.isin(sub.y, torch.tensor(classes)).nonzero().flatten())


def _shots(sub: D.Subset, k: int, seed: int) -> D.Subset:
    g = torch.Generator().manual_seed(seed)
    idx = []
    for c in sorted(set(sub.y.tolist())):
        ci = (sub.y == c).nonzero().flatten()
        idx.append(ci[torch.randperm(ci.numel(), generator=g)[:k]])
    return sub.take(torch.cat(idx))


def _lora_model(backbone: nn.Module, rank: int, seed: int) -> nn.Module:
    m = copy.deepcopy(backbone)
    add_lora(m, r=rank, alpha=2.0 * rank, select=lambda name, _: name in ("0", "2"), seed=seed)
    return m  # the head m[4] stays a trainable nn.Linear


def run_lora_adaptation(seed: int, s: Settings) -> dict:
    """Flat-LoRA vs plain LoRA: pretrain on 0-4, adapt to 5-9 from a few shots."""
    train_set, test_set = D.train_test(seed)
    old, new = (0, 1, 2, 3, 4), (5, 6, 7, 8, 9)
    backbone = make_mlp(seed=seed)
    train(backbone, D.loader(_split(train_set, old), s.batch_size, seed=seed), s.pretrain_steps,
          loss_fn=masked_classification_loss(old))  # fmt: skip
    shots = _shots(_split(train_set, new), s.lora_shots, seed)
    test_new = _split(test_set, new)
    rows = {}
    for name, rho in (("LoRA", None), ("Flat-LoRA rho=0.05", 0.05), ("Flat-LoRA rho=0.2 (option)", 0.2)):
        m = _lora_model(backbone, s.lora_rank, seed)
        opt = SGD([p for p in m.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
        flat = None if rho is None else FlatLoRA(m, rho=rho, total_steps=s.lora_steps, seed=seed)
        if flat is not None:
            flat.attach(opt)
        t0 = time.perf_counter()
        loss_fn = task_loss(new)
        it = cycle(D.loader(shots, s.batch_size, seed=seed))
        for _ in range(s.lora_steps):
            x, y = next(it)
            opt.zero_grad(set_to_none=True)
            if flat is not None:
                flat.open()
            loss_fn(m(x), y).backward()
            opt.step()
        rows[name] = {"test_acc_new": M.accuracy(m, test_new, classes=new), "train_acc": M.accuracy(m, shots, classes=new),
                      "wall_s": time.perf_counter() - t0, "steps": s.lora_steps}  # fmt: skip
    return {"shots_per_class": s.lora_shots, "test_size": len(test_new), "rows": rows}


def _soup_ingredients(
    seed: int, s: Settings, pre: D.Subset, fine: D.Subset
) -> tuple[nn.Module, list[dict], list[dict]]:
    base = make_mlp(seed=seed)
    train(base, D.loader(pre, s.batch_size, seed=seed), s.pretrain_steps)
    grid = [(lr, wd) for lr in (0.01, 0.03, 0.1, 0.3) for wd in (0.0, 5e-3)]
    ings, hps = [], []
    for j in range(s.soup_k):
        lr, wd = grid[j % len(grid)]
        m = copy.deepcopy(base)
        train(m, D.loader(fine, s.batch_size, seed=seed * 100 + j), s.soup_finetune_steps, lr=lr, weight_decay=wd)
        ings.append({k: v.detach().clone() for k, v in m.named_parameters()})
        hps.append({"lr": lr, "weight_decay": wd, "data_seed": seed * 100 + j})
    return base, ings, hps


def run_soups(seed: int, s: Settings) -> dict:
    """Best single ingredient, uniform soup, MEHL-Soup, MEHL-Soup+ (test accuracy)."""
    train_set, test_set = D.train_test(seed)
    g = torch.Generator().manual_seed(seed + 5)
    perm = torch.randperm(len(train_set), generator=g)
    n_val = len(train_set) // 5
    val, rest = train_set.take(perm[:n_val]), train_set.take(perm[n_val:])
    half = len(rest) // 2
    base, ings, hps = _soup_ingredients(
        seed, s, rest.take(torch.arange(half)), rest.take(torch.arange(half, len(rest)))
    )
    rows = {}
    m = copy.deepcopy(base)
    val_accs, test_accs = [], []
    for sd in ings:
        m.load_state_dict(sd, strict=False)
        val_accs.append(M.accuracy(m, val))
        test_accs.append(M.accuracy(m, test_set))
    best = int(np.argmax(val_accs))
    rows["best single (val-chosen)"] = {"val_acc": val_accs[best], "test_acc": test_accs[best], "ingredient": best}
    rows["uniform soup"] = _soup_row(m, val, test_set, lambda mm: uniform_soup(mm, ings))
    for name, lw in (("MEHL-Soup", False), ("MEHL-Soup+", True)):
        holder: dict = {}

        def fn(mm: nn.Module, lw: bool = lw, holder: dict = holder) -> None:
            holder["res"] = mehl_soup(mm, ings, D.loader(val, 64, seed=seed), layerwise=lw, block_size=3,
                                      epochs=2, steps_per_block=10, lr=0.05, seed=seed)  # fmt: skip

        rows[name] = _soup_row(m, val, test_set, fn)
        info = holder["res"].info
        rows[name].update({"peak_held_MB": info["peak_held_bytes"] / 2**20, "all_loaded_MB": info["all_loaded_bytes"] / 2**20,
                           "coef_sum_per_layer": [round(sum(c[l] for c in holder["res"].coefficients), 6)
                                                  for l in range(info["layers"])][:1]})  # fmt: skip
    return {"K": len(ings), "ingredients": hps, "ingredient_test_acc": test_accs, "rows": rows}


def _soup_row(m: nn.Module, val: D.Subset, test: D.Subset, fn: Callable[[nn.Module], None]) -> dict:
    t0 = time.perf_counter()
    fn(m)
    return {"val_acc": M.accuracy(m, val), "test_acc": M.accuracy(m, test), "wall_s": time.perf_counter() - t0}


def _cl_rows(tasks: list[D.Task], s: Settings, seed: int, methods: dict[str, Callable]) -> dict:
    classes = [t.classes for t in tasks]
    out = {}
    for name, fn in methods.items():
        mat = [[0.0] * len(tasks) for _ in tasks]

        def cb(i: int, m: nn.Module, mat: list = mat) -> None:
            mat[i] = [M.accuracy(m, t.test) for t in tasks]

        lds = [D.loader(t.train, s.batch_size, seed=seed) for t in tasks]
        t0 = time.perf_counter()
        try:
            info = fn(lds, classes, cb)
        except FloatingPointError as e:  # a diverged run is a result: reported, not hidden
            nan = float("nan")
            out[name] = {"class_il": {"avg_acc": nan, "bwt": nan, "forgetting": nan}, "matrix": mat,
                         "wall_s": time.perf_counter() - t0, "error": str(e)}  # fmt: skip
            continue
        out[name] = {"class_il": M.cl_summary(mat), "matrix": mat, "wall_s": time.perf_counter() - t0, "info": info}
    return out


def _classp_sequence(model: nn.Module, lds: list, classes: list, cb: Callable, s: Settings, **kw: float) -> dict:
    for i, ld in enumerate(lds):
        opt = CLASSP([p for p in model.parameters() if p.requires_grad], **kw)
        train(model, ld, s.task_steps, loss_fn=masked_classification_loss(classes[i]), optimizer=opt, schedule=False)
        cb(i, model)
    moved = sum(int((st["acc"] > 0).sum()) for st in opt.state.values())
    return {"weights_with_updates_last_task": moved, "weights": sum(p.numel() for p in model.parameters())}


def run_continual(seed: int, s: Settings) -> dict:
    """Naive, EWC, CLASSP on the 5-task sequence from scratch (class-incremental accuracy)."""
    tasks = D.task_sequence(seed)

    def naive(lds: list, classes: list, cb: Callable) -> dict:
        naive_sequential(make_mlp(seed=seed), lds, steps_per_task=s.task_steps, task_classes=classes, after_task=cb)
        return {}

    def ewc_row(lds: list, classes: list, cb: Callable) -> dict:
        r = ewc(make_mlp(seed=seed), lds, steps_per_task=s.task_steps, lam=s.ewc_lam, task_classes=classes,
                fisher_samples=s.fisher_samples, after_task=cb)  # fmt: skip
        return r.info

    methods = {
        "naive": naive,
        f"EWC lam={s.ewc_lam:g}": ewc_row,
        "CLASSP (paper defaults)": lambda lds, cl, cb: _classp_sequence(make_mlp(seed=seed), lds, cl, cb, s),
        "CLASSP threshold=1e-6 (option)": lambda lds, cl, cb: _classp_sequence(make_mlp(seed=seed), lds, cl, cb, s,
                                                                               threshold=1e-6),
    }  # fmt: skip
    return {"tasks": [list(t.classes) for t in tasks], "rows": _cl_rows(tasks, s, seed, methods)}


def _mirrored(sub: D.Subset) -> D.Subset:
    return D.Subset(sub.x.reshape(-1, 8, 8).flip(2).reshape(-1, 64), sub.y, sub.ids)


def run_lora_continual(seed: int, s: Settings) -> dict:
    """From a backbone pretrained on mirrored digits: naive, P&M, sequential LoRA, P&M-LoRA."""
    tasks = D.task_sequence(seed)
    train_set, _ = D.train_test(seed)
    backbone = make_mlp(seed=seed)
    train(backbone, D.loader(_mirrored(train_set), s.batch_size, seed=seed), s.pretrain_steps)
    kw = {"steps_per_task": s.task_steps, "fisher_samples": s.fisher_samples, "seed": seed}

    def full(pnm: bool) -> Callable:
        def fn(lds: list, classes: list, cb: Callable) -> dict:
            m = copy.deepcopy(backbone)
            if pnm:
                return perturb_and_merge(m, lds, task_classes=classes, after_task=cb, **kw).info
            naive_sequential(m, lds, steps_per_task=s.task_steps, task_classes=classes, after_task=cb)
            return {}

        return fn

    def lora(perturb: bool, merge: str) -> Callable:
        def fn(lds: list, classes: list, cb: Callable) -> dict:
            m = _lora_model(backbone, 8, seed)
            # lr 0.01 (not the 0.05 of the full-model rows): LoRA at 0.05 diverged on seed 0.
            return pnm_lora(m, lds, task_classes=classes, after_task=cb, perturb=perturb, merge=merge, lr=s.lora_cl_lr,
                            **kw).info  # fmt: skip

        return fn

    methods = {"naive (full)": full(False), "P&M (full)": full(True), "LoRA (sequential, alpha=1)": lora(False, "sum"),
               "P&M-LoRA": lora(True, "fisher")}  # fmt: skip
    return {"tasks": [list(t.classes) for t in tasks], "rows": _cl_rows(tasks, s, seed, methods)}


def run_seeds_demo(*, seed: int = 0, quick: bool = False, threads: int = 1) -> dict:
    """All four scenarios for one seed; returns the JSON-ready result."""
    s = Settings.quick() if quick else Settings()
    old_threads = torch.get_num_threads()
    # Tiny matmuls: one thread is faster, and far faster on a shared machine (2 threads on 2
    # busy cores measured 50x slower per MLP backward). The numbers do not depend on it.
    torch.set_num_threads(threads)
    try:
        t0 = time.perf_counter()
        res = {"seed": seed, "quick": quick, "settings": asdict(s), "torch_threads": threads}
        for key, fn in (("lora_adaptation", run_lora_adaptation), ("soups", run_soups), ("continual", run_continual),
                        ("lora_continual", run_lora_continual)):  # fmt: skip
            t1 = time.perf_counter()
            res[key] = fn(seed, s)
            res[key]["scenario_wall_s"] = time.perf_counter() - t1
        res["wall_s"] = time.perf_counter() - t0
    finally:
        torch.set_num_threads(old_threads)
    return res


_MEMORY_CHILD = """
import json, os, resource, sys
import torch
from torch import nn
from fastclu.soup import mehl_soup
torch.set_num_threads(1)
mode, d, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
model = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 10))
g = torch.Generator().manual_seed(0)
batch = (torch.randn(64, d, generator=g), torch.randint(0, 10, (64,), generator=g))
model(batch[0]).sum().backward()
model.zero_grad(set_to_none=True)
base = rss()
ings = paths if mode == "stream" else [torch.load(p, weights_only=True) for p in paths]
res = mehl_soup(model, ings, [batch], block_size=3, epochs=1, steps_per_block=2)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"base": base, "peak": peak, "counted": res.info["peak_held_bytes"]}))
"""


def measure_soup_memory(k: int = 12, width: int = 1024) -> dict:
    """Peak RSS growth of MEHL-Soup over ``k`` ingredients of a ``64 x width x width x 10``-ish MLP.

    Two child processes run the same soup (block 3, one epoch): one streams the ingredients
    from ``torch.save`` files through ``torch.load(mmap=True)``, the other first loads all ``k``
    into memory. Each reports ``ru_maxrss`` (peak resident set) minus its RSS just before the
    soup (after imports and one forward/backward), in MB, and the bytes the soup counts itself.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        g = torch.Generator().manual_seed(0)
        paths = []
        for j in range(k):
            m = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10))
            with torch.no_grad():
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
            paths.append(str(Path(tmp) / f"ingredient{j}.pt"))
            torch.save({n: p.detach() for n, p in m.named_parameters()}, paths[-1])
        one = sum(p.numel() * 4 for p in m.parameters())
        out = {"K": k, "ingredient_MB": one / 2**20}
        for mode in ("stream", "all"):
            r = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, mode, str(width), *paths], capture_output=True,
                               text=True, timeout=300, check=True)  # fmt: skip
            v = json.loads(r.stdout.strip().splitlines()[-1])
            out[f"{mode}_peak_rss_growth_MB"] = (v["peak"] - v["base"]) / 2**20
            out[f"{mode}_counted_MB"] = v["counted"] / 2**20
    return out


def format_tables(res: dict) -> str:
    """The human-readable tables of :func:`run_seeds_demo`'s result."""
    la = res["lora_adaptation"]
    parts = [f"LoRA adaptation (seed {res['seed']}): pretrained on 0-4, adapted to 5-9 from {la['shots_per_class']} "
             "shots/class\n" + text_table(["method", "test acc 5-9", "train acc", "time s"],
                                      [[n, r["test_acc_new"], r["train_acc"], r["wall_s"]] for n, r in la["rows"].items()])]  # fmt: skip
    so = res["soups"]
    parts.append(f"Soups of K={so['K']} fine-tunes\n" + text_table(
        ["method", "val acc", "test acc", "held MB", "all-K MB"],
        [[n, r["val_acc"], r["test_acc"], r.get("peak_held_MB"), r.get("all_loaded_MB")] for n, r in so["rows"].items()]))  # fmt: skip
    for key, title in (("continual", "Continual learning from scratch"),
                       ("lora_continual", "Continual learning from a backbone pretrained on mirrored digits")):  # fmt: skip
        rows = [[n, r["class_il"]["avg_acc"], r["class_il"]["bwt"], r["class_il"]["forgetting"], r["wall_s"]]
                for n, r in res[key]["rows"].items()]  # fmt: skip
        errs = "".join(f"\n{n}: {r['error']}" for n, r in res[key]["rows"].items() if "error" in r)
        parts.append(f"{title}: 5 tasks (class-incremental)\n"
                     + text_table(["method", "avg acc", "BWT", "forgetting", "time s"], rows) + errs)  # fmt: skip
    parts.append(f"total {res['wall_s']:.1f} s")
    return "\n\n".join(parts)


def _no_nan(o: object) -> object:
    if isinstance(o, float) and not math.isfinite(o):
        return None
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_no_nan(v) for v in o]
    return o


def _parser(prog: str, default_out: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    p.add_argument("--seed", type=int, default=0, help="data split, initialisation and sampling seed")
    p.add_argument("--out", type=Path, default=default_out,
                   help="directory for seeds_seed{N}.json" + (f" (default ./{default_out})" if default_out else ""))  # fmt: skip
    p.add_argument("--quick", action="store_true", help="tiny step counts (seconds; for tests)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these tiny models run fastest on one)")  # fmt: skip
    p.add_argument("--backend", default=None, choices=["reference", "triton", "cuda"],
                   help="fastclu op backend for every op of the run (default: automatic)")  # fmt: skip
    p.add_argument("--soup-memory", type=int, default=0, metavar="K",
                   help="only measure MEHL-Soup's peak RSS with K ingredients, streamed vs all loaded")  # fmt: skip
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m fastclu.demo.seeds",
         default_out: str | None = None) -> int:  # fmt: skip
    """Entry point of the seeds rows (``fastclu demo --scenario seeds`` passes its ``prog`` and ``--out``)."""
    a = _parser(prog, default_out).parse_args(argv)
    why = check_seeds_args(a)  # every argument checked before any work (--out first)
    if why:
        print(f"{prog}: {why}", file=sys.stderr)
        return 2
    if a.soup_memory:
        print(json.dumps(measure_soup_memory(a.soup_memory), indent=1))
        return 0
    with use_backend(a.backend):
        res = run_seeds_demo(seed=a.seed, quick=a.quick, threads=a.threads)
    res["backend"] = a.backend or "automatic"
    print(format_tables(res))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        path = a.out / f"seeds_seed{a.seed}.json"
        path.write_text(json.dumps(_no_nan(res), indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
