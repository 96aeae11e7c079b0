"""Build and packaging: build settings, the generated ninja file, the extension, the wheels.

The wheel builds are slow (a copy of the tree, a real build); the rest runs in a second.
``FASTCLU_EXPECT_EXTENSION=1`` (set by .ci/run when it builds fastclu._C) turns a missing
extension into a failure instead of a reported absence.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import stat
import struct
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

import fastclu

ROOT = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
EXPECT_EXT = os.environ.get("FASTCLU_EXPECT_EXTENSION") == "1"


def _load_setup() -> ModuleType:
    # setup.py only calls setup() when run as __main__, so importing it gives its helpers.
    spec = importlib.util.spec_from_file_location("fastclu_setup_under_test", ROOT / "setup.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def S() -> ModuleType:
    return _load_setup()


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _req_name(req: str) -> str:
    return re.split(r"[\s<>=!~;\[]", req.strip(), maxsplit=1)[0].lower()


def _fake_exe(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED entries of an ELF64 little-endian shared object (what the loader must find)."""
    data = path.read_bytes()
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, f"{path} is not ELF64 LE"
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    out = []
    for sh in sections:
        if sh[1] != 6:  # SHT_DYNAMIC
            continue
        str_off = sections[sh[6]][4]
        for off in range(sh[4], sh[4] + sh[5], 16):
            tag, val = struct.unpack_from("<qQ", data, off)
            if tag == 0:
                break
            if tag == 1:  # DT_NEEDED
                start = str_off + val
                out.append(data[start : data.index(b"\0", start)].decode())
    return out


# ---------------------------------------------------------------- pyproject


def test_build_requirements_have_no_torch(pyproject: dict) -> None:
    bs = pyproject["build-system"]
    names = {_req_name(r) for r in bs["requires"]}
    assert names == {"setuptools", "wheel", "pybind11", "ninja"}
    assert bs["build-backend"] == "setuptools.build_meta"


def test_runtime_metadata(pyproject: dict) -> None:
    proj = pyproject["project"]
    deps = {_req_name(r): r for r in proj["dependencies"]}
    assert re.fullmatch(r"torch\s*>=\s*2\.6", deps["torch"])
    # Core: what import fastclu needs (issue 11); triton and the demo's packages moved to extras.
    assert set(deps) == {"torch", "numpy", "tqdm"}
    extras = proj["optional-dependencies"]
    (triton,) = extras["triton"]
    assert "platform_system" in triton and "Linux" in triton
    for name in ("matplotlib", "scikit-learn"):
        assert name in {_req_name(r) for r in extras["demo"]}
    assert {_req_name(r) for r in extras["hf"]} == {"transformers", "peft", "accelerate"}
    test = {_req_name(r): r for r in extras["test"]}
    assert set(test) >= {"pytest", "pytest-benchmark", "ruff", "hypothesis", "scikit-learn", "matplotlib"}
    assert set(test) >= {"transformers", "peft", "accelerate", "triton"} and "Linux" in test["triton"]
    assert re.search(r"<\s*0\.18", test["ruff"]) and re.search(r">=\s*0\.17", test["ruff"])
    assert proj["requires-python"] == ">=3.11"
    assert proj["scripts"]["fastclu"] == "fastclu.cli:main"
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastclu.__version__"}
    assert pyproject["tool"]["ruff"]["line-length"] == 120
    assert pyproject["tool"]["pytest"]["ini_options"]["testpaths"] == ["tests"]


def test_readme_test_command_is_the_one_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    cmds = re.findall(r"^python -m pytest .*$", readme, flags=re.MULTILINE)
    assert cmds, "README.md shows no test command"
    assert cmds[0] in ci.splitlines()


def test_ci_script_installs_pinned_torch_first() -> None:
    ci = ROOT / ".ci" / "run"
    res = subprocess.run(["bash", "-n", str(ci)], check=False, capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    lines = [ln.strip() for ln in ci.read_text().splitlines() if not ln.lstrip().startswith("#")]
    assert "set -euo pipefail" in lines
    torch_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "torch==2.13.0" in ln)
    pkg_at = next(i for i, ln in enumerate(lines) if "pip install" in ln and "-e" in ln.split())
    # An unpinned torch (our torch>=2.6 left to the resolver) would pull a multi-GB CUDA build.
    assert torch_at < pkg_at
    assert any("ruff check ." in ln for ln in lines)


