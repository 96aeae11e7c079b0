"""Turn a ``fastclu bench`` results JSON into markdown tables (stdlib only).

    python benchmarks/report.py benchmarks/results/<device>-<date>.json            # print
    python benchmarks/report.py RESULTS.json --out table.md                        # write a file
    python benchmarks/report.py RESULTS.json --readme benchmarks/README.md         # fill the README

With ``--readme`` the text between ``<!-- results:start -->`` and ``<!-- results:end -->`` is
replaced. Only what the JSON holds is written: every number comes from a measurement, and a
run without a GPU is labelled as a harness check, not a benchmark.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

START, END = "<!-- results:start -->", "<!-- results:end -->"
PEER_ORDER = ("loop", "foreach", "compile", "torch_fused", "cat_topk", "cat_kthvalue")


def _fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f} µs"
    if s < 1:
        return f"{s * 1e3:.3f} ms"
    return f"{s:.3f} s"


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _mib(b: int | None) -> str:
    return "-" if b is None else f"{b / 2**20:.1f}"


def _size_key(size: str) -> tuple[int, int | str]:
    return (0, int(size[2:])) if size.startswith("2^") else (1, size)


def render(doc: dict[str, Any]) -> str:
    """Markdown: run header, one table per case, the end-to-end table, and the DESIGN §5 checks."""
    meta = doc["meta"]
    out = [f"### {meta['device']} — {meta['date'][:10]}", ""]
    if meta.get("gpu_skipped"):
        out += [
            (
                "> **No CUDA device in this run: the GPU part was skipped.** These are CPU timings of the "
                "reference backend and the peers on tiny sizes, recorded to check the harness. "
                "They are not performance results."
            ),
            "",
        ]
    out += [
        f"- command: `{meta['command']}`",
        (
            f"- torch {meta['torch']}, triton {meta.get('triton') or '-'}, CUDA {meta.get('cuda') or '-'}, "
            f"Python {meta.get('python', '-')}"
        ),
        (
            f"- timing: median of {meta.get('repeats')} calls after {meta.get('warmup')} warm-up calls; "
            "GB/s = DESIGN §3 floor bytes / time (same bytes for every implementation of a case, so GB/s "
            "ratios are speed-ups); % copy = against a device-to-device copy of the same bytes in the same run"
        ),
        "",
    ]
    results = doc["results"]
    targets = {(t["case"], t["impl"], t["dtype"], t["size"]): t for t in doc.get("targets", [])}
    for case in dict.fromkeys(r["case"] for r in results):
        rows = [r for r in results if r["case"] == case]
        peers = [p for p in PEER_ORDER if any(r["impl"] == p for r in rows)]
        head = ["dtype", "size", "impl", "time", "GB/s", "% copy", *[f"× vs {p}" for p in peers], "peak extra MiB"]
        head.append("§5 target")
        out += [f"#### `{case}` ({rows[0]['op']}, {rows[0]['bytes_per_element']:g} B/elem in {rows[0]['dtype']})", ""]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        rows.sort(key=lambda r: (r["dtype"] != "fp32", r["dtype"], _size_key(r["size"])))
        for r in rows:
            if r.get("error"):
                cells = [r["dtype"], r["size"], r["impl"], f"error: {r['error'][:80]}"]
                cells += [""] * (len(head) - len(cells))
            else:
                sp = r.get("speedup") or {}
                t = targets.get((case, r["impl"], r["dtype"], r["size"]))
                mark = "-" if t is None else (f"met (≥{t['target_pct']:g}%)" if t["met"] else
                                              f"**MISS** (<{t['target_pct']:g}%)")  # fmt: skip
                cells = [
                    r["dtype"], r["size"], r["impl"], _fmt_time(r["time_s"]), _fmt(r["gbps"], ".1f"),
                    _fmt(r.get("pct_copy"), ".0f"), *[_fmt(sp.get(p), ".2f") for p in peers],
                    _mib(r.get("peak_extra_bytes")), mark,
                ]  # fmt: skip
            out.append("| " + " | ".join(str(c) for c in cells) + " |")
        out.append("")
    if doc.get("e2e"):
        out += ["#### End to end", "", ("| benchmark | impl | model | iteration | optimizer part | × iteration | "
                "× optimizer | peak extra MiB |"), "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in doc["e2e"]:
            if r.get("error"):
                out.append(f"| {r['name']} | {r['impl']} | {r['model']} | error: {r['error'][:80]} | | | | |")
                continue
            out.append(
                f"| {r['name']} | {r['impl']} | {r['model']} | {_fmt_time(r.get('iteration_s'))} | "
                f"{_fmt_time(r.get('optimizer_s'))} | {_fmt(r.get('speedup_iteration'), '.2f')} | "
                f"{_fmt(r.get('speedup_optimizer'), '.2f')} | {_mib(r.get('peak_extra_bytes'))} |"
            )
        out.append("")
    tg = doc.get("targets", [])
    if tg:
        missed = [t for t in tg if not t["met"]]
        out += [f"DESIGN §5 bandwidth targets: {len(tg) - len(missed)} met, **{len(missed)} missed**.", ""]
        for t in missed:
            pct = "-" if t["pct_copy"] is None else f"{t['pct_copy']:.0f}%"
            out.append(
                f"- MISS `{t['case']}` {t['impl']} {t['dtype']} {t['size']}: {pct} of copy (< {t['target_pct']:g}%)"
            )
        out.append("")
    elif not meta.get("gpu_skipped"):
        out += ["No fused-backend result at 2^26+ elements or on a model list: DESIGN §5 targets not checked.", ""]
    return "\n".join(out)


def fill_readme(readme: Path, table: str) -> None:
    """Replace the marked results section of ``readme`` with ``table``."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", type=Path, help="a JSON written by `fastclu bench`")
    p.add_argument("--out", type=Path, default=None, help="write the markdown here instead of printing it")
    p.add_argument("--readme", type=Path, default=None, help="replace the results section of this README")
    a = p.parse_args(argv)
    doc = json.loads(a.results.read_text())
    if doc.get("schema") != 1:
        print(f"report: unsupported schema {doc.get('schema')!r} in {a.results}", file=sys.stderr)
        return 2
    table = render(doc)
    if a.readme:
        fill_readme(a.readme, table)
    if a.out:
        a.out.write_text(table + "\n")
    if not a.readme and not a.out:
        print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
