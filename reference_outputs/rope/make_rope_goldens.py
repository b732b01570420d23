"""Generate RoPE goldens from transformers' own Gemma2RotaryEmbedding (dev-only: needs torch + transformers).

    python reference_outputs/rope/make_rope_goldens.py      # writes rope_goldens.npz + rope_goldens.json here

Pinned: transformers 5.23.0, torch 2.13.0+cpu. For each case we build a Gemma2Config with the given rope_parameters,
record the *standardized* rope_parameters HF ends up holding, then drive one Gemma2RotaryEmbedding through a
sequence of forward calls (order matters: dynamic NTK and longrope are stateful) and store, per call, the
position_ids, HF's inv_freq buffer after the call, attention_scaling and cos/sin (float32). Also records
compute_inv_freq-style outputs (ROPE_INIT_FUNCTIONS called directly, with int seq_len) and how Gemma2Config
standardizes old-style keys (rope_theta / rope_scaling with "type").
"""
import copy
import json
import os
import warnings

import numpy as np
import torch

torch.set_num_threads(1)
import transformers  # noqa: E402
from transformers import Gemma2Config  # noqa: E402
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.gemma2.modeling_gemma2 import Gemma2RotaryEmbedding  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(0)


def pos(batch_rows):
    """(B, T) int64 position ids from a list of rows."""
    return np.asarray(batch_rows, dtype=np.int64)


def sweep(lo, hi, t=12):
    """Two rows of positions in [lo, hi): a spread including both ends, and a shuffled random set."""
    a = np.linspace(lo, hi - 1, t).round().astype(np.int64)
    b = rng.integers(lo, hi, size=t)
    b[-1] = lo
    return pos([a, b])


def longrope_factors(n, lo, hi):
    return [float(x) for x in np.round(rng.uniform(lo, hi, size=n), 4)]


