"""Compile every Triton kernel for a CUDA target without a GPU (run in a subprocess).

Usage: ``python _compile_kernels.py [all]``; prints one JSON line per kernel variant:
``{"kernel", "variant", "ok", "error", "vector_accesses"}``. Needs no device: triton's bundled
ptxas assembles the PTX. Must run without ``TRITON_INTERPRET`` (the helpers are then jitted).
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastclu.ops.rules import RULES, StepConfig
from fastclu.ops.triton import _reduce, combine, fisher, gram, hvp, lerp, masks, merge, perturb, soup
from fastclu.ops.triton.rules import adamw as adamw_rule
from fastclu.ops.triton.rules import update_of

TARGET = GPUTarget("cuda", 90, 32)
I64P = {"tab", "dyn", "ptrs", "numel", "blk_tensor", "blk_start", "blk_global", "index", "rowlen", "state", "hist", "ties",
        "ties_before"}  # fmt: skip
INTS = {"n_rows", "n_tensors", "blk0", "n_blocks", "n_out", "seed_lo", "seed_hi", "start", "n", "count", "tensor_index",
        "n_cols", "col_stride", "max_count"}  # fmt: skip
FLOATS = {"wd", "momentum", "one_minus_damp", "eps"} | {f"h{k}" for k in range(6)}
# every rule with every switch on that its hyperparameters allow (CLASSP: a general power)
RULE_CONFIGS = {
    "sgd": StepConfig("sgd", 0.1, weight_decay=0.1, momentum=0.9, nesterov=True),
    "adamw": StepConfig("adamw", 0.1, weight_decay=0.1, amsgrad=True),
    "classp": StepConfig("classp", 0.1, power=1.5),
}
f32, f16, bf16, f64 = tl.float32, tl.float16, tl.bfloat16, tl.float64


def _sig(fn, consts: dict, int_types: dict) -> dict:
    sig = {}
    for a in fn.arg_names:
        if a in consts:
            sig[a] = "constexpr"
        elif a in I64P:
            sig[a] = "*i64"
        elif a in ("part", "seg_out"):
            sig[a] = "*fp64"
        elif a in INTS:
            # as Triton types a Python int by value at launch: small ones i32, [2**31, 2**32) u32
            sig[a] = int_types.get(a, "i32")
        elif a in FLOATS or a.endswith(("_val", "_hi", "_mid", "_lo")):
            sig[a] = "fp32"
        else:
            sig[a] = "*fp32"
    return sig


def cases(full: bool) -> list[tuple[object, dict]]:
    out = []
    for even in (True, False) if full else (True,):
        c = {"BLOCK": 1024, "EVEN": even, "ALIGN": 16, "LAYOUT": 3 + 256 * 0b110}  # 3 operands, 2 per-step
        out += [
            (lerp._lerp_sync_kernel, dict(BETA_T=False, DS=f32, DF=f16, **c)),
            (fisher._fisher_kernel, dict(S_T=True, POWER=2, DF=f32, DG=bf16, **c)),
            (masks._ratio_kernel, dict(G_T=False, DF=f32, DR=f32, **c)),
            (masks._ratio_kernel, dict(G_T=True, DF=bf16, DR=f32, **c)),
            (masks._topk_hist_kernel, dict(SHIFT=16, D=f16, **c)),
            (masks._topk_hist_kernel, dict(SHIFT=24, D=bf16, **c)),
            (masks._topk_ties_kernel, dict(D=f32, **c)),
            (masks._topk_write_kernel, dict(D=f32, **c)),
            (merge._merge_kernel, dict(A_T=True, DP=f32, DA=f32, **c)),
            (hvp._fd_hvp_kernel, dict(E_T=False, ACC=True, DO=f32, DPL=f16, DMI=f16, **c)),
            (perturb._perturb_kernel, dict(S_T=True, MODE=2, BACKUP=True, DP=bf16, DS=f32, **c)),
            (perturb._perturb_kernel, dict(S_T=False, MODE=0, BACKUP=False, DP=f32, DS=f32, **c)),
            (perturb._copy_kernel, dict(DB=tl.int16, **c)),
            (gram._gram_kernel, dict(R=4, M0=True, M1=False, M2=True, M3=False, HAS_MASK=True, D0=f32, D1=f16,
                                           D2=bf16, D3=f32, **c)),
            (merge._merge_stats_kernel, dict(DP=f32, DA=f32, DF=f32, DT=f32, **c)),
            (soup._soup_combine_kernel, dict(K=3, DO=bf16, DB=f32, DD=f32, **{**c, "LAYOUT": 5})),
            (soup._soup_partials_kernel, dict(K=3, DG=bf16, DD=f32, **{**c, "LAYOUT": 4 + 256 * 0b1})),
        ]  # fmt: skip
        for rule in RULES:
            flags = RULE_CONFIGS[rule].flags
            out.append((combine._combine_kernel, dict(
                LR_T=True, C0_T=True, C1_T=False, C2_T=False, C3_T=False, SC_T=True, PEN_T=False, CLIP=True,
                CL_T=False, R=2, GATE0=True,
                GATE1=False, GATE2=False, GATE3=False, HAS_MASK=True, UPDATE=True, HAS_PEN=True, HAS_GS=True,
                HAS_FI=True, RESTORE=True, RULE=update_of(rule), MAXIMIZE=True, F0=flags[0], F1=flags[1],
                F2=flags[2], F3=flags[3], DP=f16, D0=f32, D1=f16, D2=f32, D3=f32, DB0=f32, DB1=f32, DB2=f32,
                DI=f32, DA=f16, DR=f16, **c)))  # fmt: skip
    out += [
        (adamw_rule._step_kernel, {"HAS_FI": True, "LR_T": False, "DST": f32, "TB": 256, "LAYOUT": 13}),
        (masks._topk_select_kernel, {"SHIFT": 24}),
        (_reduce._sum_partials_kernel, {"BLOCK": 1024}),
        (soup._soup_segments_kernel, {"K": 3, "BLOCK": 1024, "CHUNK": 1024, "LAYOUT": 4 + 256 * 0b1}),
        (perturb._row_norm_kernel, {"DP": f16, "BLOCK": 1024, "LAYOUT": 2 + 256 * 0b10}),
        # int arguments equal to 1 arrive as constexprs on the GPU
        (perturb._words_kernel, {"BLOCK": 1024, "tensor_index": 1, "seed_lo": 1}),
        (perturb._words_kernel, {"BLOCK": 1024, "_int_types": {"start": "u32", "seed_lo": "u32", "seed_hi": "u32"}}),
        (perturb._normal_kernel, {"BLOCK": 1024, "start": 1}),
        (perturb._normal_kernel, {"BLOCK": 1024, "_int_types": {"start": "i64"}}),
    ]
    return out


def ptx_counts(ptx: str) -> dict:
    """Static counts of one kernel's global memory instructions (any predicate, any width)."""
    acc = re.findall(r"(?:@%p\d+\s+)?(ld|st)\.global((?:\.[a-z]+)*?)(\.v[248])?\.(\w+)\s", ptx)
    return {
        "vector_accesses": sum(1 for _, _, v, _ in acc if v),
        "byte_loads": sum(1 for op, _, _, t in acc if op == "ld" and t in ("u8", "b8", "s8")),
        "scalar_stores": sum(1 for op, _, v, _ in acc if op == "st" and not v),
        "vector_stores": sum(1 for op, _, v, _ in acc if op == "st" and v),
    }


