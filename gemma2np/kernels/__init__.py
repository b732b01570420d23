"""Backends (layer 3): the model runs every op through one backend object (kernels/protocol.py).

    from gemma2np.kernels import get_backend, native_available
    be = get_backend("native")           # or "numpy" (dtype="float64" too), "twins", "auto"
    h = be.prepare_linear(w, weights="int8")   # "float32" | "bfloat16" | "bfloat16_dp" | "int8"
    y = be.linear(x, h)

get_backend(name):
  "numpy"  -> ReferenceBackend: gemma2np.ops itself (float32 or float64), always available;
  "twins"  -> TwinBackend: the NumPy twins of the C kernels (kernels/twins.py), every weight format;
  "native" -> NativeBackend (gemma2np._native); if the extension cannot be imported this raises
              NativeUnavailableError (a BackendError, so a ValueError, and an ImportError) in one line;
  "auto"   -> native when importable, else the reference, with one warning line.
n_threads: None = OMP_NUM_THREADS, else the number of physical cores (native only).
"""
from __future__ import annotations

import warnings

import numpy as np

from . import twins
from .handles import WEIGHT_FORMATS, LinearHandle
from .native import NativeBackend
from .ops_backend import ReferenceBackend
from .protocol import OPS, Backend, BackendError, NativeUnavailableError
from .twins import TwinBackend

__all__ = ["get_backend", "native_available", "native_import_error", "Backend", "BackendError",
           "NativeUnavailableError", "OPS", "ReferenceBackend", "TwinBackend", "NativeBackend",
           "LinearHandle", "WEIGHT_FORMATS", "twins", "BACKENDS"]

BACKENDS = ("numpy", "twins", "native", "auto")

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


def _why() -> str:
    return "%s: %s" % (type(_import_error).__name__, _import_error)


def _warn_once():
    """One warning line (no source line under it: warn_explicit with the package as its 'file')."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn_explicit(
            "the native extension gemma2np._native is not available (%s); running on NumPy. Build it with "
            "`pip install .` (a C compiler) or `python setup.py build_ext --inplace`." % _why(),
            RuntimeWarning, filename="gemma2np", lineno=0, module="gemma2np")


def get_backend(name: str = "numpy", n_threads: int | None = None, dtype="float32"):
    """Return a backend object implementing the protocol (see module doc). dtype: the reference's
    compute dtype ("float32" or "float64"); the other backends compute in float32 only."""
    if name not in BACKENDS:
        raise BackendError("backend must be one of %s, got %r" % (", ".join(map(repr, BACKENDS)), name))
    if name == "numpy":
        return ReferenceBackend(dtype, n_threads)
    if np.dtype(dtype) != np.float32:
        raise BackendError("backend %r computes in float32; dtype=%s needs backend='numpy'" % (name, np.dtype(dtype).name))
    if name == "twins":
        return TwinBackend(n_threads)
    if native_available():
        return NativeBackend(n_threads)
    if name == "native":
        raise NativeUnavailableError("backend 'native' requested but gemma2np._native cannot be imported (%s); "
                                     "use backend='numpy' or build the extension" % _why())
    _warn_once()
    return ReferenceBackend(dtype, n_threads)
