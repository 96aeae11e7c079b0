"""``fastclu demo --scenario llm --quick``: runs end to end, writes results.json and the plot."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

from fastclu.demo import main
from fastclu.demo.llm import make_facts


@pytest.fixture
def one_thread():
    old = torch.get_num_threads()  # main() sets --threads (default 1); restore it afterwards
    yield
    torch.set_num_threads(old)


def test_facts_are_made_by_the_seed() -> None:
    a, b, c = make_facts(30, 5, 1), make_facts(30, 5, 1), make_facts(30, 5, 2)
    assert a["statements"] == b["statements"] and a["statements"] != c["statements"]
    assert len(a["statements"]) == 70 and len(set(a["entities"])) == 35
    tok = a["tokenizer"]
    text = a["statements"][0][1]
    assert [tok.vocab[i] for i in tok.encode(text)] == ["<bos>", *text.split()]


def test_llm_demo_quick_writes_results_and_plot(tmp_path, capsys, one_thread) -> None:
    assert main(["--scenario", "llm", "--quick", "--seed", "3", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "llm.png").stat().st_size > 1000
    assert res["scenario"] == "llm" and res["seed"] == 3 and res["quick"]
    assert list(res["rows"]) == ["original", "retrain", "GA", "GradDiff", "NPO", "SFR-on"]
    n_forget = res["sizes"]["forget"]
    assert n_forget == 2 * round(0.1 * res["settings"]["entities"])
    for name, row in res["rows"].items():
        for k in ("forget_acc", "retain_acc", "heldout_acc", "mia"):
            assert 0.0 <= row[k] <= 100.0, (name, k)
        assert row["forget_loss"] > 0 and row["heldout_loss"] > 0 and row["time_ratio"] > 0
    assert res["rows"]["retrain"]["time_ratio"] == 1.0
    assert 0.0 < res["info"]["SFR-on"]["mask_density"] < 1.0
    out = capsys.readouterr().out
    assert "| SFR-on |" in out and "results.json" in out


def test_unknown_scenario_is_refused(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--scenario", "mnist"])
    assert "--scenario" in capsys.readouterr().err
