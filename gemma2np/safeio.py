"""Hostile-input helpers shared by every loader: strict JSON, and files that stay inside a model directory.

Layer 0 of the package: imports nothing of gemma2np. Each function takes the error class to raise
(ConfigError, CheckpointError, TokenizerError, ...: all ValueErrors), so a caller reports problems in
its own terms and no foreign exception (RecursionError, UnicodeDecodeError, int-conversion ValueError,
IsADirectoryError, a read that blocks on a FIFO) ever leaves a loader.

* ``loads_json``: ``json.loads`` with the limits Python's parser lacks. Nesting depth is bounded (Python
  raises RecursionError near 1,000 levels; ``max_depth=127`` mirrors serde_json, which the
  `safetensors` library uses), integer literals too long for ``int()`` (4,300 digits) are refused, and
  ``strict_numbers=True`` reproduces serde_json's number rules (no NaN/Infinity, integers beyond
  [-2**63, 2**64) become floats, numbers beyond float range are an error, lone surrogate escapes are an
  error) for the safetensors header.
* ``model_file``: a name from a file (a shard index) or a fixed name, resolved inside a model directory
  and checked *before anything is opened*: a plain file name (no separators, no ``..``, not absolute),
  a real path inside the directory -- or, for the Hugging Face hub cache layout
  (``<repo>/snapshots/<rev>/x -> ../../blobs/<sha>``), inside that repository's ``blobs/`` -- and a
  regular file (never a FIFO, a device such as /dev/urandom, or a directory).
* ``open_regular``: opens with O_NONBLOCK (opening a FIFO never blocks) and checks with fstat that what
  was opened is a regular file.
"""

from __future__ import annotations

import json
import math
import os
import stat

__all__ = ["loads_json", "read_json_file", "check_plain_name", "model_file", "open_regular", "check_regular"]

# serde_json's default recursion limit: 128 levels, the 128th refused (measured on safetensors 0.8).
SERDE_MAX_DEPTH = 127
# Python's own limit for int(str) (sys.int_info.default_max_str_digits): longer literals are refused
# by us with a message, not by int() with a foreign ValueError.
_MAX_INT_DIGITS = 4300
_I64_MIN, _U64_MAX = -(2**63), 2**64 - 1


class _Refused(Exception):
    """Internal: carries a message out of a json hook (json re-raises it unchanged)."""


def _raise_constant(name):
    raise _Refused(f"{name} is not JSON")


def _strict_int(s: str):
    # serde_json: an integer literal fits u64 or i64, else it is parsed as f64 ("-0" is f64 too);
    # past f64's range it is an error. Returning a float makes later integer checks refuse it, as serde does.
    if len(s.lstrip("-")) > 400:  # > 1e400 > f64 max: float(s) is inf, no need to build the int
        raise _Refused(f"number {s[:20]}... out of range")
    if s == "-0":
        return -0.0
    v = int(s)
    if _I64_MIN <= v <= _U64_MAX:
        return v
    f = float(s)
    if not math.isfinite(f):
        raise _Refused(f"number {s[:20]}... out of range")
    return f


def _strict_float(s: str):
    f = float(s)
    if not math.isfinite(f):
        raise _Refused(f"number {s[:20]} out of range")
    return f


def _lenient_int(s: str):
    if len(s.lstrip("-")) > _MAX_INT_DIGITS:
        raise _Refused(f"integer literal of {len(s)} digits is too long")
    return int(s)


def _walk(obj, max_depth: int | None, check_strings: bool) -> None:
    """Depth and string checks without recursion (a deep object must not overflow our own stack)."""
    stack = [(obj, 1)]
    while stack:
        o, d = stack.pop()
        if isinstance(o, (dict, list)):
            if max_depth is not None and d > max_depth:
                raise _Refused(f"nested more than {max_depth} levels deep")
            items = o.values() if isinstance(o, dict) else o
            if check_strings and isinstance(o, dict):
                for k in o:
                    _check_str(k)
            stack.extend((v, d + 1) for v in items)
        elif check_strings and isinstance(o, str):
            _check_str(o)


