"""Random-weight Gemma 2 GGUF files for the benchmarks (llama.cpp's layout), written tensor by tensor.

    write_random_gguf(path, cfg, "q4_0", seed=0)   # cfg: a config.json dict (gemma2np/configs/...)

Quantized files (Q4_0 / Q8_0) are written as blocks directly: random codes plus an f16 scale per block,
chosen so the weights have the checkpoint writer's standard deviation (initializer_range, 0.02). No float
copy of the model exists at any point (a 27B Q4_0 file is ~15.5 GB; its bf16 source would be 54 GB), and a
chunk of rows (~16 M weights) is the most held in memory. Because the codes are drawn directly, a Q4_0 file
is *not* the quantisation of the bf16 checkpoint bench.py writes: the same shape and byte count, different
random values. Speed does not depend on the values; where the values matter (the BF16 file, compared with
gemma2np bf16 on one model) they are the checkpoint's own: the same seeded normal chunks as bench.py.

Tensor types follow what llama.cpp's tools write:
* 2-D weights in the file's type; 1-D norms F32, stored as 1 + w (convert_hf_to_gguf.py's Gemma2Model),
  here w = 0 like the checkpoints (Gemma scales by 1 + w), so they hold 1.0.
* token_embd (tied LM head; llama.cpp writes no `output` tensor for Gemma 2): llama-quantize gives a tied
  embedding the output tensor's type, Q6_K for every ftype but Q8_0 (src/llama-quant.cpp,
  llama_tensor_get_type: `else if (new_type != GGML_TYPE_Q8_0) new_type = GGML_TYPE_Q6_K`), so a Q4_0
  model gets a Q6_K token_embd and a Q8_0 model a Q8_0 one. `embd_type` overrides that.
* Metadata: what convert_hf_to_gguf.py's Gemma2Model writes (hparams, softcaps, sliding window, file
  type) plus a SentencePiece-style vocabulary llama.cpp accepts: <pad> <eos> <bos> <unk> at 0..3 (Gemma's
  ids), the 256 byte tokens <0x00>..<0xFF> (llama.cpp looks up <0x0A> for the newline), then unique
  placeholder pieces; scores 0. gemma2np.gguf_io reads the same keys.

Block layouts (ggml-common.h): block_q4_0 = f16 d + 16 bytes of nibbles (w = d * (q - 8), 32 weights);
block_q8_0 = f16 d + 32 int8 (w = d * q); block_q6_K = ql[128] qh[64] int8 scales[16] f16 d (256 weights,
w = d * scale * (q - 32)).
"""
from __future__ import annotations

import json
import os
import time
import zlib

import numpy as np

# Root mean square of the codes each type's random blocks draw, so that d = std / rms gives weights of
# standard deviation ~std (the mean of a nibble code minus 8 is -0.5, a bias of 0.5 d: negligible).
_Q4_0_RMS = float(np.sqrt((16 ** 2 - 1) / 12 + 0.25))   # u uniform in 0..15, w = d (u - 8)
_Q8_0_RMS = float(np.sqrt(127 * 128 / 3))               # q uniform in -127..127
_Q6_K_RMS = float(np.sqrt((64 ** 2 - 1) / 12 + 0.25))   # q uniform in 0..63, w = d sc (q - 32)
_Q6_K_SCALES = (8, 16)                                   # sc uniform in [8, 16): mean 11.5

QTYPES = {"q4_0": "Q4_0", "q8_0": "Q8_0", "bf16": "BF16", "q6_k": "Q6_K", "f32": "F32"}
FILE_TYPES = {"q4_0": "MOSTLY_Q4_0", "q8_0": "MOSTLY_Q8_0", "bf16": "MOSTLY_BF16"}
CHUNK_WEIGHTS = 1 << 24
MARKER_SUFFIX = ".complete.json"


def default_embd_type(qtype: str) -> str:
    """The token_embd type llama-quantize picks for a tied Gemma 2 embedding (see the module docstring)."""
    return {"q4_0": "q6_k", "q8_0": "q8_0", "bf16": "bf16"}[qtype]


