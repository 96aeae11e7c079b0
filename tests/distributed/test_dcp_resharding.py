"""torch.distributed.checkpoint: fastclu optimizer + wrapper state saved on 2 FSDP2 ranks, loaded on 1 and on 2."""

from __future__ import annotations

from pathlib import Path

import pytest
from dist_launch import run_job

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("dcp")
    # FastSlow(AdamW) with a top-k mask, an anchor penalty, 4 masked clipped 2-role steps and a
    # pending stash; the saving job then runs 4 more steps: the uninterrupted reference.
    run_job("dcp_save", base / "save", env={"DCP_DIR": str(base / "ckpt")})
    return base


@pytest.mark.parametrize("world", [2, 1])
def test_load_and_continue(saved: Path, world: int) -> None:
    results = run_job("dcp_load", saved / f"load{world}", world=world, env={"DCP_DIR": str(saved / "ckpt")})
    for rank, res in enumerate(results):
        for name in ("stash_restored", "mask_restored", "continues_like_uninterrupted"):
            c = res["checks"][name]
            # 2 -> 2 ranks: bit-identical; 2 -> 1 process: max |diff| < 1e-5 (unsharded reductions).
            assert c["ok"], f"rank {rank} of {world}: {name} failed: {c['detail']}"
