"""Packaging, end to end: sdist, a wheel built from it, fresh installs.

What a user gets from ``pip install fastnet`` is checked here rather than the
source tree: ``python -m build --sdist`` from a copy of the tree; the wheel
built from the unpacked sdist (as pip builds from PyPI, so a file missing
from the sdist fails here); the wheel installed with ``--no-index`` into a new
virtual environment without system site-packages, where ``fastnet.ACCELERATED``
must be True. Then the two other ways a build can go: ``FASTNET_NO_EXTENSIONS=1``
installs the pure-Python package, and a failing compiler fails the build with
a message naming ``FASTNET_NO_EXTENSIONS=1``.

Builds run with build isolation, as users' builds do: each one installs
``build-system.requires`` (setuptools, Cython) from the package index into a
throwaway environment. That costs a few seconds per build with pip's cache
warm, and it is the point: the declared build requirements are what is
tested, not whatever the test environment happens to contain. The fresh
environments are made ``--without-pip`` and filled by this interpreter's pip
(``pip --python``), which saves installing pip into each of them.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slow,
    # Three isolated builds and one compile of the extension with -O3: about
    # a minute on a 2-core machine with pip's cache warm; the bound allows for
    # a cold cache and a busy machine.
    pytest.mark.timeout(900),
]

ROOT = Path(__file__).resolve().parents[1]

# One step (a build or an install) takes seconds; this bound only stops a
# hung download from holding the suite.
STEP_TIMEOUT = 600

# Directories of a working tree that are not source: venvs, build output, caches.
SKIP_DIRS = {
    ".git",
    ".venv",
    "build",
    "dist",
    "__pycache__",
    ".pytest_cache",
    ".hypothesis",
    ".mypy_cache",
    ".ruff_cache",
    ".benchmarks",
    ".build",  # benchmarks/.build: the C generator and Tokio, built by compare.py
}
# Files a build leaves next to the sources (the editable install's extension,
# Cython's output).
GENERATED_SUFFIXES = (".so", ".pyd", ".dylib", ".pyc")
GENERATED_NAMES = {"_frame.c", "_frame.html"}

if not (ROOT / "setup.py").is_file() or not (ROOT / "src" / "fastnet" / "_frame.pyx").is_file():
    pytest.skip("needs the source tree (setup.py, src/fastnet/_frame.pyx)", allow_module_level=True)


def _ignore(directory: str, names: list[str]) -> set[str]:
    return {
        name
        for name in names
        if name in SKIP_DIRS
        or name.endswith(".egg-info")
        or name.endswith(GENERATED_SUFFIXES)
        or name in GENERATED_NAMES
    }


def _env(**changes: str) -> dict[str, str]:
    """The environment without FASTNET_NO_EXTENSIONS (a CI leg may set it), plus ``changes``."""
    env = {k: v for k, v in os.environ.items() if k != "FASTNET_NO_EXTENSIONS"}
    env.update(changes)
    return env


def _run(
    args: list[str | Path], cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STEP_TIMEOUT,
    )
    if check and proc.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout[-6000:]}\nstderr:\n{proc.stderr[-6000:]}"
        )
    return proc


def _one(directory: Path, pattern: str) -> Path:
    found = sorted(directory.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} in {directory}, found {found}"
    return found[0]


def _venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _fresh_venv(parent: Path, name: str) -> Path:
    """A new virtual environment, without pip and without system site-packages."""
    venv = parent / name
    _run([sys.executable, "-m", "venv", "--without-pip", venv], parent, _env())
    return _venv_python(venv)


def _pip_into(python: Path, *args: str | Path, env: dict[str, str], cwd: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", python, "install", *args], cwd, env)


# Imports every module of the installed package too (the CLI's __main__
# aside, which runs when imported): in a bare environment, without the test
# extra's packages (uvloop, ...), and, for the pure install, without
# fastnet._frame, any unguarded import of either fails here.
PROBE = (
    "import importlib, importlib.util, pkgutil, fastnet\n"
    "names = [m.name for m in pkgutil.walk_packages(fastnet.__path__, 'fastnet.')]\n"
    "for name in names:\n"
    "    if name != 'fastnet.__main__':\n"
    "        importlib.import_module(name)\n"
    "print(fastnet.ACCELERATED)\n"
    "print(importlib.util.find_spec('fastnet._frame') is not None)\n"
    "print(importlib.util.find_spec('pytest') is not None)\n"
    "print(fastnet.__file__)\n"
)


def _probe(python: Path, cwd: Path) -> tuple[bool, bool, bool, Path]:
    """ACCELERATED, whether _frame exists, whether pytest is visible, fastnet's file.

    ``-I``: no PYTHONPATH, no user site-packages, no current directory on
    sys.path, so only what was installed into the environment is importable.
    """
    out = _run([python, "-I", "-W", "error", "-c", PROBE], cwd, _env()).stdout.split("\n")
    return out[0] == "True", out[1] == "True", out[2] == "True", Path(out[3])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("packaging")


@pytest.fixture(scope="module")
def sdist(workdir: Path) -> Path:
    # A copy, so the build leaves nothing (egg-info, build/) in the working
    # tree and cannot pick up the editable install's compiled module.
    source = workdir / "source"
    shutil.copytree(ROOT, source, ignore=_ignore)
    out = workdir / "sdist"
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", out, source], workdir, _env())
    return _one(out, "fastnet-*.tar.gz")


@pytest.fixture(scope="module")
def wheel(sdist: Path, workdir: Path) -> Path:
    unpacked = workdir / "unpacked"
    with tarfile.open(sdist) as tar:
        if hasattr(tarfile, "data_filter"):  # 3.12, and 3.10/3.11 security releases
            tar.extractall(unpacked, filter="data")
        else:
            tar.extractall(unpacked)
    project = _one(unpacked, "fastnet-*")
    out = workdir / "wheel"
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", out, project], workdir, _env())
    return _one(out, "fastnet-*.whl")


def test_sdist_contents(sdist: Path) -> None:
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    for required in (
        "pyproject.toml",
        "setup.py",
        "LICENSE",
        "README.md",
        "src/fastnet/__init__.py",
        "src/fastnet/_frame.pyx",
        "src/fastnet/_frame.pxd",
        "src/fastnet/_frame.pyi",
        "src/fastnet/_frame_py.py",
        "src/fastnet/_outq.pyx",
        "src/fastnet/_outq.pxd",
        "src/fastnet/_outq.pyi",
        "src/fastnet/_outq_py.py",
        "src/fastnet/_message.pyx",
        "src/fastnet/_message.pyi",
        "src/fastnet/_message_py.py",
        "src/fastnet/py.typed",
        "requirements/cython.txt",  # cibuildwheel's PIP_CONSTRAINT, read from the sdist
        "tests/conftest.py",
    ):
        assert required in names, f"{required} is missing from {sdist.name}"
    generated = sorted(
        n
        for n in names
        if n.endswith((".c", ".h", ".html", *GENERATED_SUFFIXES)) and n.startswith("src/")
    )
    assert not generated, f"generated files in {sdist.name}: {generated}"
    assert not [n for n in names if "__pycache__" in n]


@pytest.mark.c_extension
def test_wheel_contents(wheel: Path) -> None:
    assert not wheel.name.endswith("-none-any.whl"), f"{wheel.name} is not a platform wheel"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for module in ("_frame", "_outq", "_message"):
        compiled = [
            n for n in names if n.startswith(f"fastnet/{module}.") and n.endswith((".so", ".pyd"))
        ]
        assert len(compiled) == 1, (
            f"expected one compiled fastnet.{module} in {wheel.name}: {sorted(names)}"
        )
    for required in (
        "fastnet/py.typed",
        "fastnet/_frame.pyi",
        "fastnet/__init__.py",
        "fastnet/_frame_py.py",
        "fastnet/_outq.pyi",
        "fastnet/_outq_py.py",
        "fastnet/_message.pyi",
        "fastnet/_message_py.py",
    ):
        assert required in names, f"{required} is missing from {wheel.name}"
    unwanted = sorted(n for n in names if n.endswith((".c", ".h", ".html")))
    assert not unwanted, f"C sources or annotation files in {wheel.name}: {unwanted}"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), sorted(names)


def _elf_section_names(data: bytes) -> list[str]:
    """Section names of an ELF file (32 or 64 bit, either byte order), read from its headers."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    wide = data[4] == 2  # EI_CLASS: 1 = 32-bit, 2 = 64-bit
    order = "<" if data[5] == 1 else ">"  # EI_DATA: 1 = little-endian
    if wide:
        (shoff,) = struct.unpack_from(order + "Q", data, 0x28)
        entsize, count, names_index = struct.unpack_from(order + "HHH", data, 0x3A)
    else:
        (shoff,) = struct.unpack_from(order + "I", data, 0x20)
        entsize, count, names_index = struct.unpack_from(order + "HHH", data, 0x2E)

    def section(index: int) -> tuple[int, int, int]:
        """(name offset, file offset, size) of section ``index``."""
        base = shoff + index * entsize
        if wide:
            (name,) = struct.unpack_from(order + "I", data, base)
            offset, size = struct.unpack_from(order + "QQ", data, base + 0x18)
        else:
            (name,) = struct.unpack_from(order + "I", data, base)
            offset, size = struct.unpack_from(order + "II", data, base + 0x10)
        return name, offset, size

    _, table, table_size = section(names_index)
    strings = data[table : table + table_size]
    names = []
    for index in range(count):
        start = section(index)[0]
        names.append(strings[start : strings.index(b"\0", start)].decode("ascii"))
    return names


