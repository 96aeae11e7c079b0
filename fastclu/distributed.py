"""What DTensor (FSDP2) and DDP need from fastclu: shard-local tensors and the few global reductions.

fastclu's ops act on plain tensors. A DTensor parameter (``torch.distributed.fsdp.fully_shard``)
is handled by running the op on its local shard; only quantities that are global by nature cross
the network, through the helpers here, each of which counts the bytes it sends (:func:`comm_bytes`):

* the clip's gram matrix: one fp64 ``[R, R]`` all-reduce per clipped step;
* the global top-k: one int64 ``[256]`` histogram all-reduce per radix pass (4 passes for fp32
  scores, 8 for fp64), plus one int64 ``[world, tensors]`` all-reduce of tie counts;
* P&M's two sums: one fp64 ``[2]`` all-reduce;
* DDP Fishers: the per-rank sums of squared batch gradients and the batch count, once per Fisher;
* a replica check (int64 ``[4]``) when plain tensors are turned into a global mask on several ranks.

Supported DTensor layouts: a 1-D device mesh with ``Shard(0)`` (even or uneven, FSDP2's layout)
or ``Replicate()``. A rank's shard of a ``Shard(0)`` tensor is then one contiguous range of the
global flat (row-major) order starting at :func:`shard_offset`, and rows of tensors with
``ndim >= 2`` stay whole on one rank. Other layouts raise ``NotImplementedError`` wherever their
answer would differ from the unsharded one (a wrong number without an error is worse).

Process groups: ``group=None`` means automatic (the DTensors' mesh group; for DDP models the
model's ``process_group``; for plain tensors on an initialised world of several ranks, the world,
with a check that the tensors are the same on every rank); :data:`LOCAL` asks for a deliberately
rank-local result.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastclu import ops

__all__ = [
    "LOCAL",
    "comm_bytes",
    "fisher_grads",
    "fisher_group",
    "forward_module",
    "is_dtensor",
    "local",
    "local_list",
    "merge_sums",
    "model_group",
    "perturb_sharded_",
    "ratio_mask",
    "reduce_fisher_",
    "reduce_gram_",
    "reset_comm_bytes",
    "shard_offset",
    "tensors_group",
    "topk_mask",
]

LOCAL = "local"
"""Pass as ``group=`` to compute a deliberately rank-local result (no reduction, no replica check)."""

_RADIX_BITS = 8
_RADIX = 1 << _RADIX_BITS
_COMM: dict[str, int] = {}


# ---------------------------------------------------------------------------------------- bytes
def comm_bytes() -> dict[str, int]:
    """Payload bytes this rank passed to collectives since :func:`reset_comm_bytes`, by purpose.

    Keys: ``"gram"``, ``"topk"``, ``"merge"``, ``"fisher"``, ``"check"``, ``"noise"``. The payload is
    what one rank hands to ``all_reduce``; a ring all-reduce moves about ``2 (w - 1) / w`` times it
    over each rank's link.
    """
    return dict(_COMM)


def reset_comm_bytes() -> None:
    """Zero the counters of :func:`comm_bytes`."""
    _COMM.clear()


def _comm_device(group: Any, like: torch.device) -> torch.device:
    """Where a collective's buffer must live: NCCL reduces CUDA tensors only; gloo takes CPU ones."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend:
        return like if like.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if backend == "gloo" else like


def _all_reduce_(t: Tensor, group: Any, purpose: str, op: Any = None) -> Tensor:
    """In place all-reduce of ``t`` (SUM by default) over ``group``, counting its bytes under ``purpose``."""
    _COMM[purpose] = _COMM.get(purpose, 0) + t.numel() * t.element_size()
    op = dist.ReduceOp.SUM if op is None else op
    dev = _comm_device(group, t.device)
    if dev == t.device:
        dist.all_reduce(t, op=op, group=group)
        return t
    buf = t.to(dev)
    dist.all_reduce(buf, op=op, group=group)
    return t.copy_(buf)