def test_installed_metadata_matches_source() -> None:
    try:
        dist = importlib.metadata.distribution("fastclu")
    except importlib.metadata.PackageNotFoundError:
        if IN_CI:
            pytest.fail("CI installs fastclu, but no installed distribution was found")
        pytest.skip("fastclu is not installed here (running from the source tree)")
    assert dist.version == fastclu.__version__
    eps = [ep for ep in dist.entry_points if ep.group == "console_scripts" and ep.name == "fastclu"]
    assert [ep.value for ep in eps] == ["fastclu.cli:main"]


# ---------------------------------------------------------------- setup.py settings


@pytest.mark.parametrize(
    ("raw", "want"),
    [(None, "auto"), ("auto", "auto"), ("AUTO", "auto"), ("1", "1"), ("true", "1"), ("0", "0"), ("off", "0")],
)
def test_build_mode(S: ModuleType, raw: str | None, want: str) -> None:
    env = {} if raw is None else {"FASTCLU_BUILD_CUDA": raw}
    assert S.build_mode(env) == want


def test_build_mode_rejects_garbage(S: ModuleType) -> None:
    with pytest.raises(S.BuildConfigError, match="FASTCLU_BUILD_CUDA"):
        S.build_mode({"FASTCLU_BUILD_CUDA": "2"})


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        (None, ["80", "90"]),
        ("90;80;80", ["80", "90"]),
        ("8.0, 9.0a", ["80", "90a"]),
        ("sm_86 120 100f", ["86", "100f", "120"]),
    ],
)
def test_cuda_archs(S: ModuleType, raw: str | None, want: list[str]) -> None:
    env = {} if raw is None else {"FASTCLU_CUDA_ARCHS": raw}
    assert S.cuda_archs(env) == want


@pytest.mark.parametrize("raw", ["", " ; ", "foo", "80;x90", "35x", "12"])
def test_cuda_archs_rejects_garbage(S: ModuleType, raw: str) -> None:
    with pytest.raises(S.BuildConfigError, match="FASTCLU_CUDA_ARCHS"):
        S.cuda_archs({"FASTCLU_CUDA_ARCHS": raw})


def test_gencode_sass_for_each_ptx_for_highest(S: ModuleType) -> None:
    flags = S.gencode_flags(["75", "80", "90a"])
    sass = [f for f in flags if re.search(r"code=sm_", f)]
    ptx = [f for f in flags if re.search(r"code=compute_", f)]
    assert sass == [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ("75", "80", "90a")]
    # Arch-specific ("a") PTX would not JIT on later GPUs: the PTX is the portable compute_90.
    assert ptx == ["-gencode=arch=compute_90,code=compute_90"]


def test_max_jobs(S: ModuleType) -> None:
    assert S.max_jobs({}) is None
    assert S.max_jobs({"MAX_JOBS": "3"}) == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(S.BuildConfigError, match="MAX_JOBS"):
            S.max_jobs({"MAX_JOBS": bad})


def test_find_nvcc_order(S: ModuleType, tmp_path: Path) -> None:
    home = _fake_exe(tmp_path / "home" / "bin" / "nvcc")
    cpath = _fake_exe(tmp_path / "cpath" / "bin" / "nvcc")
    onpath = _fake_exe(tmp_path / "onpath" / "nvcc")
    path = str(onpath.parent)
    full = {"CUDA_HOME": str(home.parents[1]), "CUDA_PATH": str(cpath.parents[1]), "PATH": path}
    assert S.find_nvcc(full) == str(home)
    assert S.find_nvcc({"CUDA_PATH": str(cpath.parents[1]), "PATH": path}) == str(cpath)
    # A CUDA_HOME without nvcc falls through to the next place rather than failing.
    assert S.find_nvcc({"CUDA_HOME": str(tmp_path / "empty"), "PATH": path}) == str(onpath)
    assert S.find_nvcc({"PATH": str(tmp_path / "nothing")}) is None


def _tree(tmp_path: Path, files: list[str]) -> Path:
    root = tmp_path / "proj"
    (root / "csrc").mkdir(parents=True)
    for f in files:
        (root / "csrc" / f).write_text("// test\n")
    return root