# name -> (head_dim, max_position_embeddings, rope_parameters, list of position_ids arrays (one per forward call))
CASES = {
    # Gemma 2 as released (all sizes: theta 1e4, max 8192); head_dim 256 (2B/9B) and 128 (27B)
    "default_hd256": (256, 8192, {"rope_type": "default", "rope_theta": 10000.0},
                      [sweep(0, 8192), sweep(8192, 32768)]),
    "default_hd128_theta1e6": (128, 8192, {"rope_type": "default", "rope_theta": 1e6}, [sweep(0, 40000)]),
    # default ignores partial_rotary_factor (full head_dim)
    "default_prf_ignored": (64, 4096, {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
                            [sweep(0, 4096)]),
    "linear_f4": (256, 8192, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
                  [sweep(0, 32768)]),
    # dynamic: grow past max, stay (between max and cached), stay at exactly max, reset below max, grow again
    "dynamic_f2_small": (64, 512, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
                         [sweep(0, 100), sweep(0, 700), sweep(0, 600), sweep(0, 512), sweep(0, 100),
                          sweep(0, 2000), sweep(0, 3000)]),
    "dynamic_f4_hd256": (256, 8192, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 4.0},
                         [sweep(0, 8192), sweep(0, 12289), sweep(0, 30000), sweep(0, 50)]),
    "yarn_f4": (256, 8192, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 2048}, [sweep(0, 8192), sweep(8192, 20000)]),
    "yarn_options": (128, 8192, {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0,
                                 "original_max_position_embeddings": 1024, "beta_fast": 16, "beta_slow": 2,
                                 "mscale": 0.707, "mscale_all_dim": 1.0, "truncate": False},
                     [sweep(0, 8192)]),
    "yarn_attention_factor": (64, 4096, {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 2048, "attention_factor": 0.8},
                              [sweep(0, 4096)]),
    # longrope: short below/at original, long beyond, back to short
    "longrope": (64, 1024, {"rope_type": "longrope", "rope_theta": 10000.0,
                            "original_max_position_embeddings": 256,
                            "short_factor": longrope_factors(32, 1.0, 1.5),
                            "long_factor": longrope_factors(32, 1.0, 8.0)},
                 [sweep(0, 200), sweep(0, 256), sweep(0, 257), sweep(0, 3000), sweep(0, 100)]),
    "longrope_factor_af": (64, 4096, {"rope_type": "longrope", "rope_theta": 10000.0,
                                      "original_max_position_embeddings": 1024, "factor": 4.0,
                                      "attention_factor": 1.3,
                                      "short_factor": longrope_factors(32, 1.0, 1.2),
                                      "long_factor": longrope_factors(32, 2.0, 6.0)},
                           [sweep(1000, 2000), sweep(0, 1024)]),
    "llama3": (128, 32768, {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
               [sweep(0, 32768)]),
    "llama3_hd256": (256, 16384, {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 2.0, "low_freq_factor": 1,
                                  "high_freq_factor": 2, "original_max_position_embeddings": 4096},
                     [sweep(0, 16384)]),
    "proportional": (64, 4096, {"rope_type": "proportional", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                     [sweep(0, 4096)]),
    "proportional_factor": (64, 4096, {"rope_type": "proportional", "rope_theta": 10000.0,
                                       "partial_rotary_factor": 0.5, "factor": 2.0}, [sweep(0, 4096)]),
}

# compute_inv_freq-only cases (ROPE_INIT_FUNCTIONS called directly; no forward): partial rotary factors, where the
# inv_freq length follows int(head_dim * prf) and Gemma 2's attention could not use the result.
INIT_ONLY = {
    "linear_prf05": (64, 4096, {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0,
                                "partial_rotary_factor": 0.5}, [None]),
    "dynamic_python_seq": (64, 512, {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}, [None, 700, 3000]),
    "longrope_python_seq": (64, 1024, CASES["longrope"][2], [None, 256, 257]),
}


def make_config(head_dim, max_pos, rope_parameters):
    return Gemma2Config(head_dim=head_dim, hidden_size=head_dim * 2, num_attention_heads=2, num_key_value_heads=1,
                        num_hidden_layers=2, intermediate_size=8, vocab_size=16,
                        max_position_embeddings=max_pos, rope_parameters=copy.deepcopy(rope_parameters))


def main():
    arrays, meta = {}, {"transformers": transformers.__version__, "torch": torch.__version__, "cases": {},
                        "init_only": {}, "standardize": []}
    for name, (hd, mp, rp, calls) in CASES.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = make_config(hd, mp, rp)
        emb = Gemma2RotaryEmbedding(cfg)
        x = torch.zeros(1, dtype=torch.float32)
        meta["cases"][name] = {"head_dim": hd, "max_position_embeddings": mp,
                               "rope_parameters": dict(cfg.rope_parameters), "n_calls": len(calls),
                               "init_attention_scaling": float(emb.attention_scaling)}
        arrays[f"{name}/init_inv_freq"] = emb.inv_freq.numpy().copy()
        scal = []
        for i, p in enumerate(calls):
            cos, sin = emb(x, torch.from_numpy(p))
            arrays[f"{name}/{i}/position_ids"] = p
            arrays[f"{name}/{i}/inv_freq"] = emb.inv_freq.numpy().copy()
            arrays[f"{name}/{i}/cos"] = cos.numpy()
            arrays[f"{name}/{i}/sin"] = sin.numpy()
            scal.append(float(emb.attention_scaling))
        meta["cases"][name]["attention_scaling"] = scal
    for name, (hd, mp, rp, seqs) in INIT_ONLY.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = make_config(hd, mp, rp)
        fn = ROPE_INIT_FUNCTIONS[cfg.rope_parameters["rope_type"]]
        scal = []
        for i, s in enumerate(seqs):
            inv, af = fn(cfg, None, seq_len=s)
            arrays[f"init/{name}/{i}/inv_freq"] = inv.numpy()
            scal.append(float(af))
        meta["init_only"][name] = {"head_dim": hd, "max_position_embeddings": mp,
                                   "rope_parameters": dict(cfg.rope_parameters), "seq_lens": seqs,
                                   "attention_scaling": scal}

    # How Gemma2Config standardizes old-style keys (for the config engineer). kwargs -> rope_parameters.
    std_cases = [
        {},
        {"rope_theta": 5000.0},
        {"rope_scaling": {"type": "linear", "factor": 2.0}},
        {"rope_scaling": {"rope_type": "linear", "factor": 2.0}, "rope_theta": 123.0},
        {"rope_scaling": {"type": "dynamic", "rope_type": "linear", "factor": 2.0}},
        {"rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "dynamic", "factor": 3.0}},
        {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 77.0}, "rope_theta": 5.0},
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}},
        {"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 1024}},
        {"rope_parameters": {"rope_type": "default"}, "partial_rotary_factor": 0.5},
        {"rope_scaling": None, "rope_theta": 42.0},
    ]
    for kw in std_cases:
        kw_in = copy.deepcopy(kw)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = Gemma2Config(max_position_embeddings=8192, **copy.deepcopy(kw))
        meta["standardize"].append({"kwargs": kw_in, "rope_parameters": dict(cfg.rope_parameters)})

    np.savez_compressed(os.path.join(HERE, "rope_goldens.npz"), **arrays)
    with open(os.path.join(HERE, "rope_goldens.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print("wrote", len(arrays), "arrays")


if __name__ == "__main__":
    main()
