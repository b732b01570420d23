"""Google's official PyTorch release of Gemma 2 (gemma_pytorch's `model.ckpt`), read without torch.

Layer 2 of the package: file formats and tensor names only.

The release is a `torch.save` file: a zip archive holding `<name>/data.pkl` (a pickle of
`{"model_state_dict": {...}}`) and one raw little-endian buffer per storage at `<name>/data/<key>`.
A pickle is a small program, and an ordinary `pickle.load` of a hostile file runs whatever it names
(`os.system`, `subprocess.Popen`, ...). So the pickle is read by `RestrictedUnpickler`, whose
`find_class` hands out *our own* small functions for the handful of globals a tensor state dict
uses and raises `UnsafeCheckpointError` for every other global before anything is called. torch is
never imported: tensors are rebuilt as NumPy views of the (memory-mapped) zip members.

Names in the release (gemma_pytorch `gemma/model.py`, Gemma 2):
    embedder.weight                                   (vocab, hidden)  -> model.embed_tokens.weight
    model.layers.N.self_attn.qkv_proj.weight          fused: q rows, then k rows, then v rows
    model.layers.N.self_attn.o_proj.weight            same name in HF
    model.layers.N.mlp.{gate,up,down}_proj.weight     same
    model.layers.N.{input,post_attention,pre_feedforward,post_feedforward}_layernorm.weight   same
    model.norm.weight                                 same
    freqs_cis                                         complex RoPE table (a buffer, not a weight): dropped
gemma_pytorch's RMSNorm multiplies by (1 + w) exactly as transformers does, so norm weights are
copied unchanged (no +-1 offset, unlike llama.cpp's GGUF).
"""

from __future__ import annotations

import _compat_pickle
import collections
import io
import math
import os
import pickle
import pickletools
import re
import struct
import zipfile
import zlib
from typing import Any, Mapping

import numpy as np

from .checkpoint import CheckpointError, bfloat16
from .safeio import check_plain_name, model_file, open_regular, read_json_file

__all__ = [
    "UnsafeCheckpointError",
    "RestrictedUnpickler",
    "load_torch_file",
    "load_original_checkpoint",
    "convert_original_to_hf",
]


class UnsafeCheckpointError(CheckpointError):
    """The pickle inside a checkpoint names a global that a tensor state dict never needs."""


# torch's legacy typed-storage class names -> NumPy dtype of their elements. (torch pickles a storage
# as ('storage', torch.<X>Storage, key, location, numel) even for modern untyped storages.)
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": bfloat16,
    "ComplexDoubleStorage": np.dtype("<c16"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stand-in for `torch.<X>Storage` in a persistent id: only carries the element dtype."""

    def __init__(self, name: str):
        self.name, self.dtype = name, _STORAGE_DTYPES[name]

    def __call__(self, *args, **kwargs):  # a pickle that tries to *call* a storage class is not a state dict
        raise UnsafeCheckpointError(f"checkpoint pickle calls torch.{self.name}(...), which a state dict never does")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """torch._utils._rebuild_tensor_v2 for NumPy: a strided view of the storage, bounds-checked."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise CheckpointError(f"_rebuild_tensor_v2 got {type(storage).__name__} where a storage was expected")
    try:
        size = tuple(int(s) for s in size)
        stride = tuple(int(s) for s in stride)
        storage_offset = int(storage_offset)
    except (TypeError, ValueError):
        raise CheckpointError(f"malformed tensor record: size={size!r} stride={stride!r}") from None
    if len(size) != len(stride) or storage_offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"malformed tensor record: offset={storage_offset} size={size} stride={stride}")
    if math.prod(size) == 0:
        return np.zeros(size, dtype=storage.dtype)
    if math.prod(size) > storage.shape[0]:
        # only overlapping strides (an expand()ed tensor) can need more elements than the storage has; a
        # state dict never holds one, and copying it could allocate without bound
        raise CheckpointError(f"tensor of size {size} with stride {stride} overlaps itself in a storage of "
                              f"{storage.shape[0]} elements; not a plain weight")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.shape[0]:
        raise CheckpointError(
            f"tensor of size {size} (offset {storage_offset}, stride {stride}) reaches element {last} of a "
            f"storage holding only {storage.shape[0]} (corrupt or truncated checkpoint)"
        )
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride), writeable=False
    )
    # a view that is contiguous stays a (memory-mapped) view; a non-contiguous one (a slice that torch
    # saved with its whole storage) is copied so that later code can rely on C order.
    return view if view.flags.c_contiguous else np.ascontiguousarray(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data  # an nn.Parameter is its tensor


def _rebuild_parameter_with_state(data, requires_grad=False, backward_hooks=None, state=None):
    return data


def _ordered_dict(*args):
    return collections.OrderedDict(*args)


# (module, name) -> the harmless object `find_class` returns for it. Nothing else is ever resolved.
_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter_with_state,
    ("collections", "OrderedDict"): _ordered_dict,
    **{("torch", name): _StorageType for name in _STORAGE_DTYPES},
}