def test_extensions_modes(S: ModuleType, tmp_path: Path) -> None:
    nvcc = _fake_exe(tmp_path / "cuda" / "bin" / "nvcc")
    root = _tree(tmp_path, ["b.cu", "a.cu", "bindings.cpp", "k.cuh", "k.h", "notes.txt"])
    no_nvcc = {"PATH": str(tmp_path / "nothing")}
    with_nvcc = {"CUDA_HOME": str(nvcc.parents[1]), "PATH": str(tmp_path / "nothing")}

    assert S.extensions({**with_nvcc, "FASTCLU_BUILD_CUDA": "0"}, root) == []
    assert S.extensions({**no_nvcc, "FASTCLU_BUILD_CUDA": "auto"}, root) == []
    with pytest.raises(S.BuildConfigError, match=r"FASTCLU_BUILD_CUDA=1.*nvcc"):
        S.extensions({**no_nvcc, "FASTCLU_BUILD_CUDA": "1"}, root)

    (ext,) = S.extensions({**with_nvcc, "FASTCLU_BUILD_CUDA": "auto"}, root)
    assert ext.name == "fastclu._C"
    assert ext.sources == ["csrc/a.cu", "csrc/b.cu", "csrc/bindings.cpp"]  # relative, sorted, no headers
    assert sorted(ext.depends) == ["csrc/k.cuh", "csrc/k.h"]
    # A bad arch list fails before any compiler runs.
    with pytest.raises(S.BuildConfigError, match="FASTCLU_CUDA_ARCHS"):
        S.extensions({**with_nvcc, "FASTCLU_CUDA_ARCHS": "bogus"}, root)


def test_extensions_without_sources(S: ModuleType, tmp_path: Path) -> None:
    nvcc = _fake_exe(tmp_path / "cuda" / "bin" / "nvcc")
    root = _tree(tmp_path, ["only_header.cuh"])
    env = {"CUDA_HOME": str(nvcc.parents[1]), "PATH": str(tmp_path / "nothing")}
    assert S.extensions(env, root) == []
    with pytest.raises(S.BuildConfigError, match=r"no \.cu/\.cpp sources"):
        S.extensions({**env, "FASTCLU_BUILD_CUDA": "1"}, root)


