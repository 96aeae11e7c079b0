"""The benchmark harness in its tiny CPU mode: byte budgets, shape lists, peers' math, the CLI
end to end (JSON fields, GB/s from the byte table, PNG), the report, and the pytest-benchmark suite.

These check the harness, not speed: no timing is asserted.
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastclu import bench
from fastclu.ops.bits import unpack_bits

ROOT = Path(__file__).resolve().parents[1]

# DESIGN §3, fp32 bytes per element (R = 2 for gram and the masked step, R = 1 for the plain steps;
# 16 for perturb_: the upper end of its 12-16 range, anchor read / row-norm pass included).
DESIGN_FP32 = {
    "fisher_accumulate_": 12, "ratio_mask": 8, "topk_mask": 8, "gram": 4 * 2,
    "combine_step_sgd": 4 * 1 + 16, "combine_step_sgd_masked": 4 * 2 + 16, "combine_step_adamw": 4 * 1 + 24,
    "lerp_sync_": 16, "perturb_anchor": 16, "perturb_noise": 16, "restore_": 8, "fd_hvp_": 12,
    "merge_stats": 16, "merge_": 12,
}  # fmt: skip
MASKED = {"ratio_mask", "topk_mask", "gram", "combine_step_sgd_masked"}
# bf16 parameters/grads with fp32 state, derived by hand from the tensors each op touches.
BF16 = {"fisher_accumulate_": 2 + 8, "combine_step_sgd": 2 + 4 + 8, "combine_step_adamw": 2 + 4 + 16,
        "topk_mask": 2 + 2, "lerp_sync_": 8 + 4, "merge_stats": 4 + 8}  # fmt: skip


def _load_report():
    spec = importlib.util.spec_from_file_location("fastclu_bench_report", ROOT / "benchmarks" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_traffic_table_matches_design() -> None:
    assert set(bench.TRAFFIC) == set(DESIGN_FP32) == set(bench.CASES)
    for case, want in DESIGN_FP32.items():
        mask = 1 / 8 if case in MASKED else 0
        assert bench.bytes_per_element(case, torch.float32) == pytest.approx(want + mask), case
    for case, want in BF16.items():
        mask = 1 / 8 if case in MASKED else 0
        assert bench.bytes_per_element(case, torch.bfloat16) == pytest.approx(want + mask), case
    with pytest.raises(ValueError, match="case"):
        bench.bytes_per_element("not_an_op", torch.float32)
    # Packed masks round up per tensor: 3 tensors of 9 elements hold 3 * 2 mask bytes.
    assert bench.case_bytes("ratio_mask", [(9,), (3, 3), (9, 1)], torch.float32) == 3 * (9 * 8 + 2)


def test_every_op_of_the_contract_is_benchmarked() -> None:
    from fastclu import ops

    public = {n for n in ops.__all__ if n not in ("pack_bits", "unpack_bits", "count_bits", "packed_numel")}
    assert public == {c.op for c in bench.CASES.values()}


def test_model_shape_lists_have_the_published_sizes() -> None:
    count = {name: sum(math.prod(s) for s in fn()) for name, fn in bench.MODEL_SHAPES.items()}
    # torchvision resnet18 / vit_b_16 and Hugging Face gpt2 (tied LM head) parameter counts.
    assert count == {"resnet18": 11_689_512, "vit_b16": 86_567_656, "gpt2_124m": 124_439_808}
    # The e2e network is an independent formulation (nn.Module) of the same architecture.
    for width in (4, 64):
        model_shapes = [tuple(p.shape) for p in bench.ResNet18(10, width).parameters()]
        assert model_shapes == bench.resnet18_shapes(10, width, stem="cifar")


@pytest.mark.parametrize("numel", [1, 7, 1000, 2**16, 2**20 + 3])
def test_split_shapes(numel: int) -> None:
    shapes = bench.split_shapes(numel)
    assert sum(math.prod(s) for s in shapes) == numel
    assert all(len(s) == 2 and min(s) > 0 for s in shapes)
    if numel >= 8:
        assert len(shapes) == 4


def _outputs(case: str, d: dict, result: object, impl: str) -> list[torch.Tensor]:
    """What a call of ``case`` produced, as a flat list of float64 tensors (masks as 0/1)."""
    shapes = d["shapes"]
    if case in ("ratio_mask", "topk_mask"):
        if impl == "reference":
            result = [unpack_bits(m, math.prod(s), s) for m, s in zip(result, shapes)]
        return [r.reshape(s).double() for r, s in zip(result, shapes)]
    if case in ("gram", "merge_stats"):
        return [torch.as_tensor(x).double() for x in (result if isinstance(result, tuple) else (result,))]
    keys = {
        "fisher_accumulate_": ["fisher"], "combine_step_sgd_masked": ["params", "buf"], "lerp_sync_": ["slow", "fast"],
        "perturb_anchor": ["params", "backup"], "restore_": ["params"], "fd_hvp_": ["out"], "merge_": ["params"],
    }[case]  # fmt: skip
    return [t.double() for k in keys for t in d[k]]


PEER_CHECKS = [
    (case, peer)
    for case in ["fisher_accumulate_", "ratio_mask", "topk_mask", "gram", "combine_step_sgd_masked", "lerp_sync_",
                 "perturb_anchor", "restore_", "fd_hvp_", "merge_stats", "merge_"]
    for peer in bench.CASES[case].peers
    if peer != "compile"
]  # fmt: skip


@pytest.mark.parametrize(("case", "peer"), PEER_CHECKS)
def test_peers_compute_the_same_math_as_the_reference(case: str, peer: str) -> None:
    # A peer doing other (or less) work would make every speed-up over it meaningless.
    c = bench.CASES[case]
    shapes = bench.split_shapes(1000)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    d_ref = c.make(shapes, torch.float32, torch.device("cpu"))
    torch.manual_seed(seed)
    d_peer = c.make(shapes, torch.float32, torch.device("cpu"))
    # Same seed, same data; fresh data each run (the conftest seed changes per run).
    for a, b in zip(d_ref.values(), d_peer.values()):
        if isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)
    got_ref = _outputs(case, d_ref, c.fastclu(d_ref, "reference")(), "reference")
    got_peer = _outputs(case, d_peer, c.peers[peer](d_peer)(), peer)
    assert len(got_ref) == len(got_peer) > 0
    for x, y in zip(got_ref, got_peer):
        assert not torch.isnan(x).any()
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_check_targets_marks_misses() -> None:
    def row(impl: str, size: str, numel: int, pct: float | None) -> dict:
        return {"kind": "fastclu", "impl": impl, "size": size, "numel": numel, "pct_copy": pct,
                "case": "merge_", "dtype": "fp32"}  # fmt: skip

    rows = [row("triton", "2^26", 2**26, 91.0), row("cuda", "2^28", 2**28, 89.9), row("triton", "2^24", 2**24, 10.0),
            row("triton", "gpt2_124m", 124_439_808, 74.0), row("cuda", "resnet18", 11_689_512, 80.0),
            row("reference", "2^28", 2**28, 5.0), row("triton", "2^26", 2**26, None)]  # fmt: skip
    got = [(t["impl"], t["size"], t["target_pct"], t["met"]) for t in bench.check_targets(rows)]
    assert got == [("triton", "2^26", 90.0, True), ("cuda", "2^28", 90.0, False), ("triton", "gpt2_124m", 75.0, False),
                   ("cuda", "resnet18", 75.0, True), ("triton", "2^26", 90.0, False)]  # fmt: skip


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


def test_report_fills_readme_section(tmp_path: Path) -> None:
    report = _load_report()
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.fill_readme(readme, "NEW TABLE")
    assert readme.read_text() == f"intro\n{report.START}\nNEW TABLE\n{report.END}\noutro\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers")
    with pytest.raises(ValueError, match="section"):
        report.fill_readme(plain, "x")
    assert plain.read_text() == "no markers"


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


def test_plot_handles_model_lists_and_failed_rows(tmp_path: Path) -> None:
    def row(impl: str, size: str, numel: int, gbps: float | None) -> dict:
        return {"case": "merge_", "impl": impl, "dtype": "fp32", "size": size, "numel": numel, "gbps": gbps}

    rows = [row("copy", "2^10", 2**10, 5.0), row("reference", "2^10", 2**10, 1.0), row("copy", "2^12", 2**12, 9.0),
            row("reference", "2^12", 2**12, None), row("reference", "resnet18", 11_689_512, 2.0),
            row("loop", "resnet18", 11_689_512, 0.5)]  # fmt: skip
    path = tmp_path / "p.png"
    bench.plot(rows, path, "synthetic rows")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_shows_target_misses() -> None:
    # Synthetic rows (not measurements) shaped like a GPU run: the renderer must flag the miss.
    def row(impl: str, kind: str, t: float) -> dict:
        nbytes = 12 * 2**26
        return {"case": "merge_", "op": "merge_", "dtype": "fp32", "size": "2^26", "numel": 2**26, "n_tensors": 4,
                "bytes": nbytes, "bytes_per_element": 12.0, "impl": impl, "kind": kind, "time_s": t,
                "time_min_s": t, "gbps": nbytes / t / 1e9, "peak_extra_bytes": 0, "error": None}  # fmt: skip

    rows = [row("copy", "roofline", 1e-3), row("triton", "fastclu", 1.25e-3), row("cuda", "fastclu", 1.05e-3),
            row("loop", "peer", 4e-3)]  # fmt: skip
    bench._derive(rows)
    assert rows[1]["pct_copy"] == pytest.approx(80.0) and rows[1]["speedup"]["loop"] == pytest.approx(3.2)
    doc = {"schema": 1, "results": rows, "e2e": [], "targets": bench.check_targets(rows),
           "meta": {"device": "synthetic", "date": "2000-01-01T00:00:00+00:00", "command": "x", "torch": "t",
                    "gpu_skipped": False, "repeats": 1, "warmup": 0}}  # fmt: skip
    md = _load_report().render(doc)
    triton_line = next(line for line in md.splitlines() if "| triton |" in line)
    cuda_line = next(line for line in md.splitlines() if "| cuda |" in line)
    assert "**MISS**" in triton_line and "| 80 |" in triton_line and "| 3.20 |" in triton_line
    assert "met" in cuda_line and "MISS" not in cuda_line
    assert "1 met, **1 missed**" in md


@pytest.mark.parametrize("case", ["combine_step_sgd", "combine_step_adamw"])
def test_torch_optim_peers_use_the_same_hyperparameters(case: str) -> None:
    # The torch.optim peers build their own tensors; check on shared data that the fastclu call of
    # the case and torch.optim with the peers' settings make the same step.
    c = bench.CASES[case]
    d = c.make(bench.split_shapes(1000), torch.float32, torch.device("cpu"))
    params = [p.clone().requires_grad_(True) for p in d["params"]]
    for p, g in zip(params, d["grads"]):
        p.grad = g.clone()
    if case == "combine_step_sgd":
        opt = torch.optim.SGD(params, lr=bench.LR, momentum=bench.MOMENTUM, weight_decay=bench.WD, foreach=False)
        for p, b in zip(params, d["buf"]):
            opt.state[p]["momentum_buffer"] = b.clone()
        state_keys = ["buf"]
    else:
        opt = torch.optim.AdamW(params, lr=bench.ADAM_LR, betas=bench.BETAS, eps=bench.ADAM_EPS,
                                weight_decay=bench.ADAM_WD, foreach=False)  # fmt: skip
        for p, m, v, s in zip(params, d["exp_avg"], d["exp_avg_sq"], d["step"]):
            opt.state[p].update(exp_avg=m.clone(), exp_avg_sq=v.clone(), step=s.clone())
        state_keys = ["exp_avg", "exp_avg_sq"]
    opt.step()
    c.fastclu(d, "reference")()
    for p, q in zip(d["params"], params):
        torch.testing.assert_close(p, q.detach(), rtol=1e-6, atol=1e-7)
    torch_key = {"buf": "momentum_buffer"}
    for k in state_keys:
        for mine, p in zip(d[k], params):
            torch.testing.assert_close(mine, opt.state[p][torch_key.get(k, k)], rtol=1e-6, atol=1e-7)


def _twin_params(shapes: list[tuple[int, ...]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    a = bench._leaf_params(shapes, torch.float32, torch.device("cpu"))
    b = [p.detach().clone().requires_grad_(True) for p in a]
    for p, q in zip(a, b):
        p.grad.mul_(100.0)  # large enough that the clip at 7 is active
        q.grad = p.grad.clone()
    return a, b


def test_e2e_sfr_on_sides_make_the_same_step() -> None:
    shapes = bench.resnet18_shapes(10, 4, stem="cifar")
    mine, theirs = _twin_params(shapes)
    masks = [torch.rand(s) < 0.5 for s in shapes]
    total = torch.cat([(bench.SFR_ALPHA * g * m).reshape(-1) for g, m in zip([p.grad for p in mine], masks)]).norm()
    assert total > bench.SFR_CLIP  # the clip path is exercised
    bench.sfr_on_fastclu_step(mine, masks, "reference")()
    bench.sfr_on_torch_step(theirs, masks)()
    for p, q in zip(mine, theirs):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_e2e_pm_sides_make_the_same_step() -> None:
    shapes = bench.gpt2_shapes(vocab=50, ctx=8, dim=16, depth=1)
    mine, theirs = _twin_params(shapes)
    start = [p.detach().clone() for p in mine]
    f_step, t_step = bench.pm_fastclu_step(mine, "reference"), bench.pm_torch_step(theirs)
    for _ in range(2):
        f_step()
        t_step()
    for p, q, s in zip(mine, theirs, start):
        assert not torch.equal(p.detach(), s)
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
