"""Backend dispatch (layer 3): the model calls a backend object, never multiplies weights itself.

    from gemma2np.kernels import get_backend, native_available
    be = get_backend("native")           # or "numpy", or "auto"
    h = be.prepare_linear(w, weights="int8")   # "float32" | "bfloat16" | "bfloat16_dp" | "int8"
    y = be.linear(x, h)

get_backend(name):
  "numpy"  -> NumpyBackend (the NumPy twins in kernels/reference.py), always available;
  "native" -> NativeBackend (gemma2np._native); if the extension cannot be imported this RAISES
              ImportError (you asked for it explicitly) after one warnings.warn explaining why;
  "auto"   -> native when importable, else NumPy with one warnings.warn.
n_threads: None = OMP_NUM_THREADS, else the number of physical cores (native only).
"""
from __future__ import annotations

import warnings

from . import reference
from .native import LinearHandle, NativeBackend, NumpyBackend, WEIGHT_FORMATS

__all__ = ["get_backend", "native_available", "native_import_error", "NumpyBackend",
           "NativeBackend", "LinearHandle", "WEIGHT_FORMATS", "reference"]

_import_error = None
_checked = False
_warned = False


def _try_import():
    global _import_error, _checked
    if not _checked:
        _checked = True
        from ._openmp_env import apply_defaults
        apply_defaults()  # bounded OpenMP spinning unless the user chose; before libgomp loads (issue 13)
        try:
            from .. import _native  # noqa: F401
        except Exception as e:  # ImportError, or a broken build
            _import_error = e
    return _import_error is None


def native_available() -> bool:
    """True if the compiled extension gemma2np._native imports."""
    return _try_import()


def native_import_error():
    """The exception raised when importing gemma2np._native, or None."""
    _try_import()
    return _import_error


def _warn_once():
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            "gemma2np: the native extension gemma2np._native is not available (%s: %s); "
            "build it with `pip install -e . --no-build-isolation` or "
            "`python setup.py build_ext --inplace`." % (type(_import_error).__name__, _import_error),
            RuntimeWarning, stacklevel=3)


def get_backend(name: str = "numpy", n_threads: int | None = None):
    """Return a backend object implementing the ARCHITECTURE.md contract (see module doc)."""
    if name == "numpy":
        return NumpyBackend(n_threads)
    if name in ("native", "auto"):
        if native_available():
            return NativeBackend(n_threads)
        _warn_once()
        if name == "native":
            raise ImportError("backend 'native' requested but gemma2np._native cannot be imported: %s"
                              % (_import_error,)) from _import_error
        return NumpyBackend(n_threads)
    raise ValueError("backend must be 'numpy', 'native' or 'auto', got %r" % (name,))
