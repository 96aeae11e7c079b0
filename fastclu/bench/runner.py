"""The op grid: every case x dtype x size x (fastclu backends, peers, copy roofline), and DESIGN §5 targets."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastclu._registry import backends
from fastclu.bench.cases import CASES, Case
from fastclu.bench.shapes import MODEL_SHAPES, size_shapes
from fastclu.bench.timer import Step, _peak_extra, copy_step, time_fn
from fastclu.bench.traffic import GB, bytes_per_element, case_bytes


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