@pytest.mark.c_extension
def test_wheel_extension_is_stripped(wheel: Path) -> None:
    """Release wheels carry no debug information (setup.py compiles with -g0, links with -s)."""
    with zipfile.ZipFile(wheel) as zf:
        (compiled,) = [
            n
            for n in zf.namelist()
            if n.startswith("fastnet/_frame.") and n.endswith((".so", ".pyd"))
        ]
        data = zf.read(compiled)
    if data[:4] != b"\x7fELF":
        pytest.skip(f"{compiled} is not an ELF file; the check reads ELF section headers")
    names = _elf_section_names(data)
    assert ".text" in names and ".dynsym" in names, names  # the reader read real headers
    debug = sorted(n for n in names if n.startswith((".debug", ".zdebug")))
    assert not debug, f"{compiled} carries debug sections: {debug}"
    if sys.platform.startswith("linux"):
        assert ".symtab" not in names, f"{compiled} keeps its static symbol table"


@pytest.mark.c_extension
def test_wheel_installs_accelerated(wheel: Path, workdir: Path) -> None:
    python = _fresh_venv(workdir, "venv-wheel")
    # --no-index: the wheel just built, nothing from an index (fastnet has no
    # dependencies), so this cannot install some other fastnet.
    _pip_into(
        python, "--no-index", "--find-links", wheel.parent, "fastnet", env=_env(), cwd=workdir
    )
    accelerated, has_frame, sees_pytest, location = _probe(python, workdir)
    assert not sees_pytest, "the fresh environment sees the test environment's packages"
    assert python.parent.parent.resolve() in location.resolve().parents, location
    assert has_frame
    assert accelerated is True


