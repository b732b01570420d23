"""`gemma2np convert`: Google's official PyTorch Gemma 2 checkpoint, or a llama.cpp GGUF file -> a Hugging
Face model directory.

The equivalent of transformers' `convert_gemma2_weights_to_hf.py`, without torch:

    gemma2np convert --input-checkpoint model.ckpt --model-size 2B --output-dir gemma-2-2b-hf \
        [--dtype float32|bfloat16] [--tokenizer tokenizer.model] [--overwrite]
    gemma2np convert --input-checkpoint gemma-2-2b-Q8_0.gguf --output-dir gemma-2-2b-hf [--tokenizer DIR]

A GGUF carries its config (no --model-size / --config); its tensors are read as `from_pretrained(
gguf_file=...)` reads them (quantized blocks expanded to float32, norms stored as 1 + w turned back into w),
so the directory written computes what the GGUF computes here.

writes config.json (the published config of that size, or the one given with --config),
model.safetensors (shards + index above 5 GB) and, with --tokenizer, tokenizer.model +
tokenizer_config.json. The result loads with `Gemma2ForCausalLM.from_pretrained` here and in
transformers. The pickle inside the checkpoint is read by `original.RestrictedUnpickler`: a file that
tries to run code is refused with UnsafeCheckpointError before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

import numpy as np

from .checkpoint import CheckpointError, bfloat16, check_state_dict, save_state_dict
from .config import ConfigError, Gemma2Config
from .original import UnsafeCheckpointError, convert_original_to_hf, load_original_checkpoint
from .safeio import read_json_file

__all__ = ["convert", "convert_gguf", "sniff_checkpoint", "add_convert_parser", "run_convert", "main", "MODEL_SIZES", "published_config", "ConvertError"]

MODEL_SIZES = ("2B", "9B", "27B")
_CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")
_MAX_SHARD = 5 * 1024**3  # 5 GiB per safetensors file, like the published HF repos

# What transformers' GemmaTokenizer needs next to tokenizer.model (the published gemma-2 values).
_SPECIAL = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
_TOKENIZER_CONFIG = {
    "tokenizer_class": "GemmaTokenizer",
    "add_bos_token": True,
    "add_eos_token": False,
    **_SPECIAL,
    "additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"],
    "clean_up_tokenization_spaces": False,
    "spaces_between_special_tokens": False,
    "sp_model_kwargs": {},
    "padding_side": "left",
    "model_max_length": 1000000000000000019884624838656,
}


class ConvertError(ValueError):
    """Bad arguments to convert (sizes, dtypes, paths)."""


def sniff_checkpoint(path: str | os.PathLike) -> str:
    """What kind of file or folder `path` is, from its first bytes (never from the name alone):
    "gguf", "safetensors", "hf-directory" (config.json + *.safetensors), "torch" (zip or legacy pickle,
    or a folder of shards), "missing" or "unknown"."""
    path = os.fspath(path)
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n.endswith((".bin", ".ckpt", ".pt", ".pth")) for n in names):
            return "torch"
        if "config.json" in names and any(n.endswith(".safetensors") for n in names):
            return "hf-directory"
        return "unknown"
    if not os.path.isfile(path):
        return "missing"
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return "unknown"
    if head[:4] == b"GGUF":
        return "gguf"
    if head[:4] == b"PK\x03\x04":  # torch.save's zip format
        return "torch"
    # safetensors before the pickle test: a header length's low byte may be 0x80
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") <= 100 * 1024 * 1024:
        return "safetensors"  # 8-byte little-endian header length, then the JSON header
    if head[:1] == b"\x80":  # a protocol-2+ pickle (torch's legacy format)
        return "torch"
    return "unknown"


def _refuse_non_checkpoint(path: str, kind: str) -> None:
    """Name the real problem when the input is not something convert reads."""
    if kind == "safetensors":
        raise ConvertError(f"{path} is a safetensors file, i.e. already the Hugging Face format: nothing to "
                           "convert (load its directory directly: --model DIR). convert reads Google's PyTorch "
                           "checkpoints (.ckpt / .pt / .bin) and llama.cpp GGUF files")
    if kind == "hf-directory":
        raise ConvertError(f"{path} is already a Hugging Face model directory (config.json + safetensors): "
                           "nothing to convert (pass it as --model DIR)")


def published_config(model_size: str) -> dict[str, Any]:
    """The config.json google/gemma-2-{2b,9b,27b} was published with (bundled in gemma2np/configs/)."""
    size = str(model_size).upper()
    if size not in MODEL_SIZES:
        raise ConvertError(f"unknown model size {model_size!r}; choose one of {', '.join(MODEL_SIZES)}")
    with open(os.path.join(_CONFIG_DIR, f"gemma-2-{size.lower()}.config.json"), encoding="utf-8") as f:
        return json.load(f)


def _guess_size(state: dict[str, np.ndarray]) -> str:
    """Describe the checkpoint's own shape, to make a size mismatch easy to fix."""
    emb = state.get("embedder.weight")
    layers = {k.split(".")[2] for k in state if k.startswith("model.layers.")}
    hidden = emb.shape[1] if emb is not None and emb.ndim == 2 else None
    for size in MODEL_SIZES:
        cfg = published_config(size)
        if cfg["hidden_size"] == hidden and cfg["num_hidden_layers"] == len(layers):
            return f"the checkpoint has hidden size {hidden} and {len(layers)} layers, i.e. Gemma 2 {size}"
    return f"the checkpoint has hidden size {hidden} and {len(layers)} layers"


