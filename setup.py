"""Build of the optional native extension gemma2np._native (C99 + Cython, OpenMP).

Metadata lives in pyproject.toml; this file only adds the extension. Flags: -O3,
-ffp-contract=off (scalar code rounds like NumPy), -fopenmp when a probe program compiles and
links with it (with the user's CPPFLAGS/CFLAGS/LDFLAGS too; a visible line says when OpenMP is
off). Never -ffast-math, never -march=native (the C code dispatches at run time).
If Cython, NumPy headers or the compiler are missing or fail, the extension is skipped with
a warning and the package still installs (pure NumPy). GEMMA2NP_NO_NATIVE=1 skips it on purpose,
GEMMA2NP_NO_OPENMP=1 builds it without OpenMP.
"""
import os
import shlex
import shutil
import sys
import tempfile

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
# csrc/g2_*.c, one job each (csrc/g2_internal.h lists them)
KERNEL_SOURCES = ["dispatch", "linear", "linear_drive", "attention", "elementwise", "int4", "q4_0",
                  "int4_quant"]
KERNEL_HEADERS = ["g2_xq8", "gemma2np_kernels", "g2_internal", "g2_simd_math", "g2_linear"]


def _warn(msg):
    print("\n*** gemma2np: %s\n*** gemma2np: continuing without the native extension "
          "(pure NumPy backend)\n" % msg, file=sys.stderr)


def _env_flags(*names):
    """Flags from environment variables (CFLAGS, LDFLAGS, ...), split like a shell would."""
    out = []
    for n in names:
        out += shlex.split(os.environ.get(n, ""))
    return out


def _compiler_accepts(compiler, cflags, ldflags):
    """Compile and link a tiny OpenMP program with the given flags plus the user's CPPFLAGS/CFLAGS
    and LDFLAGS: distutils adds CFLAGS to compiles but not LDFLAGS to link_executable, so a build
    with e.g. CFLAGS=LDFLAGS=-fsanitize=address failed the probe (unresolved __asan symbols) and
    silently built the serial extension. Returns (ok, reason)."""
    tmp = tempfile.mkdtemp(prefix="g2probe")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void){int n=0;\n"
                    "#pragma omp parallel reduction(+:n)\nn+=1;\nreturn omp_get_max_threads()>0?0:n;}\n")
        user_c = _env_flags("CPPFLAGS", "CFLAGS")
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=user_c + cflags)
        compiler.link_executable(objs, "probe", output_dir=tmp,
                                 extra_postargs=user_c + _env_flags("LDFLAGS") + ldflags)
        return True, ""
    except Exception as e:
        return False, str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _say(msg):
    """A line that stands out in a build log."""
    print("\n*** gemma2np: %s\n" % msg, file=sys.stderr)


class OptionalBuildExt(build_ext):
    """build_ext that probes OpenMP and never fails the install."""

    def build_extensions(self):
        ctype = getattr(self.compiler, "compiler_type", "")
        for ext in self.extensions:
            if ctype == "msvc":
                ext.extra_compile_args = ["/O2", "/openmp"]
                continue
            base = ["-O3", "-std=gnu99", "-ffp-contract=off", "-fno-strict-aliasing"]
            if os.environ.get("GEMMA2NP_NO_OPENMP") == "1":
                ok, why = False, "GEMMA2NP_NO_OPENMP=1"
            else:
                ok, why = _compiler_accepts(self.compiler, ["-fopenmp"], ["-fopenmp"])
            if ok:
                ext.extra_compile_args = base + ["-fopenmp"]
                ext.extra_link_args = ["-fopenmp"]
            else:
                _say("OpenMP is OFF (%s): building the serial native extension "
                     "(every kernel runs on one thread)" % (why,))
                ext.extra_compile_args = base
        try:
            super().build_extensions()
        except Exception as e:  # compile/link errors
            _warn("building the native extension failed: %s" % (e,))

    def run(self):
        try:
            super().run()
        except Exception as e:
            _warn("build_ext failed: %s" % (e,))


def _extensions():
    if os.environ.get("GEMMA2NP_NO_NATIVE") == "1":
        _say("GEMMA2NP_NO_NATIVE=1: skipping the native extension (pure NumPy backend)")
        return []
    try:
        import numpy
        from Cython.Build import cythonize
        from setuptools import Extension
    except Exception as e:  # Cython or NumPy missing
        _warn("Cython/NumPy not importable at build time (%s)" % (e,))
        return []
    ext = Extension(
        "gemma2np._native",
        sources=["csrc/_native.pyx"] + ["csrc/g2_%s.c" % n for n in KERNEL_SOURCES],
        include_dirs=[numpy.get_include(), "csrc"],
        depends=["csrc/%s.h" % n for n in KERNEL_HEADERS],
        define_macros=[("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION")],
    )
    try:
        return cythonize([ext], compiler_directives={"language_level": "3"}, quiet=True)
    except Exception as e:
        _warn("cythonize failed: %s" % (e,))
        return []


setup(ext_modules=_extensions(), cmdclass={"build_ext": OptionalBuildExt})
