"""The quantized GGUFs of the bundled model the tests run, from one committed llama.cpp file.

tests/data/gguf/shakespeare-Q4_K_M.gguf is llama.cpp's own (scripts/make_gguf_quant_fixtures.py: its
convert_hf_to_gguf.py --outtype f32, then llama-quantize Q4_K_M, at the commit in fixtures.json). Its
Q4_0 and Q8_0 siblings (5.4 MB for Q8_0) are not committed: `quant_gguf` writes them from the bundled
model's weights with gguf.quants.quantize (bitwise llama.cpp's quantize_row_q4_0_ref / _q8_0_ref), with
the Q4_K_M file's metadata, F32 norms (1 + w) and -- for Q4_0, whose token_embd llama-quantize keeps at
Q6_K -- its Q6_K token_embd. The script checked every tensor of the result bitwise equal to llama-quantize's
own Q4_0 / Q8_0 files, and llama.cpp's logits on those files are committed (tests/data/gguf/*.bin).
"""
from __future__ import annotations

import os

import gguf
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODEL = os.path.join(ROOT, "gemma2np", "data", "gemma2-shakespeare")
DATA = os.path.join(ROOT, "tests", "data", "gguf")
TEMPLATE = os.path.join(DATA, "shakespeare-Q4_K_M.gguf")
Q = gguf.GGMLQuantizationType
FILE_TYPE = {"Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}


def _hf_name(gguf_name: str) -> str:
    from gemma2np.gguf_io import GGUF_TO_HF

    m = gguf_name.split(".")
    if m[0] == "blk":
        return f"model.layers.{m[1]}.{GGUF_TO_HF['layer'][m[2]][0]}.weight"
    return f"{GGUF_TO_HF['global'][m[0]][0]}.weight"


def quant_gguf(qtype: str, out_path: str, template: str = TEMPLATE) -> str:
    """Write the bundled model as llama-quantize's `qtype` ("Q4_0" or "Q8_0") GGUF at out_path."""
    from gemma2np.checkpoint import load_state_dict

    weights = load_state_dict(MODEL)
    r = gguf.GGUFReader(template)
    w = gguf.GGUFWriter(out_path, "gemma2")
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        val = f.contents()
        if f.name == "general.file_type":
            val = int(FILE_TYPE[qtype])
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, val, f.types[0], sub_type=sub)
    for t in r.tensors:
        if t.tensor_type == Q.F32:  # the norms, 1 + w as llama.cpp stores them
            w.add_tensor(t.name, np.array(t.data))
        elif qtype == "Q4_0" and t.name == "token_embd.weight":  # llama-quantize keeps it at Q6_K
            w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
        else:
            f32 = np.asarray(weights[_hf_name(t.name)]).astype(np.float32)  # bf16 -> f32, exact
            w.add_tensor(t.name, gguf.quants.quantize(f32, Q[qtype]), raw_dtype=Q[qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path
