"""`fastclu demo --quick` end to end, and the properties the issue asks the methods to show.

The demo is deterministic for a given seed (every split, initialisation and sampling draws
from its own seeded generator), so these checks are about the methods, not luck. Each
property is computed from the run's own numbers (retrain is trained in the same run).
Properties that do not hold on every seed are marked xfail with the measured numbers, not
hidden.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from fastclu.demo.digits import main, run_demo

SFR_FORGET_TOL = 5.0  # points of forget accuracy from retrain
SFR_KEEP_TOL = 3.0  # points of remain / test accuracy from retrain
CLU_TOL = 5.0  # points from retrain for unlearned sets and learned tasks in the stream


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    assert main(["--quick", "--out", str(out), "--seed", "0", "--no-progress"]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_demo_writes_results_and_figure(demo: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    out, res = demo
    png = (out / "demo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert set(res) == {"unlearning", "sequence", "clu", "meta"}
    assert res["meta"]["quick"] is True and res["meta"]["seed"] == 0
    assert res["meta"]["backend_used"] in ("reference", "triton", "cuda")
    for kind in ("class", "random"):
        rows = res["unlearning"][kind]["rows"]
        assert set(rows) == {"original", "retrain", "FT", "GA", "SalUn", "SFR-on"}
        for name, r in rows.items():
            for k in ("forget_acc", "remain_acc", "test_acc", "mia"):
                assert 0.0 <= r[k] <= 100.0, (kind, name, k)
            assert r["wall_s"] > 0 and r["steps"] > 0
    assert set(res["sequence"]["rows"]) == {"naive", "P&M", "P&M*", "joint"}
    assert len(res["clu"]["history"]) == 5


def test_demo_prints_tables(tmp_path: Path, capsys: pytest.CaptureFixture, demo: tuple[Path, dict]) -> None:
    from fastclu.demo.digits import format_tables

    text = format_tables(demo[1])
    for word in ("SFR-on", "retrain", "P&M", "naive", "joint", "UG-CLU", "avg gap", "MIA"):
        assert word.lower() in text.lower(), word


def test_demo_bad_device_returns_2_and_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--device", "nonsense", "--out", str(tmp_path), "--quick", "--no-progress"]) == 2
    assert "--device" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("argv", [["--backend", "nope"], ["--seed", "x"]])
def test_demo_bad_arguments_exit_2(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--out", str(tmp_path), "--quick", "--no-progress"])
    assert e.value.code == 2
    assert argv[0] in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()


# ---------------------------------------------------------------- the properties


def _sfron_near_retrain(res: dict, kind: str) -> None:
    rows = res["unlearning"][kind]["rows"]
    s, r = rows["SFR-on"], rows["retrain"]
    msg = f"{kind}: SFR-on {s} vs retrain {r}"
    assert abs(s["forget_acc"] - r["forget_acc"]) <= SFR_FORGET_TOL, msg
    assert abs(s["remain_acc"] - r["remain_acc"]) <= SFR_KEEP_TOL, msg
    assert abs(s["test_acc"] - r["test_acc"]) <= SFR_KEEP_TOL, msg


def _sfron_beats(res: dict, kind: str) -> None:
    rows = res["unlearning"][kind]["rows"]
    gaps = {n: rows[n]["avg_gap"] for n in ("SFR-on", "GA", "FT")}
    assert gaps["SFR-on"] < gaps["GA"] and gaps["SFR-on"] < gaps["FT"], f"{kind}: average gaps {gaps}"


def _pnm_above_naive(res: dict) -> None:
    rows = res["sequence"]["rows"]
    got = {n: rows[n]["class_il"]["avg_acc"] for n in ("P&M", "naive")}
    assert got["P&M"] > got["naive"], f"class-incremental average accuracy {got}"


def _clu_at_retrain_level(res: dict) -> None:
    last = res["clu"]["history"][-1]
    u, r = last["ug_clu"], last["retrain"]
    for k in u:
        # Unlearned sets and the learned tasks' test sets, after the whole stream.
        assert not math.isnan(u[k])
        assert abs(u[k] - r[k]) <= CLU_TOL, f"{k}: UG-CLU {u[k]:.1f} vs retrain {r[k]:.1f}"
    forgot = next(h for h in res["clu"]["history"] if h["request"].startswith("unlearn digit"))
    assert forgot["ug_clu"]["forget_acc[unlearn digit 3]"] <= forgot["retrain"]["forget_acc[unlearn digit 3]"] + CLU_TOL


@pytest.mark.parametrize("kind", ["class", "random"])
def test_sfron_near_retrain(demo: tuple[Path, dict], kind: str) -> None:
    _sfron_near_retrain(demo[1], kind)


def test_sfron_beats_ga_and_ft_class(demo: tuple[Path, dict]) -> None:
    _sfron_beats(demo[1], "class")


@pytest.mark.xfail(strict=False, reason=(
    "random 10% forgetting on digits: the original model is already within ~2-7 points of retrain, "
    "the gaps are MIA noise (the SVC MIA-efficacy on near-1 confidences flips between ~0 and ~90); "
    "measured (quick, seed 0, gap with SVC MIA): SFR-on 22.0 vs GA 12.5, FT 23.0"))  # fmt: skip
def test_sfron_beats_ga_and_ft_random(demo: tuple[Path, dict]) -> None:
    _sfron_beats(demo[1], "random")


@pytest.mark.xfail(strict=False, reason=(
    "P&M does not reliably beat naive sequential training from scratch on digits (its closed-form alpha "
    "drops to ~0 on middle tasks, freezing the model); measured class-IL average accuracy P&M vs naive: "
    "quick seed 0 32.6 vs 32.3 (holds), default seeds 0/1/2 22.1 vs 30.3, 23.7 vs 25.2, 24.1 vs 38.4"))  # fmt: skip
def test_pnm_above_naive(demo: tuple[Path, dict]) -> None:
    _pnm_above_naive(demo[1])


def test_clu_stream_forgets_and_keeps(demo: tuple[Path, dict]) -> None:
    _clu_at_retrain_level(demo[1])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_properties_on_more_seeds(seed: int) -> None:
    res = run_demo(seed=seed, quick=True, progress=False)
    _sfron_near_retrain(res, "class")
    _sfron_near_retrain(res, "random")
    _sfron_beats(res, "class")
    _clu_at_retrain_level(res)


@pytest.mark.slow
@pytest.mark.xfail(strict=False, reason=(
    "not on every seed: quick seed 2 P&M 30.7 vs naive 39.4; random-forgetting gaps are within MIA noise"))  # fmt: skip
@pytest.mark.parametrize("seed", [1, 2])
def test_pnm_and_random_gap_on_more_seeds(seed: int) -> None:
    res = run_demo(seed=seed, quick=True, progress=False)
    _pnm_above_naive(res)
    _sfron_beats(res, "random")
