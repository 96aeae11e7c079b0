"""One case per op, and every peer computes the same math as the fastclu call it is timed against."""

from __future__ import annotations

import math

import pytest
import torch

from fastclu import bench
from fastclu.ops.bits import unpack_bits


def test_every_op_of_the_contract_is_benchmarked() -> None:
    from fastclu._registry import OPS

    public = set(OPS)  # every registered multi-tensor op
    assert public == {c.op for c in bench.CASES.values()}


def _outputs(case: str, d: dict, result: object, impl: str) -> list[torch.Tensor]:
    """What a call of ``case`` produced, as a flat list of float64 tensors (masks as 0/1)."""
    shapes = d["shapes"]
    if case in ("ratio_mask", "topk_mask"):
        if impl == "reference":
            result = [unpack_bits(m, math.prod(s), s) for m, s in zip(result, shapes)]
        return [r.reshape(s).double() for r, s in zip(result, shapes)]
    if case in ("gram", "merge_stats", "soup_coef_grads"):
        return [torch.as_tensor(x).double() for x in (result if isinstance(result, tuple) else (result,))]
    keys = {
        "fisher_accumulate_": ["fisher"], "combine_step_sgd_masked": ["params", "buf"], "lerp_sync_": ["slow", "fast"],
        "perturb_anchor": ["params", "backup"], "restore_": ["params"], "fd_hvp_": ["out"], "merge_": ["params"],
        "soup_combine_": ["out"],
    }[case]  # fmt: skip
    return [t.double() for k in keys for t in d[k]]


PEER_CHECKS = [
    (case, peer)
    for case in ["fisher_accumulate_", "ratio_mask", "topk_mask", "gram", "combine_step_sgd_masked", "lerp_sync_",
                 "perturb_anchor", "restore_", "fd_hvp_", "merge_stats", "merge_", "soup_combine_",
                 "soup_coef_grads"]
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
        scale = _dot_scale(case, d_ref, x)
        if scale is not None:
            # fp32 dot products summed in another order: the error scales with sum |a b|, not with
            # the entry itself (entries of random inner products can cancel to near 0)
            bound = 2e-5 * scale + 1e-6
            assert bool(((x - y).abs() <= bound).all()), (x, y, bound)
            continue
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _dot_scale(case: str, d: dict, x: torch.Tensor) -> torch.Tensor | None:
    """For outputs that are inner products, an upper bound of sum |a b| per entry (else None)."""
    if case == "gram":  # Cauchy-Schwarz: sum |a b| <= sqrt(G_rr G_ss)
        diag = x.diagonal().abs()
        return torch.sqrt(torch.outer(diag, diag))
    if case == "soup_coef_grads":  # [K, L] entries <grads[l], diffs[k][l]>
        return torch.stack([torch.stack([(g.double().abs() * dk.double().abs()).sum() for g, dk in zip(d["grads"], dks)])
                            for dks in d["diffs"]]).reshape(x.shape)  # fmt: skip
    return None


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


def test_each_op_has_a_case_module_named_after_it() -> None:
    # Everything about an op is found by its name: fastclu/bench/cases/<op>.py holds its cases.
    import importlib

    from fastclu._registry import OPS

    public = list(OPS)
    for op in public:
        mod = importlib.import_module(f"fastclu.bench.cases.{op}")
        assert mod.CASES and all(c.op == op for c in mod.CASES), op
        assert all(bench.CASES[c.name] is c for c in mod.CASES), op
