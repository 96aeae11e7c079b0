"""``fastclu bench --host``: JSON structure and launch counts (stubbed launches), no timing asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fastclu import bench
from fastclu.bench import host


def test_host_json_rows_and_launch_counts(tmp_path: Path) -> None:
    path = tmp_path / "host.json"
    argv = ["--host", "--host-shapes", "tiny200", "--host-cases", "adamw,masked_clipped_2role,perturb_restore",
            "--warmup", "0", "--repeats", "1", "--device", "cpu", "--json", str(path)]  # fmt: skip
    assert bench.main(argv) == 0
    doc = json.loads(path.read_text())
    assert doc["kind"] == "host" and "REAL CPU step" in doc["note"] and "stubbed" in doc["note"]
    assert doc["meta"]["command"].startswith("fastclu bench --host")
    rows = doc["rows"]
    assert [r for r in rows if r["error"]] == []
    for r in rows:
        assert {"case", "impl", "shapes", "us_per_step", "launches"} <= set(r)
        assert r["shapes"] == "tiny200" and r["n_tensors"] == 200 and r["us_per_step"] > 0
    fastclu_rows = [r for r in rows if r["impl"].startswith("fastclu")]
    assert {r["case"] for r in fastclu_rows} == {"adamw", "masked_clipped_2role", "perturb_restore"}
    assert all(r["launches"] > 0 for r in fastclu_rows)  # the stub saw the kernel launches
    torch_rows = {(r["case"], r["impl"]) for r in rows if r["impl"].startswith("torch")}
    assert torch_rows == {("adamw", "torch_fused"), ("adamw", "torch_foreach")}
    base = next(r for r in rows if r["impl"] == "torch_fused")
    assert base["vs_torch_fused_adamw"] == pytest.approx(1.0)


def test_stubs_are_removed_after_the_block() -> None:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    try:
        import fastclu._C as ext
    except ImportError:  # built without the extension: only the triton stubs apply
        ext = None
    before = (JITFunction.run, InterpretedFunction.run, getattr(ext, "combine_step", None))
    with host.stubbed_launches() as counter:
        assert JITFunction.run is not before[0] and InterpretedFunction.run is not before[1]
        if ext is not None:
            assert ext.combine_step(1, 2, 3) is None and counter.count == 1
    assert (JITFunction.run, InterpretedFunction.run, getattr(ext, "combine_step", None)) == before


def test_host_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    for argv, name in [(["--host-cases", "lion"], "--host-cases"), (["--host-shapes", "bert"], "--host-shapes"),
                       (["--repeats", "0"], "--repeats")]:  # fmt: skip
        assert bench.main(["--host", *argv, "--json", str(tmp_path / "x.json")]) == 2
        assert name in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
