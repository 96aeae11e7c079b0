"""The seeds demo runs end to end in quick mode and writes its JSON."""

from __future__ import annotations

import json

import pytest

import fastclu.demo
from fastclu import cli
from fastclu.demo import seeds


def test_quick_demo_writes_tables_and_json(tmp_path, capsys) -> None:
    # through the command line, as a user runs it: fastclu demo --scenario seeds
    assert cli.main(["demo", "--scenario", "seeds", "--seed", "1", "--quick", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for title in ("LoRA adaptation", "Soups of K=4", "Continual learning from scratch", "P&M-LoRA", "MEHL-Soup+"):
        assert title in out
    res = json.loads((tmp_path / "seeds_seed1.json").read_text())
    assert set(res["lora_adaptation"]["rows"]) == {"LoRA", "Flat-LoRA rho=0.05", "Flat-LoRA rho=0.2 (option)"}
    soups = res["soups"]["rows"]
    assert soups["MEHL-Soup"]["peak_held_MB"] <= soups["MEHL-Soup"]["all_loaded_MB"]
    for key in ("continual", "lora_continual"):
        for row in res[key]["rows"].values():
            assert len(row["matrix"]) == 5
    assert res["torch_threads"] == 1
    assert res["backend"] == "automatic" and res["quick"] and res["seed"] == 1


def test_seeds_scenario_defaults_and_backend_scope(tmp_path, monkeypatch, capsys) -> None:
    seen = {}

    def fake_run(*, seed, quick, threads):
        from fastclu._registry import current_backend

        seen.update(seed=seed, quick=quick, threads=threads, backend=current_backend())
        return {"fake": True}

    monkeypatch.setattr(seeds, "run_seeds_demo", fake_run)
    monkeypatch.setattr(seeds, "format_tables", lambda res: "tables")
    monkeypatch.chdir(tmp_path)
    assert fastclu.demo.main(["--scenario", "seeds", "--seed", "4", "--threads", "2", "--backend", "reference"]) == 0
    assert seen == {"seed": 4, "quick": False, "threads": 2, "backend": "reference"}
    # fastclu demo writes by default (./fastclu-demo-seeds), as the other scenarios do
    res = json.loads((tmp_path / "fastclu-demo-seeds" / "seeds_seed4.json").read_text())
    assert res == {"fake": True, "backend": "reference"}
    # python -m fastclu.demo.seeds keeps its behaviour: no file without --out
    assert seeds.main(["--seed", "5"]) == 0
    assert not (tmp_path / "seeds_seed5.json").exists() and len(list(tmp_path.iterdir())) == 1


def test_all_runs_every_scenario_into_subdirectories(tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("transformers")
    calls = []
    monkeypatch.setattr(fastclu.demo, "digits_main", lambda argv: calls.append(("digits", argv)) or 0)
    monkeypatch.setattr(fastclu.demo, "_seeds_main", lambda argv: calls.append(("seeds", argv)) or 0)
    monkeypatch.setattr(fastclu.demo, "_llm_main", lambda argv: calls.append(("llm", argv)) or 0)
    out = str(tmp_path / "o")
    assert fastclu.demo.main(["--scenario", "all", "--quick", "--seed", "2", "--out", out, "--no-progress"]) == 0
    assert [n for n, _ in calls] == ["digits", "seeds", "llm"]
    for name, argv in calls:
        assert argv[-2:] == ["--out", f"{out}/{name}"] and argv[:3] == ["--seed", "2", "--quick"]
    assert "--no-progress" in calls[0][1] and "--no-progress" not in calls[1][1]
    # a failing scenario stops the run with its exit code
    calls.clear()
    monkeypatch.setattr(fastclu.demo, "_seeds_main", lambda argv: calls.append(("seeds", argv)) or 3)
    assert fastclu.demo.main(["--scenario", "all", "--quick", "--out", out]) == 3
    assert [n for n, _ in calls] == ["digits", "seeds"]