class RestrictedUnpickler(pickle.Unpickler):
    """An Unpickler that only resolves the globals of a tensor state dict (see `_ALLOWED`).

    Every way a pickle can reach a Python object by name (GLOBAL, STACK_GLOBAL, INST, OBJ via the
    class, EXT* via copyreg) goes through `find_class`, so refusing there means no foreign callable
    can ever be put on the stack, let alone called by REDUCE.
    `load_storage(dtype, key, numel)` supplies the bytes of persistent storage ids.
    """

    def __init__(self, file, load_storage, source: str = "checkpoint"):
        super().__init__(file)
        self._load_storage = load_storage
        self._source = source
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        obj = _ALLOWED.get((module, name))
        if obj is None:
            # protocol-2 pickles (torch's) spell some globals with Python 2 names (__builtin__.eval,
            # commands.check_call); name the Python 3 object in the message, as the stock Unpickler would.
            shown = f"{module}.{name}"
            py3 = _compat_pickle.NAME_MAPPING.get((module, name))
            py3 = ".".join(py3) if py3 else f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"
            if py3 != shown:
                shown = f"{py3} (pickled as {shown})"
            raise UnsafeCheckpointError(
                f"{self._source}: refusing to unpickle global {shown} (a tensor state dict only needs "
                "torch._utils._rebuild_tensor_v2/_rebuild_parameter, torch.*Storage and collections.OrderedDict); "
                "the file may be malicious or is not a plain state dict"
            )
        if obj is _StorageType:
            # a fresh marker per lookup: a BUILD opcode aimed at it cannot leak state into later loads
            return _StorageType(name)
        return obj

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._source}: unsupported persistent id {pid!r:.200}")
        storage_type, key, _location, numel = pid[1], str(pid[2]), pid[3], pid[4]
        dtype = _STORAGE_DTYPES.get(getattr(storage_type, "name", None)) if isinstance(storage_type, _StorageType) else None
        if dtype is None:
            raise CheckpointError(f"{self._source}: persistent id names {storage_type!r:.100}, not a torch storage type")
        if key not in self._storages:
            if not isinstance(numel, int) or isinstance(numel, bool) or numel < 0:
                raise CheckpointError(f"{self._source}: storage {key} has an invalid size {numel!r}")
            self._storages[key] = self._load_storage(dtype, key, numel)
        storage = self._storages[key]
        if len(pid) >= 6 and pid[5] is not None:  # legacy format: (view_key, offset, view_size) of a storage view
            _view_key, offset, view_size = pid[5]
            return storage[offset : offset + view_size]
        return storage


# ----------------------------------------------------------------------------- torch.save zip files
def _member_data_offset(f, info: zipfile.ZipInfo) -> int:
    """Byte offset of a STORED zip member's data: after its local header (30 bytes + name + extra)."""
    f.seek(info.header_offset)
    local = f.read(30)
    if len(local) != 30 or local[:4] != b"PK\x03\x04":
        raise CheckpointError(f"bad local zip header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", local[26:30])
    return info.header_offset + 30 + name_len + extra_len