def _check_str(s: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise _Refused("a string holds a lone surrogate escape (\\ud800-\\udfff)") from None


def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise _Refused(f"duplicate key {k!r:.80}")
        d[k] = v
    return d


def loads_json(data: bytes | str, error: type[Exception], what: str, *, max_depth: int | None = 200,
               strict_numbers: bool = False, object_pairs_hook=None):
    """Parse JSON text (bytes must be UTF-8) -> Python object, or raise `error` naming `what`.

    max_depth bounds the nesting (None: only Python's own recursion limit, reported as `error`).
    strict_numbers: serde_json's number and string rules (see the module docstring).
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error(f"{what} is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    kw = {}
    if strict_numbers:  # serde_json has no NaN / Infinity; Python's json (transformers' reader) accepts them
        kw.update(parse_constant=_raise_constant, parse_int=_strict_int, parse_float=_strict_float)
    else:
        kw.update(parse_int=_lenient_int)
    if object_pairs_hook is not None:
        kw["object_pairs_hook"] = object_pairs_hook
    try:
        obj = json.loads(data, **kw)
        _walk(obj, max_depth, check_strings=strict_numbers)
    except _Refused as exc:
        raise error(f"{what} is not acceptable JSON: {exc}") from None
    except RecursionError:
        raise error(f"{what} is not acceptable JSON: nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
    except ValueError as exc:  # anything else json / int() / float() raise on a literal
        raise error(f"{what} is not valid JSON: {exc}") from None
    return obj


def check_regular(path: str, error: type[Exception], what: str = "file") -> os.stat_result:
    """stat (never open) `path`: it must exist and be a regular file."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except OSError as exc:
        raise error(f"cannot access {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode) else \
            "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "not a regular file"
        raise error(f"{what} {path} is {kind}, not a regular file")
    return st


# config.json, an index or tokenizer_config.json is kilobytes to a few megabytes; a JSON file beyond this is
# refused before it is read into memory (and parsed into far more).
MAX_JSON_FILE = 256 << 20


def read_json_file(path: str, error: type[Exception], what: str | None = None, **kw):
    """A regular file's JSON content (see loads_json), any failure as `error`."""
    what = what or path
    with open_regular(path, error, what) as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON_FILE:
            raise error(f"{what} is {size} bytes, more than the {MAX_JSON_FILE} a JSON metadata file may have")
        # read what fstat reported (+1 byte to see a file that grew meanwhile), not MAX_JSON_FILE: a read of
        # n bytes reserves an n-byte buffer first, 256 MiB for every small config.json otherwise
        data = f.read(size + 1)
        if len(data) > MAX_JSON_FILE:
            raise error(f"{what} grew past the {MAX_JSON_FILE} bytes a JSON metadata file may have while being read")
    return loads_json(data, error, what, **kw)


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_plain_name(name, error: type[Exception], what: str = "file") -> str:
    """`name` must be a non-empty file name: no directory part, no `..`, not absolute, no NUL."""
    if not isinstance(name, str):
        raise error(f"{what} name must be a string, got {type(name).__name__} {name!r:.80}")
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if (not name or name in (".", "..") or "\x00" in name or any(s in name for s in seps)
            or os.path.isabs(name) or os.path.basename(name) != name):
        raise error(f"{what} name {name!r:.200} is not a plain file name inside the model directory")
    return name


def model_file(directory: str, name, error: type[Exception], what: str = "file") -> str:
    """The path of `name` inside `directory`, refused (as `error`) unless it is a plain file name whose
    real path stays inside the directory (or its hub-cache blobs/) and is a regular file. Opens nothing."""
    check_plain_name(name, error, what)
    path = os.path.join(directory, name)
    real_dir = os.path.realpath(directory)
    real = os.path.realpath(path)
    allowed = _within(real, real_dir)
    if not allowed:
        # Hugging Face hub cache: <repo>/snapshots/<rev>/<name> is a symlink to <repo>/blobs/<hash>.
        parts = real_dir.split(os.sep)
        if "snapshots" in parts:
            i = len(parts) - 1 - parts[::-1].index("snapshots")
            repo = os.sep.join(parts[:i])
            allowed = bool(repo) and _within(real, os.path.join(repo, "blobs"))
    if not allowed:
        raise error(f"{what} {name!r} resolves to {real}, outside the model directory {real_dir}")
    check_regular(path, error, what)
    return path


def open_regular(path: str, error: type[Exception], what: str = "file"):
    """open(path, "rb") that cannot block on a FIFO and refuses anything but a regular file."""
    check_regular(path, error, what)
    try:
        f = open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK))
    except OSError as exc:
        raise error(f"cannot open {what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # replaced between stat and open
        f.close()
        raise error(f"{what} {path} is not a regular file")
    return f
