"""Build script: the pure-Python package plus the optional CUDA extension ``fastclu._C``.

The extension is compiled from every ``csrc/*.cu`` and ``csrc/*.cpp`` by nvcc, driven by a
``build.ninja`` written into the build temp dir (so rebuilds are incremental and parallel).
It links no torch library and links the CUDA runtime statically: one build serves any torch
version, and importing it needs neither libtorch nor libcudart.so nor a GPU (the static
runtime only touches the driver on the first CUDA call).

Environment:
    FASTCLU_BUILD_CUDA   auto (default): build the extension when nvcc is found;
                         1: build it or fail with a clear error; 0: pure-Python package.
    FASTCLU_CUDA_ARCHS   compute capabilities, ";"- or ","-separated (default "80;90"; "8.0",
                         "90a", "100f" also accepted): SASS for each plus PTX of the highest.
    CUDA_HOME/CUDA_PATH  toolkit root searched for bin/nvcc before PATH.
    MAX_JOBS             parallel compile jobs (ninja -j); default: ninja's own choice.
    FASTCLU_NVCC_FLAGS   extra nvcc flags appended to every compile (shell-split).
    CUDAHOSTCXX          host compiler for nvcc (-ccbin); default: nvcc's own choice.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Mapping
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = "csrc"
EXT_NAME = "fastclu._C"
DEFAULT_ARCHS = "80;90"
COMPILE_FLAGS = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", "-std=c++17"]
# -fvisibility=hidden keeps pybind11's internals private; --exclude-libs hides the statically
# linked cudart symbols so they never interpose on (or get interposed by) torch's libcudart.
HOST_FLAGS = ["-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden"]
LINK_FLAGS = ["-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL"]


class BuildConfigError(RuntimeError):
    """A build setting (environment variable or toolchain) is invalid or missing."""


def _log(msg: str) -> None:
    print(f"fastclu build: {msg}", file=sys.stderr, flush=True)


def build_mode(env: Mapping[str, str] = os.environ) -> str:
    """``FASTCLU_BUILD_CUDA`` normalised to ``"auto"``, ``"1"`` or ``"0"``."""
    raw = env.get("FASTCLU_BUILD_CUDA", "auto").strip().lower()
    table = {"": "auto", "auto": "auto", "1": "1", "true": "1", "yes": "1", "on": "1",
             "0": "0", "false": "0", "no": "0", "off": "0"}  # fmt: skip
    if raw not in table:
        raise BuildConfigError(f"FASTCLU_BUILD_CUDA must be auto, 1 or 0, got {raw!r}")
    return table[raw]


def find_nvcc(env: Mapping[str, str] = os.environ) -> str | None:
    """Path of nvcc: ``$CUDA_HOME/bin``, then ``$CUDA_PATH/bin``, then ``PATH`` (None if absent)."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = env.get(var)
        if root:
            cand = Path(root) / "bin" / "nvcc"
            if cand.is_file() and os.access(cand, os.X_OK):
                return str(cand)
            _log(f"{var}={root} has no executable bin/nvcc; searching further")
    return shutil.which("nvcc", path=env.get("PATH", os.defpath))