def convert(
    input_checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_size: str | None = None,
    config_file: str | os.PathLike | None = None,
    dtype: str = "float32",
    tokenizer: str | os.PathLike | None = None,
) -> str:
    """Convert an official checkpoint (file or folder of shards) into an HF directory; returns output_dir.

    Exactly one of model_size ("2B" | "9B" | "27B": the published config) or config_file (a config.json).
    dtype: "float32" or "bfloat16" for the written weights. bf16 -> f32 is exact; f32 -> bf16 rounds to
    nearest even (ml_dtypes' cast, the same rounding as torch's `.to(torch.bfloat16)`).
    Everything is read and checked before anything is written.
    """
    if (model_size is None) == (config_file is None):
        raise ConvertError("give exactly one of model_size (2B, 9B, 27B) or config_file")
    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if model_size is not None:
        cfg_dict = published_config(model_size)
    else:
        if not os.path.lexists(config_file):
            raise ConvertError(f"config file not found: {os.fspath(config_file)!r}")
        # UTF-8, bounded depth and integer literals, a regular file: any failure is a ConfigError
        cfg_dict = read_json_file(os.fspath(config_file), ConfigError, os.fspath(config_file), max_depth=100)
    config = Gemma2Config.from_dict(cfg_dict)  # validates the fields
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConvertError(f"tokenizer not found: {os.fspath(tokenizer)!r}")

    _refuse_non_checkpoint(os.fspath(input_checkpoint), sniff_checkpoint(input_checkpoint))
    state = load_original_checkpoint(input_checkpoint)
    if "embedder.weight" not in state:
        raise CheckpointError(
            f"{os.fspath(input_checkpoint)}: no embedder.weight; not an official Gemma 2 PyTorch checkpoint "
            f"(tensors: {sorted(state)[:5]}...)"
        )
    try:
        hf = convert_original_to_hf(state, config)
        missing, unexpected = check_state_dict(hf, config.parameter_shapes())
    except CheckpointError as exc:
        raise CheckpointError(f"{exc} ({_guess_size(state)})") from None
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint does not match the config: {len(missing)} missing tensor(s) {missing[:3]}, "
            f"{len(unexpected)} unexpected {unexpected[:3]} ({_guess_size(state)})"
        )

    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    save_state_dict(out, hf, max_shard_size=_MAX_SHARD, dtype=bfloat16 if dtype == "bfloat16" else np.float32)
    cfg_out = dict(cfg_dict)
    cfg_out.setdefault("architectures", ["Gemma2ForCausalLM"])
    cfg_out["torch_dtype"] = dtype  # the 2024 key (kept by the published files) ...
    cfg_out["dtype"] = dtype  # ... and transformers 5's name for it
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_out, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        _write_tokenizer(os.fspath(tokenizer), out)
    return out


def convert_gguf(
    gguf_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    dtype: str = "float32",
    tokenizer: str | os.PathLike | None = None,
) -> str:
    """A llama.cpp Gemma 2 GGUF -> an HF directory (config.json from the GGUF's metadata + model.safetensors).

    dtype "float32" (default) keeps every value exactly as this package computes with it (F32/F16/BF16
    tensors widen exactly; quantized types are expanded to float32 by gguf's reference dequantizers; the
    norms are `stored - 1` in float32, see gguf_io). "bfloat16" rounds those values to nearest even.
    """
    from .gguf_io import load_gguf

    if dtype not in ("float32", "bfloat16"):
        raise ConvertError(f"dtype must be 'float32' or 'bfloat16', got {dtype!r}")
    if tokenizer is not None and not os.path.exists(tokenizer):
        raise ConvertError(f"tokenizer not found: {os.fspath(tokenizer)!r}")
    cfg_dict, state = load_gguf(gguf_path)
    config = Gemma2Config.from_dict(cfg_dict)  # validates the fields
    expected = dict(config.parameter_shapes())
    if not config.tie_word_embeddings:
        expected["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    missing, unexpected = check_state_dict(state, expected)
    if missing or unexpected:
        raise CheckpointError(f"{os.fspath(gguf_path)}: {len(missing)} missing tensor(s) {missing[:3]}, "
                              f"{len(unexpected)} unexpected {unexpected[:3]}")
    out = os.fspath(output_dir)
    os.makedirs(out, exist_ok=True)
    save_state_dict(out, state, max_shard_size=_MAX_SHARD, dtype=bfloat16 if dtype == "bfloat16" else np.float32)
    cfg_out = {k: v for k, v in cfg_dict.items() if not k.startswith("_")}
    cfg_out["torch_dtype"] = cfg_out["dtype"] = dtype
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg_out, f, indent=2, sort_keys=True)
        f.write("\n")
    if tokenizer is not None:
        _write_tokenizer(os.fspath(tokenizer), out)
    return out