def tensor_layout(cfg: dict) -> list[tuple[str, str, tuple[int, ...]]]:
    """[(GGUF name, HF name, (rows, cols) or (n,))] in convert_hf_to_gguf.py's order."""
    h, i, d = cfg["hidden_size"], cfg["intermediate_size"], cfg["head_dim"]
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out = [("token_embd.weight", "model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for L in range(cfg["num_hidden_layers"]):
        b, p = f"blk.{L}.", f"model.layers.{L}."
        out += [(b + "attn_norm.weight", p + "input_layernorm.weight", (h,)),
                (b + "attn_q.weight", p + "self_attn.q_proj.weight", (nq * d, h)),
                (b + "attn_k.weight", p + "self_attn.k_proj.weight", (nkv * d, h)),
                (b + "attn_v.weight", p + "self_attn.v_proj.weight", (nkv * d, h)),
                (b + "attn_output.weight", p + "self_attn.o_proj.weight", (h, nq * d)),
                (b + "post_attention_norm.weight", p + "post_attention_layernorm.weight", (h,)),
                (b + "ffn_norm.weight", p + "pre_feedforward_layernorm.weight", (h,)),
                (b + "ffn_gate.weight", p + "mlp.gate_proj.weight", (i, h)),
                (b + "ffn_up.weight", p + "mlp.up_proj.weight", (i, h)),
                (b + "ffn_down.weight", p + "mlp.down_proj.weight", (h, i)),
                (b + "post_ffw_norm.weight", p + "post_feedforward_layernorm.weight", (h,))]
    out.append(("output_norm.weight", "model.norm.weight", (h,)))
    return out


def _block_bytes(qtype: str) -> tuple[int, int]:
    import gguf

    return gguf.constants.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, QTYPES[qtype])]


def row_bytes(qtype: str, cols: int) -> int:
    blk, size = _block_bytes(qtype)
    if cols % blk:
        raise ValueError(f"a row of {cols} weights is not a whole number of {qtype} blocks of {blk}")
    return cols // blk * size


def random_blocks(qtype: str, nblocks: int, std: float, rng: np.random.Generator) -> np.ndarray:
    """(nblocks, block bytes) uint8 of random blocks whose weights have standard deviation ~std."""
    _, size = _block_bytes(qtype)
    out = np.empty((nblocks, size), np.uint8)
    jitter = (0.75 + 0.5 * rng.random(nblocks, dtype=np.float32))  # scales vary per block like real ones
    if qtype == "q4_0":
        d = (np.float32(std / _Q4_0_RMS) * jitter).astype(np.float16)
        out[:, :2] = d.view(np.uint8).reshape(nblocks, 2)
        out[:, 2:] = rng.integers(0, 256, size=(nblocks, 16), dtype=np.uint8)
    elif qtype == "q8_0":
        d = (np.float32(std / _Q8_0_RMS) * jitter).astype(np.float16)
        out[:, :2] = d.view(np.uint8).reshape(nblocks, 2)
        out[:, 2:] = rng.integers(-127, 128, size=(nblocks, 32), dtype=np.int8).view(np.uint8)
    elif qtype == "q6_k":
        mean_sc = sum(_Q6_K_SCALES) / 2 - 0.5
        out[:, :192] = rng.integers(0, 256, size=(nblocks, 192), dtype=np.uint8)      # ql, qh
        out[:, 192:208] = rng.integers(*_Q6_K_SCALES, size=(nblocks, 16), dtype=np.int8).view(np.uint8)
        d = (np.float32(std / (_Q6_K_RMS * mean_sc)) * jitter).astype(np.float16)
        out[:, 208:210] = d.view(np.uint8).reshape(nblocks, 2)
    else:
        raise ValueError(f"no random block writer for {qtype!r}")
    return out


def _normal_chunks(hf_name, shape, cfg, seed):
    """bench.py's checkpoint values (same seeds, same row chunks) for the BF16 file."""
    from bench import _chunks  # the same directory; bench.py imports nothing heavy at module level

    return _chunks(hf_name, shape, cfg, seed)


def _vocab(n: int):
    if n < 260:
        raise ValueError(f"vocab_size {n} is too small for the special and byte tokens (260)")
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"\u2581t{k}" for k in range(len(tokens), n)]
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [3, 3, 3, 2] + [6] * 256 + [1] * (n - 260)
    return tokens, [0.0] * n, types