# ---------------------------------------------------------------------------------------- shards
def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(t: object) -> bool:
    """Whether ``t`` is a ``torch.distributed.tensor.DTensor``."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """The rank's local shard of a DTensor (a view, no copy); a plain tensor as it is."""
    return t.to_local() if is_dtensor(t) else t


def local_list(ts: Sequence[Tensor] | None) -> list[Tensor] | None:
    """:func:`local` of every tensor of a list (None stays None)."""
    return None if ts is None else [local(t) for t in ts]


def any_dtensor(ts: Sequence[object]) -> bool:
    """Whether any entry of ``ts`` is a DTensor."""
    return any(is_dtensor(t) for t in ts)


def _layout(t: Tensor) -> tuple[bool, bool]:
    """(sharded, contributes): Shard(0) or Replicate on a 1-D mesh; a replica contributes on coordinate 0."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = t.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"DTensors on a {mesh.ndim}-D device mesh are not supported (1-D meshes only)")
    (pl,) = t.placements
    if isinstance(pl, Shard) and pl.dim == 0:
        return True, True
    if isinstance(pl, Replicate):
        return False, mesh.get_local_rank() == 0
    raise NotImplementedError(
        f"DTensor placement {pl} is not supported (Shard(0) or Replicate(); a shard must be whole rows)"
    )


def shard_offset(t: Tensor) -> int:
    """Global flat (row-major) index of the first element of this rank's shard (0 for plain tensors).

    Raises ``NotImplementedError`` for layouts whose shard is not one contiguous range.
    """
    if not is_dtensor(t):
        return 0
    sharded, _ = _layout(t)
    if not sharded:
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    row = math.prod(t.shape[1:]) if t.dim() >= 1 else 1
    return int(offset[0]) * row if t.dim() >= 1 else 0


def tensors_group(ts: Sequence[Tensor], name: str = "tensors") -> Any:
    """The process group of a list of DTensors (all on one 1-D mesh); None when none is a DTensor.

    Raises ``ValueError`` for a list mixing DTensors and plain tensors, or DTensors on
    different meshes: their global reductions would count plain tensors once per rank.
    """
    meshes = [t.device_mesh for t in ts if is_dtensor(t)]
    if not meshes:
        return None
    if len(meshes) != len(ts):
        raise ValueError(f"{name} mixes DTensors and plain tensors; shard all of them (or none)")
    mesh = meshes[0]
    if any(m != mesh for m in meshes[1:]):
        raise ValueError(f"{name} are DTensors on different device meshes; one mesh is supported")
    if mesh.ndim != 1:
        raise NotImplementedError(f"DTensors on a {mesh.ndim}-D device mesh are not supported (1-D meshes only)")
    return mesh.get_group()


def _world_size(group: Any) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def _replica_group(group: Any) -> Any:
    """For plain tensors: the group that must agree, or LOCAL when no reduction applies."""
    if group is LOCAL or group == LOCAL:
        return LOCAL
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return LOCAL
    return LOCAL if _world_size(group) <= 1 else group


# ---------------------------------------------------------------------------------------- gram
def reduce_gram_(total: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Sum the fp64 gram partials ``total`` ([R, R], this rank's shards) over the params' group.

    A no-op for plain parameters (DDP gradients are already identical on every rank).
    In place when a reduction happens; returns the (global) gram.
    """
    group = tensors_group(params, "the optimizer's parameters")
    if group is None:
        return total
    if _world_size(group) > 1 and not all(_layout(p)[0] for p in params):
        # A replica's partial would be counted once per rank.
        raise NotImplementedError("clip over Replicate() DTensor parameters is not supported (use Shard(0))")
    return _all_reduce_(total.to(torch.float64).contiguous(), group, "gram")


# ---------------------------------------------------------------------------------------- replicas
def _fingerprint(ts: Sequence[Tensor]) -> Tensor:
    """int64 [2]: wrapping sums of the bit patterns (positions mixed in), equal iff (w.h.p.) the lists are."""
    acc = torch.zeros(2, dtype=torch.int64)
    for i, t in enumerate(ts):
        if t.numel() == 0:
            continue
        keys = _ordered_keys(t, 64 if t.dtype == torch.float64 else 32)
        mixed = keys * (keys >> 11) + keys.new_tensor(2 * i + 1) * keys
        acc += torch.stack([keys.sum(), mixed.sum()]).cpu()
    return acc


