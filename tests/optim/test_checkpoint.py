"""Checkpoint mid-run (stashed role, mask, anchor penalty, scheduler), resume in a NEW process, continue:
the result must be bit-identical to the run that never stopped.

Run as a script, this file is the child process: ``python test_checkpoint.py SEED [NAME CKPT OUT]...``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

import fastclu.optim as fo
from fastclu import saliency

TOTAL, CUT = 11, 6  # CUT is a forget step: the checkpoint is taken right after its stash
ROOT = Path(__file__).resolve().parents[2]


def _batch(seed: int, step: int, tag: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 1000 + step * 10 + tag)
    return torch.randn(6, 5, generator=g), torch.randint(0, 3, (6,), generator=g)


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _optimizer(name: str, model: torch.nn.Module) -> tuple[torch.optim.Optimizer, object]:
    if name == "SGD":
        opt = fo.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        opt = fo.AdamW(model.parameters(), lr=0.01, amsgrad=True)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=TOTAL)


def _loss(model, batch):
    return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])


def _forget_half(model, opt, seed, step):
    opt.zero_grad()
    _loss(model, _batch(seed, step, 0)).backward()
    opt.stash("forget")


def _run(model, opt, sched, seed, start, stop, resume_mid_step=False):
    for step in range(start, stop):
        forget = step % 3 == 0
        if forget and not (resume_mid_step and step == start):
            _forget_half(model, opt, seed, step)
        if not forget:
            opt.zero_grad()
        _loss(model, _batch(seed, step, 1)).backward()
        if forget:
            opt.step(combine={"forget": torch.tensor(-0.7), "grad": 1.0}, clip=0.5)
        else:
            opt.step()
        sched.step()


def _setup(name, seed):
    model = _model(seed)
    opt, sched = _optimizer(name, model)
    loader_f = [_batch(seed, 100 + i, 0) for i in range(2)]
    loader_r = [_batch(seed, 200 + i, 1) for i in range(2)]
    loss_fn = torch.nn.CrossEntropyLoss()
    f_f = saliency.fisher(model, loader_f, loss_fn)
    f_r = saliency.fisher(model, loader_r, loss_fn)
    mask = saliency.ratio_mask(f_f, f_r, gamma=1.0)
    assert 0.0 < mask.density() < 1.0
    opt.set_mask(mask, mode="grad" if name == "SGD" else "update", roles=["forget"])
    opt.set_anchor(importance=f_r, lam=0.5)
    return model, opt, sched


def _child(ckpt: str, out: str, name: str, seed: int) -> None:
    torch.set_num_threads(1)
    ck = torch.load(ckpt, weights_only=True)
    model = _model(seed + 1)  # different init: everything must come from the checkpoint
    opt, sched = _optimizer(name, model)
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    sched.load_state_dict(ck["sched"])
    _run(model, opt, sched, seed, CUT, TOTAL, resume_mid_step=True)
    torch.save({"params": [p.detach() for p in model.parameters()], "opt": opt.state_dict()}, out)


def test_checkpoint_resume_in_new_process_is_bit_identical(tmp_path):
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU reductions may depend on the thread count; the child uses 1 too
    try:
        seed = int(torch.randint(0, 2**20, ()))
        jobs, finals = [], {}
        for name in ("SGD", "AdamW"):
            model, opt, sched = _setup(name, seed)
            _run(model, opt, sched, seed, 0, CUT)
            _forget_half(model, opt, seed, CUT)
            assert opt.stashed_roles() == ["forget"]
            ckpt = tmp_path / f"{name}.pt"
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, ckpt)
            jobs.append((name, str(ckpt), str(tmp_path / f"{name}.out.pt")))
            _run(model, opt, sched, seed, CUT, TOTAL, resume_mid_step=True)
            finals[name] = (model, opt)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        # one child process resumes both runs (a Python + torch start-up is the slow part)
        args = [a for job in jobs for a in job]
        subprocess.run([sys.executable, __file__, str(seed), *args], env=env, check=True, timeout=300)
        for name, _ckpt, out in jobs:
            got = torch.load(out, weights_only=True)
            model, opt = finals[name]
            for a, b in zip(model.parameters(), got["params"]):
                assert torch.equal(a.detach(), b), f"{name}: resumed weights differ"
            want = opt.state_dict()
            assert want["param_groups"] == got["opt"]["param_groups"]
            for k, st in want["state"].items():
                assert st.keys() == got["opt"]["state"][k].keys()
                for key, v in st.items():
                    assert torch.equal(v, got["opt"]["state"][k][key]), f"{name}: state {key} differs"
            assert "mask" in want["state"][0] and "anchor" in want["state"][0]
    finally:
        torch.set_num_threads(n_threads)


if __name__ == "__main__":
    _seed, _jobs = int(sys.argv[1]), sys.argv[2:]
    for _i in range(0, len(_jobs), 3):
        _child(_jobs[_i + 1], _jobs[_i + 2], _jobs[_i], _seed)
