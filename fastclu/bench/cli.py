"""``fastclu bench``: arguments, the run, the output files."""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fastclu._cli_checks import check_bench_args, exit_if_bad
from fastclu._registry import BACKENDS
from fastclu.bench.cases import ALL_PEERS, CASES
from fastclu.bench.e2e import run_e2e
from fastclu.bench.report import SCHEMA_VERSION, environment, format_table, plot, results_name
from fastclu.bench.runner import DTYPES, Config, _usable_backends, check_targets, run_ops
from fastclu.bench.shapes import CPU_LOG2_SIZES, DEFAULT_LOG2_SIZES, MODEL_SHAPES, QUICK_GPU_LOG2_SIZES
from fastclu.bench.timer import steady_cpu_malloc
from fastclu.bench.traffic import TRAFFIC


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
    host = p.add_argument_group("host path (--host)")
    host.add_argument("--host", action="store_true", help="time the host side of a step instead, kernel launches "
                      "stubbed (counted), beside torch fused/foreach AdamW; see fastclu.bench.host")  # fmt: skip
    host.add_argument("--json", default=None, metavar="PATH", help="--host: write the rows as JSON to PATH")
    host.add_argument("--host-shapes", type=_csv, default=None, help="--host: shape lists (comma list) of "
                      "tiny200 (200 one-element tensors), resnet18, gpt2_124m (default all)")  # fmt: skip
    host.add_argument("--host-cases", type=_csv, default=None, help="--host: cases (comma list) of adamw, "
                      "masked_clipped_2role, amp, fastslow, perturb_restore (default all)")  # fmt: skip
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


def _validate_lists(args: argparse.Namespace, on_gpu: bool) -> tuple[list[str], list[str], list[str]]:
    """(cases, sizes, peers) from the arguments; ValueError naming the bad argument."""
    cases = _select_cases(args.ops)
    if args.sizes:
        sizes = _parse_sizes(args.sizes)
    else:
        quick = args.quick or not on_gpu
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
    return cases, sizes, peers


def _validate_counts(args: argparse.Namespace) -> None:
    for name, v, low in (("--warmup", args.warmup, 0), ("--repeats", args.repeats, 1)):
        if v is not None and v < low:
            raise ValueError(f"{name} must be >= {low}, got {v}")


def _device(arg: str | None) -> torch.device:
    return torch.device(arg) if arg else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _config(args: argparse.Namespace) -> Config:
    """The run's settings from the arguments; ValueError naming the bad argument, before any work."""
    device = _device(args.device)
    on_gpu = device.type == "cuda"
    quick = args.quick or not on_gpu
    cases, sizes, peers = _validate_lists(args, on_gpu)
    _validate_counts(args)
    return Config(
        cases=cases, sizes=sizes, dtypes=args.dtypes, backends=args.backends, peers=peers, device=device,
        warmup=args.warmup if args.warmup is not None else (1 if not on_gpu else 3 if quick else 5),
        repeats=args.repeats if args.repeats is not None else (3 if not on_gpu else 10 if quick else 30),
        e2e=args.e2e, quick=quick, tiny=not on_gpu,
    )  # fmt: skip


def _notes(cfg: Config, skipped: dict[str, str]) -> list[str]:
    on_gpu = cfg.device.type == "cuda"
    notes = []
    if not on_gpu:
        notes.append(
            "No CUDA device: the GPU part (triton and cuda backends, GPU timings) was SKIPPED. Only the reference "
            "backend and the peers ran, on tiny sizes, to check the harness: these CPU numbers are no performance claim."
        )
    if not on_gpu and "compile" not in cfg.peers:
        notes.append("torch.compile peer skipped on CPU (pass --peers ... ,compile to include it).")
    for b, why in skipped.items():
        notes.append(f"backend {b} skipped: {why}")
    return notes


def _run(cfg: Config) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    threads = torch.get_num_threads()
    if cfg.device.type != "cuda":
        # The CPU mode checks the harness on shared CI machines, where OpenMP threads waiting on
        # each other under load cost more than they save on these tiny sizes.
        torch.set_num_threads(1)
    try:
        results = run_ops(cfg)
        e2e = run_e2e(cfg) if cfg.e2e else []
    finally:
        torch.set_num_threads(threads)
    return results, e2e


def _write(doc: dict[str, Any], out_dir: Path, with_plot: bool) -> None:
    """``<out>/<device>-<date>[-n].json`` (never overwriting an earlier run of the day) and its PNG."""
    meta = doc["meta"]
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = results_name(meta)
    n = 1
    while (out_dir / f"{stem}.json").exists():
        n += 1
        stem = f"{results_name(meta)}-{n}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"\nwrote {json_path}")
    if with_plot and importlib.util.find_spec("matplotlib") is None:
        print("NOTE: matplotlib is not installed (pip install 'fastclu[demo]'): no PNG written, --no-plot hides this")
    elif with_plot:
        png = out_dir / f"{stem}.png"
        suffix = " · CPU harness check, not a benchmark" if meta["gpu_skipped"] else ""
        plot(doc["results"], png, f"{meta['device']} · torch {meta['torch']}{suffix}")
        print(f"wrote {png}")


def main(argv: list[str] | None = None) -> int:
    """``fastclu bench``: run, print the table, write ``<out>/<device>-<date>.json`` and ``.png``.

    With ``--host``: the host-path benchmark instead (:mod:`fastclu.bench.host`).
    Returns 0 on success (also when some implementation failed: its row carries the error),
    2 on bad arguments.
    """
    args_list = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(args_list)
    exit_if_bad("fastclu bench", check_bench_args(args))  # every argument checked before any work
    command = "fastclu bench" + (" " + shlex.join(args_list) if args_list else "")
    if args.host:
        from fastclu.bench.host import host_main

        return host_main(args, command)
    try:
        cfg = _config(args)
    except ValueError as e:
        print(f"fastclu bench: {e}", file=sys.stderr)
        return 2
    on_gpu = cfg.device.type == "cuda"
    _, skipped = _usable_backends(cfg.backends, cfg.device)
    notes = _notes(cfg, skipped)
    for n in notes:
        print("NOTE:", n)
    meta = environment(cfg.device, command)
    meta.update(
        gpu_skipped=not on_gpu, quick=cfg.quick, warmup=cfg.warmup, repeats=cfg.repeats, notes=notes,
        skipped_backends=skipped, cases=cfg.cases, sizes=cfg.sizes, dtypes=cfg.dtypes, peers=cfg.peers,
        traffic_table=TRAFFIC,
    )  # fmt: skip
    if not on_gpu:
        meta["cpu_threads"] = 1
        meta["malloc"] = steady_cpu_malloc()
    results, e2e = _run(cfg)
    doc = {"schema": SCHEMA_VERSION, "meta": meta, "results": results, "e2e": e2e, "targets": check_targets(results)}
    print()
    print(format_table(results))
    missed = [t for t in doc["targets"] if not t["met"]]
    if doc["targets"]:
        print(f"\nDESIGN §5 targets: {len(doc['targets']) - len(missed)} met, {len(missed)} missed")
    out_dir = Path(args.out) if args.out else Path("benchmarks/results" if on_gpu else "fastclu-bench-cpu")
    _write(doc, out_dir, args.plot)
    for n in notes[:1]:
        print("NOTE:", n)
    return 0
