"""The CUDA extension ``fastclu._C`` and the ``cuda`` backend's wrappers.

Most checks need no GPU: the module imports, exposes every entry point, links no torch
library, evaluates the same Philox stream as the reference, the wrappers register every op,
build correct tables and reject CPU tensors with a clear error. A slow test compiles the
extension for sm_80 and sm_90 from scratch. The ``gpu`` tests run the kernels against the
reference (the shared suite in tests/ops/kernels/ covers them in depth).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

import pytest
import torch

from fastclu import _registry, ops
from fastclu.ops._table import HEADER
from fastclu.ops.rules import RULES

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
OPS = sorted(_registry.OPS)  # every declared op (fastclu.ops also exports helpers such as pack_bits)
ENTRY_POINTS = [
    "fisher_accumulate", "ratio_mask", "lerp_sync", "fd_hvp", "merge", "perturb_dir", "row_norms", "perturb_noise",
    "gram", "merge_stats", "topk_mask", "restore_mt", "combine_step", "philox_words", "philox_normal",
    "soup_combine", "soup_coef_grads",
]  # fmt: skip


@pytest.fixture(scope="module")
def ext() -> ModuleType:
    if importlib.util.find_spec("fastclu._C") is None:
        pytest.skip("fastclu._C is not built in this checkout (pip install -e . with nvcc; the slow test builds it)")
    return importlib.import_module("fastclu._C")  # a built module that fails to import is a failure


@pytest.fixture(scope="module")
def cuda_backend(ext: ModuleType) -> ModuleType:
    return importlib.import_module("fastclu.ops.cuda")


def _impl(op: str):
    from fastclu._registry import _impls

    return _impls[op]["cuda"]


def test_extension_exposes_every_entry_point(ext: ModuleType) -> None:
    missing = [n for n in ENTRY_POINTS if not callable(getattr(ext, n, None))]
    assert not missing, f"fastclu._C lacks {missing}"
    # the octet/chunk scheme needs whole octets per thread and whole rounds per chunk
    assert ext.CHUNK % (8 * 256) == 0
    assert ext.ROW_HEADER == HEADER  # the row header of fastclu/ops/_table.py (rank0 column included)


def test_extension_links_no_torch_nor_shared_cudart(ext: ModuleType) -> None:
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf not installed")
    out = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True, check=True).stdout
    needed = [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]
    bad = [n for n in needed if "torch" in n or "c10" in n or n.startswith("libcudart")]
    assert not bad, f"fastclu._C depends on {bad}; it must link only the static CUDA runtime"


def test_import_in_a_process_without_devices(ext: ModuleType) -> None:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    code = "import fastclu._C as C; print(C.CHUNK)"
    # run beside the package that holds this build, so the child imports the same one
    where = str(Path(ext.__file__).resolve().parents[1])
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120, cwd=where
    )
    assert res.returncode == 0, res.stderr
    assert int(res.stdout.strip()) == ext.CHUNK


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a usable device")
def test_launch_without_device_is_a_python_error(ext: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="merge_stats"):
        ext.merge_stats(0, 0, 0, 0, 0, 0, 0)  # (table, dyn, n_rows, n_chunks, partial, out, stream)
    with pytest.raises(RuntimeError, match="fisher_accumulate_"):
        ext.fisher_accumulate(1, 0, 1, 1, 1.0, 0, 2, 0)  # a (fake) non-empty table: reaches the device query


def test_philox_matches_reference_stream(ext: ModuleType) -> None:
    from fastclu.ops.reference.philox import philox_normal, philox_words

    rng = random.Random(torch.randint(0, 2**31, ()).item())
    for start in (0, rng.randrange(2**31), 2**32 - 3, rng.randrange(2**33, 2**40)):
        seed, tidx, n = rng.getrandbits(64), rng.randrange(2**32), 48
        words = philox_words(seed, tidx, start, n)
        z = philox_normal(seed, tidx, n, start=start)
        for q in range(n):
            want = [int(w[q]) for w in words]
            assert ext.philox_words(seed, tidx, start + q) == want, f"element {start + q}"
            got = ext.philox_normal(seed, tidx, start + q)
            assert math.isclose(got, float(z[q]), rel_tol=2e-6, abs_tol=2e-6), (start + q, got, float(z[q]))


def test_cuda_backend_registers_every_op(cuda_backend: ModuleType) -> None:
    from fastclu._registry import _impls

    missing = [op for op in OPS if "cuda" not in _impls.get(op, {})]
    assert not missing, f"no cuda implementation for {missing}"


def test_table_rows_layout(cuda_backend: ModuleType) -> None:
    from fastclu.ops.cuda._launch import CHUNK, CODE_NONE, CODE_PTR, DTYPE_CODES, table_rows

    sizes = [3, 0, CHUNK + 1, 2 * CHUNK, 1]
    a = [torch.randn(n) for n in sizes]
    b = [torch.randn(n).to(torch.bfloat16) for n in sizes]
    steps = [torch.zeros(()) for _ in sizes]
    rows, n_rows, n_chunks = table_rows("t", [a, None, b, steps], pointer_operands=(3,))
    width = HEADER + 4
    assert n_rows == 4 and len(rows) == n_rows * width  # the empty tensor has no row
    assert n_chunks == 1 + 2 + 2 + 1
    starts, idx = [], []
    for r in range(n_rows):
        row = rows[r * width : (r + 1) * width]
        t = row[3]
        starts.append(row[0])
        idx.append(t)
        assert row[1] == sizes[t]
        codes = [(row[2] >> (4 * k)) & 15 for k in range(4)]
        assert codes == [DTYPE_CODES[torch.float32], CODE_NONE, DTYPE_CODES[torch.bfloat16], CODE_PTR]
        assert row[HEADER:] == [a[t].data_ptr(), 0, b[t].data_ptr(), steps[t].data_ptr()]
        assert row[5] == row[0]  # rank0: one table, list order
    assert idx == [0, 2, 3, 4] and starts == [0, 1, 3, 5]
    rows, _, n = table_rows("t", [a], units=[7, 1, 2, 3, 4], aux=[9, 9, 9, 9, 9])
    assert n == 7 + 2 + 3 + 4 and rows[4] == 9
    with pytest.raises(TypeError, match="unsupported dtype"):
        table_rows("t", [[torch.zeros(3, dtype=torch.int32)]])


def _cpu_calls() -> dict[str, tuple]:
    p = [torch.randn(5), torch.randn(2, 3)]
    g = [torch.randn(5), torch.randn(2, 3)]
    m = [ops.pack_bits(torch.rand(5) < 0.5), ops.pack_bits(torch.rand(6) < 0.5)]
    st = {"momentum_buffer": [torch.randn(5), torch.randn(2, 3)]}
    kw_step = {
        "rule": "sgd", "lr": 0.1, "coeffs": [1.0], "scale": 1.0, "mask": m, "masked": [True], "mask_mode": "grad",
        "penalty": 0.0, "importance": None, "anchor": None, "grad_scale": None, "found_inf": None,
        "restore_from": None, "weight_decay": 0.0, "maximize": False, "momentum": 0.9, "dampening": 0.0,
        "nesterov": False, "init_momentum": False, "betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False,
    }  # fmt: skip
    pert = {"backup": None, "anchor": None, "direction": None, "seed": 3, "row_norms": None}
    return {
        "fisher_accumulate_": ((p, g, 1.0), {"power": 2}),
        "ratio_mask": ((p, g, 1.0), {"eps": 1e-12}),
        "topk_mask": ((p, 3), {}),
        "gram": (([p, g],), {"mask": m, "masked": [True, False]}),
        "combine_step_": ((p, [g], st), kw_step),
        "lerp_sync_": ((p, g, 0.5), {}),
        "perturb_": ((p, 0.1), pert),
        "restore_": ((p, g), {}),
        "fd_hvp_": ((p, g, g, 0.1), {"accumulate": False}),
        "merge_stats": ((p, g, g, g), {}),
        "merge_": ((p, g, 0.5), {}),
        "soup_combine_": ((p, g, [g, g], torch.ones(2, 2)), {}),
        "soup_coef_grads": ((p, [g, g]), {"layerwise": True}),
    }


def _flat(xs: list) -> list[torch.Tensor]:
    return [t for x in xs for t in (_flat(x) if isinstance(x, list) else [x])]


@pytest.mark.parametrize("op", OPS)
def test_cpu_tensors_get_a_clear_error(cuda_backend: ModuleType, op: str) -> None:
    args, kwargs = _cpu_calls()[op]
    tensors = [t for a in args if isinstance(a, list) for t in _flat(a)]
    before = [t.clone() for t in tensors]
    with pytest.raises(ValueError, match="cuda backend needs CUDA tensors"):
        _impl(op)(*args, **kwargs)
    assert all(torch.equal(t, b) for t, b in zip(tensors, before)), "a rejected call modified its inputs"


@pytest.mark.skipif(HAS_GPU, reason="checks the behaviour without a usable device")
def test_public_op_names_the_missing_device(cuda_backend: ModuleType) -> None:
    with pytest.raises(RuntimeError, match="cuda"):
        ops.fisher_accumulate_([torch.zeros(3)], [torch.randn(3)], backend="cuda")


# --- host side of the wrappers, without a GPU: what crosses the pybind11 boundary ---------------

# Table arguments of every entry point: (table, dyn, n_rows, n_chunks).
_T = 4


def _table_args(name: str) -> int:
    return _T


# Operand order of every table, as csrc/ops.h documents it (the kernels index operands by position).
_LAYOUT = {
    "fisher_accumulate": ["fisher", "grads"],
    "ratio_mask": ["f_forget", "f_remain", "out"],
    "lerp_sync": ["slow", "fast"],
    "fd_hvp": ["out", "grads_plus", "grads_minus"],
    "merge": ["params", "anchor"],
    "perturb_dir": ["params", "backup", "src"],
    "row_norms": ["params", "norms"],
    "perturb_noise": ["params", "backup", "norms"],
    "gram": ["g0", "g1", "g2", "g3", "mask"],
    "merge_stats": ["params", "anchor", "fisher_sum", "fisher_theta_sum"],
    "topk_mask": ["scores", "out"],
    "restore_mt": ["params", "backup"],
    "soup_combine": ["out", "base", "diff0", "diff1"],
    "soup_coef_grads": ["grads", "diff0", "diff1", "diff2"],
    "combine_step": ["params", "restore_from", "g0", "g1", "g2", "g3", "mask", "state0", "state1", "state_max",
                     "importance", "anchor", "step"],
}  # fmt: skip
# Entry points that touch no device when their table is empty: the real binding can be called
# with (0, 0, 0) to check that every recorded argument converts (pybind11 types, config keys).
_NOOP_WHEN_EMPTY = {"fisher_accumulate", "ratio_mask", "lerp_sync", "fd_hvp", "merge", "perturb_dir", "row_norms",
                    "perturb_noise", "topk_mask", "combine_step", "restore_mt", "soup_combine", "soup_coef_grads"}  # fmt: skip


class _Recorder:
    """Stands in for the CUDA-only helpers of the wrappers: tables are built on the host and
    recorded with the launch that uses them; _C calls are recorded, not run."""

    def __init__(self, ext: ModuleType) -> None:
        self.ext = ext
        self.tables: list[tuple[str, list, tuple]] = []  # (op, operands, (rows, n_rows, n_chunks))
        self.calls: list[tuple[str, tuple, list | None]] = []  # (entry point, args, operands of its table)

    def build_table(self, op, operands, device, *, units=None, aux=None, pointer_operands=(), dynamic=()):
        from fastclu.ops.cuda._launch import Table, table_rows

        content = table_rows(op, operands, units=units, aux=aux, pointer_operands=pointer_operands)
        self.tables.append((op, list(operands), content))
        return Table(None, content[1], content[2])

    def __getattr__(self, name: str):
        real = getattr(self.ext, name)

        def call(*args):
            doc = real.__doc__.splitlines()[0]
            n_params = doc.count(": ")
            assert len(args) == n_params, f"{name} called with {len(args)} arguments, binding takes {n_params}"
            self.calls.append((name, args, self.tables[-1][1] if name in _LAYOUT and self.tables else None))
            if name in _NOOP_WHEN_EMPTY:
                n = _table_args(name)
                real(*[0] * n, *args[n:])  # converts every argument; an empty table launches nothing
            elif name == "restore":
                real(args[0], args[1], [0] * len(args[2]), args[3])  # zero bytes: no copy

        return call


@pytest.fixture
def recorder(cuda_backend: ModuleType, ext: ModuleType, monkeypatch: pytest.MonkeyPatch) -> _Recorder:
    import contextlib
    import importlib

    from fastclu._registry import FAMILIES
    from fastclu.ops.cuda import _launch

    rec = _Recorder(ext)
    for mod in [importlib.import_module(f"fastclu.ops.cuda.{f}") for f in FAMILIES]:
        monkeypatch.setattr(mod, "_C", rec)
        monkeypatch.setattr(mod, "require_cuda", lambda *a: None)
        monkeypatch.setattr(mod, "on_device", lambda dev: contextlib.nullcontext())
        monkeypatch.setattr(mod, "stream_of", lambda dev: 1234)
        monkeypatch.setattr(mod, "build_table", rec.build_table)
    # host allocations: NaN / 0xA5 poison, except the topk state the host reads back (no NaN flag)
    monkeypatch.setattr(
        _launch, "alloc",
        lambda shape, dtype, device: torch.full(shape if isinstance(shape, tuple) else (shape,),
                                                float("nan") if dtype.is_floating_point else 0, dtype=dtype),
    )  # fmt: skip
    return rec


def _same(got: list | None, want: list | None) -> bool:
    if got is None or want is None:
        return got is want
    return len(got) == len(want) and all(a is b for a, b in zip(got, want))


def test_wrappers_pass_operands_in_kernel_order(recorder: _Recorder) -> None:
    p = [torch.randn(5), torch.randn(3, 4), torch.randn(0)]
    q, r, s = ([torch.randn_like(x) for x in p] for _ in range(3))
    m = [ops.pack_bits(torch.rand(x.numel()) < 0.5) for x in p]

    _impl("fisher_accumulate_")(p, q, 0.25, power=1)
    _impl("lerp_sync_")(p, q, torch.tensor(0.5))
    _impl("fd_hvp_")(p, q, r, 0.125, accumulate=True)
    _impl("merge_")(p, q, 0.75)
    masks = _impl("ratio_mask")(p, q, 1.5, eps=1e-9)
    _impl("merge_stats")(p, q, r, s)
    _impl("gram")([p, q, r], mask=m, masked=[False, True, True])
    _impl("perturb_")(p, 0.5, backup=s, anchor=q, direction=None, seed=None, row_norms=None)
    _impl("perturb_")(p, 0.5, backup=None, anchor=None, direction=r, seed=None, row_norms=None)
    _impl("restore_")(p, s)
    calls = {name: (args, operands) for name, args, operands in recorder.calls}

    expect = {
        "fisher_accumulate": ([p, q], (0.25, 0, 1, 1234)),
        "lerp_sync": ([p, q], (0.5, 0, 1234)),
        "fd_hvp": ([p, q, r], (0.125, 0, True, 1234)),
        "merge": ([p, q], (0.75, 0, 1234)),
        "ratio_mask": ([p, q, masks], (1.5, 0, 1e-9, 1234)),
        "merge_stats": ([p, q, r, s], None),
        "gram": ([p, q, r, None, m], None),
        "restore_mt": ([p, s], (1234,)),  # one launch for every tensor, not a copy per tensor
    }
    for name, (operands, tail) in expect.items():
        args, got = calls[name]
        assert len(got) == len(_LAYOUT[name]) and all(_same(a, b) for a, b in zip(got, operands)), name
        if tail is not None:
            assert args[_T:] == tail, f"{name}: {args[_T:]} != {tail}"
    assert calls["gram"][0][_T : _T + 2] == (3, 0b110)  # n_roles, masked roles as bits
    # fp64 has no kernel dtype code: fastclu.ops routes fp64 lists to the reference (the one place
    # fp64 is decided), so the wrapper's old per-tensor copy path is gone; called directly, the
    # wrapper refuses fp64 with a clear error instead of launching
    pd, sd = [x.double() for x in p], [x.double() for x in s]
    n_calls = len(recorder.calls)
    with pytest.raises(TypeError, match=r"unsupported dtype torch\.float64"):
        _impl("restore_")(pd, sd)
    assert len(recorder.calls) == n_calls
    # both direction modes: mode 0 reads the anchor (task vector), mode 1 the direction
    dirs = [(args, ops_) for name, args, ops_ in recorder.calls if name == "perturb_dir"]
    assert _same(dirs[0][1][1], s) and _same(dirs[0][1][2], q) and dirs[0][0][_T + 2] == 0
    assert dirs[1][1][1] is None and _same(dirs[1][1][2], r) and dirs[1][0][_T + 2] == 1
    # tables: one row per non-empty tensor, chunk counts consistent with the launch
    for _, operands, (rows, n_rows, _n_chunks) in recorder.tables:
        assert n_rows == sum(1 for x in operands[0] if x.numel())
        assert len(rows) == n_rows * (HEADER + len(operands))


def test_soup_wrappers_operands_and_empty_tensors(recorder: _Recorder) -> None:
    p = [torch.randn(5), torch.randn(0), torch.randn(3, 4)]
    base, d0, d1, d2 = ([torch.randn_like(x) for x in p] for _ in range(4))
    coefs = torch.rand(2, 3)
    _impl("soup_combine_")(p, base, [d0, d1], coefs)
    got = _impl("soup_coef_grads")(p, [d0, d1, d2], layerwise=True)
    (c_name, c_args, c_ops), (g_name, g_args, g_ops) = recorder.calls
    assert (c_name, g_name) == ("soup_combine", "soup_coef_grads")
    assert all(_same(a, b) for a, b in zip(c_ops, [p, base, d0, d1])) and len(c_ops) == 4
    assert c_args[_T:] == (2, coefs.data_ptr(), 3, 1234)  # K, coefficients [K, n_cols], stream
    assert all(_same(a, b) for a, b in zip(g_ops, [p, d0, d1, d2])) and len(g_ops) == 4
    assert g_args[_T : _T + 2] == (3, 3)  # K, number of tensors (the empty one included)
    # nothing ran: the entries of the non-empty tensors stay poisoned, the empty tensor's are zeroed by the host
    assert got.shape == (3, 3) and torch.equal(got[:, 1], torch.zeros(3)) and got[:, [0, 2]].isnan().all()


def test_perturb_seed_wrapper_rows_and_norms(recorder: _Recorder) -> None:
    p = [torch.randn(3, 4, 2), torch.randn(7), torch.randn(0, 5), torch.randn(())]
    seed = 2**64 - 5
    norms = _impl("perturb_")(p, 0.5, backup=None, anchor=None, direction=None, seed=seed, row_norms=None)
    (rn_op, rn_ops, (rn_rows, rn_n, rn_units)), (pn_op, pn_ops, (pn_rows, pn_n, _)) = recorder.tables
    assert [rn_op, pn_op] == ["perturb_", "perturb_"]
    assert [name for name, _, _ in recorder.calls] == ["row_norms", "perturb_noise"]  # norms before the move
    # the row-norm table walks rows: units = rows per tensor, aux = row length
    assert rn_units == 3 + 1 + 1 and rn_n == 3
    width = HEADER + 2
    assert [rn_rows[i * width + 4] for i in range(rn_n)] == [8, 7, 1]
    assert [rn_rows[i * width + 3] for i in range(rn_n)] == [0, 1, 3]  # tensor index: the Philox key
    assert _same(rn_ops[1], norms) and _same(pn_ops[2], norms) and pn_ops[1] is None
    assert [pn_rows[i * (HEADER + 3) + 4] for i in range(pn_n)] == [8, 7, 1]
    assert [tuple(n.shape) for n in norms] == [(3,), (1,), (0,), (1,)]
    assert torch.equal(norms[2], torch.zeros(0))  # the empty tensor's norms are not left to a kernel
    noise = [args for name, args, _ in recorder.calls if name == "perturb_noise"]
    assert noise[0][_T:] == (0.5, 0, seed, 1234)


def _combine_kwargs(**over) -> dict:
    kw = {
        "rule": "adamw", "lr": 0.01, "coeffs": [1.0, torch.tensor(-0.5)], "scale": 0.7, "mask": None,
        "masked": [False, False], "mask_mode": "grad", "penalty": 0.3, "importance": None, "anchor": None,
        "grad_scale": None, "found_inf": None, "restore_from": None, "weight_decay": 0.01, "maximize": True,
        "momentum": 0.0, "dampening": 0.0, "nesterov": False, "init_momentum": False, "betas": (0.8, 0.9),
        "eps": 1e-6, "amsgrad": True,
    }  # fmt: skip
    kw.update(over)
    return kw


def test_combine_wrapper_config_and_operands(recorder: _Recorder) -> None:
    p = [torch.randn(5), torch.randn(2, 3)]
    g0, g1, imp, anc, rest = ([torch.randn_like(x) for x in p] for _ in range(5))
    st = {k: [torch.rand_like(x) for x in p] for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    st["step"] = [torch.tensor(4.0), torch.tensor(4.0)]
    m = [ops.pack_bits(torch.rand(x.numel()) < 0.5) for x in p]
    _impl("combine_step_")(
        p, [g0, g1], st, **_combine_kwargs(mask=m, masked=[True, False], mask_mode="update", importance=imp,
                                           anchor=anc, restore_from=rest)
    )  # fmt: skip
    ((name, args, operands),) = recorder.calls
    assert name == "combine_step"
    want = [p, rest, g0, g1, None, None, m, st["exp_avg"], st["exp_avg_sq"], st["max_exp_avg_sq"], imp, anc, None]
    assert len(operands) == len(_LAYOUT["combine_step"])
    assert all(_same(a, b) for a, b in zip(operands, want)), "combine operands out of kernel order"
    cfg = args[_T]
    assert cfg["rule"] == RULES["adamw"].id and cfg["flags"][1] and cfg["maximize"] and cfg["update_mode"]
    assert cfg["has_mask"] and "adamw" not in cfg  # a rule id, no per-rule flag
    assert cfg["has_restore"] and cfg["has_penalty"] and not cfg["has_grad_scale"] and cfg["found_inf_ptr"] == 0
    assert cfg["n_roles"] == 2 and cfg["masked_bits"] == 0b01
    assert cfg["lr"] == (0.01, 0) and cfg["scale"] == (0.7, 0) and cfg["penalty"] == (0.3, 0)
    assert cfg["coeffs"] == [(1.0, 0), (-0.5, 0)]  # a CPU 0-d tensor is read on the host
    # AdamW's slots (fastclu.ops.rules): weight_decay, beta1, beta2, eps; the rest zero
    assert cfg["hparams"] == [0.01, 0.8, 0.9, 1e-6, 0.0, 0.0] and cfg["flags"] == [1, 1, 0, 0]
    # CPU step counters: incremented on the host (as the reference does) and passed as one value
    assert cfg["step_mode"] == 0 and cfg["step"] == 5.0 and all(float(s) == 5.0 for s in st["step"])
    # the binding rejects a bad config before it touches anything (coeff[] has room for 4 roles)
    with pytest.raises(ValueError, match="n_roles"):
        recorder.ext.combine_step(0, 0, 0, 0, dict(cfg, n_roles=5, coeffs=[(1.0, 0)] * 5), 0)
    with pytest.raises(KeyError, match="step_mode"):
        recorder.ext.combine_step(0, 0, 0, 0, {k: v for k, v in cfg.items() if k != "step_mode"}, 0)


def test_combine_wrapper_penalty_zero_and_cpu_found_inf(recorder: _Recorder) -> None:
    p = [torch.randn(6)]
    g, imp, anc, rest, buf = ([torch.randn_like(p[0])] for _ in range(5))
    kw = _combine_kwargs(rule="sgd", momentum=0.9, amsgrad=False, coeffs=[1.0], masked=[False])
    # penalty == 0.0 (a host value): the reference skips the term, so the kernel must not read it
    _impl("combine_step_")(p, [g], {"momentum_buffer": buf}, **dict(kw, importance=imp, anchor=anc, penalty=0.0))
    ((_, args, operands),) = recorder.calls
    assert operands[10] is None and operands[11] is None and not args[_T]["has_penalty"]
    assert _same(operands[7], buf) and operands[8] is None and operands[12] is None
    # a set host found_inf: no launch, state untouched, but the fused restore still happens
    st = {"exp_avg": [torch.randn(6)], "exp_avg_sq": [torch.rand(6)], "max_exp_avg_sq": [torch.rand(6)],
          "step": [torch.tensor(2.0)]}  # fmt: skip
    before = {k: [x.clone() for x in v] for k, v in st.items()}
    _impl("combine_step_")(p, [g, g], st, **_combine_kwargs(found_inf=torch.tensor(1.0), restore_from=rest))
    assert len(recorder.calls) == 1
    assert torch.equal(p[0], rest[0])
    assert all(torch.equal(a, b) for k in st for a, b in zip(st[k], before[k]))
    # a clear host found_inf: the step runs (counter incremented once)
    _impl("combine_step_")(p, [g, g], st, **_combine_kwargs(found_inf=torch.tensor(0.0)))
    assert len(recorder.calls) == 2 and float(st["step"][0]) == 3.0 and recorder.calls[1][1][_T]["step"] == 3.0


def _nvcc() -> str | None:
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    cand = Path(home, "bin", "nvcc") if home else None
    return str(cand) if cand and cand.exists() else shutil.which("nvcc")


@pytest.mark.slow
def test_extension_compiles_for_sm80_sm90_without_warnings(tmp_path: Path) -> None:
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    import pybind11

    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    pkg = tmp_path / "fastclu"
    shutil.copytree(ROOT / "fastclu", pkg, ignore=shutil.ignore_patterns("_C*.so", "__pycache__"))
    sources = sorted(str(p) for p in (ROOT / "csrc").iterdir() if p.suffix in (".cu", ".cpp"))
    cmd = [
        nvcc, "-std=c++17", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-Werror", "all-warnings",
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=[sm_90,compute_90]",
        "-Xcompiler", "-fPIC,-fvisibility=hidden,-Wall", "-shared", f"-I{ROOT / 'csrc'}",
        f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}", *sources,
        "-cudart", "static", "-o", str(pkg / f"_C{suffix}"),
    ]  # fmt: skip
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "warning" not in (res.stdout + res.stderr).lower(), res.stdout + res.stderr
    env = dict(os.environ, PYTHONPATH=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    code = "import fastclu._C as C, fastclu.ops.cuda; print(C.__file__)"
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith(str(tmp_path))


# --- on a GPU: the kernels themselves (short smoke checks; tests/ops/kernels/ goes deeper) ---

DEV = torch.device("cuda") if HAS_GPU else None
SIZES = [1, 7, 8193, 0, 300]


def _rand(dtype: torch.dtype = torch.float32, lo: float = 0.1) -> list[torch.Tensor]:
    return [(lo + torch.rand(n, device=DEV)).to(dtype) for n in SIZES]


def _randn(dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    return [torch.randn(n, device=DEV).to(dtype) for n in SIZES]


def _close(a: list[torch.Tensor], b: list[torch.Tensor], tol: float = 2e-6) -> None:
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x.double(), y.double(), rtol=tol, atol=tol, msg=lambda m, i=i: f"tensor {i}: {m}")


@pytest.fixture
def poison_cuda(cuda_backend: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every buffer the cuda wrappers hand to a kernel to fill starts as NaN (floats) or 0xA5."""
    from fastclu.ops.cuda import _launch

    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else 0xA5
        return torch.full(shape if isinstance(shape, tuple) else (shape,), fill, dtype=dtype, device=device)

    monkeypatch.setattr(_launch, "alloc", alloc)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_gpu_elementwise_ops_match_reference(cuda_backend: ModuleType, dtype: torch.dtype, poison_cuda: None) -> None:
    tol = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    f, g = _rand(), _randn(dtype)
    got, want = [x.clone() for x in f], [x.clone() for x in f]
    ops.fisher_accumulate_(got, g, 0.3, backend="cuda")
    ops.fisher_accumulate_(want, g, 0.3, backend="reference")
    _close(got, want)
    a, b = _rand(dtype), _rand(dtype)
    assert all(torch.equal(x, y) for x, y in zip(ops.ratio_mask(a, b, 1.1, backend="cuda"),
                                                 ops.ratio_mask(a, b, 1.1, backend="reference")))  # fmt: skip
    s1, f1 = [x.float() for x in _randn()], _randn(dtype)
    s2, f2 = [x.clone() for x in s1], [x.clone() for x in f1]
    ops.lerp_sync_(s1, f1, 0.3, backend="cuda")
    ops.lerp_sync_(s2, f2, 0.3, backend="reference")
    _close(s1, s2)
    _close(f1, f2, tol)
    out1 = [torch.full_like(x, float("nan")) for x in g]
    out2 = [x.clone() for x in out1]
    gm = _randn(dtype)
    ops.fd_hvp_(out1, g, gm, torch.tensor(0.01, device=DEV), backend="cuda")
    ops.fd_hvp_(out2, g, gm, torch.tensor(0.01, device=DEV), backend="reference")
    _close(out1, out2, tol)