def _write_tokenizer(src: str, out: str) -> None:
    """Copy tokenizer.model (a file, or the one in a folder, with its json files if any) and make sure a
    tokenizer_config.json exists (the published gemma-2 values)."""
    if os.path.isdir(src):
        model = os.path.join(src, "tokenizer.model")
        if not os.path.isfile(model):
            raise ConvertError(f"no tokenizer.model in {src!r}")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            if os.path.isfile(os.path.join(src, name)):
                shutil.copyfile(os.path.join(src, name), os.path.join(out, name))
    else:
        model = src
    shutil.copyfile(model, os.path.join(out, "tokenizer.model"))
    if not os.path.isfile(os.path.join(out, "tokenizer_config.json")):
        with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(_TOKENIZER_CONFIG, f, indent=2)
            f.write("\n")
    if not os.path.isfile(os.path.join(out, "special_tokens_map.json")):
        with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
            json.dump({**_SPECIAL, "additional_special_tokens": _TOKENIZER_CONFIG["additional_special_tokens"]}, f, indent=2)
            f.write("\n")


# ----------------------------------------------------------------------------- command line
CONVERT_EPILOG = """\
examples:
  gemma2np convert --input-checkpoint gemma-2-2b/model.ckpt --model-size 2B --output-dir gemma-2-2b-hf \\
      --tokenizer gemma-2-2b/tokenizer.model
  gemma2np convert --input-checkpoint gemma-2-27b-pytorch/ --model-size 27B --output-dir out --dtype bfloat16
  gemma2np convert --input-checkpoint gemma-2-2b-Q8_0.gguf --output-dir gemma-2-2b-hf --tokenizer gemma-2-2b/

The output directory must not exist or be empty, unless --overwrite is given.
"""


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register `convert` on an argparse subparsers object; sets `func=run_convert`."""
    p = subparsers.add_parser(
        "convert",
        help="convert Google's official PyTorch Gemma 2 checkpoint, or a GGUF file, to a Hugging Face directory",
        description="Convert an official Gemma 2 PyTorch checkpoint (model.ckpt, or a folder of .bin shards) or a "
        "llama.cpp GGUF file into a Hugging Face model directory (config.json + model.safetensors), without torch.",
        epilog=CONVERT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--input-checkpoint", required=True,
                   help="model.ckpt / .pt / .bin file, a folder of shards, or a .gguf file")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model-size", choices=MODEL_SIZES, type=str.upper,
                       help="use the published config of this size (PyTorch checkpoints)")
    which.add_argument("--config", dest="config_file",
                       help="a config.json to use instead of --model-size (PyTorch checkpoints)")
    p.add_argument("--output-dir", required=True, help="directory to write (created if needed)")
    p.add_argument("--overwrite", action="store_true", help="write into an output directory that is not empty")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the written weights")
    p.add_argument("--tokenizer", help="tokenizer.model (or a folder holding it) to copy alongside")
    p.set_defaults(func=run_convert)
    return p


def _fail(msg: str) -> int:
    print("gemma2np convert: error: " + " ".join(str(msg).split()), file=sys.stderr)
    return 2


def run_convert(args) -> int:
    """Run `convert` from parsed args: 0 on success, 2 with a one-line error on bad input."""
    kind = sniff_checkpoint(args.input_checkpoint)
    out = os.fspath(args.output_dir)
    if os.path.isdir(out) and os.listdir(out) and not getattr(args, "overwrite", False):
        return _fail(f"the output directory {out} exists and is not empty: choose another, or pass --overwrite")
    if os.path.exists(out) and not os.path.isdir(out):
        return _fail(f"the output path {out} exists and is not a directory")
    try:
        if kind == "gguf":
            if args.model_size is not None or args.config_file is not None:
                return _fail("a GGUF file carries its own config: drop --model-size / --config")
            out = convert_gguf(args.input_checkpoint, out, dtype=args.dtype, tokenizer=args.tokenizer)
        else:
            if args.model_size is None and args.config_file is None:
                return _fail("one of --model-size or --config is required for a PyTorch checkpoint")
            out = convert(args.input_checkpoint, out, model_size=args.model_size, config_file=args.config_file,
                          dtype=args.dtype, tokenizer=args.tokenizer)
    except UnsafeCheckpointError as exc:
        return _fail(f"unsafe checkpoint refused: {exc}")
    except (CheckpointError, ConfigError, ConvertError, OSError) as exc:
        return _fail(str(exc))
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m gemma2np.convert ...` (the same options as `gemma2np convert`)."""
    parser = argparse.ArgumentParser(prog="gemma2np")
    sub = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(sub)
    args = parser.parse_args(["convert", *(sys.argv[1:] if argv is None else argv)])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
