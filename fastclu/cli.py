"""Command line: ``fastclu info | demo | bench`` (also ``python -m fastclu ...``).

``info`` reports versions, devices and which op backends are usable here (and why not).
``demo`` and ``bench`` hand their arguments, untouched, to ``fastclu.demo.main`` and
``fastclu.bench.main``; those are imported only when asked for, so ``info`` works without them.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any

from fastclu._verification import summary as verification_summary

# Subcommands implemented elsewhere: name -> (module, help text).
_DELEGATED = {
    "demo": ("fastclu.demo", "run the unlearning / continual-learning demo on bundled data"),
    "bench": ("fastclu.bench", "benchmark the fused ops against their PyTorch formulations"),
}
_ENV_VARS = ("FASTCLU_BACKEND", "TRITON_INTERPRET", "FASTCLU_CUDA_ON_CPU", "CUDA_VISIBLE_DEVICES")
# The optional extras of pyproject.toml and the modules each brings (import names).
_EXTRAS = {"triton": ("triton",), "demo": ("sklearn", "matplotlib"), "hf": ("transformers", "peft", "accelerate")}


def _version(module: str) -> str | None:
    try:
        mod = importlib.import_module(module)
    except (ImportError, RuntimeError, OSError):  # missing or broken install: no usable version
        return None
    return str(getattr(mod, "__version__", "unknown"))


def _extension() -> dict[str, Any]:
    try:
        mod = importlib.import_module("fastclu._C")
    except ImportError as e:
        return {"built": False, "reason": f"{e.__class__.__name__}: {e}"}
    return {"built": True, "path": getattr(mod, "__file__", None)}


def _extras() -> dict[str, list[str]]:
    """Each optional extra -> the modules of it that are not installed (empty: installed)."""
    return {name: [m for m in mods if importlib.util.find_spec(m) is None] for name, mods in _EXTRAS.items()}


def _devices() -> list[dict[str, Any]]:
    import torch

    devs: list[dict[str, Any]] = [{"name": "cpu", "type": "cpu", "threads": torch.get_num_threads()}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            devs.append({
                "name": f"cuda:{i}",
                "type": "cuda",
                "model": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count,
            })  # fmt: skip
    return devs


def collect_info() -> dict[str, Any]:
    """Everything ``fastclu info`` prints, as a JSON-serialisable dict.

    Keys: ``fastclu``, ``python``, ``platform``, ``torch``, ``torch_cuda`` (CUDA version torch
    was built with, or None), ``cuda_available``, ``triton``, ``numpy``, ``extension``
    (``{"built": bool, "path"|"reason": str}``), ``extras`` (extra name -> its modules that are
    not installed), ``devices`` (list of dicts), ``backends``
    (name -> None if usable, else the reason), ``verification`` (kernel backend -> ``{"gpu", "cpu"}``:
    how it was verified on a GPU, None if never, and what checks it without one), ``env`` (the relevant environment variables).
    """
    import torch

    import fastclu

    return {
        "fastclu": fastclu.__version__,
        "fastclu_path": os.path.dirname(fastclu.__file__),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "extension": _extension(),
        "extras": _extras(),
        "devices": _devices(),
        "backends": fastclu.backends(),
        "verification": verification_summary(),
        "env": {k: os.environ[k] for k in _ENV_VARS if k in os.environ},
    }


def format_info(info: dict[str, Any]) -> str:
    """Human-readable text for :func:`collect_info`'s dict."""
    ext = info["extension"]
    lines = [
        f"fastclu   {info['fastclu']} ({info['fastclu_path']})",
        f"python    {info['python']} ({info['platform']})",
        (
            f"torch     {info['torch']} (CUDA build: {info['torch_cuda'] or 'none'}, "
            f"CUDA available: {'yes' if info['cuda_available'] else 'no'})"
        ),
        f"triton    {info['triton'] or 'not installed'}",
        f"numpy     {info['numpy'] or 'not installed'}",
        f"fastclu._C  {'built: ' + str(ext['path']) if ext['built'] else 'not built (' + ext['reason'] + ')'}",
        "extras    "
        + ", ".join(
            f"{name}: "
            + ("installed" if not missing else f"missing {' '.join(missing)} (pip install 'fastclu[{name}]')")
            for name, missing in info["extras"].items()
        ),
        "devices:",
    ]
    for d in info["devices"]:
        if d["type"] == "cuda":
            lines.append(
                f"  {d['name']:8s} {d['model']} (sm {d['capability']}, {d['memory_gib']} GiB, "
                f"{d['multiprocessors']} SMs)"
            )
        else:
            lines.append(f"  {d['name']:8s} {d['threads']} threads")
    lines.append("verified on a GPU (automatic choice on CUDA tensors prefers verified, then stronger evidence):")
    for name, v in info.get("verification", {}).items():
        lines.append(f"  {name:9s} {v['gpu'] or 'not yet'}; without a GPU: {v['cpu']}")
    lines.append("backends:")
    for name, reason in info["backends"].items():
        lines.append(f"  {name:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    if info["env"]:
        lines.append("environment:")
        lines.extend(f"  {k}={v}" for k, v in info["env"].items())
    return "\n".join(lines)


def _cmd_info(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="fastclu info", description="Print versions, devices and backends.")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")
    args = parser.parse_args(list(argv))
    info = collect_info()
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0


def _delegate(name: str, argv: Sequence[str]) -> int:
    module, _ = _DELEGATED[name]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        # Only a missing subcommand module is "unavailable"; a missing dependency inside it
        # is a real error and propagates with its own traceback.
        if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
            raise
        print(f"fastclu {name}: not available in this installation ({module} is missing)", file=sys.stderr)
        return 2
    entry: Callable[[list[str]], int | None] = mod.main
    rc = entry(list(argv))
    return 0 if rc is None else int(rc)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastclu",
        description="fastclu: fused optimizers for continual learning and machine unlearning.",
        epilog="Run 'fastclu COMMAND --help' for a command's own options.",
    )
    parser.add_argument("--version", action="store_true", help="print the fastclu version and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("info", help="versions, devices and backend availability (see 'fastclu info --help')")
    for name, (_, text) in _DELEGATED.items():
        sub.add_parser(name, help=text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fastclu`` console script; returns the process exit code.

    argv: the arguments after the program name (default ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    # Subcommands parse their own options: everything after the command name is theirs,
    # including --help, so dispatch before the top-level parser can claim any of it.
    if argv and argv[0] in _DELEGATED:
        return _delegate(argv[0], argv[1:])
    if argv and argv[0] == "info":
        return _cmd_info(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on unknown commands, 0 on --help
    if args.version:
        import fastclu

        print(f"fastclu {fastclu.__version__}")
        return 0
    parser.print_help()
    return 2