def test_pure_install(sdist: Path, workdir: Path) -> None:
    python = _fresh_venv(workdir, "venv-pure")
    _pip_into(python, sdist, env=_env(FASTNET_NO_EXTENSIONS="1"), cwd=workdir)
    # Probed without FASTNET_NO_EXTENSIONS: the build itself made no extension.
    accelerated, has_frame, sees_pytest, location = _probe(python, workdir)
    assert not sees_pytest
    assert python.parent.parent.resolve() in location.resolve().parents, location
    assert not has_frame, "FASTNET_NO_EXTENSIONS=1 still built fastnet._frame"
    assert accelerated is False


@pytest.mark.skipif(sys.platform == "win32", reason="MSVC is not chosen through CC")
def test_compiler_failure_names_the_way_out(sdist: Path, workdir: Path) -> None:
    false = shutil.which("false")
    assert false, "needs a `false` command to stand in for a broken compiler"
    out = workdir / "broken"
    proc = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", out, sdist],
        workdir,
        _env(CC=false),
        check=False,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"the build succeeded with CC={false}:\n{output[-4000:]}"
    assert "could not build its C extension" in output, output[-4000:]
    assert "FASTNET_NO_EXTENSIONS=1" in output, output[-4000:]
    assert not list(out.glob("*.whl")), "a wheel was produced anyway"
