"""Argument checks for ``fastclu demo`` and ``fastclu bench``, run before any work.

Each check returns None when the arguments are fine, else one line naming the argument and
what was expected; :func:`exit_if_bad` prints it and exits with status 2, as argparse does for
bad usage.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

__all__ = [
    "check_all_args",
    "check_backend",
    "check_bench_args",
    "check_demo_args",
    "check_device",
    "check_seeds_args",
    "check_writable_dir",
    "exit_if_bad",
]


def exit_if_bad(prog: str, why: str | None) -> None:
    """Print ``prog: why`` to stderr and raise ``SystemExit(2)`` when ``why`` is set."""
    if why:
        print(f"{prog}: {why}", file=sys.stderr)
        raise SystemExit(2)


def check_writable_dir(flag: str, path: str | None) -> str | None:
    """``path`` is a writable directory, or can be created as one (nothing is created here)."""
    if path is None:
        return None
    if not isinstance(path, str) or not path:
        return f"{flag}: expected a directory path, got {path!r}"
    target = os.path.abspath(path)
    if os.path.exists(target):
        if not os.path.isdir(target):
            return f"{flag}: {path!r} exists and is not a directory"
        return None if os.access(target, os.W_OK | os.X_OK) else f"{flag}: directory {path!r} is not writable"
    parent = os.path.dirname(target)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f"{flag}: cannot create {path!r} ({parent!r} is not a writable directory)"
    return None


def check_device(flag: str, device: str | None) -> str | None:
    """``device`` parses as a torch device, and a CUDA device exists when one is asked for."""
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        return f"{flag}: not a torch device {device!r} ({e})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{flag}: {device!r} requested but no CUDA device is available"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{flag}: {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
    return None


def check_demo_args(args: argparse.Namespace) -> str | None:
    """``fastclu demo``: ``--out`` writable (first), ``--seed >= 0``, ``--sfron-clip > 0``, ``--device``."""
    why = check_writable_dir("--out", args.out)
    if why:
        return why
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    clip = args.sfron_clip
    if clip is not None and not (math.isfinite(clip) and clip > 0):
        return f"--sfron-clip must be a finite number > 0, got {clip}"
    return check_device("--device", args.device)


def check_backend(flag: str, backend: str | None) -> str | None:
    """``backend`` (already one of the names, by argparse) can run here."""
    if backend is None:
        return None
    from fastclu import backends

    why = backends().get(backend)
    return None if why is None else f"{flag}: backend {backend!r} is unavailable: {why}"


def check_seeds_args(args: argparse.Namespace) -> str | None:
    """``fastclu demo --scenario seeds``: ``--out`` writable (first), ``--seed >= 0``, ``--threads >= 1``,
    ``--soup-memory`` K in [0, 1000], ``--backend`` usable."""
    why = check_writable_dir("--out", None if args.out is None else str(args.out))
    if why:
        return why
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if not 0 <= args.soup_memory <= 1000:
        return f"--soup-memory must be a number of ingredients in [0, 1000] (0: off), got {args.soup_memory}"
    return check_backend("--backend", args.backend)


def check_all_args(args: argparse.Namespace) -> str | None:
    """``fastclu demo --scenario all``: ``--out`` writable (first), ``--seed >= 0``, ``--backend`` usable,
    and transformers installed (the llm scenario is part of it)."""
    why = check_writable_dir("--out", args.out)
    if why:
        return why
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    why = check_backend("--backend", args.backend)
    if why:
        return why
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return ("--scenario all: includes the llm scenario, which needs transformers (pip install 'fastclu[hf]'); "
                "run --scenario digits and --scenario seeds on their own without it")  # fmt: skip
    return None


def check_bench_args(args: argparse.Namespace) -> str | None:
    """``fastclu bench``: no empty comma lists (``--ops ,``), a real ``--device``, ``--out`` writable."""
    for flag, value in (("--ops", args.ops), ("--sizes", args.sizes), ("--dtypes", args.dtypes),
                        ("--backends", args.backends), ("--peers", args.peers)):  # fmt: skip
        if value is not None and not value:
            return f"{flag}: empty list; name at least one entry (omit {flag} for the default)"
    why = check_device("--device", args.device)
    return why or check_writable_dir("--out", args.out)