def test_build_ninja_is_valid_and_complete(S: ModuleType, tmp_path: Path) -> None:
    """ninja itself parses the generated file (paths with spaces and '$'), and plans every step."""
    try:
        ninja = S.find_ninja()
    except S.BuildConfigError:
        pytest.skip("ninja is not installed (it is a build requirement, not a runtime one)")
    d = tmp_path / "dir with space$"
    srcs = [d / "src" / "a kernel.cu", d / "src" / "bindings.cpp"]
    for s in srcs:
        s.parent.mkdir(parents=True, exist_ok=True)
        s.write_text("// test\n")
    out = d / "lib" / "_C.so"
    cflags = ["-O3", '-DNAME="x y"', *S.gencode_flags(["80", "90"])]
    S.write_build_ninja(d / "build.ninja", "/opt/cuda x/bin/nvcc", srcs, d / "obj", out, cflags, S.LINK_FLAGS)
    res = subprocess.run(
        [ninja, "-C", str(d), "-f", "build.ninja", "-n", "-v"], check=False, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stdout + res.stderr
    cmds = [line for line in res.stdout.splitlines() if "nvcc" in line]
    assert len(cmds) == 3, res.stdout  # two compiles and one link
    compile_cmds, link = cmds[:2], cmds[2]
    for src, cmd in zip(srcs, compile_cmds, strict=True):
        assert "'/opt/cuda x/bin/nvcc'" in cmd and str(src) in cmd
        for flag in ("-O3", "-gencode=arch=compute_90,code=compute_90", "-MD"):
            assert flag in cmd
    for flag in ("-shared", "-cudart static", "--exclude-libs,ALL"):
        assert flag in link
    assert str(out) in link


# ---------------------------------------------------------------- the extension


def test_elf_parser_sees_real_dependencies() -> None:
    # Guards the check below: the parser must find libtorch where it is known to be needed.
    import torch

    lib = Path(torch.__file__).parent / "lib" / "libtorch_python.so"
    if not lib.exists():
        pytest.skip("this torch build has no lib/libtorch_python.so to calibrate against")
    needed = elf_needed(lib)
    assert any(n.startswith("libtorch") for n in needed), needed


def test_extension_import() -> None:
    spec = importlib.util.find_spec("fastclu._C")
    if spec is None:
        assert not EXPECT_EXT, "FASTCLU_EXPECT_EXTENSION=1 but fastclu._C is not built"
        reason = fastclu.backends()["cuda"]
        assert reason is not None and "extension not built" in reason
        return
    import fastclu._C as C  # importing needs no GPU: the static cudart touches the driver lazily

    path = Path(C.__file__)
    assert path.parent == Path(fastclu.__file__).parent
    needed = elf_needed(path)
    # One build serves every torch: no torch/c10/python library, and cudart is static.
    bad = [n for n in needed if re.match(r"lib(torch|c10|cudart|python)", n)]
    assert not bad, f"fastclu._C links {bad}"
    if not _cuda_available():
        assert fastclu.backends()["cuda"] == "extension built, but no CUDA device"


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ---------------------------------------------------------------- wheels (slow: real builds)


def _copy_tree(dst: Path) -> Path:
    # Build from a copy so the test never writes build/, *.egg-info or _C into the work tree.
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info", "build", "dist")
    for name in ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in"):
        shutil.copy2(ROOT / name, dst / name)
    for name in ("fastclu", "csrc"):
        if (ROOT / name).exists():
            shutil.copytree(ROOT / name, dst / name, ignore=ignore)
    return dst


def _build_wheel(tmp_path: Path, env_extra: dict[str, str]) -> Path:
    for mod in ("setuptools", "wheel"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is needed for a build without isolation (no network in tests)")
    src = tmp_path / "src"
    src.mkdir()
    _copy_tree(src)
    out = tmp_path / "wheels"
    env = {**os.environ, **env_extra}
    res = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(src), "-w", str(out), "--no-deps", "--no-build-isolation"],
        check=False, capture_output=True, text=True, env=env, timeout=900,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    (whl,) = out.glob("fastclu-*.whl")
    return whl


def _run_from_wheel(whl: Path, tmp_path: Path, code: str) -> str:
    site = tmp_path / "site"
    with zipfile.ZipFile(whl) as z:
        z.extractall(site)
    env = {**os.environ, "PYTHONPATH": str(site)}
    res = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert res.returncode == 0, res.stdout + res.stderr
    return res.stdout


@pytest.mark.slow
def test_wheel_without_extension(tmp_path: Path) -> None:
    whl = _build_wheel(tmp_path, {"FASTCLU_BUILD_CUDA": "0"})
    assert whl.name.endswith("-py3-none-any.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [ln for ln in z.read(meta).decode().splitlines() if ln.startswith("Requires-Dist:")]
        eps = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert not any("/_C" in n for n in names)
    assert "fastclu/cli.py" in names and "fastclu/ops/__init__.py" in names
    assert not any(n.startswith(("tests/", "csrc/")) for n in names)
    assert any(re.match(r"Requires-Dist: torch\s*>=\s*2\.6", r) for r in requires)
    assert "fastclu = fastclu.cli:main" in eps
    out = _run_from_wheel(
        whl, tmp_path,
        "import json, fastclu, fastclu.cli as c; i = c.collect_info(); "
        "print(json.dumps([fastclu.__file__, i['extension']['built'], i['backends']['cuda']]))",
    )  # fmt: skip
    path, built, cuda = json.loads(out.strip().splitlines()[-1])
    assert path.startswith(str(tmp_path / "site"))
    assert built is False and "extension not built" in cuda


@pytest.mark.slow
def test_wheel_with_extension(tmp_path: Path) -> None:
    S = _load_setup()
    if S.find_nvcc() is None:
        pytest.skip("nvcc not found: the extension cannot be built here")
    if not S.cuda_sources(ROOT):
        pytest.skip("csrc/ has no sources yet")
    whl = _build_wheel(tmp_path, {"FASTCLU_BUILD_CUDA": "1", "FASTCLU_CUDA_ARCHS": "80"})
    assert re.search(r"-cp\d+-cp\d+-linux_x86_64\.whl$", whl.name), whl.name
    with zipfile.ZipFile(whl) as z:
        so = [n for n in z.namelist() if re.fullmatch(r"fastclu/_C\..*\.so", n)]
    assert len(so) == 1
    out = _run_from_wheel(whl, tmp_path, "import fastclu, fastclu._C as C; print(C.__file__)")
    lib = Path(out.strip().splitlines()[-1])
    assert lib.is_relative_to(tmp_path / "site")
    assert not [n for n in elf_needed(lib) if re.match(r"lib(torch|c10|cudart|python)", n)]