def _check_replicas(name: str, ts: Sequence[Tensor], group: Any) -> None:
    fp = _fingerprint(ts)
    both = torch.cat([fp, ~fp])
    _all_reduce_(both, group, "check", dist.ReduceOp.MAX)
    if not torch.equal(both[:2], ~both[2:]):
        raise ValueError(
            f"{name} differ across the {_world_size(group)} ranks: a rank-local score cannot make a global "
            "mask. Reduce it first (fastclu.saliency.fisher(..., group=...) does for DDP models), or pass "
            "group=fastclu.distributed.LOCAL for a deliberately per-rank mask"
        )


# ---------------------------------------------------------------------------------------- masks
def ratio_mask(
    f_forget: Sequence[Tensor],
    f_remain: Sequence[Tensor],
    gamma: float | Tensor,
    *,
    eps: float,
    group: Any = None,
    backend: str | None = None,
) -> list[Tensor]:
    """:func:`fastclu.ops.ratio_mask` on DTensor shards (elementwise: no communication) or on
    plain tensors, checked to be the same on every rank of ``group`` (see the module docstring)."""
    if any_dtensor(f_forget) or any_dtensor(f_remain):
        tensors_group(list(f_forget) + list(f_remain), "f_forget and f_remain")
        for i, (a, b) in enumerate(zip(f_forget, f_remain)):
            if a.placements != b.placements or a.shape != b.shape:
                raise ValueError(f"f_forget[{i}] and f_remain[{i}] must have the same shape and placements")
        return ops.ratio_mask(local_list(f_forget), local_list(f_remain), gamma, eps=eps, backend=backend)
    grp = _replica_group(group)
    if grp is not LOCAL:
        _check_replicas("f_forget / f_remain", list(f_forget) + list(f_remain), grp)
    return ops.ratio_mask(list(f_forget), list(f_remain), gamma, eps=eps, backend=backend)


def _ordered_keys(s: Tensor, width: int) -> Tensor:
    """int64 keys whose signed order is the float order of ``s`` (-0.0 == +0.0): the ops' contract."""
    if width == 32:
        bits = (s.reshape(-1).to(torch.float32) + 0.0).view(torch.int32).to(torch.int64)
        return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    bits = (s.reshape(-1).to(torch.float64) + 0.0).view(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFFFFFFFFFF, bits)


def topk_mask(scores: Sequence[Tensor], k: int, *, group: Any = None, backend: str | None = None) -> list[Tensor]:
    """Exact global top-``k`` over every element of ``scores``, bit-packed per local tensor.

    DTensor scores: a distributed radix select over the local shards. Each pass all-reduces one
    int64 ``[256]`` histogram of this rank's keys under the current prefix; the last step
    all-reduces the per-tensor tie counts of every rank, so ties go to the earlier element in
    global (tensor index, global flat index) order exactly as :func:`fastclu.ops.topk_mask` breaks
    them in one process. Nothing is gathered or concatenated. Plain scores: checked to be equal on
    every rank of ``group`` (a rank-local score is an error), then :func:`fastclu.ops.topk_mask`.
    Returns one packed ``uint8`` mask per tensor (of the local shard for DTensors).
    """
    scores = list(scores)
    if not any_dtensor(scores):
        grp = _replica_group(group)
        if grp is not LOCAL:
            _check_replicas("scores", scores, grp)
        return ops.topk_mask(scores, k, backend=backend)
    grp = tensors_group(scores, "scores")
    total = sum(s.numel() for s in scores)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= total:
        raise ValueError(f"k must be an int in [0, {total}] (the number of scores), got {k!r}")
    locals_ = [local(s) for s in scores]
    layout = [_layout(s) for s in scores]
    for s in scores:
        shard_offset(s)  # raises for layouts without a contiguous shard
    width = 64 if any(s.dtype == torch.float64 for s in scores) else 32
    mine = [s if contributes else s[:0] for s, (_, contributes) in zip(locals_, layout)]
    device = mine[0].device if mine else torch.device("cpu")
    if k == 0:
        return [torch.zeros(ops.packed_numel(s.numel()), dtype=torch.uint8, device=s.device) for s in locals_]
    threshold, need = _radix_select(mine, k, width, grp, device)
    return _take(locals_, [sharded for sharded, _ in layout], threshold, need, width, grp)


