"""The model options every `gemma2np` command shares, and what they resolve to.

    --model DIR | FILE.gguf    an HF-format directory (config.json + safetensors) or a llama.cpp GGUF file
    --gguf-file NAME           a GGUF file inside --model DIR (transformers' `gguf_file=`)
    --tokenizer DIR            where tokenizer.model is (default: the model's directory)
    --backend, --weights, --threads

`resolve_model(args)` turns them into a `ModelSource` (checked: the files exist, are what they claim),
`load_config / load_model / load_tokenizer` load from it, and every mistake is a `UserError`: one line,
exit status 2. Used by cli.py (generate, chat, info), compare.py and the perplexity command.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from dataclasses import dataclass

__all__ = [
    "DEFAULT_MODEL_DIR", "UserError", "ModelSource", "add_model_args", "resolve_model", "load_config",
    "load_model", "load_tokenizer", "runtime_kwargs", "one_line", "system_info", "simd_path",
]

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gemma2-shakespeare")
_GGUF_MAGIC = b"GGUF"


class UserError(Exception):
    """A mistake of the user's (bad path, bad value, prompt too long): reported in one line, exit status 2."""


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


@dataclass(frozen=True)
class ModelSource:
    """Where the model is: `directory` holds config.json / tokenizer.model / generation_config.json;
    `gguf_file` (an absolute path) is the GGUF to read the weights and config from, or None (safetensors)."""

    directory: str
    gguf_file: str | None = None
    bundled: bool = False

    @property
    def label(self) -> str:
        return self.gguf_file or self.directory


# ============================================================================ options


def add_model_args(p: argparse.ArgumentParser, *, runtime: bool = True,
                   backends: tuple[str, ...] = ("numpy", "native")) -> None:
    """--model and --gguf-file; with runtime=True also --tokenizer, --backend, --weights, --threads."""
    p.add_argument("--model", metavar="DIR|FILE.gguf", default=None,
                   help="Hugging Face-format model directory (config.json + model.safetensors, + tokenizer.model), "
                        "or a llama.cpp .gguf file. Default: the bundled Shakespeare model")
    p.add_argument("--gguf-file", metavar="NAME", default=None,
                   help="read the weights and config from this GGUF file inside the --model directory "
                        "(like transformers' gguf_file=)")
    if not runtime:
        return
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory holding tokenizer.model (default: the model directory; a GGUF's own "
                        "vocabulary is not read)")
    p.add_argument("--backend", choices=backends, default=None,
                   help="numpy: the readable reference (default); native: the C/OpenMP kernels (faster; "
                        "implied by --weights bfloat16/int8)")
    p.add_argument("--weights", choices=("float32", "bfloat16", "int8", "int4"), default=None,
                   help="in-memory weight format of the native backend (default: as the checkpoint); "
                        "bfloat16, int8 and int4 imply --backend native")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="threads of the native backend (default: OMP_NUM_THREADS, else the physical cores)")


def runtime_kwargs(args) -> dict:
    """backend / weights / n_threads for from_pretrained, from the options, checked.

    --weights bfloat16 or int8 only exist on the native backend, so they select it when --backend is not
    given; an explicit --backend numpy with them is a contradiction and refused.
    """
    backend, weights, threads = getattr(args, "backend", None), getattr(args, "weights", None), getattr(args, "threads", None)
    if weights in ("bfloat16", "int8", "int4"):
        if backend == "numpy":
            raise UserError(f"--weights {weights} runs on the native backend: drop --backend numpy "
                            "(the numpy backend computes with float32 weights)")
        if backend is None:
            backend = "native"
    if threads is not None and threads < 1:
        raise UserError(f"--threads must be at least 1, got {threads}")
    return {"backend": backend or "numpy", "weights": weights, "n_threads": threads}


# ============================================================================ resolving --model


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == _GGUF_MAGIC
    except OSError:
        return False


def resolve_model(args) -> ModelSource:
    """The model the options name (default: the bundled one), with the files checked to exist."""
    model, gguf = getattr(args, "model", None), getattr(args, "gguf_file", None)
    bundled = model is None
    if bundled:
        directory = DEFAULT_MODEL_DIR
        if not os.path.isdir(directory):
            raise UserError(f"the bundled model is not installed at {directory}; pass --model DIR")
    else:
        model = os.path.expanduser(model)
        if os.path.isfile(model):
            if not _is_gguf(model):
                what = "a .gguf that does not start with the GGUF magic" if model.endswith(".gguf") else "a file"
                raise UserError(f"--model {model} is {what}: --model takes a model directory (config.json + "
                                f"*.safetensors) or a llama.cpp GGUF file; for a safetensors model pass its directory")
            if gguf is not None:
                raise UserError("--model names a GGUF file and --gguf-file names another: give one of them")
            directory, gguf = os.path.dirname(os.path.abspath(model)), os.path.abspath(model)
        elif os.path.isdir(model):
            directory = model
        else:
            raise UserError(f"model directory not found: {model}")
    if gguf is not None:
        path = os.path.abspath(gguf if os.path.isabs(gguf) else os.path.join(directory, gguf))
        if not os.path.isfile(path):
            raise UserError(f"GGUF file not found: {path}")
        if not _is_gguf(path):
            raise UserError(f"{path} is not a GGUF file (it does not start with the GGUF magic)")
        return ModelSource(directory, path, bundled)
    if not os.path.isfile(os.path.join(directory, "config.json")):
        if bundled:
            raise UserError(f"the bundled model at {directory} is incomplete (no config.json); pass --model DIR")
        ggufs = sorted(f for f in os.listdir(directory) if f.endswith(".gguf"))
        hint = f" (for a GGUF file: --model {os.path.join(directory, ggufs[0])} or --gguf-file NAME)" if ggufs else ""
        raise UserError(f"cannot load the model from {directory}: not a model directory (no config.json){hint}")
    return ModelSource(directory, None, bundled)


