"""The application on top of the library: ``fastclu demo`` scenarios, their tables and plots.

``digits`` holds the unlearning, continual-learning and CLU scenarios on scikit-learn's bundled
digits data (the default); ``llm`` the LLM-unlearning scenario on a tiny GPT-2
(``--scenario llm``, needs transformers). The CLI calls :func:`main`.
"""

from __future__ import annotations

import argparse

from fastclu.demo.digits import main as digits_main
from fastclu.demo.digits import run_demo

__all__ = ["SCENARIOS", "main", "run_demo"]

SCENARIOS = ("digits", "llm")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastclu demo``: picks the scenario (``--scenario``), hands it the other arguments."""
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--scenario", choices=SCENARIOS, default="digits")
    known, rest = pre.parse_known_args(argv)
    if known.scenario == "llm":
        from fastclu.demo.llm import main as llm_main

        return llm_main(rest)
    return digits_main(rest)
