"""The seeds demo runs end to end in quick mode and writes its JSON."""

from __future__ import annotations

import json

from fastclu.demo import seeds


def test_quick_demo_writes_tables_and_json(tmp_path, capsys) -> None:
    assert seeds.main(["--seed", "1", "--quick", "--out", str(tmp_path)]) == 0
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
