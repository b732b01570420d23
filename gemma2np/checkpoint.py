"""HF-format checkpoint directories: safetensors files (single or sharded) <-> {name: array}.

Layer 2 of the package: knows file formats and Hugging Face tensor names, nothing of the model.

The safetensors format is small enough to read directly: an 8-byte little-endian header length, a
JSON header mapping each tensor name to {dtype, shape, data_offsets}, then the raw little-endian
bytes. Reading it ourselves lets every tensor be a *memory map* of the file (nothing is read until
it is used, so a 5 GB checkpoint costs page cache, not 2x its size in RAM) and lets every
corruption be reported with the file and tensor it concerns. The header is validated exactly as the
`safetensors` library validates it (tests/test_hardening.py runs both on mutated files), and files are
*written* by the library itself (`safetensors.numpy.save_file`). bfloat16 comes from `ml_dtypes`
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

from .safeio import SERDE_MAX_DEPTH, check_plain_name, loads_json, model_file, open_regular, read_json_file

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

# safetensors dtype tag <-> NumPy dtype (little endian): every tag with a NumPy dtype. The library also
# knows F4 / F6_* (packed sub-byte) and F8_* floats; those are refused as unsupported (nothing in Gemma 2
# uses them, and NumPy cannot view packed elements).
_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": bfloat16,
    "C64": np.dtype("<c8"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_TAGS = {v: k for k, v in _DTYPES.items()}
_KNOWN_UNSUPPORTED = ("F4", "F6_E2M3", "F6_E3M2", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ")

# The safetensors library (Rust, serde_json) refuses a header longer than 100,000,000 bytes (not 100 MiB).
_MAX_HEADER = 100_000_000
_USIZE_MAX = 2**64 - 1


class CheckpointError(ValueError):
    """A checkpoint file or directory is missing, malformed, truncated or inconsistent."""


class _Entries(dict):
    """A JSON object that remembers which keys it saw twice (json keeps the last value, as serde does
    for maps; serde refuses a repeated *struct* field, which is what `dups` lets us do too)."""

    dups: frozenset = frozenset()


def _pairs(pairs):
    d = _Entries()
    seen = set()
    dups = set()
    for k, v in pairs:
        if k in seen:
            dups.add(k)
        seen.add(k)
        d[k] = v
    d.dups = frozenset(dups)
    return d


def _is_usize(x) -> bool:
    # serde's usize: a JSON integer (never a float like 2.0, never a bool) in [0, 2**64)
    return isinstance(x, int) and not isinstance(x, bool) and 0 <= x <= _USIZE_MAX


def parse_safetensors_header(raw: bytes, file_size: int, path: str) -> tuple[dict, dict, int]:
    """Validate a safetensors header exactly as the `safetensors` library does (read_metadata + validate).

    raw: the n header bytes; file_size: the whole file's size. Returns ({name: (dtype, shape, begin, end)},
    metadata, n). Refused, like the library: non-UTF-8 or non-JSON headers (serde_json rules: depth < 128,
    no NaN, numbers in range, no lone surrogates), a non-object, `__metadata__` that is not null or a map of
    strings (or given twice), an entry that is not {dtype, shape, data_offsets} (extra keys are ignored, a
    repeated one is refused), an unknown dtype, shape or offsets that are not unsigned integers, offsets that
    (sorted) do not start at 0, follow each other without a gap or overlap and end exactly at the end of the
    file, a size that disagrees with dtype x shape, and a shape whose product overflows 64 bits.
    """
    n = len(raw)
    header = loads_json(raw, CheckpointError, f"{path}: header", max_depth=SERDE_MAX_DEPTH,
                        strict_numbers=True, object_pairs_hook=_pairs)
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    if "__metadata__" in header.dups:
        raise CheckpointError(f"{path}: header has two __metadata__ entries")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r:.200}")
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise CheckpointError(f"{path}: tensor {name!r} has a malformed header entry {info!r:.200}")
        if getattr(info, "dups", frozenset()) & {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{path}: tensor {name!r} repeats a field ({sorted(info.dups)})")
        tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(tag, str) or (tag not in _DTYPES and tag not in _KNOWN_UNSUPPORTED):
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag!r:.80} (not a safetensors dtype)")
        if not (isinstance(shape, list) and all(_is_usize(s) for s in shape)):
            raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r:.200}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r:.200}")
        entries.append((tuple(offsets), name, tag, shape))
    # the library sorts by offsets, then requires each tensor to start where the previous one ended
    entries.sort(key=lambda e: e[0])
    tensors = {}
    start = 0
    for (begin, end), name, tag, shape in entries:
        if begin != start or end < begin:
            raise CheckpointError(
                f"{path}: tensor {name!r} has offsets [{begin}, {end}) but the previous tensor ends at byte {start} "
                "(tensors must tile the data section without gaps or overlaps: invalid offset)")
        start = end
        count = 1
        for s in shape:  # checked product, as the library's usize arithmetic
            count *= s
            if count > _USIZE_MAX:
                raise CheckpointError(f"{path}: tensor {name!r} shape {shape} overflows 64 bits")
        if tag in _KNOWN_UNSUPPORTED:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {tag} (no NumPy equivalent)")
        dtype = _DTYPES[tag]
        nbytes = count * dtype.itemsize
        if nbytes > _USIZE_MAX:
            raise CheckpointError(f"{path}: tensor {name!r} size overflows 64 bits")
        if end - begin != nbytes:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({tag} {shape}) should take {nbytes} bytes but its offsets are "
                f"[{begin}, {end})")
        tensors[name] = (dtype, tuple(shape), begin, end)
    data_size = file_size - 8 - n
    if start != data_size:
        how = "truncated file?" if start > data_size else "bytes not covered by any tensor"
        raise CheckpointError(
            f"{path}: the tensors end at byte {start} of the data section but the file has {data_size} bytes of "
            f"data ({how}; the data section must be covered exactly)")
    return tensors, metadata, n


def read_safetensors(path: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, np.ndarray], dict]:
    """Read one .safetensors file -> ({name: array}, metadata).

    The file is validated as the `safetensors` library validates it (`parse_safetensors_header`; a test
    runs both readers on mutated files). With mmap=True every array is a read-only view of a memory map of
    the file (zero copy: nothing is read until used); mmap=False reads the data section into memory.
    """
    path = os.fspath(path)
    with open_regular(path, CheckpointError, "checkpoint file") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in a file of {size} bytes (truncated or not safetensors)"
            )
        raw = f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{path}: file shrank while being read")
        entries, metadata, _ = parse_safetensors_header(raw, size, path)
        data_start = 8 + n
        data_size = size - data_start
        buffer = np.zeros(0, np.uint8)
        if entries and data_size:
            if mmap:
                # np.memmap maps through our already-open, checked file object (no second open by name)
                buffer = np.memmap(f, dtype=np.uint8, mode="r", offset=data_start, shape=(data_size,))
            else:
                f.seek(data_start)
                buffer = np.frombuffer(f.read(data_size), dtype=np.uint8)
                if buffer.shape[0] != data_size:
                    raise CheckpointError(f"{path}: file shrank while being read")
    tensors: dict[str, np.ndarray] = {}
    for name, (dtype, shape, begin, end) in entries.items():
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
    """Write {name: array} as one .safetensors file with the `safetensors` library (safetensors.numpy), so the
    format is the library's own for every other reader; metadata {"format": "pt"} as transformers expects.

    dtype: convert floating-point tensors to it while writing. The library writes from contiguous arrays in
    memory: tensors already in the target dtype and C order (e.g. memory-mapped ones) are passed as they are,
    converted ones are held for the duration of this file (one shard), not the whole checkpoint.
    """
    from safetensors.numpy import save_file

    meta = {"format": "pt", **(metadata or {})}
    arrays = {}
    for name in tensors:
        a = np.asarray(tensors[name])
        dt = _target_dtype(a, dtype)
        if dt not in _TAGS:
            raise CheckpointError(f"cannot write tensor {name!r}: dtype {dt} has no safetensors tag")
        arrays[name] = np.ascontiguousarray(a.astype(dt, copy=False))
    tmp = os.fspath(path) + ".tmp"
    try:
        save_file(arrays, tmp, metadata=meta)
    except Exception:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    os.replace(tmp, path)  # never leave a half-written file under the real name


def checkpoint_files(directory: str | os.PathLike) -> list[str]:
    """The safetensors files of an HF checkpoint directory, in index order.

    Every file is checked before any is opened (`safeio.model_file`): a shard named by the index must be a
    plain file name whose real path stays inside the directory (``../x``, ``/etc/x``, ``sub/x`` and symlinks
    out of it are refused; the Hugging Face cache's snapshot -> blobs links are allowed) and a regular file
    (not /dev/urandom, a FIFO or a directory)."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"checkpoint directory not found: {directory!r}")
    index = os.path.join(directory, SAFE_WEIGHTS_INDEX_NAME)
    single = os.path.join(directory, SAFE_WEIGHTS_NAME)
    if os.path.lexists(index):
        model_file(directory, SAFE_WEIGHTS_INDEX_NAME, CheckpointError, "safetensors index")
        data = read_json_file(index, CheckpointError, index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            got = type(data).__name__ if not isinstance(data, dict) else type(weight_map).__name__
            raise CheckpointError(f"{index}: not a valid safetensors index (weight_map must be an object of "
                                  f"tensor name -> shard file name, got {got})")
        for tensor, shard in weight_map.items():
            if not isinstance(shard, str):
                raise CheckpointError(f"{index}: weight_map[{tensor!r:.100}] is {type(shard).__name__} "
                                      f"{shard!r:.80}, not a shard file name")
        files = list(dict.fromkeys(weight_map.values()))
        for f in files:  # names first: nothing outside the directory is even stat()ed
            check_plain_name(f, CheckpointError, f"shard named by {SAFE_WEIGHTS_INDEX_NAME}")
        missing = [f for f in files if not os.path.lexists(os.path.join(directory, f))]
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        return [model_file(directory, f, CheckpointError, f"shard named by {SAFE_WEIGHTS_INDEX_NAME}") for f in files]
    if os.path.lexists(single):
        return [model_file(directory, SAFE_WEIGHTS_NAME, CheckpointError, "checkpoint file")]
    others = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if others:
        return [model_file(directory, f, CheckpointError, "checkpoint file") for f in others]
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

    if hasattr(a, "gather"):  # a quantized GGUF tensor (gguf_quant): dequantizes only the gathered rows
        return a.gather(index)
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
    if hasattr(a, "copy_to_ram"):  # a quantized GGUF tensor (gguf_quant): its blocks, copied the same way
        return a.copy_to_ram()
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

    a = getattr(a, "raw", a)  # a quantized GGUF tensor (gguf_quant): the pages of its blocks
    mm, off = _mapping_of(a)
    if mm is None or not hasattr(_mmap, "MADV_DONTNEED"):
        return
    page = _mmap.PAGESIZE
    # only whole pages that lie inside this tensor: neighbours may still be in use
    first = -(-off // page) * page
    last = min(len(mm), off + a.nbytes) // page * page
    if last > first:
        mm.madvise(_mmap.MADV_DONTNEED, first, last - first)
