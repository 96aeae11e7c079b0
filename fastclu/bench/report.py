"""Run metadata, result file names, the text table and the plot."""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import re
from pathlib import Path
from typing import Any

import torch

from fastclu._registry import backends
from fastclu.bench.shapes import MODEL_SHAPES

SCHEMA_VERSION = 1


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
