"""HF-format checkpoint directories: safetensors files (single or sharded) <-> {name: array}.

Layer 2 of the package: knows file formats and Hugging Face tensor names, nothing of the model.

The safetensors format is small enough to read directly: an 8-byte little-endian header length, a
JSON header mapping each tensor name to {dtype, shape, data_offsets}, then the raw little-endian
bytes. Reading it ourselves lets every tensor be a *memory map* of the file (nothing is read until
it is used, so a 5 GB checkpoint costs page cache, not 2x its size in RAM) and lets every
corruption be reported with the file and tensor it concerns. bfloat16 comes from `ml_dtypes`
(the NumPy dtype extension maintained by the JAX team), not from bit tricks of our own.
"""

from __future__ import annotations

import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

__all__ = [
    "CheckpointError",
    "SAFE_WEIGHTS_NAME",
    "SAFE_WEIGHTS_INDEX_NAME",
    "read_safetensors",
    "write_safetensors",
    "load_state_dict",
    "save_state_dict",
    "checkpoint_files",
    "bfloat16",
]

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

bfloat16 = np.dtype(ml_dtypes.bfloat16)

# safetensors dtype tag <-> NumPy dtype (little endian).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": bfloat16,
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAGS = {v: k for k, v in _DTYPES.items()}

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec caps the header at 100 MB


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, truncated or inconsistent."""


def read_safetensors(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read one .safetensors file -> ({name: array}, metadata).

    With mmap=True every array is a read-only view of a memory map of the file.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{path}: header length {n} does not fit in a file of {size} bytes (truncated or not safetensors)"
                )
            raw = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file not found: {path}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    buffer = None
    if header:
        if mmap:
            buffer = np.memmap(path, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,)) if data_size else np.zeros(0, np.uint8)
        else:
            with open(path, "rb") as f:
                f.seek(data_start)
                buffer = np.frombuffer(f.read(), dtype=np.uint8)
    tensors: dict[str, np.ndarray] = {}
    for name, info in header.items():
        try:
            tag, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r}") from None
        dtype = _DTYPES.get(tag)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag!r}")
        if not (isinstance(shape, list) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int)) or end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({tag} {shape}) should take {nbytes} bytes but its offsets are "
                f"[{begin}, {end})"
            )
        if end > data_size:
            raise CheckpointError(
                f"{path}: tensor {name!r} ends at byte {end} of the data section but the file only has "
                f"{data_size} bytes of data (truncated file?)"
            )
        tensors[name] = buffer[begin:end].view(dtype).reshape(shape)
    return tensors, metadata


def _target_dtype(a: np.ndarray, dtype) -> np.dtype:
    """The dtype a tensor is written in: `dtype` for floating-point tensors when given, else its own."""
    own = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
    if dtype is not None and (np.issubdtype(a.dtype, np.floating) or a.dtype == bfloat16):
        return dtype
    return own


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: dict | None = None, dtype=None
) -> None:
    """Write {name: array} as one .safetensors file (readable by the `safetensors` library and transformers).

    dtype: convert floating-point tensors to it while writing, one tensor at a time (so converting a large
    checkpoint never holds a second full copy in memory).
    """
    header: dict = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    names = sorted(tensors)
    for name in names:
        a = tensors[name]
        dt = _target_dtype(a, dtype)
        tag = _TAGS.get(dt)
        if tag is None:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {dt} has no safetensors tag")
        nbytes = math.prod(a.shape) * dt.itemsize
        header[name] = {"dtype": tag, "shape": list(a.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    tmp = os.fspath(path) + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            a = np.asarray(tensors[name])
            a = np.ascontiguousarray(a.astype(_target_dtype(a, dtype), copy=False))
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)  # never leave a half-written file under the real name


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF checkpoint directory, in index order."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r}")
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a valid safetensors index ({exc!r})") from None
        files = list(dict.fromkeys(weight_map.values()))
        missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [os.path.join(directory, f) for f in files]
    if os.path.exists(single):
        return [single]
    others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if others:
        return [os.path.join(directory, f) for f in others]
    hint = ""
    if any(f.endswith((".bin", ".pt", ".pth", ".ckpt")) for f in os.listdir(directory)):
        hint = " (PyTorch pickle checkpoints are not loaded directly: see `gemma2np convert`)"
    if any(f.endswith(".gguf") for f in os.listdir(directory)):
        hint = " (for a GGUF file pass gguf_file=...)"
    raise CheckpointError(f"no model.safetensors or {SAFE_WEIGHTS_INDEX_NAME} in {directory!r}{hint}")


def load_state_dict(directory: str | os.PathLike, mmap: bool = True) -> dict[str, np.ndarray]:
    """All tensors of an HF checkpoint directory (single file or shards), memory-mapped."""
    state: dict[str, np.ndarray] = {}
    for path in checkpoint_files(directory):
        tensors, _ = read_safetensors(path, mmap=mmap)
        for name, value in tensors.items():
            if name in state:
                raise CheckpointError(f"tensor {name!r} appears in more than one shard ({path})")
            state[name] = value
    return state


def save_state_dict(
    directory: str | os.PathLike,
    state: Mapping[str, np.ndarray],
    max_shard_size: int | None = None,
    dtype: np.dtype | str | None = None,
) -> list[str]:
    """Write {name: array} as model.safetensors, or as shards + model.safetensors.index.json when the
    total exceeds max_shard_size bytes (transformers' naming: model-00001-of-00003.safetensors)."""
    os.makedirs(directory, exist_ok=True)
    if dtype is not None:
        dtype = bfloat16 if str(dtype) in ("bfloat16", "bf16") else np.dtype(dtype)
    names = list(state)
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = math.prod(state[name].shape) * _target_dtype(state[name], dtype).itemsize
        if max_shard_size is not None and shards[-1] and size + nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    # drop stale files from an earlier save with another layout
    for f in os.listdir(directory):
        if f == SAFE_WEIGHTS_INDEX_NAME or (f.startswith("model") and f.endswith(".safetensors")):
            os.remove(os.path.join(directory, f))
    if len(shards) == 1:
        write_safetensors(os.path.join(directory, SAFE_WEIGHTS_NAME), {k: state[k] for k in shards[0]}, dtype=dtype)
        return [SAFE_WEIGHTS_NAME]
    files = []
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(directory, fname), {k: state[k] for k in shard}, dtype=dtype)
        files.append(fname)
        weight_map.update({k: fname for k in shard})
    total = sum(math.prod(v.shape) * _target_dtype(v, dtype).itemsize for v in state.values())
    with open(os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    return files


def check_state_dict(
    state: Mapping[str, np.ndarray],
    expected: Mapping[str, tuple[int, ...]],
    optional: Iterable[str] = (),
) -> tuple[list[str], list[str]]:
    """Compare a state dict with the expected {name: shape}.

    Raises CheckpointError naming the tensor when a shape disagrees or a tensor is not floating point;
    returns (missing, unexpected) name lists (the caller decides which are fatal).
    """
    optional = set(optional)
    for name, shape in expected.items():
        if name in state:
            got = tuple(state[name].shape)
            if got != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {got}, the config implies {tuple(shape)}")
            dt = state[name].dtype
            if not (np.issubdtype(dt, np.floating) or dt == bfloat16):
                raise CheckpointError(f"tensor {name!r} has dtype {dt}, expected a floating-point dtype")
    missing = [n for n in expected if n not in state and n not in optional]
    unexpected = [n for n in state if n not in expected]
    return missing, unexpected


def _mapping_of(a: np.ndarray):
    """(mmap object, byte offset of `a` inside it) for a view of a np.memmap, else (None, 0)."""
    base = a
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mm = getattr(base, "_mmap", None)
    if mm is None or not hasattr(mm, "madvise"):
        return None, 0
    try:
        start_addr = np.frombuffer(mm, dtype=np.uint8).__array_interface__["data"][0]
    except (TypeError, ValueError):
        return None, 0
    return mm, a.__array_interface__["data"][0] - start_addr


def gather_rows(a: np.ndarray, index: np.ndarray) -> np.ndarray:
    """a[index] for a 2-D tensor; rows of a memory-mapped tensor are read with pread() instead.

    For the embedding table: touching rows through the mapping would map whole pages (plus the kernel's
    fault-around) into our resident set, hundreds of MB after a few thousand random tokens; pread
    copies just the rows. Returns an array of shape index.shape + a.shape[1:]."""
    import mmap as _mmap

    base = a
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    filename = getattr(base, "filename", None)
    mm, off = _mapping_of(a)
    if filename is None or mm is None or a.ndim != 2 or not a.flags.c_contiguous:
        return a[index]
    # np.memmap maps from `offset` rounded down to the allocation granularity; `off` is a's place in the map
    offset = base.offset - base.offset % _mmap.ALLOCATIONGRANULARITY + off
    row_bytes = a.shape[1] * a.dtype.itemsize
    flat = np.asarray(index).reshape(-1)
    uniq, inverse = np.unique(flat, return_inverse=True)
    rows = np.empty((len(uniq), a.shape[1]), a.dtype)
    fd = os.open(filename, os.O_RDONLY)
    try:
        for i, r in enumerate(uniq):
            data = os.pread(fd, row_bytes, offset + int(r) * row_bytes)
            if len(data) != row_bytes:
                raise CheckpointError(f"{filename}: short read of embedding row {int(r)} (file truncated?)")
            rows[i] = np.frombuffer(data, a.dtype)
    finally:
        os.close(fd)
    return rows[inverse].reshape(np.shape(index) + a.shape[1:])


def copy_to_ram(a: np.ndarray, chunk_bytes: int = 64 << 20) -> np.ndarray:
    """A private in-memory copy of a (memory-mapped) tensor, made chunk by chunk with the file pages
    released behind it: resident memory grows by the tensor's size only, never twice. NumPy backs large
    allocations with transparent huge pages where the OS allows it."""
    if _mapping_of(a)[0] is None:
        return a
    out = np.empty(a.shape, a.dtype)
    flat_src = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    flat_dst = out.reshape(flat_src.shape)
    rows = max(1, chunk_bytes // max(1, flat_src.shape[1] * a.dtype.itemsize))
    for r0 in range(0, flat_src.shape[0], rows):
        flat_dst[r0:r0 + rows] = flat_src[r0:r0 + rows]
        release_pages(flat_src[r0:r0 + rows])
    return out


def release_pages(a: np.ndarray) -> None:
    """Tell the OS that the pages of a memory-mapped tensor may leave this process's resident set.

    Used after a tensor was converted at load (int8 quantisation, bf16 -> f32 widening): the converted
    copy is what the model uses, and without this the file pages we read would stay counted in our
    RSS until memory pressure evicts them. The mapping is read-only and file-backed, so this is always
    safe: a later access simply faults the pages in again from the page cache. No-op for other arrays.
    """
    import mmap as _mmap

    mm, off = _mapping_of(a)
    if mm is None or not hasattr(_mmap, "MADV_DONTNEED"):
        return
    page = _mmap.PAGESIZE
    # only whole pages that lie inside this tensor: neighbours may still be in use
    first = -(-off // page) * page
    last = min(len(mm), off + a.nbytes) // page * page
    if last > first:
        mm.madvise(_mmap.MADV_DONTNEED, first, last - first)
