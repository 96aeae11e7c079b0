"""``fastclu bench`` in its tiny CPU mode end to end: arguments, JSON fields, GB/s from the byte
table, PNG, report; and the pytest-benchmark suite. These check the harness, not speed."""

from __future__ import annotations

import datetime as dt
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _bench_expect import BF16, DESIGN_FP32, MASKED, ROOT, _load_report

from fastclu import bench


def test_bad_arguments_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for argv, name in [(["--dtypes", "fp64"], "--dtypes"), (["--sizes", "huge"], "--sizes"),
                       (["--ops", "nope"], "--ops"), (["--peers", "numpy"], "--peers"),
                       (["--backends", "tpu"], "--backends"), (["--repeats", "0"], "--repeats")]:  # fmt: skip
        assert bench.main([*argv, "--out", str(tmp_path)]) == 2
        assert name in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_end_to_end_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--ops", "fisher_accumulate_,combine_step_sgd,topk_mask", "--sizes", "8,2^10",
            "--dtypes", "fp32,bf16", "--backends", "reference,triton,cuda", "--warmup", "0", "--repeats", "2",
            "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    before = dt.datetime.now(dt.UTC)
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert "GPU part" in out and "SKIPPED" in out  # forced CPU: the GPU part is said to be skipped

    json_path = next(tmp_path.glob("*.json"))
    png = json_path.with_suffix(".png")
    assert sorted(tmp_path.iterdir()) == [json_path, png]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    img = matplotlib.image.imread(png)
    assert img.shape[0] > 100 and img.shape[1] > 100 and img.std() > 0  # not a blank canvas

    doc = json.loads(json_path.read_text())
    meta = doc["meta"]
    assert doc["schema"] == 1
    assert meta["command"] == "fastclu bench " + shlex.join(argv)
    assert meta["torch"] == torch.__version__ and meta["device_type"] == "cpu" and meta["gpu_skipped"] is True
    assert {"device", "triton", "cuda", "python", "date", "notes", "fastclu_backends"} <= set(meta)
    assert json_path.name == f"cpu-{meta['date'][:10]}.json"
    date = dt.datetime.fromisoformat(meta["date"])
    assert abs((date - before).total_seconds()) < 600
    assert set(meta["skipped_backends"]) == {"triton", "cuda"}

    res = doc["results"]
    assert [r for r in res if r["error"]] == []
    groups: dict[tuple, list[dict]] = {}
    for r in res:
        groups.setdefault((r["case"], r["dtype"], r["size"]), []).append(r)
    assert len(groups) == 3 * 2 * 2
    for (case, dtype, size), rows in groups.items():
        impls = {r["impl"] for r in rows}
        assert impls == {"copy", "reference", *(set(bench.CASES[case].peers) - {"compile"})}
        shapes = bench.size_shapes(size)
        numel = sum(math.prod(s) for s in shapes)
        per = (DESIGN_FP32 if dtype == "fp32" else BF16)[case]
        masks = sum((math.prod(s) + 7) // 8 for s in shapes) if case in MASKED else 0
        copy = next(r for r in rows if r["impl"] == "copy")
        own = next(r for r in rows if r["impl"] == "reference")
        for r in rows:
            assert r["numel"] == numel == 2 ** int(size[2:])
            assert r["bytes"] == per * numel + masks
            assert r["time_s"] > 0 and r["time_min_s"] <= r["time_s"]
            assert r["gbps"] == pytest.approx(r["bytes"] / r["time_s"] / 1e9, rel=1e-12)
            assert r["pct_copy"] == pytest.approx(100 * r["gbps"] / copy["gbps"], rel=1e-12)
        for r in rows:
            if r["kind"] == "peer":
                assert own["speedup"][r["impl"]] == pytest.approx(r["time_s"] / own["time_s"], rel=1e-12)
    assert doc["targets"] == []  # the reference backend carries no target, and no size reaches 2^26

    e2e = doc["e2e"]
    assert [r["name"] for r in e2e] == ["sfr_on_forget_iter"] * 2 + ["pm_step"] * 2
    assert [r["impl"].startswith("fastclu") and r["impl"].endswith("[reference]") for r in e2e] == [True, False] * 2
    assert e2e[1]["impl"].startswith("torch.optim") and e2e[3]["impl"].startswith("torch.optim")
    assert e2e[0]["iteration_s"] > 0 and e2e[1]["iteration_s"] > 0
    assert all(r["error"] is None and r["optimizer_s"] > 0 for r in e2e)
    assert e2e[0]["speedup_optimizer"] == pytest.approx(e2e[1]["optimizer_s"] / e2e[0]["optimizer_s"])

    md = _load_report().render(doc)
    assert "GPU part was skipped" in md
    for case in ("fisher_accumulate_", "combine_step_sgd", "topk_mask"):
        assert f"`{case}`" in md
    assert "| dtype | size | impl | time | GB/s | % copy |" in md and "End to end" in md


@pytest.mark.slow  # a second interpreter importing torch: ~10-30 s on a loaded 2-core machine
def test_pytest_benchmark_suite_runs_in_cpu_mode() -> None:
    cmd = [sys.executable, "-m", "pytest", "benchmarks", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
           "--bench-ops", "restore_,combine_step_adamw", "--bench-dtypes", "fp32"]  # fmt: skip
    proc = subprocess.run(cmd, check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout


def test_runs_of_the_same_day_do_not_overwrite(tmp_path: Path) -> None:
    argv = ["--ops", "restore_", "--sizes", "4", "--dtypes", "fp32", "--peers", "none", "--no-e2e", "--no-plot",
            "--repeats", "1", "--warmup", "0", "--device", "cpu", "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(argv) == 0 and bench.main(argv) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert len(names) == 2 and names[0].endswith("-2.json") != names[1].endswith("-2.json")
    docs = [json.loads((tmp_path / n).read_text()) for n in names]
    assert all([r["impl"] for r in d["results"]] == ["copy", "reference"] for d in docs)
