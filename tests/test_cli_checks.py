"""``fastclu demo`` / ``fastclu bench``: bad arguments refused before any work, exit status 2."""

from __future__ import annotations

import os

import pytest

import fastclu
import fastclu.demo
from fastclu import bench
from fastclu.demo import digits, seeds


def _refused(main, argv: list[str], flag: str, capsys: pytest.CaptureFixture, monkeypatch) -> None:
    def no_work(*a, **k):  # the work must not start
        raise AssertionError("work started despite a bad argument")

    monkeypatch.setattr(digits, "run_demo", no_work)
    monkeypatch.setattr(seeds, "run_seeds_demo", no_work)
    monkeypatch.setattr(seeds, "measure_soup_memory", no_work)
    monkeypatch.setattr(fastclu.demo, "digits_main", no_work)
    monkeypatch.setattr(fastclu.demo, "_llm_main", no_work)
    monkeypatch.setattr(bench, "Config", no_work)
    # demo returns 2 (as it did for a bad --device); bench exits 2 like argparse
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--seed", "-1"], "--seed"),
        (["--sfron-clip", "-1"], "--sfron-clip"),
        (["--sfron-clip", "0"], "--sfron-clip"),
        (["--sfron-clip", "nan"], "--sfron-clip"),
        (["--device", "nosuch"], "--device"),
        (["--out", "{file}/sub"], "--out"),
    ],
)
def test_demo_bad_arguments(argv, flag, capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    _refused(digits.main, argv, flag, capsys, monkeypatch)


def test_demo_out_checked_first(tmp_path, capsys, monkeypatch) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    # --out is reported even when another argument is bad too
    _refused(digits.main, ["--out", str(f), "--seed", "-1"], "--out", capsys, monkeypatch)
    assert f.read_text() == "x" and not os.path.isdir(f)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--device", "nosuch"], "--device"),
        (["--ops", ","], "--ops"),
        (["--dtypes", ","], "--dtypes"),
        (["--backends", ""], "--backends"),
        (["--out", "{file}/sub"], "--out"),
    ],
)
def test_bench_bad_arguments(argv, flag, capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    _refused(bench.main, argv, flag, capsys, monkeypatch)


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--seed", "-1"], "--seed"),
        (["--threads", "0"], "--threads"),
        (["--soup-memory", "-1"], "--soup-memory"),
        (["--soup-memory", "1001"], "--soup-memory"),
        (["--out", "{file}/sub"], "--out"),
        (["--out", "{file}/sub", "--seed", "-1"], "--out"),
        (["--backend", "nosuch"], "--backend"),
    ],
)
def test_demo_seeds_bad_arguments(argv, flag, capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    _refused(fastclu.demo.main, ["--scenario", "seeds", *argv], flag, capsys, monkeypatch)


@pytest.mark.parametrize("scenario", ["seeds", "all"])
def test_demo_unusable_backend_refused(scenario, capsys, monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(fastclu, "backends", lambda: {"reference": None, "triton": "no CUDA device", "cuda": "x"})
    argv = ["--scenario", scenario, "--backend", "triton", "--out", str(tmp_path / "o")]
    _refused(fastclu.demo.main, argv, "--backend", capsys, monkeypatch)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("argv", "flag"),
    [(["--seed", "-1"], "--seed"), (["--out", "{file}/sub"], "--out"), (["--backend", "nosuch"], "--backend")],
)
def test_demo_all_bad_arguments(argv, flag, capsys, monkeypatch, tmp_path) -> None:
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{file}", str(tmp_path / "file")) for a in argv]
    _refused(fastclu.demo.main, ["--scenario", "all", *argv], flag, capsys, monkeypatch)


def test_demo_all_needs_transformers(capsys, monkeypatch, tmp_path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a)
    )
    _refused(
        fastclu.demo.main, ["--scenario", "all", "--out", str(tmp_path / "o")], "transformers", capsys, monkeypatch
    )
