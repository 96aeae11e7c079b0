"""fastclu.distributed in one process: plain tensors pass through, a 1-rank mesh equals the ops, bad layouts raise.

The 2-rank behaviour (reductions, shards, DDP, DCP) is tested in tests/distributed/.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fastclu import distributed, ops


@pytest.fixture
def one_rank(tmp_path: Path):
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_plain_tensors_pass_through() -> None:
    xs = [torch.randn(5, 3), torch.randn(7)]
    assert distributed.local_list(xs) == xs and distributed.shard_offset(xs[0]) == 0
    distributed.reset_comm_bytes()
    got = distributed.topk_mask(xs, 9)
    assert all(torch.equal(a, b) for a, b in zip(got, ops.topk_mask(xs, 9)))
    assert distributed.comm_bytes() == {}  # no process group: nothing reduced


def test_one_rank_mesh_matches_ops(one_rank) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    xs = [torch.randint(0, 4, (6, 5)).float(), torch.randn(9)]
    ds = [distribute_tensor(x, one_rank, [Shard(0)]) for x in xs]
    for k in (0, 1, 20, 39):
        got = distributed.topk_mask(ds, k)
        assert all(torch.equal(a, b) for a, b in zip(got, ops.topk_mask(xs, k)))
    with pytest.raises(ValueError, match="NaN"):
        distributed.topk_mask([distribute_tensor(torch.tensor([1.0, float("nan")]), one_rank, [Shard(0)])], 1)


def test_unsupported_layout_raises_before_moving(one_rank) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    d = distribute_tensor(torch.randn(4, 6), one_rank, [Shard(1)])
    before = d.to_local().clone()
    with pytest.raises(NotImplementedError, match="Shard"):
        distributed.perturb_sharded_([d], 0.1, seed=3)
    assert torch.equal(d.to_local(), before)
    with pytest.raises(NotImplementedError, match="Shard"):
        distributed.topk_mask([d], 3)


def test_mixed_dtensor_and_plain_is_an_error(one_rank) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    d = distribute_tensor(torch.randn(4, 2), one_rank, [Shard(0)])
    with pytest.raises(ValueError, match="mixes DTensors and plain"):
        distributed.tensors_group([d, torch.randn(3)])


def test_model_group(one_rank) -> None:
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    assert distributed.model_group(nn.Linear(3, 2)) is None
    ddp = DistributedDataParallel(nn.Linear(3, 2))
    assert distributed.model_group(ddp) is ddp.process_group
    fsdp = fully_shard(nn.Linear(3, 2), mesh=one_rank)
    assert distributed.model_group(fsdp) is one_rank.get_group()
