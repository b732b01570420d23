"""Write tiny checkpoints in Google's official Gemma 2 PyTorch format into tests/data/original/ (dev-only: torch).

    python scripts/make_original_fixture.py

Layout of the official release (gemma_pytorch): `torch.save({"model_state_dict": sd}, "model.ckpt")` with
    embedder.weight, model.layers.N.self_attn.qkv_proj.weight (q rows, then k, then v), ...o_proj.weight,
    model.layers.N.mlp.{gate,up,down}_proj.weight, the four per-layer norms, model.norm.weight,
    and the complex64 RoPE buffer freqs_cis;
or, for big models, a folder of plain-state-dict shards named by pytorch_model.bin.index.json.

Written here (a random tiny model, seed 0; norm weights random so that a lost `1 +` would show):
    config.json                        the HF config of the tiny model (use with --config)
    model_f32.ckpt, model_bf16.ckpt    zip torch.save files, {"model_state_dict": ...}
    model_bf16_legacy.ckpt             the same with _use_new_zipfile_serialization=False (pre-1.6 format)
    sharded/                           two .bin shards + index; bf16 tensors that are views into ONE shared
                                       flat storage (non-zero storage offsets) and o_proj saved with
                                       column-major strides, to exercise offsets/strides in the reader
    expected_f32.safetensors, expected_bf16.safetensors
                                       the HF tensors, split here with torch.split exactly as transformers'
                                       convert_gemma2_weights_to_hf.py does (tied head not written)
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from safetensors.torch import save_file

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "original")

CONFIG = {
    "architectures": ["Gemma2ForCausalLM"],
    "model_type": "gemma2",
    "vocab_size": 32,
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,  # heads * head_dim = 32 != hidden 16, as in every real Gemma 2
    "query_pre_attn_scalar": 8,
    "sliding_window": 4,
    "max_position_embeddings": 16,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "hidden_activation": "gelu_pytorch_tanh",
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}


def official_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    c = CONFIG
    g = torch.Generator().manual_seed(seed)
    h, d, nq, nkv, i = c["hidden_size"], c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]

    def rnd(*shape, std=0.3):
        return torch.randn(*shape, generator=g) * std

    sd = {"embedder.weight": rnd(c["vocab_size"], h, std=1.0)}
    for n in range(c["num_hidden_layers"]):
        p = f"model.layers.{n}."
        sd[p + "self_attn.qkv_proj.weight"] = rnd((nq + 2 * nkv) * d, h)
        sd[p + "self_attn.o_proj.weight"] = rnd(h, nq * d)
        sd[p + "mlp.gate_proj.weight"] = rnd(i, h)
        sd[p + "mlp.up_proj.weight"] = rnd(i, h)
        sd[p + "mlp.down_proj.weight"] = rnd(h, i)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm"):
            sd[p + norm + ".weight"] = rnd(h, std=0.5)
    sd["model.norm.weight"] = rnd(h, std=0.5)
    # gemma_pytorch's precompute_freqs_cis(head_dim, max_seq_len * 2, theta): a complex64 buffer
    freqs = 1.0 / (c["rope_theta"] ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    t = torch.arange(c["max_position_embeddings"] * 2).float()
    sd["freqs_cis"] = torch.polar(torch.ones(t.numel(), d // 2), torch.outer(t, freqs))
    return sd


def to_hf(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' convert_gemma2_weights_to_hf.py mapping (num_key_value_heads > 1 branch)."""
    c = CONFIG
    d, nq, nkv, h = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    out = {}
    for k, v in sd.items():
        if k == "freqs_cis":
            continue
        if "qkv_proj" in k:
            q, kk, vv = torch.split(v, [nq * d, nkv * d, nkv * d], 0)
            out[k.replace("qkv_proj", "q_proj")] = q.reshape(nq * d, h).clone()
            out[k.replace("qkv_proj", "k_proj")] = kk.reshape(nkv * d, h).clone()
            out[k.replace("qkv_proj", "v_proj")] = vv.reshape(nkv * d, h).clone()
        elif k == "embedder.weight":
            out["model.embed_tokens.weight"] = v.clone()
        else:
            out[k] = v.clone()
    return out


def cast(sd, dtype):
    return {k: (v if v.is_complex() else v.to(dtype)) for k, v in sd.items()}


def main() -> None:
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    with open(os.path.join(OUT, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2, sort_keys=True)
        f.write("\n")
    sd = official_state_dict()
    bf = cast(sd, torch.bfloat16)
    torch.save({"model_state_dict": sd}, os.path.join(OUT, "model_f32.ckpt"))
    torch.save({"model_state_dict": bf}, os.path.join(OUT, "model_bf16.ckpt"))
    torch.save({"model_state_dict": bf}, os.path.join(OUT, "model_bf16_legacy.ckpt"),
               _use_new_zipfile_serialization=False)
    save_file(to_hf(sd), os.path.join(OUT, "expected_f32.safetensors"))
    save_file(to_hf(bf), os.path.join(OUT, "expected_bf16.safetensors"))

    # sharded: every real weight a view into one flat bf16 storage (so storage offsets are non-zero) ...
    names = [k for k in bf if k != "freqs_cis"]
    flat = torch.cat([bf[k].reshape(-1) for k in names])
    views, off = {}, 0
    for k in names:
        n = bf[k].numel()
        views[k] = flat[off : off + n].view(bf[k].shape)
        off += n
    # ... and o_proj with column-major strides (same values, stride (1, rows))
    for k in names:
        if k.endswith("o_proj.weight"):
            views[k] = bf[k].t().contiguous().t()
            assert views[k].stride() == (1, bf[k].shape[0])
    half = len(names) // 2
    shards = {
        "pytorch_model-00001-of-00002.bin": {k: views[k] for k in names[:half]},
        "pytorch_model-00002-of-00002.bin": {**{k: views[k] for k in names[half:]}, "freqs_cis": bf["freqs_cis"]},
    }
    sdir = os.path.join(OUT, "sharded")
    os.makedirs(sdir)
    weight_map = {}
    for fname, part in shards.items():
        torch.save(part, os.path.join(sdir, fname))  # gemma_pytorch shards are plain state dicts
        weight_map.update({k: fname for k in part})
    with open(os.path.join(sdir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
        f.write("\n")

    total = sum(os.path.getsize(os.path.join(dp, fn)) for dp, _, fns in os.walk(OUT) for fn in fns)
    print(f"wrote {OUT}: {total / 1024:.1f} KB")
    assert total < 200 * 1024


if __name__ == "__main__":
    main()
