"""The ``fastclu`` command line: info output, dispatch of demo/bench, errors, ``python -m``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import fastclu
from fastclu import cli

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], **kw: object) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=120, cwd=ROOT, **kw)


def test_info_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert fastclu.__version__ in out
    assert torch.__version__ in out
    assert platform.python_version() in out
    lines = out.splitlines()
    backend_lines = lines[lines.index("backends:") + 1 :]
    for name, reason in fastclu.backends().items():
        (line,) = [ln for ln in backend_lines if ln.split()[:1] == [name]]
        if reason is None:
            assert line.split()[1] == "available"
        else:
            assert "unavailable" in line and reason in line
    assert any(ln.split()[:1] == ["cpu"] for ln in lines)


def test_info_json_agrees_with_independent_sources(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["fastclu"] == fastclu.__version__
    assert info["torch"] == torch.__version__
    assert info["torch_cuda"] == torch.version.cuda
    assert info["python"] == platform.python_version()
    assert info["cuda_available"] == torch.cuda.is_available()
    try:
        want_triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        want_triton = None
    assert info["triton"] == want_triton
    assert info["extension"]["built"] == (importlib.util.find_spec("fastclu._C") is not None)
    assert info["backends"] == fastclu.backends()
    assert [d["name"] for d in info["devices"]] == ["cpu"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def test_info_reports_environment(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTCLU_BACKEND", "reference")
    assert cli.main(["info"]) == 0
    assert "FASTCLU_BACKEND=reference" in capsys.readouterr().out


@pytest.mark.parametrize("command, module", [("demo", "fastclu.demo"), ("bench", "fastclu.bench")])
@pytest.mark.parametrize("returned, code", [(None, 0), (0, 0), (3, 3)])
def test_subcommand_gets_argv_untouched(
    monkeypatch: pytest.MonkeyPatch, command: str, module: str, returned: int | None, code: int
) -> None:
    seen: list[list[str]] = []

    def fake_main(argv: list[str]) -> int | None:
        seen.append(argv)
        return returned

    fake = types.ModuleType(module)
    fake.main = fake_main
    monkeypatch.setitem(sys.modules, module, fake)
    # --help and unknown flags belong to the subcommand, not to the top-level parser.
    args = ["--help", "--steps", "3", "-x", "positional"]
    assert cli.main([command, *args]) == code
    assert seen == [args]


@pytest.mark.parametrize("command, module", [("demo", "fastclu.demo"), ("bench", "fastclu.bench")])
def test_missing_subcommand_module_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], command: str, module: str
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes the import raise ModuleNotFoundError
    assert cli.main([command]) == 2
    err = capsys.readouterr().err
    assert command in err and module in err


def test_broken_dependency_inside_subcommand_propagates(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # A subcommand that exists but imports something missing is a bug to surface, not "unavailable".
    (tmp_path / "fastclu_cli_test_broken.py").write_text("import fastclu_no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli._DELEGATED, "bench", ("fastclu_cli_test_broken", "test"))
    with pytest.raises(ModuleNotFoundError, match="fastclu_no_such_dependency_xyz"):
        cli.main(["bench"])


def test_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["info", "--no-such-flag"])
    assert e.value.code == 2
    assert cli.main([]) == 2  # no command: help, and a non-zero status
    out = capsys.readouterr().out
    for name in ("info", "demo", "bench"):
        assert name in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"fastclu {fastclu.__version__}"


def test_python_dash_m() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # Only the __main__ wiring is under test here (info's content is checked in-process above).
    res = _run([sys.executable, "-m", "fastclu", "--version"], env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"fastclu {fastclu.__version__}"


def test_console_script() -> None:
    exe = shutil.which("fastclu")
    if exe is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("CI installs fastclu, but the 'fastclu' console script is not on PATH")
        pytest.skip("fastclu is not installed here (no console script on PATH)")
    res = _run([exe, "--version"])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"fastclu {fastclu.__version__}"