def _radix_select(mine: list[Tensor], k: int, width: int, grp: Any, device: torch.device) -> tuple[int, int]:
    """The k-th largest key over all ranks and how many of its copies are still to be taken."""
    prefix, need = 0, k
    for shift in range(width - _RADIX_BITS, -1, -_RADIX_BITS):
        top = shift == width - _RADIX_BITS
        hist = torch.zeros(_RADIX + (1 if top else 0), dtype=torch.int64, device=device)
        for s in mine:
            if s.numel() == 0:
                continue
            if top:
                hist[_RADIX] += torch.isnan(s).sum()
            keys = _ordered_keys(s, width)
            if top:
                digits = (keys >> shift) + _RADIX // 2
            else:
                digits = (keys[(keys >> (shift + _RADIX_BITS)) == prefix] >> shift) & (_RADIX - 1)
            hist[:_RADIX] += torch.bincount(digits, minlength=_RADIX)
        _all_reduce_(hist, grp, "topk")
        if top and int(hist[_RADIX]):
            # Every rank sees the same reduced count, so every rank raises: no collective is left waiting.
            raise ValueError("scores contain NaN (topk_mask needs totally ordered scores)")
        counts = hist[:_RADIX].tolist()
        above = 0
        for b in range(_RADIX - 1, -1, -1):
            if above + counts[b] >= need:
                break
            above += counts[b]
        need -= above
        prefix = (b - _RADIX // 2) if top else (prefix << _RADIX_BITS) | b
    return prefix, need


def _take(locals_: list[Tensor], sharded: list[bool], threshold: int, need: int, width: int, grp: Any) -> list[Tensor]:
    """Pack ``key > threshold`` plus the first ``need`` ties in global (tensor, flat index) order."""
    world, rank = _world_size(grp), dist.get_rank(grp)
    keys = [_ordered_keys(s, width) for s in locals_]
    ties = torch.zeros(world, len(locals_), dtype=torch.int64)
    for i, (kk, sh) in enumerate(zip(keys, sharded)):
        if sh or rank == 0:  # a replica's ties are counted once (on coordinate 0)
            ties[rank, i] = int((kk == threshold).sum())
    _all_reduce_(ties, grp, "topk")
    out = []
    for i, (kk, sh) in enumerate(zip(keys, sharded)):
        before = int(ties[:, :i].sum())
        if sh:
            # Shard(0) shards follow the mesh coordinate, which is the group rank on a 1-D mesh.
            before += int(ties[:rank, i].sum())
            take = min(max(need - before, 0), int(ties[rank, i]))
        else:
            take = min(max(need - before, 0), int(ties[:, i].sum()))
        keep = kk > threshold
        if take:
            tie = kk == threshold
            keep |= tie & (torch.cumsum(tie, dim=0) <= take)
        out.append(ops.pack_bits(keep))
    return out


# ---------------------------------------------------------------------------------------- fisher
def forward_module(model: nn.Module) -> nn.Module:
    """The module to run a scoring forward through: a DDP model's ``.module`` (no gradient hooks, no
    buffer broadcast: the per-rank scores are reduced explicitly); any other model itself."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def model_group(model: nn.Module) -> Any:
    """The process group a wrapped model is parallel over: a DDP model's ``process_group``, an FSDP2
    model's parameter mesh group; None for a plain model."""
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return model.process_group
    return tensors_group(list(model.parameters()), "the model's parameters")


def fisher_group(model: nn.Module, group: Any) -> Any:
    """The group a DDP model's Fisher is reduced over: ``group``, or by default the model's own.

    Returns LOCAL for other models (FSDP2 gradients are already the global batch's, averaged by
    its reduce-scatter; a plain model in one process has nothing to reduce).
    """
    from torch.nn.parallel import DistributedDataParallel

    if group is LOCAL or group == LOCAL:
        return LOCAL
    if isinstance(model, DistributedDataParallel):
        return model.process_group if group is None else group
    if group is not None and not any_dtensor(list(model.parameters())):
        return group  # an explicit group for a plain model (e.g. hand-rolled data parallelism)
    return LOCAL


def fisher_grads(model: nn.Module, loss: Tensor, params: Sequence[Tensor]) -> list[Tensor | None]:
    """Gradients of ``loss`` w.r.t. ``params`` without touching ``.grad`` as the caller sees it.

    FSDP2 parameters get their (reduce-scattered, sharded) gradients only through ``backward``,
    so for DTensor parameters the backward runs with ``.grad`` saved and put back; otherwise
    ``torch.autograd.grad``.
    """
    params = list(params)
    if not any_dtensor(params):
        return list(torch.autograd.grad(loss, params, allow_unused=True))
    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        loss.backward()
        return [p.grad for p in params]
    finally:
        for p, g in zip(params, saved):
            p.grad = g


def reduce_fisher_(acc: list[Tensor], batches: int, group: Any) -> int:
    """Sum the per-rank Fisher sums ``acc`` and batch counts over ``group`` (LOCAL: nothing).

    Returns the global number of batches; ``acc`` then holds the global sums (in place).
    """
    if group is LOCAL or _world_size(group) <= 1:
        return batches
    for a in acc:
        _all_reduce_(a, group, "fisher")
    n = torch.tensor([batches], dtype=torch.int64)
    _all_reduce_(n, group, "fisher")
    return int(n)


# ---------------------------------------------------------------------------------------- P&M
def merge_sums(
    params: Sequence[Tensor],
    anchor: Sequence[Tensor],
    fisher_sum: Sequence[Tensor],
    fisher_theta_sum: Sequence[Tensor],
    *,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """P&M's ``(num, den)`` over DTensor shards: local :func:`fastclu.ops.merge_stats`, fp64 all-reduce."""
    grp = tensors_group(params, "params")
    _, contributes = zip(*(_layout(p) for p in params)) if params else ((), ())
    idx = [i for i, c in enumerate(contributes) if c]
    pick = [[local(x[i]) for i in idx] for x in (params, anchor, fisher_sum, fisher_theta_sum)]
    sums = torch.zeros(2, dtype=torch.float64)
    if idx:
        with torch.no_grad():
            n, d = ops.merge_stats(*pick, backend=backend)
        sums += torch.stack([n.double().cpu(), d.double().cpu()])
    _all_reduce_(sums, grp, "merge")
    dev = local(params[0]).device
    return sums[0].to(dev, torch.float32), sums[1].to(dev, torch.float32)


# ---------------------------------------------------------------------------------------- noise
def _row_norms(params: list[Tensor], lp: list[Tensor]) -> list[Tensor]:
    """fp32 row norms of (possibly sharded) tensors, for their local rows.

    Rows of ``ndim >= 2`` tensors are whole on a rank. A sharded tensor of ``ndim <= 1`` is one
    row split over the ranks: its fp64 sum of squares is reduced, for all such tensors in one
    all-reduce (8 bytes per tensor).
    """
    from fastclu.ops.reference.perturb import row_norms_of

    split = [i for i, p in enumerate(params) if p.dim() < 2 and is_dtensor(p) and _layout(p)[0]]
    out = [None if i in split else row_norms_of(t) for i, t in enumerate(lp)]
    if split:
        sq = torch.stack([(lp[i].double() ** 2).sum().cpu() for i in split])
        _all_reduce_(sq, tensors_group([params[i] for i in split], "params"), "noise")
        for j, i in enumerate(split):
            out[i] = sq[j].sqrt().reshape(1).to(lp[i].device, torch.float32)
    return out


def perturb_sharded_(
    params: list[Tensor],
    scale: float | Tensor,
    *,
    backup: list[Tensor] | None = None,
    anchor: list[Tensor] | None = None,
    direction: list[Tensor] | None = None,
    seed: int | None = None,
    row_norms: list[Tensor] | None = None,
    backend: str | None = None,
) -> list[Tensor] | None:
    """:func:`fastclu.ops.perturb_` over DTensor parameters, acting on their local shards.

    In seed mode the noise is the unsharded noise: the Philox normal is keyed on
    ``(seed, position in params, global flat index)`` (:func:`shard_offset` + local index) and each
    row's sigma uses the whole row's norm, so a sharded run draws bit for bit what one process
    draws. The noise is generated here with the reference Philox and applied through
    ``perturb_(direction=...)``: there is no fused-kernel path for sharded noise yet. Returns the
    local fp32 row norms in seed mode, else None.
    """
    with torch.no_grad():
        return _perturb_sharded(params, scale, backup, anchor, direction, seed, row_norms, backend)


def _perturb_sharded(
    params: list[Tensor],
    scale: float | Tensor,
    backup: list[Tensor] | None,
    anchor: list[Tensor] | None,
    direction: list[Tensor] | None,
    seed: int | None,
    row_norms: list[Tensor] | None,
    backend: str | None,
) -> list[Tensor] | None:
    lp = local_list(params)
    kw = {"backup": local_list(backup), "anchor": local_list(anchor), "backend": backend}
    if seed is None:
        return ops.perturb_(lp, scale, direction=local_list(direction), **kw)
    from fastclu.ops.reference.perturb import n_rows
    from fastclu.ops.reference.philox import philox_normal

    offsets = [shard_offset(p) for p in params]  # raises for unsupported layouts before anything moves
    norms = [r.reshape(-1).to(torch.float32) for r in row_norms] if row_norms is not None else _row_norms(params, lp)
    noise = []
    for i, (p, t) in enumerate(zip(params, lp)):
        offset, nr = offsets[i], norms[i]
        full_rows = p.shape[0] if p.dim() >= 2 else 1
        n = p.numel() // full_rows if full_rows else 0
        z = philox_normal(seed, i, t.numel(), device=t.device, start=offset)
        rows = n_rows(t) if p.dim() >= 2 else 1
        root_n = torch.tensor(math.sqrt(n), dtype=torch.float32, device=t.device)
        sigma = nr.reshape(rows, 1).to(device=t.device, dtype=torch.float32) / root_n
        noise.append((z.reshape(rows, -1) * sigma).reshape(t.shape) if t.numel() else z.reshape(t.shape))
    ops.perturb_(lp, scale, direction=noise, **kw)
    return norms


# ---------------------------------------------------------------------------------------- DCP
_SKELETON = "skeleton"
_TENSOR_REF = "__fastclu_tensor__"


def _param_index(path: tuple, t: Tensor, params: list[Tensor]) -> int | None:
    """The parameter a state tensor belongs to: an int key on its path that indexes a parameter of its shape."""
    for key in path[1:]:
        if isinstance(key, int) and 0 <= key < len(params) and t.shape == params[key].shape:
            return key
    return None


def _to_dtensor_like(x: Tensor, p: Tensor) -> Tensor:
    """A local tensor shaped like ``p``'s shard, as a DTensor with ``p``'s layout."""
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(x, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def optimizer_checkpoint(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The state of a fastclu optimizer (and its wrappers) as a flat dict for ``torch.distributed.checkpoint``.

    Everything of ``optimizer.state_dict()`` is kept: buffers, step counters, stashed roles,
    anchors, FastSlow's slow weights, P&M's statistics, param groups. Tensors shaped like a
    parameter stay DTensors with the parameter's layout (or plain for plain parameters), so
    DCP reshards them; a bit-packed mask is stored unpacked (``uint8`` 0/1 shaped like its
    parameter), since packed bytes of a shard do not line up with another sharding. Save it
    with ``dcp.save({"optim": optimizer_checkpoint(opt), ...})``; load with
    :func:`load_optimizer_checkpoint`.
    """
    params = [p for g in optimizer.param_groups for p in g["params"]]
    out: dict[str, Any] = {}

    def walk(x: Any, path: tuple) -> Any:
        if isinstance(x, dict):
            return {k: walk(v, (*path, k)) for k, v in x.items()}
        if isinstance(x, (list, tuple)) and not isinstance(x, Tensor):
            return type(x)(walk(v, (*path, i)) for i, v in enumerate(x))
        if not isinstance(x, Tensor):
            return x
        name = f"t{len(out)}"
        owner = path[1] if len(path) == 3 and path[0] == "state" and path[2] == "mask" else None
        if owner is not None:  # a packed mask: unpack to the parameter's (shard's) shape
            p = params[owner]
            lp = local(p)
            bits = ops.unpack_bits(x, lp.numel(), lp.shape).to(torch.uint8)
            out[name] = _to_dtensor_like(bits, p) if is_dtensor(p) else bits
            return {_TENSOR_REF: name, "param": owner, "mask": True}
        idx = _param_index(path, x, params) if is_dtensor(x) or path[:1] != ("param_groups",) else None
        out[name] = x
        return {_TENSOR_REF: name, "param": idx, "mask": False, "shape": list(x.shape), "dtype": str(x.dtype)}

    # The structure (param groups, counters, tensor references) travels as one pickled object, as
    # DCP stores any non-tensor value: load checkpoints you trust only.
    out[_SKELETON] = pickle.dumps(walk(optimizer.state_dict(), ()))
    return out


def load_optimizer_checkpoint(optimizer: torch.optim.Optimizer, checkpoint_id: Any, key: str = "optim") -> None:
    """Load what :func:`optimizer_checkpoint` saved under ``key`` into ``optimizer``, in its current layout.

    The parameters may be sharded differently from the saving run (e.g. saved on 2 ranks, loaded
    on 1 or on 2): per-parameter tensors are read as DTensors with the current parameters'
    layout (plain full tensors for plain parameters). Two ``dcp.load`` calls: the structure,
    then the tensors.
    """
    import torch.distributed.checkpoint as dcp

    params = [p for g in optimizer.param_groups for p in g["params"]]
    head = {key: {_SKELETON: b""}}
    dcp.load(head, checkpoint_id=checkpoint_id)
    skeleton = pickle.loads(head[key][_SKELETON])
    template: dict[str, Tensor] = {}
    refs: list[dict] = []

    def collect(x: Any) -> None:
        if isinstance(x, dict) and _TENSOR_REF in x:
            refs.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                collect(v)
        elif isinstance(x, (list, tuple)):
            for v in x:
                collect(v)

    collect(skeleton)
    for ref in refs:
        idx = ref["param"]
        if ref["mask"]:
            p = params[idx]
            template[ref[_TENSOR_REF]] = torch.zeros_like(p, dtype=torch.uint8)
            continue
        dtype = getattr(torch, ref["dtype"].removeprefix("torch."))
        if idx is not None and is_dtensor(params[idx]):
            template[ref[_TENSOR_REF]] = torch.zeros_like(params[idx], dtype=dtype)
        else:
            dev = local(params[idx]).device if idx is not None else torch.device("cpu")
            template[ref[_TENSOR_REF]] = torch.zeros(ref["shape"], dtype=dtype, device=dev)
    body = {key: template}
    dcp.load(body, checkpoint_id=checkpoint_id)
    loaded = body[key]

    def build(x: Any) -> Any:
        if isinstance(x, dict) and _TENSOR_REF in x:
            t = loaded[x[_TENSOR_REF]]
            return ops.pack_bits(local(t).reshape(-1).bool()) if x["mask"] else t
        if isinstance(x, dict):
            return {k: build(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(build(v) for v in x)
        return x

    optimizer.load_state_dict(build(skeleton))
