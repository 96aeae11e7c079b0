"""Static sm_90 reading of the CUDA kernels, no GPU needed: registers and spills, PTX load kinds.

Usage: ``python tests/ops/kernels/_cuda_static.py [OUTDIR] [combine gram ...]`` (default: every
``csrc/*.cu`` with kernels). Compiles each file with nvcc and setup.py's flags for ``sm_90``,
prints one line per kernel (``ptxas -v``: registers, spill bytes) and, per file, the PTX loads by
state space (``ld.global`` / ``ld.global.nc`` / generic ``ld``). Needs nvcc on PATH.
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
FILES = ["combine", "gram", "masks", "fisher", "lerp", "hvp", "merge", "perturb"]


def _demangle(name: str) -> str:
    out = subprocess.run(["c++filt", name], capture_output=True, text=True, check=False).stdout.strip() or name
    return re.sub(r"fastclu::|\(anonymous namespace\)::", "", out)


def read_file(stem: str, out: pathlib.Path) -> list[str]:
    """Lines of the static reading of ``csrc/<stem>.cu``."""
    src = SRC / f"{stem}.cu"
    r = subprocess.run(["nvcc", *FLAGS, "-Xptxas", "-v", "-c", str(src), "-o", str(out / f"{stem}.o")],
                       capture_output=True, text=True, check=True)  # fmt: skip
    subprocess.run(["nvcc", *FLAGS, "-ptx", str(src), "-o", str(out / f"{stem}.ptx")], check=True)
    lines, kernel, spill = [], None, ""
    for line in r.stderr.splitlines():
        if m := re.search(r"entry function '(\w+)'", line):
            kernel = _demangle(m.group(1))
        if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            spill = f"spill st/ld {m.group(1)}/{m.group(2)} B"
        if (m := re.search(r"Used (\d+) registers", line)) and kernel:
            lines.append(f"{stem:8s} regs={m.group(1):>3s} {spill:20s} {kernel}")
            kernel = None
    ptx = (out / f"{stem}.ptx").read_text()
    ops = re.findall(r"\b(ld(?:\.global|\.param|\.shared|\.local|\.const)?(?:\.nc)?)(?:\.v[24])?\.\w+", ptx)
    kinds = collections.Counter(o if o != "ld" else "ld (generic)" for o in ops)
    lines.append(f"{stem:8s} PTX loads: {dict(kinds)}")
    return lines


def main() -> None:
    args = sys.argv[1:]
    out = pathlib.Path(args.pop(0)) if args and not args[0].isidentifier() else pathlib.Path(tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    for stem in args or FILES:
        print("\n".join(read_file(stem, out)), flush=True)


if __name__ == "__main__":
    main()
