"""What transformers 5.23 makes of various Gemma 2 config.json dicts -> config_goldens.json.

Dev-only (needs transformers). For each input dict: the effective values of the fields that act on
the computation, or the fact that transformers refuses the dict. tests/test_config.py checks that
gemma2np.Gemma2Config.from_dict means the same.
    python reference_outputs/configs/make_config_goldens.py
"""

import json
import os
import warnings

from transformers import Gemma2Config

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "gemma2np", "configs")

FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_activation", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "eos_token_id", "bos_token_id", "tie_word_embeddings",
    "rope_parameters", "attention_bias", "attention_dropout", "final_logit_softcapping",
    "attn_logit_softcapping", "query_pre_attn_scalar", "sliding_window", "layer_types",
    "use_bidirectional_attention", "num_labels",
]


def cases():
    for name in ("gemma-2-2b", "gemma-2-9b", "gemma-2-27b"):
        with open(os.path.join(SHARED, f"{name}.config.json")) as f:
            yield name, json.load(f)
    # what transformers 5.x writes itself
    yield "hf5_default_written", json.loads(Gemma2Config().to_json_string())
    yield "hf5_custom_written", json.loads(Gemma2Config(
        num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}, sliding_window=16,
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16).to_json_string())
    # hand-written / partial files
    yield "minimal", {"model_type": "gemma2"}
    yield "partial_sizes", {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 1,
                            "num_hidden_layers": 3, "head_dim": 8, "intermediate_size": 96, "vocab_size": 100}
    yield "old_rope_scaling_type", {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 20000.0}
    yield "old_rope_scaling_yarn", {"rope_scaling": {"rope_type": "yarn", "factor": 2.0}, "max_position_embeddings": 512}
    yield "hidden_act_only", {"hidden_act": "gelu", "num_hidden_layers": 2}
    yield "bidirectional", {"use_bidirectional_attention": True, "num_hidden_layers": 2}
    yield "labels", {"id2label": {"0": "neg", "1": "neu", "2": "pos"}, "label2id": {"neg": 0, "neu": 1, "pos": 2}}
    yield "eos_list", {"eos_token_id": [1, 107]}
    yield "no_softcaps", {"final_logit_softcapping": None, "attn_logit_softcapping": None}
    # refused by transformers
    yield "bad_layer_types_len", {"num_hidden_layers": 3, "layer_types": ["full_attention"]}
    yield "bad_layer_type_name", {"num_hidden_layers": 2, "layer_types": ["full_attention", "bogus"]}
    yield "bad_heads_vs_hidden", {"hidden_size": 30, "num_attention_heads": 4}


def main():
    out = {}
    for name, d in cases():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                c = Gemma2Config.from_dict(dict(d))
            out[name] = {"input": d, "ok": True,
                         "effective": {k: getattr(c, k, None) for k in FIELDS}}
        except Exception as exc:  # noqa: BLE001 - we record that transformers refuses it
            out[name] = {"input": d, "ok": False, "error": type(exc).__name__}
    with open(os.path.join(HERE, "config_goldens.json"), "w") as f:
        json.dump(out, f, indent=1, sort_keys=True, default=str)
    print(f"{len(out)} cases written")


if __name__ == "__main__":
    main()
