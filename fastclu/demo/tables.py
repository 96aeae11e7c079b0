"""Plain-text tables shared by the demo scenarios."""

from __future__ import annotations

import math


def fmt(v: object) -> str:
    """One cell: floats to one decimal, None / NaN as ``-``."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def table(header: list[str], rows: list[list[object]]) -> str:
    """A left-aligned first column, right-aligned others, a dashed rule under the header."""
    cells = [header] + [[fmt(c) for c in r] for r in rows]
    w = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "  ".join("-" * x for x in w))
    return "\n".join(lines)
