"""The end-to-end masked clipped 2-role AdamW case: its peers make the same steps as fastclu's,
and it runs through the op grid (``fastclu bench --ops combine_step_adamw_masked_clipped``)."""

from __future__ import annotations

import pytest
import torch

from fastclu import bench
from fastclu.bench.runner import Config, run_ops

CASE = "combine_step_adamw_masked_clipped"


@pytest.mark.parametrize("peer", ["loop", "foreach"])
def test_peers_make_the_same_steps_as_fastclu(peer: str) -> None:
    c = bench.CASES[CASE]
    shapes = bench.split_shapes(1000)
    seed = int(torch.randint(0, 2**31, ()))
    torch.manual_seed(seed)
    d_ref = c.make(shapes, torch.float32, torch.device("cpu"))
    torch.manual_seed(seed)
    d_peer = c.make(shapes, torch.float32, torch.device("cpu"))
    before = [p.detach().clone() for p in d_ref["params"]]
    ours, theirs = c.fastclu(d_ref, "reference"), c.peers[peer](d_peer)
    for _ in range(3):
        ours()
        theirs()
    for p, q, b in zip(d_ref["params"], d_peer["params"], before):
        assert not torch.equal(p, b)  # the step moved the weights
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-7)
    # the inputs a step reads are left as they were (the next timed call sees the same data)
    torch.manual_seed(seed)
    fresh = c.make(shapes, torch.float32, torch.device("cpu"))
    for k in ("grads", "grads_forget"):
        assert all(torch.equal(x, y) for x, y in zip(d_ref[k], fresh[k])), k


def test_the_clip_is_active_in_the_case() -> None:
    # Otherwise the case would time an unclipped step.
    c = bench.CASES[CASE]
    d = c.make(bench.split_shapes(1000), torch.float32, torch.device("cpu"))
    from fastclu.bench.cases.combine_step_ import CLIP, COEF_FORGET

    g = [COEF_FORGET * torch.where(m, f, 0.0) + r for f, r, m in zip(d["grads_forget"], d["grads"], d["bool"])]
    assert float(torch.sqrt(sum((x.double() ** 2).sum() for x in g))) > CLIP


def test_the_case_runs_in_the_op_grid() -> None:
    cfg = Config(cases=[CASE], sizes=["2^10"], dtypes=["fp32"], backends=["reference"], peers=["loop", "foreach",
                 "torch_fused"], device=torch.device("cpu"), warmup=1, repeats=2, e2e=False, quick=True)  # fmt: skip
    rows = run_ops(cfg, log=lambda _: None)
    assert {r["impl"] for r in rows} == {"copy", "reference", "loop", "foreach", "torch_fused"}
    assert [r for r in rows if r["error"]] == []
    own = next(r for r in rows if r["impl"] == "reference")
    assert own["bytes"] == bench.case_bytes(CASE, bench.size_shapes("2^10"), torch.float32)
    assert set(own["speedup"]) == {"loop", "foreach", "torch_fused"}
