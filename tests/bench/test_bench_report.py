"""DESIGN §5 targets, the markdown report, the README section and the plot."""

from __future__ import annotations

from pathlib import Path

import pytest
from _bench_expect import _load_report

from fastclu import bench


def test_check_targets_marks_misses() -> None:
    def row(impl: str, size: str, numel: int, pct: float | None) -> dict:
        return {"kind": "fastclu", "impl": impl, "size": size, "numel": numel, "pct_copy": pct,
                "case": "merge_", "dtype": "fp32"}  # fmt: skip

    rows = [row("triton", "2^26", 2**26, 91.0), row("cuda", "2^28", 2**28, 89.9), row("triton", "2^24", 2**24, 10.0),
            row("triton", "gpt2_124m", 124_439_808, 74.0), row("cuda", "resnet18", 11_689_512, 80.0),
            row("reference", "2^28", 2**28, 5.0), row("triton", "2^26", 2**26, None)]  # fmt: skip
    got = [(t["impl"], t["size"], t["target_pct"], t["met"]) for t in bench.check_targets(rows)]
    assert got == [("triton", "2^26", 90.0, True), ("cuda", "2^28", 90.0, False), ("triton", "gpt2_124m", 75.0, False),
                   ("cuda", "resnet18", 75.0, True), ("triton", "2^26", 90.0, False)]  # fmt: skip


def test_report_fills_readme_section(tmp_path: Path) -> None:
    report = _load_report()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.fill_readme(readme, "NEW TABLE")
    assert readme.read_text() == f"intro\n{report.START}\nNEW TABLE\n{report.END}\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    with pytest.raises(ValueError, match="section"):
        report.fill_readme(plain, "x")
    assert plain.read_text() == "no markers"


def test_plot_handles_model_lists_and_failed_rows(tmp_path: Path) -> None:
    def row(impl: str, size: str, numel: int, gbps: float | None) -> dict:
        return {"case": "merge_", "impl": impl, "dtype": "fp32", "size": size, "numel": numel, "gbps": gbps}

    rows = [row("copy", "2^10", 2**10, 5.0), row("reference", "2^10", 2**10, 1.0), row("copy", "2^12", 2**12, 9.0),
            row("reference", "2^12", 2**12, None), row("reference", "resnet18", 11_689_512, 2.0),
            row("loop", "resnet18", 11_689_512, 0.5)]  # fmt: skip
    path = tmp_path / "p.png"
    bench.plot(rows, path, "synthetic rows")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_target_misses() -> None:
    # Synthetic rows (not measurements) shaped like a GPU run: the renderer must flag the miss.
    def row(impl: str, kind: str, t: float) -> dict:
        nbytes = 12 * 2**26
        return {"case": "merge_", "op": "merge_", "dtype": "fp32", "size": "2^26", "numel": 2**26, "n_tensors": 4,
                "bytes": nbytes, "bytes_per_element": 12.0, "impl": impl, "kind": kind, "time_s": t,
                "time_min_s": t, "gbps": nbytes / t / 1e9, "peak_extra_bytes": 0, "error": None}  # fmt: skip

    rows = [row("copy", "roofline", 1e-3), row("triton", "fastclu", 1.25e-3), row("cuda", "fastclu", 1.05e-3),
            row("loop", "peer", 4e-3)]  # fmt: skip
    bench._derive(rows)
    assert rows[1]["pct_copy"] == pytest.approx(80.0) and rows[1]["speedup"]["loop"] == pytest.approx(3.2)
    doc = {"schema": 1, "results": rows, "e2e": [], "targets": bench.check_targets(rows),
           "meta": {"device": "synthetic", "date": "2000-01-01T00:00:00+00:00", "command": "x", "torch": "t",
                    "gpu_skipped": False, "repeats": 1, "warmup": 0}}  # fmt: skip
    md = _load_report().render(doc)
    triton_line = next(line for line in md.splitlines() if "| triton |" in line)
    cuda_line = next(line for line in md.splitlines() if "| cuda |" in line)
    assert "**MISS**" in triton_line and "| 80 |" in triton_line and "| 3.20 |" in triton_line
    assert "met" in cuda_line and "MISS" not in cuda_line
    assert "1 met, **1 missed**" in md