def write_random_gguf(path: str, cfg: dict, qtype: str, seed: int = 0, embd_type: str | None = None,
                      log=None) -> dict:
    """Write a random Gemma 2 GGUF of `qtype` ("q4_0" | "q8_0" | "bf16") at `path` (via path + ".tmp").
    Returns {"bytes": file size, "tensor_types": {...}}."""
    import gguf
    import ml_dtypes

    Q = gguf.GGMLQuantizationType
    embd_type = embd_type or default_embd_type(qtype)
    std = float(cfg.get("initializer_range", 0.02))
    layout = tensor_layout(cfg)
    tmp = path + ".tmp"
    w = gguf.GGUFWriter(tmp, "gemma2")
    w.add_name(f"gemma2np-bench random {qtype}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_file_type(int(getattr(gguf.LlamaFileType, FILE_TYPES[qtype])))
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    tokens, scores, types = _vocab(cfg["vocab_size"])
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(cfg.get("bos_token_id", 2))
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(cfg.get("pad_token_id", 0))
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)

    kinds = {}
    for gname, _, shape in layout:
        if len(shape) == 1:
            kind = "f32"
            w.add_tensor_info(gname, shape, np.dtype(np.float32), shape[0] * 4)
        else:
            kind = embd_type if gname == "token_embd.weight" else qtype
            rows, cols = shape
            if kind == "bf16":
                # byte shape (rows, 2 cols): the writer turns a uint8 shape into elements by the type's sizes
                w.add_tensor_info(gname, (rows, cols * 2), np.dtype(np.uint8), rows * cols * 2, raw_dtype=Q.BF16)
            else:
                rb = row_bytes(kind, cols)
                w.add_tensor_info(gname, (rows, rb), np.dtype(np.uint8), rows * rb, raw_dtype=getattr(Q, QTYPES[kind]))
        kinds[gname] = kind
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    t0 = time.perf_counter()
    # Tensor data: each tensor starts at the writer's alignment and is padded after, as write_tensor_data does,
    # but written a chunk of rows at a time (the offsets above were computed from the same byte counts).
    for k, (gname, hf_name, shape) in enumerate(layout):
        kind = kinds[gname]
        w.write_padding(fout, fout.tell())
        start = fout.tell()
        if kind == "f32":
            np.ones(shape, np.float32).tofile(fout)  # 1 + w with w = 0
        elif kind == "bf16":
            for a in _normal_chunks(hf_name, shape, cfg, seed):
                a.astype(ml_dtypes.bfloat16).tofile(fout)
        else:
            rows, cols = shape
            blk, _ = _block_bytes(kind)
            rng = np.random.default_rng([seed, zlib.crc32(gname.encode()), zlib.crc32(kind.encode())])
            step = max(1, CHUNK_WEIGHTS // cols)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                random_blocks(kind, n * cols // blk, std, rng).tofile(fout)
        w.write_padding(fout, fout.tell() - start)
        if log and (k % 11 == 0 or k == len(layout) - 1):
            log(f"  {os.path.basename(path)}: tensor {k + 1}/{len(layout)} {time.perf_counter() - t0:.0f} s")
    w.close()
    os.replace(tmp, path)
    return {"bytes": os.path.getsize(path), "tensor_types": {"token_embd": embd_type, "2d": qtype, "norms": "f32"}}


def ensure_random_gguf(path: str, cfg: dict, qtype: str, seed: int = 0, embd_type: str | None = None,
                       log=None) -> dict:
    """write_random_gguf unless `path` exists with a marker (path + ".complete.json") of the same spec."""
    spec = {"config": {k: cfg[k] for k in sorted(cfg) if not k.startswith("_")}, "qtype": qtype, "seed": seed,
            "embd_type": embd_type or default_embd_type(qtype), "version": 1}
    marker = path + MARKER_SUFFIX
    try:
        with open(marker) as f:
            old = json.load(f)
        if old.get("spec") == json.loads(json.dumps(spec)) and os.path.getsize(path) == old.get("bytes"):
            if log:
                log(f"reusing {path}")
            return old
    except (OSError, ValueError):
        pass
    for p in (marker, path):
        if os.path.exists(p):
            os.remove(p)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    info = write_random_gguf(path, cfg, qtype, seed, embd_type, log)
    info["spec"] = spec
    with open(marker, "w") as f:
        json.dump(info, f)
    if log:
        log(f"wrote {path} ({info['bytes'] / 1e9:.2f} GB)")
    return info