def _shown(v: object) -> object:
    fn = getattr(v, "fn", None)  # a Triton function passed as a constexpr (an update rule)
    return f"{fn.__module__}.{fn.__name__}" if fn is not None else v


def main() -> None:
    for fn, consts in cases(len(sys.argv) > 1 and sys.argv[1] == "all"):
        variant = {k: (str(v) if isinstance(v, tl.dtype) else _shown(v)) for k, v in consts.items()}
        int_types = consts.get("_int_types", {})
        consts = {k: v for k, v in consts.items() if k != "_int_types"}
        rec = {
            "kernel": fn.__name__,
            "variant": variant,
            "ok": False,
            "error": None,
            "vector_accesses": 0,
        }  # + ptx_counts
        try:
            k = triton.compile(
                ASTSource(fn=fn, signature=_sig(fn, consts, int_types), constexprs=consts), target=TARGET
            )
            rec["ok"] = True
            rec.update(ptx_counts(k.asm["ptx"]))
            if os.environ.get("FASTCLU_PTX_DIR"):  # keep the PTX for reading (one file per variant)
                name = f"{fn.__name__}_{abs(hash(json.dumps(variant, sort_keys=True))) % 10**6}.ptx"
                pathlib.Path(os.environ["FASTCLU_PTX_DIR"], name).write_text(k.asm["ptx"])
        except Exception as e:  # noqa: BLE001 - report every failure, keep compiling the rest
            rec["error"] = f"{e.__class__.__name__}: {e}"[:2000]
        print(json.dumps(rec), flush=True)


if __name__ == "__main__":
    main()