# Bounds on what an archive may make us decompress (a zip "bomb" declares gigabytes for a tiny tensor).
_DEFLATE_MAX_RATIO = 1032  # DEFLATE cannot expand more than ~1032:1 (258-byte matches from 2-bit codes)
_MAX_PICKLE_BYTES = 256 << 20  # data.pkl of a 27B checkpoint is ~100 KB
_CHUNK = 16 << 20  # compressed members are inflated in pieces of this size
# Errors the zipfile / zlib / bz2 / lzma modules raise on damaged archives: all reported as CheckpointError.
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, OSError, NotImplementedError,
               RuntimeError, ValueError, struct.error, OverflowError)


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, nbytes: int, path: str, dtype=np.uint8) -> np.ndarray:
    """Exactly `nbytes` bytes of a compressed member, inflated in bounded pieces into one preallocated array.

    The member's declared size must be what the tensor needs (checked by the caller) and, for DEFLATE, within
    what its compressed size can inflate to, so memory use is bounded by the bytes the tensor needs."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointError(f"{path}: member {info.filename} uses zip compression method {info.compress_type}; "
                              "torch.save writes members uncompressed (or DEFLATE-recompressed)")
    if info.compress_type == zipfile.ZIP_DEFLATED and nbytes > _DEFLATE_MAX_RATIO * info.compress_size + 1024:
        raise CheckpointError(f"{path}: member {info.filename} declares {info.file_size} bytes from "
                              f"{info.compress_size} compressed bytes, more than DEFLATE can produce (zip bomb?)")
    out = np.empty(nbytes, np.uint8)
    done = 0
    try:
        with zf.open(info) as f:
            while done < nbytes:
                piece = f.read(min(_CHUNK, nbytes - done))
                if not piece:
                    break
                out[done:done + len(piece)] = np.frombuffer(piece, np.uint8)
                done += len(piece)
    except _ZIP_ERRORS as exc:
        raise CheckpointError(f"{path}: cannot read {info.filename} ({type(exc).__name__}: {exc}; corrupt or "
                              "truncated archive?)") from None
    if done != nbytes:
        raise CheckpointError(f"{path}: {info.filename} holds {done} bytes, {nbytes} expected (truncated?)")
    return out.view(dtype)


def _load_zip(path: str) -> Any:
    try:
        zf = zipfile.ZipFile(path)
    except _ZIP_ERRORS as exc:
        raise CheckpointError(f"{path}: not a readable torch zip checkpoint ({exc}; truncated file?)") from None
    with zf:
        try:
            return _load_zip_members(zf, path)
        except CheckpointError:
            raise
        except _ZIP_ERRORS as exc:  # anything the zip layer raises once the central directory was read
            raise CheckpointError(f"{path}: corrupt torch zip checkpoint ({type(exc).__name__}: {exc})") from None


def _small_member(zf, name: str, limit: int, path: str) -> bytes:
    info = zf.getinfo(name)
    if info.file_size > limit:
        raise CheckpointError(f"{path}: {name} declares {info.file_size} bytes, more than the {limit} such a "
                              "record can need")
    return _read_member(zf, info, info.file_size, path).tobytes()


def _load_zip_members(zf: zipfile.ZipFile, path: str) -> Any:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1] or [n for n in names if n == "data.pkl"]
    if len(pkls) != 1:
        raise CheckpointError(f"{path}: a zip file but not a torch.save archive (no unique <name>/data.pkl)")
    prefix = pkls[0][: -len("data.pkl")]
    byteorder = "little"
    if prefix + "byteorder" in names:
        byteorder = _small_member(zf, prefix + "byteorder", 16, path).decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byteorder record {byteorder!r}")
    size = os.path.getsize(path)

    def load_storage(dtype: np.dtype, key: str, numel: int) -> np.ndarray:
        member = f"{prefix}data/{key}"
        try:
            info = zf.getinfo(member)
        except KeyError:
            raise CheckpointError(f"{path}: storage {member} is missing from the archive (truncated?)") from None
        nbytes = numel * dtype.itemsize
        if info.file_size != nbytes:
            # torch writes exactly numel x itemsize bytes per storage; a member declaring more is not a
            # torch storage (and a DEFLATE member declaring gigabytes for 16 floats is a zip bomb)
            raise CheckpointError(
                f"{path}: storage {member} declares {info.file_size} bytes, {numel} x {dtype} needs {nbytes}"
            )
        # big-endian archives (torch.save on s390x / POWER BE): read the elements as big-endian and convert,
        # as torch.load does (it byte-swaps each element; complex numbers component by component)
        dt = dtype.newbyteorder(">") if byteorder == "big" and dtype.itemsize > 1 and dtype != bfloat16 else dtype
        if info.compress_type == zipfile.ZIP_STORED:
            # torch writes members uncompressed (and 64-byte aligned): memory-map them, so a 20 GB
            # checkpoint costs page cache rather than RAM.
            with open(path, "rb") as f:
                start = _member_data_offset(f, info)
            if start + nbytes > size:
                raise CheckpointError(f"{path}: storage {member} runs past the end of the file (truncated)")
            if nbytes == 0:
                return np.zeros(0, dtype)
            arr = np.memmap(path, dtype=dt, mode="r", offset=start, shape=(numel,))
        else:
            arr = _read_member(zf, info, nbytes, path, dt)
        if byteorder == "big":
            if dtype == bfloat16:
                arr = arr.view(np.uint16).byteswap().view(bfloat16)
            else:
                arr = arr.astype(dtype)
        return arr

    raw = _small_member(zf, pkls[0], _MAX_PICKLE_BYTES, path)
    return _unpickle(raw, load_storage, path)


class _BoundedReader:
    """A file for the unpickler whose read(n) never asks for more than the file has left: a corrupt length
    (BINBYTES8 / FRAME / LONG4 of 2**40) would otherwise make the buffered reader allocate n bytes first."""

    def __init__(self, f, size: int):
        self._f, self._size = f, size

    def _left(self) -> int:
        return max(0, self._size - self._f.tell())

    left = _left

    def tell(self) -> int:
        return self._f.tell()

    def seek(self, pos: int) -> int:
        return self._f.seek(pos)

    def read(self, n: int = -1) -> bytes:
        return self._f.read(self._left() if n is None or n < 0 else min(n, self._left()))

    def readline(self, limit: int = -1) -> bytes:
        return self._f.readline(self._left() if limit is None or limit < 0 else min(limit, self._left()))

    def readinto(self, b) -> int:
        view = memoryview(b)[: self._left()]
        return self._f.readinto(view)


def _scan_pickle(stream, source: str) -> int:
    """Walk one pickle's opcodes (pickletools, pure Python, nothing built) up to STOP; returns the end offset.

    CPython's C unpickler trusts lengths and indices before it has the data: BINBYTES8 / BINUNICODE8 / LONG4
    allocate their declared size first, and a BINPUT / LONG_BINPUT index grows (and zero-fills) the memo table
    to twice that index -- 2**32 means 64 GB. So a pickle is first checked here: counted lengths must be backed
    by bytes in the stream (reads are capped to what is left, see _BoundedReader), memo indices cannot exceed
    the number of opcodes so far (a pickler numbers its memo entries 0, 1, 2, ...), and a FRAME must fit."""
    ops = 0
    try:
        for op, arg, pos in pickletools.genops(stream):
            ops += 1
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not (isinstance(arg, int) and 0 <= arg <= ops):
                raise CheckpointError(f"{source}: malformed pickle in checkpoint (memo index {arg!r:.40} at byte "
                                      f"{pos} after only {ops} opcodes)")
            if op.name == "FRAME" and isinstance(arg, int) and arg > stream.left():
                raise CheckpointError(f"{source}: malformed pickle in checkpoint (frame of {arg} bytes at byte {pos} "
                                      "runs past the end)")
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- ValueError (truncated / unknown opcode), UnicodeDecodeError, ...
        raise CheckpointError(f"{source}: malformed pickle in checkpoint ({type(exc).__name__}: {exc})") from None
    return stream.tell()


def _unpickle(raw: bytes | _BoundedReader, load_storage, source: str) -> Any:
    """One pickle, checked by _scan_pickle, then unpickled by RestrictedUnpickler from memory."""
    if isinstance(raw, (bytes, bytearray)):
        _scan_pickle(_BoundedReader(io.BytesIO(raw), len(raw)), source)
        f = io.BytesIO(raw)
    else:  # a legacy file: the pickle is the next bytes of the stream
        start = raw.tell()
        end = _scan_pickle(raw, source)
        raw.seek(start)
        f = io.BytesIO(raw.read(end - start))
    try:
        return RestrictedUnpickler(f, load_storage, source).load()
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 -- a corrupt pickle can raise nearly anything (OverflowError,
        # RecursionError, UnicodeDecodeError, struct.error, MemoryError from a hostile length): each is malformed
        # input. No foreign code runs (find_class refuses every global we do not own), so no other bug can hide here.
        raise CheckpointError(f"{source}: malformed pickle in checkpoint ({type(exc).__name__}: {exc})") from None


# ----------------------------------------------------------------------------- legacy (pre-1.6) torch.save
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def _load_legacy(path: str) -> Any:
    """The non-zip format (torch.save(..., _use_new_zipfile_serialization=False)): four pickles
    (magic number, protocol version, sys info, the object) then, for each storage key listed by a fifth
    pickle, an int64 element count followed by the raw bytes."""
    with open_regular(path, CheckpointError, "checkpoint file") as raw_file:
        file_size = os.fstat(raw_file.fileno()).st_size
        f = _BoundedReader(raw_file, file_size)
        storages: dict[str, tuple[np.dtype, int, np.ndarray]] = {}

        declared = [0]

        def declare(dtype, key, numel):  # data comes after the main pickle: fill in once it is read
            # all storages together must fit in the file (one per key: many keys each "as large as the file"
            # would otherwise allocate many times the file's size before a byte of data is read)
            declared[0] += numel * dtype.itemsize
            if declared[0] > file_size:
                raise CheckpointError(f"{path}: storage {key} declares {numel} elements; the storages declared "
                                      f"so far need {declared[0]} bytes, more than the file holds ({file_size})")
            arr = np.empty(numel, dtype=dtype)
            storages[key] = (dtype, numel, arr)
            return arr

        def nothing(*a):
            raise CheckpointError(f"{path}: unexpected storage in a legacy header pickle")

        magic = _unpickle(f, nothing, path)
        if magic != _LEGACY_MAGIC:
            raise CheckpointError(f"{path}: not a torch checkpoint (no zip signature, wrong legacy magic number)")
        _protocol = _unpickle(f, nothing, path)
        sys_info = _unpickle(f, nothing, path)
        if isinstance(sys_info, dict) and not sys_info.get("little_endian", True):
            raise CheckpointError(f"{path}: big-endian legacy checkpoints are not supported")
        obj = _unpickle(f, declare, path)
        keys = _unpickle(f, nothing, path)
        if not isinstance(keys, list):
            raise CheckpointError(f"{path}: legacy storage key list is a {type(keys).__name__}, not a list")
        for key in keys:
            if not isinstance(key, str) or key not in storages:
                raise CheckpointError(f"{path}: storage {key!r} listed but never referenced")
            dtype, numel, arr = storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise CheckpointError(f"{path}: truncated before storage {key}")
            (count,) = struct.unpack("<q", head)
            if count != numel:
                raise CheckpointError(f"{path}: storage {key} has {count} elements on disk, {numel} declared")
            data = f.read(numel * dtype.itemsize)
            if len(data) != numel * dtype.itemsize:
                raise CheckpointError(f"{path}: storage {key} is truncated")
            arr[...] = np.frombuffer(data, dtype=dtype)
    return obj


def load_torch_file(path: str | os.PathLike) -> Any:
    """Read one torch.save file (zip or legacy) without torch and without running pickle code."""
    path = os.fspath(path)
    if not os.path.lexists(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    with open_regular(path, CheckpointError, "checkpoint file") as f:  # never a FIFO / device
        head = f.read(4)
    if head[:2] == b"PK":
        return _load_zip(path)
    if head[:1] == b"\x80":  # a bare pickle stream: the legacy format starts with the pickled magic number
        return _load_legacy(path)
    raise CheckpointError(f"{path}: neither a torch zip checkpoint nor a legacy torch pickle")


def _as_state_dict(obj: Any, source: str) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        obj = obj["model_state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{source}: holds a {type(obj).__name__}, not a state dict")
    out = {}
    for k, v in obj.items():
        if not isinstance(v, np.ndarray):
            raise CheckpointError(f"{source}: entry {k!r} is a {type(v).__name__}, not a tensor")
        out[str(k)] = v
    return out


def load_original_checkpoint(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of an official checkpoint: one torch.save file (`{"model_state_dict": ...}` or a bare
    state dict), or a folder of `.bin`/`.ckpt`/`.pt`/`.pth` shards (with `pytorch_model.bin.index.json`
    naming them, as gemma_pytorch's 27B release has, or all such files in name order)."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return _as_state_dict(load_torch_file(path), path)
    if not os.path.isdir(path):
        raise CheckpointError(f"input checkpoint not found: {path!r}")
    index = os.path.join(path, "pytorch_model.bin.index.json")
    if os.path.lexists(index):
        data = read_json_file(model_file(path, os.path.basename(index), CheckpointError, "shard index"),
                              CheckpointError, index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: not a valid shard index (weight_map must be an object of tensor name "
                                  "-> shard file name)")
        files = list(dict.fromkeys(weight_map.values()))
        for name in files:  # every name checked before any shard is opened
            check_plain_name(name, CheckpointError, "shard named by pytorch_model.bin.index.json")
    else:
        files = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".ckpt", ".pt", ".pth")))
    if not files:
        raise CheckpointError(f"{path}: no .bin/.ckpt/.pt/.pth checkpoint files in this folder")
    shards = [model_file(path, name, CheckpointError, "checkpoint shard") for name in files]
    state: dict[str, np.ndarray] = {}
    for shard in shards:
        for k, v in _as_state_dict(load_torch_file(shard), shard).items():
            if k in state:
                raise CheckpointError(f"tensor {k!r} appears in more than one shard ({shard})")
            state[k] = v
    return state


# ----------------------------------------------------------------------------- renaming to HF
_SKIP = re.compile(r"(^|\.)(freqs_cis|local_freqs_cis|global_freqs_cis|rotary_emb\.inv_freq)$")
_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.qkv_proj\.weight$")


def convert_original_to_hf(state: Mapping[str, np.ndarray], config) -> dict[str, np.ndarray]:
    """Rename/split an official state dict into transformers' Gemma2ForCausalLM names (views, no copies).

    `config` is a Gemma2Config. The fused qkv_proj (rows: q of all heads, then k, then v; each head
    `head_dim` consecutive rows, head order preserved) is split at nq*d and (nq+nkv)*d, as transformers'
    convert_gemma2_weights_to_hf does with torch.split. (That script's `num_key_value_heads == 1` branch
    repeats k/v for Gemma 1's multi-query 2B; no Gemma 2 size has one kv head, and a single kv head is
    valid GQA for transformers' Gemma2 anyway, so it is split the same way here.)
    The tied head is not written (`lm_head.weight` = embed_tokens, as transformers' save_pretrained does).
    """
    d, nq, nkv, h = config.head_dim, config.num_attention_heads, config.num_key_value_heads, config.hidden_size
    hf: dict[str, np.ndarray] = {}
    for name, value in state.items():
        if _SKIP.search(name):
            continue  # RoPE tables are recomputed from rope_theta, never loaded
        m = _QKV.match(name)
        if m:
            rows = (nq + 2 * nkv) * d
            if value.shape != (rows, h):
                raise CheckpointError(
                    f"{name} has shape {tuple(value.shape)}; the config ({nq} heads, {nkv} kv heads, head_dim {d}, "
                    f"hidden {h}) implies ({rows}, {h}): wrong --model-size/--config for this checkpoint?"
                )
            p = f"model.layers.{m.group(1)}.self_attn."
            hf[p + "q_proj.weight"] = value[: nq * d]
            hf[p + "k_proj.weight"] = value[nq * d : (nq + nkv) * d]
            hf[p + "v_proj.weight"] = value[(nq + nkv) * d :]
        elif name == "embedder.weight":
            hf["model.embed_tokens.weight"] = value
        else:
            hf[name] = value
    return hf
