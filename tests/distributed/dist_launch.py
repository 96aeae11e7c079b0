"""Launch a 2-process gloo job on the CPU (torchrun's environment variables), bounded in time.

Each worker runs ``dist_workers.py CASE OUTDIR`` and writes ``OUTDIR/rank<r>.json`` with its
checks. A worker that fails makes the others be killed at once (they would otherwise wait in a
collective); a job past ``timeout_s`` is killed and reported as a failure.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("dist_workers.py")
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_job(
    case: str, outdir: Path, world: int = 2, timeout_s: float = 120.0, env: dict[str, str] | None = None
) -> list[dict]:
    """Run ``case`` on ``world`` ranks; return each rank's result dict (raises AssertionError on failure)."""
    outdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world),
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}  # fmt: skip
    procs = []
    for r in range(world):
        log = open(outdir / f"rank{r}.log", "w")  # noqa: SIM115 - closed below
        e = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        procs.append((subprocess.Popen([sys.executable, str(WORKER), case, str(outdir)], env=e, cwd=ROOT,
                                       stdout=log, stderr=subprocess.STDOUT), log))  # fmt: skip
    deadline = time.monotonic() + timeout_s
    failed = None
    try:
        while any(p.poll() is None for p, _ in procs):
            bad = [r for r, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]][0].returncode}"
                break
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout_s} s"
                break
            time.sleep(0.1)
        bad = [r for r, (p, _) in enumerate(procs) if p.poll() not in (None, 0)]
        if failed is None and bad:
            failed = f"rank {bad[0]} exited with {procs[bad[0]][0].returncode}"
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
            log.close()
    if failed is not None:
        logs = "\n".join(f"--- rank {r}\n{(outdir / f'rank{r}.log').read_text()[-4000:]}" for r in range(world))
        raise AssertionError(f"distributed job {case!r} failed: {failed}\n{logs}")
    return [json.loads((outdir / f"rank{r}.json").read_text()) for r in range(world)]


def assert_checks(results: list[dict], case: str, names: list[str]) -> None:
    """Every rank passed every named check of ``case``."""
    for rank, res in enumerate(results):
        for name in names:
            c = res[case]["checks"][name]
            assert c["ok"], f"rank {rank}: {case}/{name} failed: {c['detail']}"
