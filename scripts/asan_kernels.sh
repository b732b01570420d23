#!/usr/bin/env bash
# Build the native extension with AddressSanitizer + UndefinedBehaviorSanitizer in a temporary copy
# of the tree and run the kernel tests against it (issue 13). Nothing is installed and the tree you
# run it from is not touched. Needs gcc (with libasan / libubsan), Cython, NumPy, pytest, hypothesis.
#
#   scripts/asan_kernels.sh                  # tests/test_kernels.py, test_threading.py, test_attention_kernels.py
#   scripts/asan_kernels.sh -k linear        # extra arguments go to pytest
#   KEEP=1 scripts/asan_kernels.sh           # keep the temporary directory (its path is printed)
#
# Any sanitizer report fails the run: UBSan is built with -fno-sanitize-recover (abort on the first
# report) and ASan aborts on its first error by default. Leak detection is off: CPython and NumPy
# keep allocations alive at exit on purpose. The extension must be built WITH OpenMP (setup.py's
# probe honours CFLAGS/LDFLAGS), so the threaded code is what gets checked; the script checks that.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
CC="${CC:-gcc}"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gemma2np-asan.XXXXXX")"
if [[ "${KEEP:-0}" != 1 ]]; then trap 'rm -rf "$TMP"' EXIT; fi
echo "asan_kernels: working in $TMP"

# a copy of what the build and the tests need (no build products of the source tree)
mkdir -p "$TMP/src"
(cd "$ROOT" && tar --exclude='*.so' --exclude='__pycache__' --exclude='csrc/_native.c' \
    -cf - setup.py pyproject.toml csrc gemma2np tests) | (cd "$TMP/src" && tar -xf -)

SAN="-fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer -g"
cd "$TMP/src"
CC="$CC" CFLAGS="$SAN" LDFLAGS="$SAN" "$PY" setup.py -q build_ext --inplace > "$TMP/build.log" 2>&1 || {
    cat "$TMP/build.log"; echo "asan_kernels: build failed"; exit 1; }
if grep -q "OpenMP is OFF" "$TMP/build.log"; then
    grep "OpenMP is OFF" "$TMP/build.log"; echo "asan_kernels: the sanitizer build lost OpenMP"; exit 1
fi
ls gemma2np/_native*.so > /dev/null

# the sanitizer runtimes must be loaded before anything else in the (unsanitized) python process
PRELOAD="$("$CC" -print-file-name=libasan.so):$("$CC" -print-file-name=libubsan.so)"
export LD_PRELOAD="$PRELOAD"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"
"$PY" -c "import gemma2np._native as n; assert n.have_openmp(), 'serial build'; print('asan_kernels: extension', n.__file__, n.cpu_features(), 'openmp')"

status=0
# deselected: the mallopt test (ASan replaces malloc, so glibc's thresholds cannot apply)
"$PY" -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_threading.py tests/test_attention_kernels.py \
    --deselect tests/test_kernels.py::test_native_backend_keeps_activation_blocks_in_the_heap "$@" 2>&1 | tee "$TMP/pytest.log" || status=$?
if grep -qE "ERROR: AddressSanitizer|runtime error:" "$TMP/pytest.log"; then
    echo "asan_kernels: SANITIZER REPORT (see above)"; exit 1
fi
if [[ $status -ne 0 ]]; then echo "asan_kernels: tests failed ($status)"; exit "$status"; fi
echo "asan_kernels: OK (ASan + UBSan, no reports)"
