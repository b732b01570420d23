"""Gemma2Config: defaults, the published configs, transformers' meaning of config.json, validation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from gemma2np import ConfigError, Gemma2Config, Gemma2ForCausalLM

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "gemma2np" / "configs"
GOLDENS = json.loads((ROOT / "reference_outputs" / "configs" / "config_goldens.json").read_text())

# name -> (parameters with the tied head, as transformers counts them)
PUBLISHED = {"gemma-2-2b": 2_614_341_888, "gemma-2-9b": 9_241_705_984, "gemma-2-27b": 27_227_128_320}


def test_seed_defaults():
    c = Gemma2Config()
    expected = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                    num_attention_heads=16, num_key_value_heads=16, head_dim=256,
                    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192, initializer_range=0.02,
                    rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                    tie_word_embeddings=True, rope_theta=10000.0, attention_bias=False, attention_dropout=0.0,
                    final_logit_softcapping=30.0, attn_logit_softcapping=50.0, query_pre_attn_scalar=224,
                    sliding_window=4096, use_bidirectional_attention=None)
    for k, v in expected.items():
        assert getattr(c, k) == v, k
    assert c.rope_parameters == {"rope_theta": 10000.0, "rope_type": "default"}
    assert c.layer_types[:3] == ["sliding_attention", "full_attention", "sliding_attention"]
    assert len(c.layer_types) == 28


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_config_shapes_and_parameter_count(name):
    cfg = Gemma2Config.from_pretrained(CONFIGS / f"{name}.config.json")
    assert cfg.num_parameters() == PUBLISHED[name]
    shapes = cfg.parameter_shapes()
    assert shapes["model.embed_tokens.weight"] == (256000, cfg.hidden_size)
    q = shapes["model.layers.0.self_attn.q_proj.weight"]
    assert q == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
    # heads x head_dim != hidden for every published size: head_dim is never derived
    assert cfg.num_attention_heads * cfg.head_dim != cfg.hidden_size
    assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED[name]


def test_published_query_scalars():
    get = lambda n: Gemma2Config.from_pretrained(CONFIGS / f"gemma-2-{n}.config.json").query_pre_attn_scalar
    assert (get("2b"), get("9b"), get("27b")) == (256, 256, 144)


@pytest.mark.parametrize("name", sorted(GOLDENS))
def test_config_means_what_transformers_makes_of_it(name):
    case = GOLDENS[name]
    if not case["ok"]:
        with pytest.raises(ConfigError):
            Gemma2Config.from_dict(dict(case["input"]))
        return
    cfg = Gemma2Config.from_dict(dict(case["input"]))
    for field, want in case["effective"].items():
        got = json.loads(json.dumps(getattr(cfg, field), default=str))
        assert got == want, f"{field}: gemma2np {got!r} != transformers {want!r}"


def test_json_round_trip(tmp_path):
    cfg = Gemma2Config(num_hidden_layers=3, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=8, layer_types=["full_attention"] * 3, rope_scaling={"type": "linear", "factor": 2.0})
    cfg.save_pretrained(tmp_path)
    again = Gemma2Config.from_pretrained(tmp_path)
    assert again == cfg
    assert again.rope_parameters["rope_type"] == "linear"


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_attention_heads=16, num_key_value_heads=6), "divisible"),
    (dict(hidden_activation="gelu_bogus"), "hidden_activation"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_size=-8), "hidden_size"),
    (dict(num_hidden_layers=2, layer_types=["full_attention"]), "layer_types"),
    (dict(num_hidden_layers=2, layer_types=["full_attention", "local"]), "layer_types"),
    (dict(sliding_window=None), "sliding_window"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(rope_parameters={"rope_type": "warp", "rope_theta": 1.0}), "rope"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "factor"),
    (dict(rms_norm_eps=0), "rms_norm_eps"),
    (dict(query_pre_attn_scalar=0), "query_pre_attn_scalar"),
    (dict(attn_logit_softcapping=-1.0), "attn_logit_softcapping"),
    (dict(head_dim=1.5), "head_dim"),
])
def test_validation_errors_name_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        Gemma2Config(**kwargs)


def test_no_sliding_layer_needs_no_window():
    cfg = Gemma2Config(num_hidden_layers=2, layer_types=["full_attention"] * 2, sliding_window=None)
    assert cfg.sliding_window is None


def test_broken_config_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        Gemma2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Gemma2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="llama"):
        Gemma2Config.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 3, "hidden_size": 30,
                                                      "num_key_value_heads": 2}))
    with pytest.raises(ConfigError):
        Gemma2Config.from_pretrained(tmp_path)


def test_extra_keys_are_kept_and_hidden_act_has_no_effect(tmp_path):
    d = json.loads((CONFIGS / "gemma-2-2b.config.json").read_text())
    d["hidden_act"] = "relu"  # transformers' Gemma2MLP reads hidden_activation only
    cfg = Gemma2Config.from_dict(d)
    assert cfg.hidden_activation == "gelu_pytorch_tanh"
    assert cfg.cache_implementation == "hybrid" and cfg.hidden_act == "relu"


def test_initializer_range_drives_random_init():
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, sliding_window=4)
    small = Gemma2ForCausalLM.from_config(Gemma2Config(initializer_range=0.01, **base), seed=1)
    big = Gemma2ForCausalLM.from_config(Gemma2Config(initializer_range=0.5, **base), seed=1)
    s = small.state_dict()["model.layers.0.mlp.up_proj.weight"].std()
    b = big.state_dict()["model.layers.0.mlp.up_proj.weight"].std()
    assert abs(s - 0.01) < 0.002 and abs(b - 0.5) < 0.1
    # norms start at zero (scale 1 + w = 1), pad row of the embedding is zero
    assert not small.state_dict()["model.layers.0.input_layernorm.weight"].any()
    assert not small.state_dict()["model.embed_tokens.weight"][0].any()
    again = Gemma2ForCausalLM.from_config(Gemma2Config(initializer_range=0.01, **base), seed=1)
    np.testing.assert_array_equal(again.state_dict()["model.embed_tokens.weight"],
                                  small.state_dict()["model.embed_tokens.weight"])


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_models_build_without_allocating(name):
    import resource

    cfg = Gemma2Config.from_pretrained(CONFIGS / f"{name}.config.json")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = Gemma2ForCausalLM.from_config(cfg, empty_weights=True)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 200, f"building {name} allocated {grown_mb:.0f} MB"
    assert model.num_parameters() == PUBLISHED[name]
    assert sum(math.prod(s) for s in model.parameter_shapes().values()) == PUBLISHED[name]
    assert len(model.layers) == cfg.num_hidden_layers
    assert model.layers[0].q_proj[0].shape == (cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size)
