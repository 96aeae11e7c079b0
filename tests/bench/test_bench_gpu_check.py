"""benchmarks/gpu_check.{sh,py}, the prepared GPU run, on the CPU: the plan (dry run), the phase
runner (ok, failure, timeout, missing tool, budget), and the Python phases at tiny sizes, so the
script cannot rot before a GPU is lent. No GPU number is produced here."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = ["env", "build", "info", "tests_gpu_triton", "tests_gpu_cuda", "bench_ops", "steps", "bench_topk",
          "bench_e2e", "rebuilds", "host", "sanitizer_memcheck", "sanitizer_racecheck", "tests_gpu_large"]  # fmt: skip


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("fastclu_gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def test_dry_run_prints_every_phase(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(tmp_path)],
                          check=False, capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for name in PHASES:
        assert f"[dry-run] {name} " in proc.stdout
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["dry_run"] is True and [p["name"] for p in doc["phases"]] == PHASES
    assert {p["status"] for p in doc["phases"]} == {"dry-run"}
    assert doc["budget_s"] <= 480  # the 8-minute wall of issue 19
    build = next(p for p in doc["phases"] if p["name"] == "build")
    assert "build_ext --inplace" in build["command"] and "pip" not in build["command"]


def test_phase_runner_statuses(gc, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    py = sys.executable
    ok = gc.run_phase(gc.Phase("ok", [py, "-c", "print('hello')"], 30), tmp_path, 30)
    assert ok["status"] == "ok" and ok["returncode"] == 0
    assert "hello" in (tmp_path / ok["log"]).read_text()
    bad = gc.run_phase(gc.Phase("bad", [py, "-c", "raise SystemExit(3)"], 30), tmp_path, 30)
    assert bad["status"] == "failed" and bad["returncode"] == 3
    slow = gc.run_phase(gc.Phase("slow", [py, "-c", "import time; time.sleep(60)"], 60), tmp_path, 1)
    assert slow["status"] == "timeout" and slow["seconds"] < 30
    missing = gc.run_phase(gc.Phase("m", ["x"], 5, needs="no-such-tool-fastclu"), tmp_path, 5)
    assert missing["status"] == "skipped" and "no-such-tool-fastclu" in missing["reason"]


def test_spent_budget_skips_later_phases_and_still_writes_the_summary(gc, tmp_path: Path) -> None:
    assert gc.main(["run", str(tmp_path), "--budget", "1"]) == 0
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert [p["name"] for p in doc["phases"]] == PHASES
    assert all(p["status"] == "skipped" and "budget" in p["reason"] for p in doc["phases"])
    assert gc.main(["run", str(tmp_path), "--only", "nope"]) == 2


def test_rebuild_counter_sees_table_builds(gc, tmp_path: Path) -> None:
    out = tmp_path / "rebuilds.json"
    argv = ["rebuilds", "--device", "cpu", "--backends", "triton", "--steps", "2", "--stash-every", "2"]
    assert gc.main([*argv, "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert row["found_builder"] is True and row["steps"] == 2
    assert all(v >= 0 for v in row["table_builds"].values())
    # after the warm-up no stable table is rebuilt: moved gradients only re-upload pointers
    assert sum(row["table_builds"].values()) == 0 and row["table_stats"]["builds"] == 0
    assert row["table_stats"]["hits"] > 0 and row["table_stats"]["pointer_uploads"] > 0
    # The counter counts: a fresh parameter set must build at least one table.
    with gc.count_calls(gc.TABLE_BUILDERS["triton"]) as counts:
        gc.training_run("triton", 0, "cpu", stash_every=1)
    assert sum(counts.values()) > 0


def test_junit_counts_and_written_files(gc, tmp_path: Path) -> None:
    (tmp_path / "logs").mkdir()
    test_file = tmp_path / "test_gc_tiny_sample.py"
    test_file.write_text("def test_ok():\n    pass\n\ndef test_bad():\n    assert 1 == 2\n")
    xml = tmp_path / "t.xml"
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test_file), f"--junitxml={xml}"]
    rec = gc.run_phase(gc.Phase("t", argv, 60, outputs=["t.xml"]), tmp_path, 60)
    assert rec["status"] == "failed" and rec["files"] == ["t.xml"]
    assert {k: rec["junit"][k] for k in ("tests", "failures", "errors")} == {"tests": 2, "failures": 1, "errors": 0}
    assert len(rec["junit"]["failed_ids"]) == 1 and rec["junit"]["failed_ids"][0].endswith("::test_bad")
