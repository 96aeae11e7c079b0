"""``fastclu info`` reports which optional extras (pyproject's triton / demo / hf) are installed."""

from __future__ import annotations

import importlib
import importlib.util

import pytest

from fastclu import cli


def test_info_lists_extras_as_installed_here() -> None:
    # The test extra brings every other extra's packages, so all import here.
    for mods in (("sklearn", "matplotlib"), ("transformers", "peft", "accelerate")):
        for m in mods:
            importlib.import_module(m)
    extras = cli.collect_info()["extras"]
    assert set(extras) == {"triton", "demo", "hf"}
    assert extras["demo"] == [] and extras["hf"] == []


def test_info_names_a_missing_extra(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert cli.collect_info()["extras"]["hf"] == ["peft"]
    assert cli.main(["info"]) == 0
    (line,) = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("extras")]
    assert "hf: missing peft (pip install 'fastclu[hf]')" in line and "demo: installed" in line
