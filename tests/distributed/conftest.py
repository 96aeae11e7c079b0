"""One 2-rank gloo job for the distributed tests (each process start costs seconds of imports).

The job runs the FSDP2, P&M, DDP and DCP cases of ``dist_workers.py`` in order; each test file reads
its case's checks. The job is bounded by a hard timeout that kills the workers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_launch import run_job

CASES = "fsdp,pnm,ddp,dcp_save,dcp_load"


@pytest.fixture(scope="session")
def dist_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="session")
def two_rank_job(dist_base: Path) -> list[dict]:
    """Per rank: ``{case: {"checks": {name: {"ok", "detail"}}, "measured": {...}}}``."""
    return run_job(CASES, dist_base / "job", env={"DCP_DIR": str(dist_base / "ckpt")}, timeout_s=150.0)
