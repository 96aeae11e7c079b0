"""The verification record and the automatic backend choice it drives on CUDA tensors."""

from __future__ import annotations

import pytest

from fastclu import _registry, _verification, cli
from fastclu._verification import EVIDENCE, Evidence, auto_order


def test_every_kernel_backend_has_a_record() -> None:
    assert set(EVIDENCE) == set(_registry.BACKENDS) - {"reference"}
    for name, ev in EVIDENCE.items():
        assert ev.cpu, f"{name}: say what checks it without a GPU"


def test_no_backend_claims_a_gpu_run_yet() -> None:
    # Edit this test together with the record once a GPU run has verified a backend.
    assert all(ev.gpu is None for ev in EVIDENCE.values())


def test_unverified_backends_rank_by_cpu_evidence() -> None:
    assert auto_order(("triton", "cuda")) == ["cuda", "triton"]


def test_a_gpu_verified_backend_comes_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(EVIDENCE, "triton", Evidence(gpu="suite on an H100", cpu="interpreter", strength=0))
    assert auto_order(("cuda", "triton")) == ["triton", "cuda"]


def test_automatic_choice_on_cuda_tensors_follows_the_record(monkeypatch: pytest.MonkeyPatch) -> None:
    for b in ("cuda", "triton"):
        monkeypatch.setitem(_registry._loaded, b, None)  # both usable, whatever this machine has
    monkeypatch.setitem(_registry._impls, "fake_op", {"cuda": print, "triton": print})
    assert _registry._auto("fake_op", "cuda") == "cuda"
    monkeypatch.setitem(EVIDENCE, "triton", Evidence(gpu="suite on an H100", cpu="interpreter", strength=0))
    assert _registry._auto("fake_op", "cuda") == "triton"
    assert _registry._auto("fake_op", "cpu") == "reference"


def test_info_reports_the_record() -> None:
    info = cli.collect_info()
    assert info["verification"] == _verification.summary()
    text = cli.format_info(info)
    assert "verified on a GPU" in text and "not yet" in text