def cuda_archs(env: Mapping[str, str] = os.environ) -> list[str]:
    """``FASTCLU_CUDA_ARCHS`` as normalised arch names (``"80"``, ``"90a"``), sorted, unique."""
    raw = env.get("FASTCLU_CUDA_ARCHS", DEFAULT_ARCHS)
    out: list[str] = []
    for item in re.split(r"[;,\s]+", raw.strip()):
        if not item:
            continue
        m = re.fullmatch(r"(?:sm_|compute_)?(\d+)(?:\.(\d))?([af]?)", item.strip().lower())
        if m is None:
            raise BuildConfigError(f"FASTCLU_CUDA_ARCHS: cannot parse {item!r} (expected e.g. 80, 8.0, 90a)")
        major, minor, suffix = m.groups()
        name = f"{major}{minor}{suffix}" if minor is not None else f"{major}{suffix}"
        if int(re.sub(r"\D", "", name)) < 50:
            raise BuildConfigError(f"FASTCLU_CUDA_ARCHS: {item!r} is not a CUDA compute capability")
        if name not in out:
            out.append(name)
    if not out:
        raise BuildConfigError(f"FASTCLU_CUDA_ARCHS is empty ({raw!r})")
    return sorted(out, key=lambda a: (int(re.sub(r"\D", "", a)), a))


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch plus PTX of the highest, so newer GPUs can JIT the kernels.

    The PTX drops an ``a``/``f`` suffix: arch-specific PTX would not run on later GPUs.
    """
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    top = re.sub(r"\D", "", archs[-1])
    flags.append(f"-gencode=arch=compute_{top},code=compute_{top}")
    return flags


def max_jobs(env: Mapping[str, str] = os.environ) -> int | None:
    """``MAX_JOBS`` as a positive int, or None when unset."""
    raw = env.get("MAX_JOBS", "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise BuildConfigError(f"MAX_JOBS must be a positive integer, got {raw!r}")
    return int(raw)


def cuda_sources(root: Path = ROOT) -> list[str]:
    """Every ``csrc/*.cu`` and ``csrc/*.cpp``, relative to ``root`` (setuptools wants relative paths)."""
    d = root / CSRC
    files = sorted(p for pat in ("*.cu", "*.cpp") for p in d.glob(pat))
    return [p.relative_to(root).as_posix() for p in files]


def cuda_headers(root: Path = ROOT) -> list[str]:
    """Every header under ``csrc/`` (update rules live in ``csrc/rules/``)."""
    d = root / CSRC
    files = sorted(p for pat in ("*.cuh", "*.h", "*.hpp") for p in d.rglob(pat))
    return [p.relative_to(root).as_posix() for p in files]


def find_ninja() -> str:
    """The ninja executable: the ``ninja`` PyPI package (a build requirement), else PATH."""
    try:
        import ninja  # type: ignore[import-not-found]

        cand = Path(ninja.BIN_DIR) / "ninja"
        if cand.is_file():
            return str(cand)
    except ImportError:
        pass
    found = shutil.which("ninja")
    if found is None:
        raise BuildConfigError("ninja is needed to build fastclu._C: pip install ninja")
    return found


def _ninja_path(p: str | Path) -> str:
    # Paths on build/input lines: ninja treats "$", " " and ":" specially.
    return str(p).replace("$", "$$").replace(" ", "$ ").replace(":", "$:")


def _ninja_cmd(args: list[str]) -> str:
    # Values of variables are shell command text; only "$" needs ninja escaping there.
    return " ".join(shlex.quote(a) for a in args).replace("$", "$$")


def write_build_ninja(
    path: Path, nvcc: str, sources: list[Path], objdir: Path, output: Path, cflags: list[str], ldflags: list[str]
) -> None:
    """Write a ninja file compiling ``sources`` to objects and linking them into ``output``."""
    lines = [
        "ninja_required_version = 1.3",
        f"nvcc = {_ninja_cmd([nvcc])}",
        f"cflags = {_ninja_cmd(cflags)}",
        f"ldflags = {_ninja_cmd(ldflags)}",
        "",
        "rule nvcc_compile",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = NVCC $in",
        "",
        "rule nvcc_link",
        "  command = $nvcc $in $ldflags -o $out",
        "  description = LINK $out",
        "",
    ]
    objs = []
    for src in sources:
        obj = objdir / (src.name + ".o")
        objs.append(obj)
        lines.append(f"build {_ninja_path(obj)}: nvcc_compile {_ninja_path(src)}")
    lines.append(f"build {_ninja_path(output)}: nvcc_link {' '.join(_ninja_path(o) for o in objs)}")
    lines.append(f"default {_ninja_path(output)}")
    text = "\n".join(lines) + "\n"
    # Rewriting an identical file keeps ninja's view of the build unchanged (incremental rebuilds).
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


class NinjaNvccBuildExt(build_ext):
    """build_ext that compiles CUDA extensions with nvcc through a generated build.ninja."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != EXT_NAME:
            super().build_extension(ext)
            return
        try:
            import pybind11
        except ImportError as e:
            raise BuildConfigError("pybind11 is needed to build fastclu._C: pip install pybind11") from e

        nvcc = find_nvcc()
        if nvcc is None:  # checked before setup(); the environment may have changed since
            raise BuildConfigError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
        tmp = Path(self.build_temp).resolve() / "fastclu_C"
        objdir = tmp / "obj"
        objdir.mkdir(parents=True, exist_ok=True)
        output = Path(self.get_ext_fullpath(ext.name)).resolve()
        output.parent.mkdir(parents=True, exist_ok=True)
        archs = cuda_archs()
        cflags = (
            COMPILE_FLAGS
            + gencode_flags(archs)
            + HOST_FLAGS
            + ["-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"], "-I" + str(ROOT / CSRC)]
            + shlex.split(os.environ.get("FASTCLU_NVCC_FLAGS", ""))
        )
        ldflags = list(LINK_FLAGS)
        host_cxx = os.environ.get("CUDAHOSTCXX")
        if host_cxx:
            cflags += ["-ccbin", host_cxx]
            ldflags += ["-ccbin", host_cxx]
        sources = [(ROOT / s).resolve() for s in ext.sources]
        write_build_ninja(tmp / "build.ninja", nvcc, sources, objdir, output, cflags, ldflags)
        cmd = [find_ninja(), "-C", str(tmp), "-f", "build.ninja"]
        jobs = max_jobs()
        if jobs is not None:
            cmd += ["-j", str(jobs)]
        _log(f"nvcc {nvcc}, archs {';'.join(archs)}, {len(sources)} sources -> {output}")
        try:
            subprocess.run(cmd, check=True)
        except subprocess.CalledProcessError as e:
            raise BuildConfigError(
                f"building {EXT_NAME} failed (ninja exit {e.returncode}); see the nvcc output above. "
                "FASTCLU_BUILD_CUDA=0 installs the package without it (reference and triton backends only)."
            ) from e


def extensions(env: Mapping[str, str] = os.environ, root: Path = ROOT) -> list[Extension]:
    """The extension list for setup(): ``[fastclu._C]`` or ``[]`` per FASTCLU_BUILD_CUDA."""
    mode = build_mode(env)
    if mode == "0":
        _log("FASTCLU_BUILD_CUDA=0: pure-Python package (no fastclu._C)")
        return []
    nvcc = find_nvcc(env)
    sources = cuda_sources(root)
    if nvcc is None:
        if mode == "1":
            raise BuildConfigError(
                "FASTCLU_BUILD_CUDA=1 but nvcc was not found in $CUDA_HOME/bin, $CUDA_PATH/bin or PATH; "
                "install the CUDA toolkit (or set CUDA_HOME), or set FASTCLU_BUILD_CUDA=0"
            )
        _log("nvcc not found: pure-Python package (no fastclu._C); set CUDA_HOME to build it")
        return []
    if not sources:
        if mode == "1":
            raise BuildConfigError(f"FASTCLU_BUILD_CUDA=1 but {root / CSRC} has no .cu/.cpp sources")
        _log(f"no sources in {CSRC}/: pure-Python package (no fastclu._C)")
        return []
    cuda_archs(env)  # fail early on a bad FASTCLU_CUDA_ARCHS
    max_jobs(env)
    return [Extension(EXT_NAME, sources=sources, depends=cuda_headers(root))]


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__; tests import it
    try:
        ext_modules = extensions()
    except BuildConfigError as e:
        sys.exit(f"error: {e}")
    setup(ext_modules=ext_modules, cmdclass={"build_ext": NinjaNvccBuildExt}, zip_safe=False)
