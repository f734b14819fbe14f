"""Import-time behaviour, each case in a fresh interpreter.

Every module of the package imports on its own under ``-W error`` (no import
cycle hides behind the order in which ``fastnet/__init__`` happens to import
things, and importing warns about nothing); the compiled backend is the
default when it is built; ``FASTNET_NO_EXTENSIONS`` set to any non-empty value
selects the pure-Python twin. A subprocess per case, because the backend is
chosen once, when ``fastnet.framing`` is first imported.
"""

from __future__ import annotations

import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastnet

# A fresh interpreter importing fastnet takes well under a second; this bound
# only keeps a hung import from stalling the suite.
SUBPROCESS_TIMEOUT = 60

# __main__ runs the CLI when imported; `python -m fastnet` is the CLI's to test.
NOT_IMPORTABLE_ALONE = {"fastnet.__main__"}


def _modules() -> list[str]:
    names = ["fastnet"]
    for info in pkgutil.walk_packages(fastnet.__path__, prefix="fastnet."):
        if info.name not in NOT_IMPORTABLE_ALONE:
            names.append(info.name)
    return sorted(names)


def _run(code: str, tmp_path: Path, **env_changes: str | None) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a new interpreter, away from the source tree, with ``env_changes``."""
    env = dict(os.environ)
    for name, value in env_changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


def _check(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, (
        f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    )
    assert proc.stderr == "", f"the import wrote to stderr:\n{proc.stderr}"
    return proc.stdout


def test_module_list_is_complete() -> None:
    # walk_packages finds modules by their files; if it found only the
    # package, the parametrization below would test nothing.
    assert {"fastnet.errors", "fastnet.framing", "fastnet._frame_py"} <= set(_modules())


@pytest.mark.parametrize("module", _modules())
def test_module_imports_alone(module: str, tmp_path: Path) -> None:
    _check(_run(f"import {module}", tmp_path))


@pytest.mark.c_extension
def test_extension_is_default_when_built(tmp_path: Path) -> None:
    out = _check(
        _run(
            "import fastnet, fastnet.framing as f, fastnet._frame as c\n"
            "print(fastnet.ACCELERATED, f.LengthPrefixedDecoder is c.LengthPrefixedDecoder,"
            " f.LineEncoder is c.LineEncoder)",
            tmp_path,
            FASTNET_NO_EXTENSIONS=None,
        )
    )
    assert out.split() == ["True", "True", "True"]


@pytest.mark.c_extension
def test_empty_variable_keeps_extension(tmp_path: Path) -> None:
    # An empty value is "not set": CI matrices pass '' for the extension leg.
    out = _check(
        _run("import fastnet; print(fastnet.ACCELERATED)", tmp_path, FASTNET_NO_EXTENSIONS="")
    )
    assert out.split() == ["True"]


@pytest.mark.parametrize("value", ["1", "0", "Y", "no", "false"])
def test_any_nonempty_value_selects_twin(value: str, tmp_path: Path) -> None:
    # Any non-empty value means pure Python, even "0" and "false"
    # (bool(os.environ.get(...)), the aiohttp/yarl/multidict convention).
    out = _check(
        _run(
            "import fastnet, fastnet.framing as f, fastnet._frame_py as py\n"
            "names = ['LengthPrefixedDecoder', 'LengthPrefixedEncoder',"
            " 'LineDecoder', 'LineEncoder']\n"
            "print(fastnet.ACCELERATED, all(getattr(f, n) is getattr(py, n) for n in names))\n"
            "spec = fastnet.LengthPrefixed()\n"
            "print(type(spec.decoder()).__module__, type(spec.encoder).__module__)",
            tmp_path,
            FASTNET_NO_EXTENSIONS=value,
        )
    )
    assert out.split() == ["False", "True", "fastnet._frame_py", "fastnet._frame_py"]


def test_twin_stays_importable_by_name(tmp_path: Path) -> None:
    # Tests and benchmarks import the twin directly whichever backend is active.
    out = _check(
        _run(
            "import fastnet._frame_py as py\nprint(py.LengthPrefixedDecoder.__module__)",
            tmp_path,
            FASTNET_NO_EXTENSIONS=None,
        )
    )
    assert out.split() == ["fastnet._frame_py"]
