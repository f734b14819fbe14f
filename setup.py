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
    setup(
        ext_modules=[
            Extension(
                f"fastnet.{name}",
                [f"src/fastnet/{name}.pyx"],
                extra_compile_args=["-O3"] if sys.platform != "win32" else [],
            )
            for name in ("_frame", "_outq", "_core")
        ],
        cmdclass={"build_ext": BuildExt},
    )
