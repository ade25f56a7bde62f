#!/usr/bin/env bash
# Build fastface._C with AddressSanitizer in a temporary copy of the tree and run the C++ kernel tests
# (the cpp rows of tests/test_op_*.py) against it. The working tree's own build is left alone.
#
#   .ci/asan_tests.sh [extra pytest args]      (ASAN_TESTS=<files> to run other test files)
#
# Python itself is not instrumented, so libasan is preloaded; leak detection is off (the interpreter
# keeps its allocations until exit) and the link-order check is off (libasan comes in by LD_PRELOAD).
# Budget: about 3 minutes on 2 cores.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
work="$(mktemp -d "${TMPDIR:-/tmp}/fastface-asan.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cp -r "$repo/csrc" "$repo/fastface" "$repo/tests" "$repo/setup.py" "$repo/pyproject.toml" "$work/"
find "$work" \( -name '*.so' -o -name '__pycache__' \) -prune -exec rm -rf {} +

cd "$work"
# the test extras bring pybind11; a bare environment gets it here
python -c "import pybind11" 2>/dev/null || python -m pip install -q "pybind11>=2.12"
FASTFACE_ASAN=1 FASTFACE_BUILD_STRICT=1 python setup.py -q build_ext --inplace >build.log 2>&1 || {
  tail -50 build.log
  exit 1
}

libasan="$(${CXX:-g++} -print-file-name=libasan.so)"
if [[ ! -e "$libasan" ]]; then
  echo "asan_tests: libasan.so not found (g++ -print-file-name=libasan.so gave '$libasan')" >&2
  exit 1
fi

# libstdc++ too: ASan resolves the real __cxa_throw when it starts, before any extension has loaded
# libstdc++ into python; without it the first C++ exception (every ValueError from a kernel) aborts.
libstdcxx="$(${CXX:-g++} -print-file-name=libstdc++.so.6)"
export LD_PRELOAD="$libasan $libstdcxx"
export ASAN_OPTIONS="detect_leaks=0:verify_asan_link_order=0:abort_on_error=1:halt_on_error=1:detect_odr_violation=0"
export PYTHONPATH="$work${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
# the copy must be the one imported
python -c "import fastface._C as c, sys; assert c.__file__.startswith('$work'), c.__file__"
cd "$work" && env -u TRITON_INTERPRET python -m pytest -q -p no:cacheprovider ${ASAN_TESTS:-tests/test_op_*.py -k cpp} "$@"
