"""The application on top of the library: ``fastclu demo`` scenarios, their tables and plots.

``--scenario`` picks what runs:

* ``digits`` (the default): the unlearning, continual-learning and CLU scenarios on
  scikit-learn's bundled digits data (:mod:`fastclu.demo.digits`);
* ``seeds``: the further algorithms on the digits, i.e. Flat-LoRA vs LoRA, MEHL-Soup(+) vs the
  uniform soup and the best ingredient, CLASSP / EWC vs naive, P&M-LoRA vs sequential LoRA
  (:mod:`fastclu.demo.seeds`);
* ``llm``: LLM unlearning on a tiny GPT-2 (:mod:`fastclu.demo.llm`, needs transformers);
* ``all``: the three above, one after the other, each in a subdirectory of ``--out``.

The CLI calls :func:`main`.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from fastclu._cli_checks import check_all_args
from fastclu.demo.digits import main as digits_main
from fastclu.demo.digits import run_demo

__all__ = ["SCENARIOS", "main", "run_demo"]

SCENARIOS = ("digits", "seeds", "llm", "all")


def _seeds_main(argv: list[str]) -> int:
    from fastclu.demo.seeds import main as seeds_main

    return seeds_main(argv, prog="fastclu demo --scenario seeds", default_out="fastclu-demo-seeds")


def _llm_main(argv: list[str]) -> int:
    from fastclu.demo.llm import main as llm_main

    return llm_main(argv)


def _all_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastclu demo --scenario all",
                                description="digits, seeds and llm, one after the other")  # fmt: skip
    p.add_argument("--out", default="fastclu-demo-all",
                   help="output directory; each scenario writes into OUT/<scenario> (default ./fastclu-demo-all)")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed of every scenario")
    p.add_argument("--quick", action="store_true", help="every scenario's quick settings (seconds; for tests)")
    p.add_argument("--backend", default=None, choices=["reference", "triton", "cuda"],
                   help="fastclu op backend of the digits and seeds scenarios (default: automatic)")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (digits)")
    return p


def _run_all(argv: list[str]) -> int:
    args = _all_parser().parse_args(argv)
    why = check_all_args(args)  # every argument checked before any work (--out first)
    if why:
        print(f"fastclu demo: {why}", file=sys.stderr)
        return 2
    common = ["--seed", str(args.seed)] + (["--quick"] if args.quick else [])
    backend = ["--backend", args.backend] if args.backend else []
    runs = (
        ("digits", digits_main, common + backend + (["--no-progress"] if args.no_progress else [])),
        ("seeds", _seeds_main, common + backend),
        ("llm", _llm_main, common),
    )
    times = {}
    for name, fn, sub in runs:
        print(f"=== fastclu demo --scenario {name} {' '.join(sub)}", flush=True)
        t0 = time.perf_counter()
        rc = fn([*sub, "--out", os.path.join(args.out, name)])
        times[name] = time.perf_counter() - t0
        if rc:
            return rc
    print("\n" + ", ".join(f"{n} {t:.1f} s" for n, t in times.items()) + f" (wrote {args.out}/)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclu demo``: picks the scenario (``--scenario``), hands it the other arguments."""
    pre = argparse.ArgumentParser(prog="fastclu demo", add_help=False, allow_abbrev=False)
    pre.add_argument("--scenario", choices=SCENARIOS, default="digits")
    known, rest = pre.parse_known_args(argv)
    if known.scenario == "llm":
        return _llm_main(rest)
    if known.scenario == "seeds":
        return _seeds_main(rest)
    if known.scenario == "all":
        return _run_all(rest)
    return digits_main(rest)