@pytest.mark.gpu
def test_gpu_topk_ties_and_reductions(cuda_backend: ModuleType, poison_cuda: None) -> None:
    scores = [torch.randint(0, 5, (n,), device=DEV).float() for n in SIZES]  # many ties
    total = sum(SIZES)
    for k in (0, 1, total // 3, total):
        assert all(torch.equal(x, y) for x, y in zip(ops.topk_mask(scores, k, backend="cuda"),
                                                     ops.topk_mask(scores, k, backend="reference")))  # fmt: skip
    bad = [x.clone() for x in scores]
    bad[2][4000] = float("nan")
    with pytest.raises(ValueError, match=r"scores\[2\] contains NaN"):
        ops.topk_mask(bad, 3, backend="cuda")
    gs = [_randn(), _randn(), _randn()]
    mask = [ops.pack_bits(torch.rand(n, device=DEV) < 0.5) for n in SIZES]
    g1 = ops.gram(gs, mask=mask, masked=[True, False, True], backend="cuda")
    g2 = ops.gram(gs, mask=mask, masked=[True, False, True], backend="reference")
    torch.testing.assert_close(g1, g2, rtol=2e-6, atol=2e-6)
    assert torch.equal(g1, ops.gram(gs, mask=mask, masked=[True, False, True], backend="cuda")), "not deterministic"
    p, a, fs, ft = _randn(), _randn(), _rand(), _randn()
    n1, d1 = ops.merge_stats(p, a, fs, ft, backend="cuda")
    n2, d2 = ops.merge_stats(p, a, fs, ft, backend="reference")
    torch.testing.assert_close(torch.stack([n1, d1]), torch.stack([n2, d2]), rtol=2e-6, atol=2e-6)


@pytest.mark.gpu
def test_gpu_perturb_restore_and_merge(cuda_backend: ModuleType, poison_cuda: None) -> None:
    params = [torch.randn(n, 3, device=DEV) for n in SIZES]
    clean = [x.clone() for x in params]
    backup = [torch.full_like(x, float("nan")) for x in params]
    ref = [x.clone() for x in params]
    seed = int(torch.randint(0, 2**62, ()).item())
    norms = ops.perturb_(params, 0.05, seed=seed, backup=backup, backend="cuda")
    norms_ref = ops.perturb_(ref, 0.05, seed=seed, backend="reference")
    _close(params, ref, 1e-5)
    _close(norms, norms_ref)
    assert all(torch.equal(b, c) for b, c in zip(backup, clean))
    ops.restore_(params, backup, backend="cuda")
    assert all(torch.equal(p, c) for p, c in zip(params, clean))
    anchor = [torch.randn_like(x) for x in params]
    m1, m2 = [x.clone() for x in params], [x.clone() for x in params]
    ops.merge_(m1, anchor, 0.4, backend="cuda")
    ops.merge_(m2, anchor, 0.4, backend="reference")
    _close(m1, m2)


@pytest.mark.gpu
@pytest.mark.parametrize("rule", ["sgd", "adamw"])
@pytest.mark.parametrize("mode", ["grad", "update"])
def test_gpu_combine_step_matches_reference(cuda_backend: ModuleType, rule: str, mode: str) -> None:
    def setup() -> tuple[list, list, dict]:
        torch.manual_seed(seed)
        p = _randn()
        gr = [_randn(), _randn()]
        if rule == "sgd":
            st = {"momentum_buffer": _randn()}
        else:
            st = {"exp_avg": _randn(), "exp_avg_sq": _rand(), "step": [torch.tensor(3.0) for _ in SIZES]}
        return p, gr, st

    seed = int(torch.randint(0, 2**31, ()).item())
    mask = [ops.pack_bits(torch.rand(n, device=DEV) < 0.5) for n in SIZES]
    kw = {
        "rule": rule, "lr": torch.tensor(0.01, device=DEV), "coeffs": [1.0, -0.5], "scale": 0.7, "mask": mask,
        "masked": [True, False], "mask_mode": mode, "weight_decay": 0.01, "momentum": 0.9, "nesterov": True,
        "grad_scale": torch.tensor(4.0, device=DEV), "found_inf": torch.tensor(0.0, device=DEV),
    }  # fmt: skip
    runs = []
    for backend in ("cuda", "reference"):
        p, gr, st = setup()
        ops.combine_step_(p, gr, st, backend=backend, **kw)
        runs.append((p, st))
    _close(runs[0][0], runs[1][0], 1e-5)
    for key in runs[0][1]:
        if key != "step":
            _close(runs[0][1][key], runs[1][1][key], 1e-5)
    p, gr, st = setup()
    before = [x.clone() for x in p]
    ops.combine_step_(p, gr, st, backend="cuda", **dict(kw, found_inf=torch.tensor(1.0, device=DEV)))
    assert all(torch.equal(x, y) for x, y in zip(p, before)), "found_inf must skip the step"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_combine_restore_from_fp32_into_low_precision(cuda_backend: ModuleType, dtype: torch.dtype) -> None:
    """restore_from in fp32 for fp16/bf16 params: the step starts from the restored (rounded) weights."""
    tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    clean = [torch.randn(n, device=DEV) for n in SIZES]
    grads = [_randn()]
    kw = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01, "importance": _rand(), "anchor": _randn(dtype)}
    runs = []
    for backend in ("cuda", "reference"):
        p = [torch.full(x.shape, float("nan"), device=DEV, dtype=dtype) for x in clean]
        st = {"momentum_buffer": [torch.ones_like(x) for x in clean]}
        ops.combine_step_(p, grads, st, restore_from=clean, penalty=0.5, backend=backend, **kw)
        runs.append((p, st["momentum_buffer"]))
    _close(runs[0][0], runs[1][0], tol)
    _close(runs[0][1], runs[1][1], 1e-5)
    # a skipped step still restores, rounding exactly as a copy into the params' dtype does
    p = [torch.full(x.shape, float("nan"), device=DEV, dtype=dtype) for x in clean]
    st = {"momentum_buffer": [torch.ones_like(x) for x in clean]}
    fi = torch.ones((), device=DEV)
    ops.combine_step_(p, grads, st, restore_from=clean, found_inf=fi, backend="cuda", **kw)
    assert all(torch.equal(a, b.to(dtype)) for a, b in zip(p, clean))
