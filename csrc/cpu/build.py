"""Build ``fastclu._C_cpu``: the csrc CUDA kernels compiled by g++ for the CPU execution mode.

A test-only module, never part of a wheel (setup.py does not know it; ``*.so`` is ignored by
git). It is compiled from the same sources as ``fastclu._C`` -- every ``csrc/*.cu`` (as C++),
every ``csrc/*.cpp`` (the pybind11 bindings) -- plus ``csrc/cpu/*.cpp`` (the fiber runtime and
the module entry point), with ``csrc/cpu/cuda_shim.h`` standing in for the CUDA toolkit. No CUDA
toolkit is needed. Rebuilds are incremental (an object is recompiled when its source, any
header or the flags change). Usage: ``python csrc/cpu/build.py [-v] [-j N] [--force]``.

Environment: ``CXX`` (default g++), ``MAX_JOBS`` (parallel compiles, default: CPU count),
``FASTCLU_CPU_CXXFLAGS`` (extra flags, shell-split).
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shlex
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
CPU = CSRC / "cpu"
BUILD = ROOT / "build" / "fastclu_C_cpu"
MODULE = "_C_cpu"
# -ffp-contract=off: no fused multiply-add, so __fmul_rn/__fadd_rn round like the GPU's.
# -fno-strict-aliasing: the kernels reinterpret element arrays as vector types, as CUDA allows.
FLAGS = ["-std=c++17", "-O2", "-g0", "-fPIC", "-fvisibility=hidden", "-ffp-contract=off", "-fno-strict-aliasing",
         "-DFASTCLU_CPU", "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function"]  # fmt: skip


def output_path() -> Path:
    return ROOT / "fastclu" / (MODULE + sysconfig.get_config_var("EXT_SUFFIX"))


def sources() -> list[Path]:
    """Every kernel and binding source of ``fastclu._C`` (globbed, so renames need no edit) plus the runtime."""
    return sorted(CSRC.glob("*.cu")) + sorted(CSRC.glob("*.cpp")) + sorted(CPU.glob("*.cpp"))


def headers() -> list[Path]:
    # csrc/rules/ too: a rule's header changes combine.cu's object
    dirs = (CSRC, CSRC / "rules", CPU, CPU / "include")
    return sorted(p for d in dirs for pat in ("*.h", "*.cuh", "*.hpp") for p in d.glob(pat))


def compile_flags() -> list[str]:
    import pybind11

    return [
        *FLAGS, "-include", str(CPU / "cuda_shim.h"),
        "-I" + str(CPU / "include"), "-I" + str(CPU), "-I" + str(CSRC),
        "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"],
        *shlex.split(os.environ.get("FASTCLU_CPU_CXXFLAGS", "")),
    ]  # fmt: skip


def _digest(paths: list[Path], flags: list[str]) -> str:
    h = hashlib.sha256("\0".join(flags).encode())
    for p in paths:
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def _compile(cxx: str, src: Path, obj: Path, flags: list[str], header_digest: str) -> bool:
    """Compile ``src`` unless ``obj`` was built from the same source, headers and flags."""
    stamp = obj.with_suffix(".stamp")
    key = _digest([src], flags) + header_digest
    if obj.exists() and stamp.exists() and stamp.read_text() == key:
        return False
    lang = ["-x", "c++"] if src.suffix == ".cu" else []
    cmd = [cxx, *flags, *lang, "-c", str(src), "-o", str(obj)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"compiling {src.relative_to(ROOT)} for the CPU mode failed:\n{shlex.join(cmd)}\n{res.stderr}"
        )
    stamp.write_text(key)
    return True


def build(force: bool = False, jobs: int | None = None, verbose: bool = False) -> Path:
    """Compile and link ``fastclu/_C_cpu*.so`` (incrementally); returns its path."""
    cxx = os.environ.get("CXX", "g++")
    flags = compile_flags()
    srcs = sources()
    if not any(s.suffix == ".cu" for s in srcs):
        raise RuntimeError(f"no CUDA sources in {CSRC}")
    objdir = BUILD / "obj"
    objdir.mkdir(parents=True, exist_ok=True)
    out = output_path()
    jobs = jobs or int(os.environ.get("MAX_JOBS", "0") or 0) or os.cpu_count() or 1
    t0 = time.perf_counter()
    with open(BUILD / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test processes build once
        if force:
            for stamp in objdir.glob("*.stamp"):
                stamp.unlink()
        header_digest = _digest(headers(), flags)
        objs = [objdir / (f"{s.parent.name}_{s.name}.o") for s in srcs]
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            built = list(pool.map(lambda so: _compile(cxx, so[0], so[1], flags, header_digest), zip(srcs, objs)))
        link_key = _digest(objs, [cxx])
        link_stamp = BUILD / "link.stamp"
        if any(built) or not out.exists() or not link_stamp.exists() or link_stamp.read_text() != link_key:
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            cmd = [cxx, "-shared", *map(str, objs), "-o", str(tmp)]
            res = subprocess.run(cmd, check=False, capture_output=True, text=True)
            if res.returncode != 0:
                raise RuntimeError(f"linking {out.name} failed:\n{shlex.join(cmd)}\n{res.stderr}")
            os.replace(tmp, out)  # atomic: a process that already loaded the old file keeps it
            link_stamp.write_text(link_key)
    if verbose:
        print(f"{out.relative_to(ROOT)}: {sum(built)}/{len(srcs)} sources compiled in {time.perf_counter() - t0:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="recompile every source")
    parser.add_argument("-j", "--jobs", type=int, default=None, help="parallel compiles")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    try:
        build(force=args.force, jobs=args.jobs, verbose=args.verbose)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
