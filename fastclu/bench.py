"""Microbenchmarks of the fastclu ops against every peer, with a copy roofline (``fastclu bench``).

Every op of :mod:`fastclu.ops` is timed per backend (reference, triton, cuda: whichever run
here), dtype and size, next to the same math written the ways a user would write it instead
(a Python loop over parameters, ``torch._foreach_*``, ``torch.compile`` of the loop,
``torch.optim`` with ``fused=True`` where the math coincides) and next to a device-to-device
copy of the same number of bytes: the bandwidth roofline measured in the same run.

Effective bandwidth is ``bytes / time`` where ``bytes`` is the op's floor traffic from DESIGN §3
(:data:`TRAFFIC`), the same for every implementation of a case, so GB/s ratios are speed-ups.

On a machine without a CUDA device only the reference backend and the peers run, on tiny
sizes, to check the harness; the results then say ``gpu_skipped: true`` and are no timing claim.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fastclu import ops
from fastclu._cli_checks import check_bench_args, exit_if_bad
from fastclu._registry import BACKENDS, backends
from fastclu.ops.bits import pack_bits

SCHEMA_VERSION = 1
GB = 1e9

# --------------------------------------------------------------------------------------------
# Byte budgets (DESIGN §3): passes over each tensor class, per element.
#   "p": tensors in the benchmarked dtype (params, grads, directions, scores) -> itemsize bytes
#   "s": fp32 optimizer state / accumulators                                    -> 4 bytes
#   "m": bit-packed masks                                                       -> 1/8 byte
# A read-modify-write counts 2 passes. These are floors: an implementation that reads a
# tensor twice still gets credited with one pass, so its GB/s is "effective", not raw.
# --------------------------------------------------------------------------------------------
TRAFFIC: dict[str, dict[str, int]] = {
    # fisher (s) read+write, grad (p) read
    "fisher_accumulate_": {"p": 1, "s": 2},
    # F_f, F_r read; mask written
    "ratio_mask": {"p": 2, "m": 1},
    # one histogram pass + the mask-writing pass over the scores (DESIGN: 8, +4 per extra select pass)
    "topk_mask": {"p": 2, "m": 1},
    # R = 2 role grads read once, mask read
    "gram": {"p": 2, "m": 1},
    # R = 1: grad read, param read+write, momentum read+write   (4R + 16)
    "combine_step_sgd": {"p": 3, "s": 2},
    # R = 2 (forget masked, remain unmasked): 2 grads, param rw, momentum rw, mask  (4R + 16)
    "combine_step_sgd_masked": {"p": 4, "s": 2, "m": 1},
    # R = 1: grad read, param rw, exp_avg rw, exp_avg_sq rw   (4R + 24)
    "combine_step_adamw": {"p": 3, "s": 4},
    # slow (fp32 master) rw, fast read + write
    "lerp_sync_": {"p": 2, "s": 2},
    # param rw, anchor read, backup write
    "perturb_anchor": {"p": 4},
    # row-norm pass over param, param rw, backup write (DESIGN: 12-16)
    "perturb_noise": {"p": 4},
    # backup read, param write
    "restore_": {"p": 2},
    # g+ read, g- read, out write
    "fd_hvp_": {"p": 3},
    # param, anchor read; fisher_sum, fisher_theta_sum (s) read
    "merge_stats": {"p": 2, "s": 2},
    # param rw, anchor read
    "merge_": {"p": 3},
}


def _traffic(case: str) -> dict[str, int]:
    if case not in TRAFFIC:
        raise ValueError(f"case must be one of {list(TRAFFIC)}, got {case!r}")
    return TRAFFIC[case]


def bytes_per_element(case: str, dtype: torch.dtype) -> float:
    """Floor traffic of ``case`` in bytes per parameter element (mask bits as 1/8 byte)."""
    t = _traffic(case)
    isz = torch.empty((), dtype=dtype).element_size()
    return t.get("p", 0) * isz + t.get("s", 0) * 4 + t.get("m", 0) / 8


def case_bytes(case: str, shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> int:
    """Exact floor traffic of one call of ``case`` on tensors of ``shapes`` (packed masks rounded up)."""
    t = _traffic(case)
    isz = torch.empty((), dtype=dtype).element_size()
    total = 0
    for s in shapes:
        n = math.prod(s)
        total += t.get("p", 0) * isz * n + t.get("s", 0) * 4 * n + t.get("m", 0) * ((n + 7) // 8)
    return total


# --------------------------------------------------------------------------------------------
# Recorded parameter shape lists, written out from the architectures (no torchvision).
# --------------------------------------------------------------------------------------------
def resnet18_shapes(num_classes: int = 1000, width: int = 64, stem: str = "imagenet") -> list[tuple[int, ...]]:
    """ResNet-18 trainable parameters in ``named_parameters`` order (BatchNorm weight and bias).

    ``stem="imagenet"``: 7x7 conv (torchvision's resnet18, 11,689,512 parameters at 1000 classes);
    ``stem="cifar"``: 3x3 conv (the CIFAR variant used by SFR-on).
    """
    out: list[tuple[int, ...]] = []
    k = 7 if stem == "imagenet" else 3
    out += [(width, 3, k, k), (width,), (width,)]
    cin = width
    for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
        for block in range(2):
            stride = 2 if (stage > 0 and block == 0) else 1
            out += [(cout, cin, 3, 3), (cout,), (cout,), (cout, cout, 3, 3), (cout,), (cout,)]
            if stride != 1 or cin != cout:
                out += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    out += [(num_classes, cin), (num_classes,)]
    return out


def vit_b16_shapes(
    num_classes: int = 1000, dim: int = 768, depth: int = 12, mlp: int = 3072, patch: int = 16, image: int = 224
) -> list[tuple[int, ...]]:
    """ViT-B/16 parameters as torchvision's ``vit_b_16`` holds them (86,567,656 at the defaults)."""
    tokens = (image // patch) ** 2 + 1
    out: list[tuple[int, ...]] = [(1, 1, dim), (dim, 3, patch, patch), (dim,), (1, tokens, dim)]
    for _ in range(depth):
        out += [(dim,), (dim,), (3 * dim, dim), (3 * dim,), (dim, dim), (dim,), (dim,), (dim,)]
        out += [(mlp, dim), (mlp,), (dim, mlp), (dim,)]
    out += [(dim,), (dim,), (num_classes, dim), (num_classes,)]
    return out


def gpt2_shapes(vocab: int = 50257, ctx: int = 1024, dim: int = 768, depth: int = 12) -> list[tuple[int, ...]]:
    """GPT-2 parameters (Conv1D layout, LM head tied to ``wte``): 124,439,808 at the defaults."""
    out: list[tuple[int, ...]] = [(vocab, dim), (ctx, dim)]
    for _ in range(depth):
        out += [(dim,), (dim,), (dim, 3 * dim), (3 * dim,), (dim, dim), (dim,)]
        out += [(dim,), (dim,), (dim, 4 * dim), (4 * dim,), (4 * dim, dim), (dim,)]
    out += [(dim,), (dim,)]
    return out


MODEL_SHAPES: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "resnet18": resnet18_shapes,
    "vit_b16": vit_b16_shapes,
    "gpt2_124m": gpt2_shapes,
}

DEFAULT_LOG2_SIZES = (16, 18, 20, 22, 24, 26, 28)
QUICK_GPU_LOG2_SIZES = (16, 20, 24)
CPU_LOG2_SIZES = (10, 14)  # harness check only


def split_shapes(numel: int, parts: int = 4) -> list[tuple[int, ...]]:
    """``numel`` elements split into ``parts`` 2-d tensors of halving sizes (1/2, 1/4, ..., rest).

    Unequal sizes so multi-tensor tables are exercised; 2-d so per-row ops see rows.
    """
    sizes, left = [], numel
    for _i in range(parts - 1):
        s = max(left // 2, 1) if left > 1 else 0
        if s == 0:
            break
        sizes.append(s)
        left -= s
    if left:
        sizes.append(left)
    out = []
    for s in sizes:
        cols = math.gcd(s, 1024)
        out.append((s // cols, cols))
    return out


# --------------------------------------------------------------------------------------------
# Cases: data builders, the fastclu call, the peers.
# --------------------------------------------------------------------------------------------
Data = dict[str, Any]
Step = Callable[[], object]


def _randn(
    shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device, scale: float = 1.0
) -> list[Tensor]:
    return [torch.randn(tuple(s), dtype=torch.float32, device=device).mul_(scale).to(dtype) for s in shapes]


def _rand_pos(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    # Strictly positive, like Fishers / second moments.
    return [torch.rand(tuple(s), dtype=torch.float32, device=device).add_(1e-3).to(dtype) for s in shapes]


def _masks(shapes: Sequence[Sequence[int]], device: torch.device) -> tuple[list[Tensor], list[Tensor]]:
    """(bit-packed masks, the same masks as bool tensors shaped like the params)."""
    bools = [torch.rand(tuple(s), device=device) < 0.5 for s in shapes]
    return [pack_bits(b) for b in bools], bools


def _leaf_params(shapes: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device) -> list[Tensor]:
    ps = _randn(shapes, dtype, device)
    gs = _randn(shapes, dtype, device, 1e-2)
    for p, g in zip(ps, gs):
        p.requires_grad_(True)
        p.grad = g
    return ps


LR, MOMENTUM, WD = 1e-2, 0.9, 5e-4
ADAM_LR, ADAM_WD, BETAS, ADAM_EPS = 1e-3, 1e-2, (0.9, 0.999), 1e-8


@dataclass
class Case:
    """One benchmarked computation: how to build its data, call fastclu, and call each peer."""

    name: str
    op: str
    make: Callable[[list[tuple[int, ...]], torch.dtype, torch.device], Data]
    fastclu: Callable[[Data, str], Step]
    peers: dict[str, Callable[[Data], Step]] = field(default_factory=dict)
    doc: str = ""


def _sgd_peer(kind: str) -> Callable[[Data], Step]:
    def build(d: Data) -> Step:
        params = _leaf_params(d["shapes"], d["dtype"], d["device"])
        extra = {"foreach": False} if kind == "loop" else {"foreach": True} if kind == "foreach" else {"fused": True}
        opt = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, weight_decay=WD, **extra)
        return opt.step

    return build


def _adamw_peer(kind: str) -> Callable[[Data], Step]:
    def build(d: Data) -> Step:
        params = _leaf_params(d["shapes"], d["dtype"], d["device"])
        extra = {"foreach": False} if kind == "loop" else {"foreach": True} if kind == "foreach" else {"fused": True}
        opt = torch.optim.AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, **extra)
        return opt.step

    return build


def _compiled(step_builder: Callable[[Data], Step]) -> Callable[[Data], Step]:
    """``torch.compile`` of a peer's step (compilation happens during the warm-up, not timed)."""

    def build(d: Data) -> Step:
        torch._dynamo.reset()  # a fresh cache per case: shapes differ, and the cache limit is small
        return torch.compile(step_builder(d))

    return build


# ---- fisher_accumulate_ ----
def _make_fisher(shapes, dtype, device) -> Data:
    return {"fisher": _rand_pos(shapes, torch.float32, device), "grads": _randn(shapes, dtype, device)}


def _fisher_loop(d: Data) -> Step:
    def step() -> None:
        for f, g in zip(d["fisher"], d["grads"]):
            f.add_(g.float() ** 2)

    return step


def _fisher_foreach(d: Data) -> Step:
    def step() -> None:
        g = d["grads"] if d["grads"][0].dtype == torch.float32 else [x.float() for x in d["grads"]]
        torch._foreach_addcmul_(d["fisher"], g, g)

    return step


# ---- ratio_mask ----
def _make_ratio(shapes, dtype, device) -> Data:
    return {"ff": _rand_pos(shapes, dtype, device), "fr": _rand_pos(shapes, dtype, device)}


def _ratio_loop(d: Data) -> Step:
    # The papers keep a boolean (often float) mask per parameter; packing is fastclu's layout.
    def step() -> list[Tensor]:
        return [(f.float() + 1e-12) >= 1.0 * (r.float() + 1e-12) for f, r in zip(d["ff"], d["fr"])]

    return step


# ---- topk_mask ----
def _make_topk(shapes, dtype, device) -> Data:
    scores = _randn(shapes, dtype, device)
    total = sum(math.prod(s) for s in shapes)
    return {"scores": scores, "k": max(1, total // 10)}


def _topk_cat(d: Data) -> Step:
    # What SalUn's code does: concatenate every score, torch.topk, scatter back to masks.
    def step() -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in d["scores"]])
        idx = torch.topk(flat, d["k"], sorted=False).indices
        mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        mask[idx] = True
        return list(torch.split(mask, [s.numel() for s in d["scores"]]))

    return step


def _topk_kthvalue(d: Data) -> Step:
    def step() -> list[Tensor]:
        flat = torch.cat([s.reshape(-1) for s in d["scores"]])
        thr = torch.kthvalue(flat.float(), flat.numel() - d["k"] + 1).values
        return [s >= thr for s in d["scores"]]

    return step


# ---- gram ----
def _make_gram(shapes, dtype, device) -> Data:
    packed, bools = _masks(shapes, device)
    return {"g0": _randn(shapes, dtype, device), "g1": _randn(shapes, dtype, device), "mask": packed, "bool": bools}


def _gram_loop(d: Data) -> Step:
    def step() -> Tensor:
        roles = [d["g0"], d["g1"]]
        out = torch.zeros(2, 2, device=d["g0"][0].device)
        for r in range(2):
            for s in range(r, 2):
                acc = torch.zeros((), device=out.device)
                for gr, gs, m in zip(roles[r], roles[s], d["bool"]):
                    acc = acc + ((gr.float() * m) * (gs.float() * m)).sum()
                out[r, s] = acc
                out[s, r] = acc
        return out

    return step


# ---- combine_step_ ----
def _make_sgd(shapes, dtype, device) -> Data:
    return {
        "params": _randn(shapes, dtype, device),
        "grads": _randn(shapes, dtype, device, 1e-2),
        "buf": _randn(shapes, torch.float32, device, 1e-2),
    }


def _make_sgd_masked(shapes, dtype, device) -> Data:
    d = _make_sgd(shapes, dtype, device)
    d["grads_remain"] = _randn(shapes, dtype, device, 1e-2)
    d["mask"], d["bool"] = _masks(shapes, device)
    return d


def _sgd_masked_loop(d: Data) -> Step:
    # SFR-on's forget step as its code writes it: mask the forget grad, combine, SGD per tensor.
    def step() -> None:
        for p, gf, gr, buf, m in zip(d["params"], d["grads"], d["grads_remain"], d["buf"], d["bool"]):
            g = -25.0 * (gf.float() * m) + gr.float()
            g = g.add(p.float(), alpha=WD)
            buf.mul_(MOMENTUM).add_(g)
            p.add_(buf.to(p.dtype), alpha=-LR)

    return step


def _sgd_masked_foreach(d: Data) -> Step:
    fmasks = [m.float() for m in d["bool"]]  # float masks kept across steps, as the papers' code does

    def step() -> None:
        gf = torch._foreach_mul([g.float() for g in d["grads"]], fmasks)
        torch._foreach_mul_(gf, -25.0)
        torch._foreach_add_(gf, [g.float() for g in d["grads_remain"]])
        torch._foreach_add_(gf, [p.float() for p in d["params"]], alpha=WD)
        torch._foreach_mul_(d["buf"], MOMENTUM)
        torch._foreach_add_(d["buf"], gf)
        torch._foreach_add_(d["params"], [b.to(p.dtype) for b, p in zip(d["buf"], d["params"])], alpha=-LR)

    return step


def _make_adamw(shapes, dtype, device) -> Data:
    return {
        "params": _randn(shapes, dtype, device),
        "grads": _randn(shapes, dtype, device, 1e-2),
        "exp_avg": _randn(shapes, torch.float32, device, 1e-3),
        "exp_avg_sq": _rand_pos(shapes, torch.float32, device),
        "step": [torch.ones((), dtype=torch.float32, device=device) for _ in shapes],
    }


# ---- lerp_sync_ ----
def _make_lerp(shapes, dtype, device) -> Data:
    return {"slow": _randn(shapes, torch.float32, device), "fast": _randn(shapes, dtype, device)}


def _lerp_loop(d: Data) -> Step:
    def step() -> None:
        for s, f in zip(d["slow"], d["fast"]):
            s.add_(f.float() - s, alpha=0.5)
            f.copy_(s)

    return step


def _lerp_foreach(d: Data) -> Step:
    def step() -> None:
        fast = d["fast"] if d["fast"][0].dtype == torch.float32 else [f.float() for f in d["fast"]]
        torch._foreach_lerp_(d["slow"], fast, 0.5)
        torch._foreach_copy_(d["fast"], d["slow"])

    return step


# ---- perturb_ ----
def _make_perturb(shapes, dtype, device) -> Data:
    params = _randn(shapes, dtype, device)
    return {
        "params": params,
        "anchor": [(p.float() + 0.1 * torch.randn_like(p, dtype=torch.float32)).to(dtype) for p in params],
        # Poisoned, not empty_like: a backup the step failed to write shows up as NaN.
        "backup": [torch.full_like(p, float("nan")) for p in params],
    }


def _perturb_anchor_loop(d: Data) -> Step:
    def step() -> None:
        for p, a, b in zip(d["params"], d["anchor"], d["backup"]):
            b.copy_(p)
            p.add_(p - a, alpha=0.5)

    return step


def _perturb_anchor_foreach(d: Data) -> Step:
    def step() -> None:
        torch._foreach_copy_(d["backup"], d["params"])
        delta = torch._foreach_sub(d["params"], d["anchor"])
        torch._foreach_add_(d["params"], delta, alpha=0.5)

    return step


def _perturb_noise_loop(d: Data) -> Step:
    # Flat-LoRA-style noise as written with torch's RNG: same math, different generator.
    def step() -> None:
        for p, b in zip(d["params"], d["backup"]):
            b.copy_(p)
            rows = p.reshape(p.shape[0], -1) if p.dim() >= 2 else p.reshape(1, -1)
            norms = rows.float().norm(dim=1, keepdim=True) / math.sqrt(rows.shape[1])
            noise = torch.randn(rows.shape, device=p.device) * norms
            rows.add_((0.05 * noise).to(p.dtype))

    return step


# ---- restore_ ----
def _make_restore(shapes, dtype, device) -> Data:
    return {"params": _randn(shapes, dtype, device), "backup": _randn(shapes, dtype, device)}


def _restore_loop(d: Data) -> Step:
    def step() -> None:
        for p, b in zip(d["params"], d["backup"]):
            p.copy_(b)

    return step


def _restore_foreach(d: Data) -> Step:
    return lambda: torch._foreach_copy_(d["params"], d["backup"])


# ---- fd_hvp_ ----
def _make_hvp(shapes, dtype, device) -> Data:
    return {
        "out": _randn(shapes, dtype, device),
        "gp": _randn(shapes, dtype, device),
        "gm": _randn(shapes, dtype, device),
    }


def _hvp_loop(d: Data) -> Step:
    def step() -> None:
        for o, gp, gm in zip(d["out"], d["gp"], d["gm"]):
            o.copy_((gp.float() - gm.float()) / (2 * 1e-3))

    return step


def _hvp_foreach(d: Data) -> Step:
    def step() -> None:
        diff = torch._foreach_sub(d["gp"], d["gm"])
        torch._foreach_mul_(diff, 1.0 / (2 * 1e-3))
        torch._foreach_copy_(d["out"], diff)

    return step


# ---- merge_stats / merge_ ----
def _make_merge(shapes, dtype, device) -> Data:
    d = _make_perturb(shapes, dtype, device)
    d["fs"] = _rand_pos(shapes, torch.float32, device)
    d["fts"] = _randn(shapes, torch.float32, device)
    return d


def _merge_stats_loop(d: Data) -> Step:
    def step() -> tuple[Tensor, Tensor]:
        num = torch.zeros((), device=d["fs"][0].device)
        den = torch.zeros((), device=d["fs"][0].device)
        for p, a, fs, fts in zip(d["params"], d["anchor"], d["fs"], d["fts"]):
            delta = p.float() - a.float()
            num = num + (delta * (fts - a.float() * fs)).sum()
            den = den + (delta * delta * fs).sum()
        return num, den

    return step


def _merge_loop(d: Data) -> Step:
    def step() -> None:
        for p, a in zip(d["params"], d["anchor"]):
            p.copy_(a.float() + 0.5 * (p.float() - a.float()))

    return step


def _merge_foreach(d: Data) -> Step:
    # theta = anchor + alpha (theta - anchor) = lerp(theta, anchor, 1 - alpha)
    return lambda: torch._foreach_lerp_(d["params"], d["anchor"], 0.5)


def _with_shapes(make: Callable[..., Data]) -> Callable[..., Data]:
    def wrapped(shapes, dtype, device) -> Data:
        d = make(shapes, dtype, device)
        d.update(shapes=shapes, dtype=dtype, device=device)
        return d

    return wrapped


def _loop_and_compile(loop: Callable[[Data], Step], foreach: Callable[[Data], Step] | None = None):
    peers = {"loop": loop}
    if foreach is not None:
        peers["foreach"] = foreach
    peers["compile"] = _compiled(loop)
    return peers


CASES: dict[str, Case] = {
    c.name: c
    for c in [
        Case(
            "fisher_accumulate_", "fisher_accumulate_", _with_shapes(_make_fisher),
            lambda d, b: lambda: ops.fisher_accumulate_(d["fisher"], d["grads"], backend=b),
            _loop_and_compile(_fisher_loop, _fisher_foreach), "F += g^2",
        ),
        Case(
            "ratio_mask", "ratio_mask", _with_shapes(_make_ratio),
            lambda d, b: lambda: ops.ratio_mask(d["ff"], d["fr"], 1.0, backend=b),
            _loop_and_compile(_ratio_loop), "m = F_f + eps >= gamma (F_r + eps), packed",
        ),
        Case(
            "topk_mask", "topk_mask", _with_shapes(_make_topk),
            lambda d, b: lambda: ops.topk_mask(d["scores"], d["k"], backend=b),
            {"cat_topk": _topk_cat, "cat_kthvalue": _topk_kthvalue}, "exact global top-10%",
        ),
        Case(
            "gram", "gram", _with_shapes(_make_gram),
            lambda d, b: lambda: ops.gram([d["g0"], d["g1"]], mask=d["mask"], backend=b),
            _loop_and_compile(_gram_loop), "2x2 Gram of masked role grads",
        ),
        Case(
            "combine_step_sgd", "combine_step_", _with_shapes(_make_sgd),
            lambda d, b: lambda: ops.combine_step_(
                d["params"], [d["grads"]], {"momentum_buffer": d["buf"]}, rule="sgd", lr=LR,
                momentum=MOMENTUM, weight_decay=WD, backend=b,
            ),
            {"loop": _sgd_peer("loop"), "foreach": _sgd_peer("foreach"), "compile": _compiled(_sgd_peer("foreach")),
             "torch_fused": _sgd_peer("fused")},
            "plain SGD (momentum, wd): the math of torch.optim.SGD",
        ),
        Case(
            "combine_step_sgd_masked", "combine_step_", _with_shapes(_make_sgd_masked),
            lambda d, b: lambda: ops.combine_step_(
                d["params"], [d["grads"], d["grads_remain"]], {"momentum_buffer": d["buf"]}, rule="sgd", lr=LR,
                coeffs=[-25.0, 1.0], mask=d["mask"], masked=[True, False], momentum=MOMENTUM, weight_decay=WD,
                backend=b,
            ),
            _loop_and_compile(_sgd_masked_loop, _sgd_masked_foreach),
            "SFR-on/UG-CLU: masked forget + remain grads, SGD",
        ),
        Case(
            "combine_step_adamw", "combine_step_", _with_shapes(_make_adamw),
            lambda d, b: lambda: ops.combine_step_(
                d["params"], [d["grads"]],
                {"exp_avg": d["exp_avg"], "exp_avg_sq": d["exp_avg_sq"], "step": d["step"]},
                rule="adamw", lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, backend=b,
            ),
            {"loop": _adamw_peer("loop"), "foreach": _adamw_peer("foreach"),
             "compile": _compiled(_adamw_peer("foreach")), "torch_fused": _adamw_peer("fused")},
            "plain AdamW: the math of torch.optim.AdamW",
        ),
        Case(
            "lerp_sync_", "lerp_sync_", _with_shapes(_make_lerp),
            lambda d, b: lambda: ops.lerp_sync_(d["slow"], d["fast"], 0.5, backend=b),
            _loop_and_compile(_lerp_loop, _lerp_foreach), "Lookahead sync",
        ),
        Case(
            "perturb_anchor", "perturb_", _with_shapes(_make_perturb),
            lambda d, b: lambda: ops.perturb_(d["params"], 0.5, backup=d["backup"], anchor=d["anchor"], backend=b),
            _loop_and_compile(_perturb_anchor_loop, _perturb_anchor_foreach), "P&M: theta += k eps (theta - anchor)",
        ),
        Case(
            "perturb_noise", "perturb_", _with_shapes(_make_perturb),
            lambda d, b: lambda: ops.perturb_(d["params"], 0.05, backup=d["backup"], seed=1234, backend=b),
            {"loop": _perturb_noise_loop, "compile": _compiled(_perturb_noise_loop)},
            "Flat-LoRA: row-scaled Gaussian noise",
        ),
        Case(
            "restore_", "restore_", _with_shapes(_make_restore),
            lambda d, b: lambda: ops.restore_(d["params"], d["backup"], backend=b),
            {"loop": _restore_loop, "foreach": _restore_foreach}, "theta <- backup",
        ),
        Case(
            "fd_hvp_", "fd_hvp_", _with_shapes(_make_hvp),
            lambda d, b: lambda: ops.fd_hvp_(d["out"], d["gp"], d["gm"], 1e-3, backend=b),
            _loop_and_compile(_hvp_loop, _hvp_foreach), "(g+ - g-) / 2 eps",
        ),
        Case(
            "merge_stats", "merge_stats", _with_shapes(_make_merge),
            lambda d, b: lambda: ops.merge_stats(d["params"], d["anchor"], d["fs"], d["fts"], backend=b),
            _loop_and_compile(_merge_stats_loop), "P&M sums",
        ),
        Case(
            "merge_", "merge_", _with_shapes(_make_merge),
            lambda d, b: lambda: ops.merge_(d["params"], d["anchor"], 0.5, backend=b),
            _loop_and_compile(_merge_loop, _merge_foreach), "theta = anchor + alpha delta",
        ),
    ]
}  # fmt: skip

ALL_PEERS = ("loop", "foreach", "compile", "torch_fused", "cat_topk", "cat_kthvalue")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Step, device: torch.device, *, warmup: int, repeats: int) -> list[float]:
    """Seconds per call, ``repeats`` samples after ``warmup`` untimed calls.

    CUDA: each call bracketed by CUDA events on the current stream (launch overhead included,
    as a training step would pay it). CPU: ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(device)
        out = [s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return out


def _peak_extra(fn: Step, device: torch.device) -> int | None:
    """Bytes allocated by one call above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del result
    return int(peak)


def copy_step(nbytes: int, device: torch.device) -> Step:
    """A device-to-device copy moving ``nbytes`` in total (``nbytes / 2`` read + written)."""
    n = max(nbytes // 2 // 4, 1)
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


# --------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------
@dataclass
class Config:
    cases: list[str]
    sizes: list[str]  # "2^k" or a model name from MODEL_SHAPES
    dtypes: list[str]
    backends: list[str]
    peers: list[str]
    device: torch.device
    warmup: int
    repeats: int
    e2e: bool
    quick: bool
    tiny: bool = False  # e2e models scaled down (no GPU: harness check only)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def size_shapes(size: str) -> list[tuple[int, ...]]:
    """Shape list for a size label: ``"2^k"`` (split in a few tensors) or a model name."""
    if size in MODEL_SHAPES:
        return MODEL_SHAPES[size]()
    m = re.fullmatch(r"2\^(\d+)", size)
    if not m:
        raise ValueError(f"size must be '2^k' or one of {sorted(MODEL_SHAPES)}, got {size!r}")
    return split_shapes(2 ** int(m.group(1)))


def _usable_backends(requested: Sequence[str], device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends that can be timed here, and a reason for each one skipped."""
    status = backends()
    use, skipped = [], {}
    for b in requested:
        if b != "reference" and device.type != "cuda":
            skipped[b] = "no CUDA device: GPU backend skipped (interpreter timings would be meaningless)"
        elif status.get(b) is not None:
            skipped[b] = str(status[b])
        else:
            use.append(b)
    return use, skipped


def _measure(impl: str, kind: str, build: Callable[[], Step], cfg: Config, row: dict[str, Any]) -> dict[str, Any]:
    r = dict(row, impl=impl, kind=kind, time_s=None, time_min_s=None, gbps=None, peak_extra_bytes=None, error=None)
    try:
        fn = build()
        samples = time_fn(fn, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats)
        r["peak_extra_bytes"] = _peak_extra(fn, cfg.device)
        r["time_s"] = statistics.median(samples)
        r["time_min_s"] = min(samples)
        r["gbps"] = row["bytes"] / r["time_s"] / GB if r["time_s"] > 0 else None
    except Exception as e:  # noqa: BLE001 -- one broken implementation must not hide the others' numbers
        r["error"] = f"{type(e).__name__}: {e}"[:500]
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()  # after an out-of-memory, give the next implementation a clean pool
    return r


def run_ops(cfg: Config, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Time every case x dtype x size x (backends, peers, copy); derived columns filled in."""
    use_backends, _ = _usable_backends(cfg.backends, cfg.device)
    results: list[dict[str, Any]] = []
    copy_cache: dict[int, dict[str, Any]] = {}
    for case_name in cfg.cases:
        for dname in cfg.dtypes:
            for size in cfg.sizes:
                rows = _run_point(CASES[case_name], DTYPES[dname], dname, size, cfg, use_backends, copy_cache)
                for r in rows:
                    t = "error: " + r["error"] if r["error"] else f"{r['time_s'] * 1e3:9.3f} ms {r['gbps']:8.2f} GB/s"
                    log(f"{case_name:24s} {dname:5s} {size:10s} {r['impl']:13s} {t}")
                results += rows
    return results


def _run_point(
    case: Case,
    dtype: torch.dtype,
    dname: str,
    size: str,
    cfg: Config,
    use_backends: list[str],
    copy_cache: dict[int, dict[str, Any]],
) -> list[dict[str, Any]]:
    shapes = size_shapes(size)
    numel = sum(math.prod(s) for s in shapes)
    nbytes = case_bytes(case.name, shapes, dtype)
    base = {
        "case": case.name, "op": case.op, "dtype": dname, "size": size, "numel": numel,
        "n_tensors": len(shapes), "bytes": nbytes, "bytes_per_element": bytes_per_element(case.name, dtype),
    }  # fmt: skip
    # The roofline is measured once per byte count and shared by every case moving that many bytes.
    if nbytes not in copy_cache:
        copy_cache[nbytes] = _measure("copy", "roofline", lambda: copy_step(nbytes, cfg.device), cfg, base)
    rows = [dict(copy_cache[nbytes], **base)]
    for b in use_backends:
        rows.append(
            _measure(b, "fastclu", lambda b=b: case.fastclu(case.make(shapes, dtype, cfg.device), b), cfg, base)
        )
    for peer, make_peer in case.peers.items():
        if peer in cfg.peers:
            rows.append(_measure(peer, "peer", lambda m=make_peer: m(case.make(shapes, dtype, cfg.device)), cfg, base))
    _derive(rows)
    return rows


def _derive(rows: list[dict[str, Any]]) -> None:
    """% of copy bandwidth, and each fastclu row's speed-up over every peer (peer time / own time)."""
    copy = next((r for r in rows if r["kind"] == "roofline"), None)
    copy_bw = copy["gbps"] if copy and copy["gbps"] else None
    peers = {r["impl"]: r["time_s"] for r in rows if r["kind"] == "peer" and r["time_s"]}
    for r in rows:
        r["pct_copy"] = 100.0 * r["gbps"] / copy_bw if (copy_bw and r["gbps"]) else None
        if r["kind"] == "fastclu":
            r["speedup"] = {p: t / r["time_s"] for p, t in peers.items()} if r["time_s"] else {}


# --------------------------------------------------------------------------------------------
# DESIGN §5 targets
# --------------------------------------------------------------------------------------------
def check_targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each fused (non-reference) result against DESIGN §5's fraction of copy bandwidth.

    >= 90% at 2^26 elements and above, >= 75% on real models' parameter lists. The reference
    backend is the specification, not a fused kernel, so it carries no target.
    """
    out = []
    for r in results:
        if r["kind"] != "fastclu" or r["impl"] == "reference":
            continue
        if r["size"] in MODEL_SHAPES:
            need = 75.0
        elif r["numel"] >= 2**26:
            need = 90.0
        else:
            continue
        pct = r.get("pct_copy")
        out.append(
            {
                "case": r["case"], "impl": r["impl"], "dtype": r["dtype"], "size": r["size"],
                "pct_copy": pct, "target_pct": need, "met": bool(pct is not None and pct >= need),
            }
        )  # fmt: skip
    return out


# --------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------
class _Block(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNet18(torch.nn.Module):
    """ResNet-18, CIFAR stem (3x3 conv, no max-pool), as SFR-on trains it; parameter shapes are
    :func:`resnet18_shapes` with ``stem="cifar"``."""

    def __init__(self, num_classes: int = 10, width: int = 64) -> None:
        super().__init__()
        nn = torch.nn
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        blocks, cin = [], width
        for stage, cout in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                blocks.append(_Block(cin, cout, 2 if (stage > 0 and i == 0) else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        y = self.blocks(torch.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _adaptive_forget_loss(logits: Tensor, y: Tensor, lam: float = 0.5) -> Tensor:
    """SFR-on's adaptively weighted forget loss: w_i proportional to 1 / (stopgrad(l_i)^lam + 1e-15)."""
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    c = 1.0 / (per.detach().clamp_min(0) ** lam + 1e-15)
    return (c / c.sum() * per).sum()


SFR_LR, SFR_ALPHA, SFR_CLIP = 0.01, 25.0, 7.0
PM_EPS = 0.5


def sfr_on_fastclu_step(params: list[Tensor], masks: list[Tensor], backend: str) -> Step:
    """SFR-on's forget update with fastclu: ``fastclu.optim.SGD`` + ``set_mask`` (mode ``grad``) +
    ``step(combine={"grad": -alpha_f}, clip=7)``. ``masks``: bool, shaped like ``params``."""
    from fastclu.optim import SGD

    opt = SGD(params, lr=SFR_LR, momentum=MOMENTUM, weight_decay=WD, backend=backend)
    opt.set_mask([pack_bits(m) for m in masks], mode="grad")
    return lambda: opt.step(combine={"grad": -SFR_ALPHA}, clip=SFR_CLIP)


def sfr_on_torch_step(params: list[Tensor], masks: list[Tensor]) -> Step:
    """The same update as SFR-on's code writes it: float masks multiplied into each ``.grad``, the
    coefficient, ``clip_grad_norm_``, ``torch.optim.SGD(foreach=False).step()``."""
    fmasks = [m.to(p.dtype) for m, p in zip(masks, params)]
    opt = torch.optim.SGD(params, lr=SFR_LR, momentum=MOMENTUM, weight_decay=WD, foreach=False)

    def step() -> None:
        with torch.no_grad():
            for p, m in zip(params, fmasks):
                p.grad.mul_(m).mul_(-SFR_ALPHA)
        torch.nn.utils.clip_grad_norm_(params, SFR_CLIP, foreach=False)
        opt.step()

    return step


def _adamw_folds() -> bool:
    """Whether fastclu.optim.AdamW.step takes ``restore_from`` (the folded restore saves a pass)."""
    try:
        from fastclu.optim import AdamW
    except ImportError:
        return False
    return "restore_from" in inspect.signature(AdamW.step).parameters


def pm_fastclu_step(params: list[Tensor], backend: str) -> Step:
    """A P&M step with ``PerturbMerge(fastclu.optim.AdamW)`` (k = +1 always), after a first task
    (theta_prev = the current weights) and one step, so the task vector is nonzero. The model's
    forward/backward is not run: ``.grad`` stays as given."""
    from fastclu.optim import AdamW
    from fastclu.optim.perturb_merge import PerturbMerge

    opt = PerturbMerge(AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, backend=backend),
                       eps=PM_EPS, probs=(0.0, 1.0, 0.0), fold_restore=_adamw_folds(), backend=backend)  # fmt: skip
    opt.accumulate_fisher()
    opt.end_task()
    opt.step()

    def step() -> None:
        with opt.perturbed():
            pass  # forward/backward at the perturbed weights would run here
        opt.accumulate_fisher()
        opt.step()

    return step


def pm_torch_step(params: list[Tensor]) -> Step:
    """The same P&M step written as Python loops around ``torch.optim.AdamW(foreach=False)``, after
    the same setup (theta_prev = the current weights, one step)."""
    anchor = [p.detach().clone() for p in params]
    backup = [torch.empty_like(p) for p in params]
    fisher = [torch.zeros_like(p) for p in params]
    opt = torch.optim.AdamW(params, lr=ADAM_LR, betas=BETAS, eps=ADAM_EPS, weight_decay=ADAM_WD, foreach=False)
    opt.step()

    def step() -> None:
        with torch.no_grad():
            for p, a, b in zip(params, anchor, backup):
                b.copy_(p)
                p.add_(p - a, alpha=PM_EPS)
            # forward/backward at the perturbed weights would run here
            for p, b in zip(params, backup):
                p.copy_(b)
            for f, p in zip(fisher, params):
                f.addcmul_(p.grad, p.grad)
        opt.step()

    return step


def e2e_sfr_on(cfg: Config, backends: Sequence[str]) -> list[dict[str, Any]]:
    """One SFR-on forget iteration on a ResNet-18: adaptive forget loss forward/backward, then the
    masked (mode ``grad``) ascent step with alpha_f = 25, global-norm clip 7 of the masked, weighted
    gradient, SGD lr 0.01, momentum 0.9, wd 5e-4 (:func:`sfr_on_fastclu_step` vs
    :func:`sfr_on_torch_step`)."""
    dev = cfg.device
    width, batch, res = (4, 2, 8) if cfg.tiny else (64, 128, 32)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, res, res, generator=g).to(dev)
    y = torch.randint(0, 10, (batch,), generator=g).to(dev)
    label = f"ResNet-18 CIFAR (width {width}, batch {batch}x3x{res}x{res})"

    def fwd_bwd(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=False)
        _adaptive_forget_loss(model(x), y).backward()

    def side(backend: str | None) -> Callable[[], tuple[torch.nn.Module, Step, list[Tensor]]]:
        def build() -> tuple[torch.nn.Module, Step, list[Tensor]]:
            model = ResNet18(10, width).to(dev)
            params = list(model.parameters())
            masks = [torch.rand(p.shape, device=dev) < 0.5 for p in params]
            fwd_bwd(model)  # .grad exists before the optimizer is built, as after a first backward
            step = sfr_on_torch_step(params, masks) if backend is None else sfr_on_fastclu_step(params, masks, backend)
            return model, step, params

        return build

    rows = [_e2e_row("sfr_on_forget_iter", f"fastclu.optim.SGD[{b}]", side(b), fwd_bwd, cfg, label) for b in backends]
    rows.append(_e2e_row("sfr_on_forget_iter", "torch.optim.SGD(loop)", side(None), fwd_bwd, cfg, label))
    return rows


def e2e_pm(cfg: Config, backends: Sequence[str]) -> list[dict[str, Any]]:
    """One P&M training step on a GPT-2-124M parameter list, optimizer side only (the model's
    forward/backward is not run: the gradients are fixed random tensors): backup, perturb
    theta += eps (theta - theta_prev), restore, F += g^2, AdamW (:func:`pm_fastclu_step` vs
    :func:`pm_torch_step`)."""
    dev = cfg.device
    shapes = gpt2_shapes(vocab=1000, ctx=64, dim=64, depth=2) if cfg.tiny else gpt2_shapes()
    numel = sum(math.prod(s) for s in shapes)
    label = f"GPT-2 parameter list ({numel:,} fp32 params, {len(shapes)} tensors), no forward/backward"

    def side(backend: str | None) -> Callable[[], tuple[None, Step, list[Tensor]]]:
        def build() -> tuple[None, Step, list[Tensor]]:
            params = _leaf_params(shapes, torch.float32, dev)
            return None, (pm_torch_step(params) if backend is None else pm_fastclu_step(params, backend)), params

        return build

    fold = ", fold" if _adamw_folds() else ""
    rows = [_e2e_row("pm_step", f"fastclu PerturbMerge(AdamW{fold})[{b}]", side(b), None, cfg, label) for b in backends]
    rows.append(_e2e_row("pm_step", "torch.optim.AdamW(loop)", side(None), None, cfg, label))
    return rows


def _e2e_row(
    name: str,
    impl: str,
    build: Callable[[], tuple[Any, Step, list[Tensor]]],
    fwd_bwd: Callable | None,
    cfg: Config,
    label: str,
) -> dict[str, Any]:
    r: dict[str, Any] = {"name": name, "impl": impl, "model": label, "iteration_s": None, "optimizer_s": None,
                         "peak_extra_bytes": None, "error": None}  # fmt: skip
    try:
        model, opt_step, _ = build()
        if model is not None and fwd_bwd is not None:

            def full() -> None:
                fwd_bwd(model)
                opt_step()

            r["iteration_s"] = statistics.median(time_fn(full, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats))
        r["optimizer_s"] = statistics.median(time_fn(opt_step, cfg.device, warmup=cfg.warmup, repeats=cfg.repeats))
        r["peak_extra_bytes"] = _peak_extra(opt_step, cfg.device)
    except Exception as e:  # noqa: BLE001 -- the other side of the comparison still gets reported
        r["error"] = f"{type(e).__name__}: {e}"[:500]
    return r


def run_e2e(cfg: Config, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Both end-to-end benchmarks, for every usable fastclu backend and the torch.optim version,
    with each fastclu row's speed-up over torch.optim (torch time / fastclu time)."""
    use, _ = _usable_backends(cfg.backends, cfg.device)
    rows = []
    for fn in (e2e_sfr_on, e2e_pm):
        pair = fn(cfg, use)
        ref = next((r for r in pair if r["impl"].startswith("torch")), None)
        for r in pair:
            if ref is not None and r is not ref and not r["error"] and not ref["error"]:
                for key in ("iteration_s", "optimizer_s"):
                    if r[key] and ref[key]:
                        r[f"speedup_{key[:-2]}"] = ref[key] / r[key]
            it = f"{r['iteration_s'] * 1e3:9.3f} ms/iter" if r.get("iteration_s") else ""
            op = f"{r['optimizer_s'] * 1e3:9.3f} ms optimizer" if r.get("optimizer_s") else ""
            log(f"e2e {r['name']:20s} {r['impl']:40s} {it} {op} {('error: ' + r['error']) if r['error'] else ''}")
        rows += pair
    return rows


# --------------------------------------------------------------------------------------------
# Metadata, output
# --------------------------------------------------------------------------------------------
def environment(device: torch.device, command: str) -> dict[str, Any]:
    """Device name and software versions, the exact command, UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 -- a broken triton install is reported as absent, not fatal
        triton_version = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name = props.name
        extra = {"memory_bytes": props.total_memory, "capability": f"{props.major}.{props.minor}"}
    else:
        name = platform.processor() or platform.machine() or "cpu"
        extra = {"cpu_count": os.cpu_count()}
    return {
        "device": name, "device_type": device.type, **extra,
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "python": platform.python_version(), "platform": platform.platform(),
        "fastclu_backends": {k: v for k, v in backends().items()},
        "command": command,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def results_name(meta: dict[str, Any]) -> str:
    """``<device>-<date>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-21``."""
    return f"{_slug(meta['device'] if meta['device_type'] == 'cuda' else 'cpu')}-{meta['date'][:10]}"


def format_table(results: list[dict[str, Any]]) -> str:
    """Plain-text table of the op results (one line per implementation)."""
    head = f"{'case':24s} {'dtype':5s} {'size':10s} {'impl':13s} {'time ms':>10s} {'GB/s':>9s} {'%copy':>7s}  speed-ups"
    lines = [head, "-" * len(head)]
    for r in results:
        if r["error"]:
            lines.append(f"{r['case']:24s} {r['dtype']:5s} {r['size']:10s} {r['impl']:13s} error: {r['error'][:60]}")
            continue
        pct = f"{r['pct_copy']:6.1f}%" if r.get("pct_copy") is not None else "      -"
        sp = " ".join(f"{k}={v:.2f}x" for k, v in (r.get("speedup") or {}).items())
        lines.append(
            f"{r['case']:24s} {r['dtype']:5s} {r['size']:10s} {r['impl']:13s} {r['time_s'] * 1e3:10.4f} "
            f"{r['gbps']:9.2f} {pct}  {sp}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """GB/s vs size, one panel per case; a line per implementation (and dtype), copy dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = [r for r in results if r["size"] not in MODEL_SHAPES and r["gbps"]]
    models = [r for r in results if r["size"] in MODEL_SHAPES and r["gbps"]]
    cases = list(dict.fromkeys(r["case"] for r in results)) or ["(none)"]
    ncol = min(4, len(cases))
    nrow = math.ceil(len(cases) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False)
    # One colour per implementation across panels, one line style per dtype.
    impls = [i for i in dict.fromkeys(r["impl"] for r in sweep + models) if i != "copy"]
    colors = {i: plt.get_cmap("tab10")(n % 10) for n, i in enumerate(impls)} | {"copy": "black"}
    styles = {d: s for d, s in zip(dict.fromkeys(r["dtype"] for r in sweep), ["-", ":", "-."])}
    for ax, case in zip(axes.flat, cases):
        mine = [r for r in sweep if r["case"] == case]
        for impl, dt in dict.fromkeys((r["impl"], r["dtype"]) for r in mine):
            pts = sorted((r["numel"], r["gbps"]) for r in mine if (r["impl"], r["dtype"]) == (impl, dt))
            style = "--" if impl == "copy" and styles[dt] == "-" else styles[dt]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colors[impl], marker="o", ms=3,
                    label=f"{impl} {dt}")  # fmt: skip
        # Model parameter lists: stars at their element count, same colours.
        for r in results:
            if r["case"] == case and r["size"] in MODEL_SHAPES and r["gbps"] and r["impl"] in colors:
                ax.plot([r["numel"]], [r["gbps"]], "*", color=colors[r["impl"]], ms=6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(case, fontsize=9)
        ax.set_xlabel("elements", fontsize=8)
        ax.set_ylabel("effective GB/s", fontsize=8)
        ax.tick_params(labelsize=7)
        if mine:
            ax.legend(fontsize=6)
    if models:
        fig.text(0.01, 0.005, "stars: model parameter lists (" + ", ".join(dict.fromkeys(r["size"] for r in models))
                 + ")", fontsize=7)  # fmt: skip
    for ax in list(axes.flat)[len(cases) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parse_sizes(items: Sequence[str]) -> list[str]:
    out = []
    for it in items:
        it = it.strip().lower()
        if it in MODEL_SHAPES:
            out.append(it)
        elif it == "models":
            out += list(MODEL_SHAPES)
        elif re.fullmatch(r"(2\^)?\d+", it):
            k = int(it.removeprefix("2^"))
            if not 0 <= k <= 34:
                raise ValueError(f"--sizes: log2 size must be in [0, 34], got {k}")
            out.append(f"2^{k}")
        else:
            raise ValueError(f"--sizes: expected log2 sizes (e.g. 16,20 or 2^16), 'models' or {sorted(MODEL_SHAPES)}")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastclu bench",
        description="Time fastclu's ops (every backend that runs here) against their peers and a copy roofline.",
    )
    p.add_argument("--ops", type=_csv, default=None, help=f"cases (comma list; an op name selects all its cases): "
                   f"{', '.join(CASES)}")  # fmt: skip
    p.add_argument("--sizes", type=_csv, default=None, help="log2 element counts and/or models "
                   f"({', '.join(MODEL_SHAPES)}, or 'models'); default 16..28 step 2 + models on GPU")  # fmt: skip
    p.add_argument("--dtypes", type=_csv, default=["fp32", "bf16"], help="fp32, bf16, fp16 (default fp32,bf16)")
    p.add_argument("--backends", type=_csv, default=list(BACKENDS), help="reference, triton, cuda (default all)")
    p.add_argument("--peers", type=_csv, default=None, help=f"peers to time: {', '.join(ALL_PEERS)} or 'none' "
                   "(default all on GPU; all but compile on CPU)")  # fmt: skip
    p.add_argument("--out", default=None, help="output folder (default benchmarks/results on GPU, "
                   "./fastclu-bench-cpu otherwise)")  # fmt: skip
    p.add_argument("--quick", action="store_true", help="GPU: sizes 2^16, 2^20, 2^24, no model lists, 10 repeats "
                   "(always on without a GPU: sizes 2^10, 2^14, tiny e2e models, 3 repeats)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=None, help="untimed calls before timing (default 5; quick 3; CPU 1)")
    p.add_argument("--repeats", type=int, default=None, help="timed calls, the median is reported "
                   "(default 30; quick 10; CPU 3)")  # fmt: skip
    p.add_argument("--no-e2e", dest="e2e", action="store_false", help="skip the end-to-end benchmarks")
    p.add_argument("--no-plot", dest="plot", action="store_false", help="do not write the PNG")
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    return p


def _select_cases(names: Sequence[str] | None) -> list[str]:
    if not names:
        return list(CASES)
    out = []
    for n in names:
        hits = [c for c in CASES if c == n or CASES[c].op == n]
        if not hits:
            raise ValueError(f"--ops: unknown op or case {n!r}; choose from {', '.join(CASES)}")
        out += [h for h in hits if h not in out]
    return out


def main(argv: list[str] | None = None) -> int:
    """``fastclu bench``: run, print the table, write ``<out>/<device>-<date>.json`` and ``.png``.

    Returns 0 on success (also when some implementation failed: its row carries the error),
    2 on bad arguments.
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(args_list)
    exit_if_bad("fastclu bench", check_bench_args(args))  # issue 17: every argument checked before any work
    try:
        device = (
            torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        on_gpu = device.type == "cuda"
        quick = args.quick or not on_gpu
        cases = _select_cases(args.ops)
        if args.sizes:
            sizes = _parse_sizes(args.sizes)
        else:
            log2 = CPU_LOG2_SIZES if not on_gpu else QUICK_GPU_LOG2_SIZES if quick else DEFAULT_LOG2_SIZES
            sizes = [f"2^{k}" for k in log2] + ([] if quick else list(MODEL_SHAPES))
        for d in args.dtypes:
            if d not in DTYPES:
                raise ValueError(f"--dtypes: unknown dtype {d!r}; choose from {', '.join(DTYPES)}")
        for b in args.backends:
            if b not in BACKENDS:
                raise ValueError(f"--backends: unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
        if args.peers is None:
            peers = [p for p in ALL_PEERS if on_gpu or p != "compile"]
        elif args.peers == ["none"]:
            peers = []
        else:
            bad = [p for p in args.peers if p not in ALL_PEERS]
            if bad:
                raise ValueError(f"--peers: unknown peer {bad[0]!r}; choose from {', '.join(ALL_PEERS)} or none")
            peers = args.peers
        for name, v in (("--warmup", args.warmup), ("--repeats", args.repeats)):
            if v is not None and v < (0 if name == "--warmup" else 1):
                raise ValueError(f"{name} must be >= {0 if name == '--warmup' else 1}, got {v}")
    except ValueError as e:
        print(f"fastclu bench: {e}", file=sys.stderr)
        return 2

    cfg = Config(
        cases=cases, sizes=sizes, dtypes=args.dtypes, backends=args.backends, peers=peers, device=device,
        warmup=args.warmup if args.warmup is not None else (1 if not on_gpu else 3 if quick else 5),
        repeats=args.repeats if args.repeats is not None else (3 if not on_gpu else 10 if quick else 30),
        e2e=args.e2e, quick=quick, tiny=not on_gpu,
    )  # fmt: skip
    _, skipped = _usable_backends(cfg.backends, device)
    notes = []
    if not on_gpu:
        notes.append(
            "No CUDA device: the GPU part (triton and cuda backends, GPU timings) was SKIPPED. Only the reference "
            "backend and the peers ran, on tiny sizes, to check the harness: these CPU numbers are no performance claim."
        )
    if not on_gpu and "compile" not in peers:
        notes.append("torch.compile peer skipped on CPU (pass --peers ... ,compile to include it).")
    for b, why in skipped.items():
        notes.append(f"backend {b} skipped: {why}")
    for n in notes:
        print("NOTE:", n)

    command = "fastclu bench" + (" " + shlex.join(args_list) if args_list else "")
    meta = environment(device, command)
    meta.update(
        gpu_skipped=not on_gpu, quick=quick, warmup=cfg.warmup, repeats=cfg.repeats, notes=notes,
        skipped_backends=skipped, cases=cases, sizes=sizes, dtypes=cfg.dtypes, peers=peers,
        traffic_table=TRAFFIC,
    )  # fmt: skip
    threads = torch.get_num_threads()
    if not on_gpu:
        # The CPU mode checks the harness on shared CI machines, where OpenMP threads waiting on
        # each other under load cost more than they save on these tiny sizes.
        torch.set_num_threads(1)
        meta["cpu_threads"] = 1
    try:
        results = run_ops(cfg)
        e2e = run_e2e(cfg) if cfg.e2e else []
    finally:
        torch.set_num_threads(threads)
    doc = {
        "schema": SCHEMA_VERSION, "meta": meta, "results": results, "e2e": e2e,
        "targets": check_targets(results),
    }  # fmt: skip

    print()
    print(format_table(results))
    missed = [t for t in doc["targets"] if not t["met"]]
    if doc["targets"]:
        print(f"\nDESIGN §5 targets: {len(doc['targets']) - len(missed)} met, {len(missed)} missed")
    out_dir = Path(args.out) if args.out else Path("benchmarks/results" if on_gpu else "fastclu-bench-cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_name(meta)
    n = 1
    while (out_dir / f"{stem}.json").exists():  # never overwrite an earlier run of the same day
        n += 1
        stem = f"{results_name(meta)}-{n}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote {json_path}")
    if args.plot:
        png = out_dir / f"{stem}.png"
        title = f"{meta['device']} · torch {meta['torch']}" + (" · CPU harness check, not a benchmark" if not on_gpu
                                                               else "")  # fmt: skip
        plot(results, png, title)
        print(f"wrote {png}")
    for n in notes[:1]:
        print("NOTE:", n)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
