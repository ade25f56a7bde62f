"""Builds csrc/ into fastface._C (pybind11, C++17, OpenMP).

The extension is optional for users: a failed build leaves a working pure-Python install whose "cpp"
backend falls back with a warning. FASTFACE_BUILD_STRICT=1 (set in CI) makes a failed build fatal.
FASTFACE_ASAN=1 builds with AddressSanitizer (CI runs the kernel tests under it once).
"""

import glob
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

STRICT = os.environ.get("FASTFACE_BUILD_STRICT") == "1"
ASAN = os.environ.get("FASTFACE_ASAN") == "1"


class OptionalBuildExt(build_ext):
    def run(self):
        try:
            super().run()
        except Exception as exc:  # noqa: BLE001 - any compiler failure
            self._fail(exc)

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _fail(self, exc):
        if STRICT:
            raise
        print(f"fastface: building fastface._C failed ({exc}); the cpp backend will be unavailable",
              file=sys.stderr)


def extensions():
    sources = sorted(glob.glob("csrc/*.cpp"))
    if not sources:
        return []
    from pybind11.setup_helpers import Pybind11Extension

    compile_args = ["-O3", "-fopenmp", "-fno-math-errno"]
    link_args = ["-fopenmp"]
    if ASAN:
        compile_args += ["-fsanitize=address", "-fno-omit-frame-pointer", "-g", "-O1"]
        link_args += ["-fsanitize=address"]
    return [
        Pybind11Extension(
            "fastface._C",
            sources,
            include_dirs=["csrc"],
            cxx_std=17,
            extra_compile_args=compile_args,
            extra_link_args=link_args,
        )
    ]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
