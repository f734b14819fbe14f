"""Build the extensions ``fastnet._frame``, ``_outq`` and ``_core``; the rest is in pyproject.toml.

``FASTNET_NO_EXTENSIONS=1`` (or a non-CPython interpreter) builds the
pure-Python package. Otherwise a compiler failure fails the build: there is no
silent fallback, because a slow install that looks fine is worse than an
error that says what to do.

Environment:
    FASTNET_NO_EXTENSIONS  any non-empty value: build no extension.
    FASTNET_DEBUG          any non-empty value: compile the extension's internal invariant
                           checks in (arena offsets, windows, direct receive; see
                           _debug_check in _frame.pyx), for sanitizer and fuzzing builds.
                           Passed as the C macro FASTNET_DEBUG (1 or 0); a release build
                           gets 0, and the compiler drops the checks.
    FASTNET_ANNOTATE       write Cython's annotated HTML next to the .pyx.
    FASTNET_LINETRACE      compile with line tracing, for coverage and profilers.
    FASTNET_PROFILE        any non-empty value: a release build (-O3, no checks) that
                           keeps its symbols and frame pointers, so perf and callgrind
                           name the extension's functions (the per-read profile).
    FASTNET_SANITIZE       any non-empty value: compile and link with AddressSanitizer
                           and UndefinedBehaviorSanitizer (gcc or clang), with symbols
                           and frame pointers, for ``make asan`` and the fuzzers.
                           ``fuzzer`` (clang only, with CC=clang): the same plus
                           ``-fsanitize=fuzzer-no-link``, so the C code's edges and
                           comparisons feed libFuzzer (``make fuzz``).

Release builds carry no debug information: the ``-g`` that Python's own CFLAGS
add would make the wheel's extension about ten times its code size. Builds
with FASTNET_SANITIZE, FASTNET_DEBUG or FASTNET_PROFILE keep their symbols.
"""

from __future__ import annotations

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

NO_EXTENSIONS = bool(os.environ.get("FASTNET_NO_EXTENSIONS")) or (
    sys.implementation.name != "cpython"
)

REMEDY = (
    "fastnet could not build its C extension. Install a C compiler and the "
    "Python headers, or install the pure-Python package with "
    "FASTNET_NO_EXTENSIONS=1 pip install fastnet"
)


# Compile and link flags of a sanitizer build: ASan and UBSan together, each
# UBSan finding fatal (-fno-sanitize-recover) so a fuzzer or test run stops on
# it, symbols and frame pointers for readable reports, -O1 as the sanitizers'
# documentation recommends (fast enough, few frames optimised away).
SANITIZE_FLAGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
SANITIZE_COMPILE = [*SANITIZE_FLAGS, "-fno-omit-frame-pointer", "-g", "-O1"]
# FASTNET_SANITIZE=fuzzer adds clang's SanitizerCoverage for libFuzzer (inline
# 8-bit edge counters, the PC table, comparison tracing), without linking a
# libFuzzer in: atheris's asan_with_fuzzer.so, preloaded, provides it and ASan.
FUZZER_FLAG = "-fsanitize=fuzzer-no-link"


def extension_flags() -> tuple[list[str], list[str]]:
    """Compile and link arguments of the extension for this platform and environment."""
    if sys.platform == "win32":
        return [], []
    sanitize = os.environ.get("FASTNET_SANITIZE")
    if sanitize == "fuzzer":
        return [FUZZER_FLAG, *SANITIZE_COMPILE], [FUZZER_FLAG, *SANITIZE_FLAGS]
    if sanitize:
        return SANITIZE_COMPILE, SANITIZE_FLAGS
    # -g0 comes after Python's own CFLAGS (which carry -g) and overrides them.
    compile_args = ["-O3"]
    link_args: list[str] = []
    if os.environ.get("FASTNET_PROFILE"):
        # A release build that keeps its symbols and frame pointers, for perf
        # and callgrind to name the extension's functions.
        compile_args += ["-g", "-fno-omit-frame-pointer"]
    elif not os.environ.get("FASTNET_DEBUG"):
        compile_args.append("-g0")
        if sys.platform.startswith("linux"):
            # Strips the symbol table as well; PyInit_ stays in the dynamic symbols.
            link_args.append("-s")
    return compile_args, link_args


class BuildExt(build_ext):
    """Cythonize at build time and turn any compiler failure into one clear error."""

    def finalize_options(self) -> None:
        try:
            from Cython.Build import cythonize
        except ImportError as exc:  # only under --no-build-isolation
            raise RuntimeError(
                "building fastnet needs Cython>=3.1,<4 (pip install 'Cython>=3.1,<4'), "
                "or FASTNET_NO_EXTENSIONS=1 for the pure-Python package"
            ) from exc
        linetrace = bool(os.environ.get("FASTNET_LINETRACE"))
        directives = {
            "language_level": 3,
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
            "linetrace": linetrace,
        }
        macros = [("FASTNET_DEBUG", "1" if os.environ.get("FASTNET_DEBUG") else "0")]
        if linetrace:
            macros.append(("CYTHON_TRACE_NOGIL", "1"))
        for ext in self.distribution.ext_modules:
            ext.define_macros = list(ext.define_macros or []) + macros
        self.distribution.ext_modules = cythonize(
            self.distribution.ext_modules,
            compiler_directives=directives,
            annotate=bool(os.environ.get("FASTNET_ANNOTATE")),
        )
        super().finalize_options()

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            raise RuntimeError(f"{REMEDY}\n(cause: {exc})") from exc


if NO_EXTENSIONS:
    print("*********************\n* Pure Python build *\n*********************")
    setup()
else:
    print("**********************\n* Accelerated build *\n**********************")
    compile_args, link_args = extension_flags()
    setup(
        ext_modules=[
            Extension(
                f"fastnet.{name}",
                [f"src/fastnet/{name}.pyx"],
                extra_compile_args=compile_args,
                extra_link_args=link_args,
            )
            for name in ("_frame", "_outq", "_core", "_message")
        ],
        cmdclass={"build_ext": BuildExt},
    )