# ============================================================================ loading


def load_config(src: ModelSource):
    """The Gemma2Config: config.json, or a GGUF's metadata (what from_pretrained(gguf_file=) uses)."""
    from .config import Gemma2Config

    try:
        if src.gguf_file is not None:
            from .gguf_io import read_gguf_config

            return Gemma2Config.from_dict(read_gguf_config(src.gguf_file))
        return Gemma2Config.from_pretrained(src.directory)
    except (ValueError, OSError) as e:  # ConfigError / CheckpointError are ValueErrors
        raise UserError(f"cannot read the config of {src.label}: {one_line(e)}") from None


def load_model(args, src: ModelSource, *, dtype: str = "float32", progress=None, quiet: bool = True,
               tensor_parallel: bool = False):
    """Gemma2ForCausalLM from the source with the runtime options. progress: a callable(done, total)
    (e.g. a progress bar) or None. quiet: silence load-time warnings (e.g. an unused classification head).
    tensor_parallel: split over the ranks when run under mpiexec (no effect in one process)."""
    from .modeling import Gemma2ForCausalLM

    kw = runtime_kwargs(args)
    try:
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            return Gemma2ForCausalLM.from_pretrained(src.directory, gguf_file=src.gguf_file, dtype=dtype,
                                                     progress=progress, tensor_parallel=tensor_parallel,
                                                     cache_dtype=getattr(args, "cache_dtype", None), **kw)
    except (ValueError, OSError, KeyError, ImportError) as e:  # CheckpointError/ConfigError are ValueErrors
        raise UserError(f"cannot load the model from {src.label}: {one_line(e)}") from None


def load_tokenizer(args, src: ModelSource | str):
    from .tokenizer import GemmaTokenizer

    directory = src.directory if isinstance(src, ModelSource) else src
    path = getattr(args, "tokenizer", None) or directory
    try:
        return GemmaTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:  # TokenizerError is a ValueError
        hint = ""
        if isinstance(src, ModelSource) and src.gguf_file is not None and not getattr(args, "tokenizer", None):
            hint = (" (a GGUF's own vocabulary is not read: put the model's tokenizer.model beside the .gguf "
                    "or pass --tokenizer DIR)")
        raise UserError(f"cannot load the tokenizer from {path}: {one_line(e)}{hint}") from None


# ============================================================================ what runs


def simd_path() -> str | None:
    """The kernels the native extension dispatches to on this CPU, or None without the extension.
    The C code has two paths (see csrc/): AVX-512 (F/BW/VL + FMA; with AVX-512 BF16's vdpbf16ps for bf16
    prefill when the CPU has it) and portable scalar C. There is no separate AVX2 path."""
    from .kernels import native_available

    if not native_available():
        return None
    from . import _native

    level = _native.get_simd()
    if level == 0:
        return "scalar C (no AVX-512)"
    if level == 1 and "avx512bf16" in _native.cpu_features():
        return "AVX-512 + AVX-512 BF16"
    return "AVX-512"


def system_info(model=None) -> str:
    """One line like llama.cpp's system_info: backend, weight format, SIMD path, OpenMP, threads.
    Without a model: what the native backend would use here (for `info`)."""
    from .kernels import native_available, native_import_error

    if not native_available():
        native = f"native extension not built ({type(native_import_error()).__name__})"
    else:
        from . import _native

        native = f"SIMD {simd_path()}; OpenMP {'on' if _native.have_openmp() else 'off'}"
    if model is None:
        if not native_available():
            return native
        from . import _native

        return f"native backend: {native}; {_native.default_threads()} threads by default"
    be = model.backend
    weights = model.weights_format
    prepared = model.prepared_weights()
    if prepared["gguf_quant"]:  # a GGUF's quantized tensors keep their own formats
        weights = f"{'/'.join(sorted(prepared['formats']))} ({prepared['bytes'] / 1e6:.2f} MB)"
    if be.name == "numpy":
        import numpy as np

        return f"backend numpy (NumPy {np.__version__}), weights {weights}"
    return f"backend {be.name}, weights {weights}; {native}; {be.n_threads} threads"


def print_system_info(model, file=None) -> None:
    print(f"[{system_info(model)}]", file=file or sys.stderr)
