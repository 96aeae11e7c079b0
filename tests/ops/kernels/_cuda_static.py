"""Static sm_90 reading of the CUDA kernels, no GPU needed: registers and spills, PTX load kinds.

Usage: ``python tests/ops/kernels/_cuda_static.py [OUTDIR] [combine gram ...]`` (default: every
``csrc/*.cu`` with kernels). Compiles each file with nvcc and setup.py's flags for ``sm_90``,
prints one line per kernel (``ptxas -v``: registers, spill bytes) and, per file, the PTX loads by
state space (``ld.global`` / ``ld.global.nc`` / generic ``ld``) and the kernels with generic
loads or stores. Needs nvcc on PATH.
"""

from __future__ import annotations

import collections
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[3]
SRC = ROOT / "csrc"
FLAGS = ["-arch=sm_90", "-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17", f"-I{SRC}"]
FILES = ["combine", "gram", "masks", "fisher", "lerp", "hvp", "merge", "perturb", "soup"]


def _demangle(name: str) -> str:
    out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=False).stdout.strip() or name
    return re.sub(r"fastclu::|\(anonymous namespace\)::", "", out)


_GENERIC = re.compile(
    r"^\s*(?:@%p\d+\s+)?(ld|st)(?:\.volatile|\.relaxed\.\w+|\.weak)?(?:\.v[248])?\.[busf]\d+\s", re.MULTILINE
)


def generic_accesses(ptx: str) -> dict[str, tuple[int, int]]:
    """Per kernel (demangled): generic-space ``(loads, stores)`` in the PTX (no state space
    named: ``ld.f32``, not ``ld.global.f32``), which ptxas assembles as generic LD / ST."""
    out = {}
    for m in re.finditer(r"\.entry\s+(\w+)\((.*?)\n}\n", ptx, re.DOTALL):
        kinds = [g.group(1) for g in _GENERIC.finditer(m.group(2))]
        out[_demangle(m.group(1))] = (kinds.count("ld"), kinds.count("st"))
    return out


def compile_ptx(stem: str, out: pathlib.Path) -> str:
    """PTX of ``csrc/<stem>.cu`` for sm_90 (setup.py's flags)."""
    subprocess.run(["nvcc", *FLAGS, "-ptx", str(SRC / f"{stem}.cu"), "-o", str(out / f"{stem}.ptx")], check=True)
    return (out / f"{stem}.ptx").read_text()


def read_file(stem: str, out: pathlib.Path) -> list[str]:
    """Lines of the static reading of ``csrc/<stem>.cu``."""
    src = SRC / f"{stem}.cu"
    r = subprocess.run(["nvcc", *FLAGS, "-Xptxas", "-v", "-c", str(src), "-o", str(out / f"{stem}.o")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    ptx = compile_ptx(stem, out)
    lines, kernel, spill = [], None, ""
    for line in r.stderr.splitlines():
        if m := re.search(r"entry function '(\w+)'", line):
            kernel = _demangle(m.group(1))
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spill = f"spill st/ld {m.group(1)}/{m.group(2)} B"
        if (m := re.search(r"Used (\d+) registers", line)) and kernel:
            lines.append(f"{stem:8s} regs={m.group(1):>3s} {spill:20s} {kernel}")
            kernel = None
    ops = re.findall(r"\b(ld(?:\.global|\.param|\.shared|\.local|\.const)?(?:\.nc)?)(?:\.v[24])?\.\w+", ptx)
    kinds = collections.Counter(o if o != "ld" else "ld (generic)" for o in ops)
    lines.append(f"{stem:8s} PTX loads: {dict(kinds)}")
    generic = {k: v for k, v in generic_accesses(ptx).items() if any(v)}
    lines.append(f"{stem:8s} generic (ld, st) per kernel: {generic or 'none'}")
    return lines


def main() -> None:
    args = sys.argv[1:]
    out = pathlib.Path(args.pop(0)) if args and not args[0].isidentifier() else pathlib.Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    for stem in args or FILES:
        print("\n".join(read_file(stem, out)), flush=True)


if __name__ == "__main__":
    main()
