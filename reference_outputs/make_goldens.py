"""Make the PyTorch golden outputs that gemma2np is tested against (dev-only: needs torch + transformers).

Pinned: torch 2.13.0 (CPU), transformers 5.23.0.  Run from the repo root:

    OMP_NUM_THREADS=1 python reference_outputs/make_goldens.py           # all cases
    OMP_NUM_THREADS=1 python reference_outputs/make_goldens.py causal_gqa  # some cases

Every case is a directory reference_outputs/<case>/ holding
  config.json, model.safetensors (or shards + model.safetensors.index.json), generation_config.json
      -- exactly what `save_pretrained(..., safe_serialization=True)` writes (one case overwrites config.json
         with the 2024 layout, see `old_config_format`)
  golden.npz  -- inputs and outputs of each call, keys "<call>.<name>" (see case.json)
  case.json   -- {"class": ..., "calls": [...], "generate": [...], "facts": {...}}

Numerics decisions:
  * float32, attn_implementation="eager" (Gemma 2 refuses sdpa because it cannot softcap), .eval().
  * ALL weights are randomised, including the RMSNorm weights (HF initialises them to zero, so the `1 + w`
    would never be exercised) with std large enough that |pre-softcap score| exceeds the (small) caps; the
    measured maxima are written into case.json["facts"] so a reader can see that tanh bites.
  * every call runs on a fresh copy of the freshly built model: transformers mutates state during forward
    (dynamic RoPE caches its grown inv_freq; the sequence-classification loss writes config.problem_type),
    so each golden depends only on the weights + the call's inputs.
  * bf16: parameters are rounded to bf16 in the fp32 model (the goldens are computed in fp32 from the rounded
    parameters) and the checkpoint is saved in bf16. `model.to(bfloat16)` would also cast RoPE's inv_freq.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.numpy import load_file as np_load_file  # noqa: E402
from transformers import Gemma2Config  # noqa: E402
from transformers.models.gemma2 import modeling_gemma2  # noqa: E402

torch.set_num_threads(1)
assert torch.__version__.startswith("2.13.0"), torch.__version__
assert transformers.__version__ == "5.23.0", transformers.__version__

OUT = Path(__file__).resolve().parent
VOCAB = 128

# ------------------------------------------------------------------------------------------------------------------
# measuring how hard the attention softcap bites: wrap the eager attention function (looked up by global name at
# call time in modeling_gemma2) and record max |q.k * scaling| before the cap.
_PRECAP = {"max": 0.0}
_BEYOND = {"n": 0, "total": 0}
_orig_eager = modeling_gemma2.eager_attention_forward


def _recording_eager(module, query, key, value, attention_mask, dropout=0.0, scaling=None, softcap=None, **kw):
    k = modeling_gemma2.repeat_kv(key, module.num_key_value_groups)
    s = torch.matmul(query, k.transpose(2, 3)) * scaling
    if attention_mask is not None:  # only count visible scores
        s = torch.where(attention_mask > torch.finfo(s.dtype).min / 2, s, torch.zeros_like(s))
    _PRECAP["max"] = max(_PRECAP["max"], float(s.abs().max()))
    if attention_mask is not None:
        vis = attention_mask > torch.finfo(s.dtype).min / 2
        vis = vis.expand_as(s)
    else:
        vis = torch.ones_like(s, dtype=torch.bool)
    _BEYOND["n"] += int(((s.abs() > softcap) & vis).sum())
    _BEYOND["total"] += int(vis.sum())
    return _orig_eager(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, softcap=softcap, **kw)


modeling_gemma2.eager_attention_forward = _recording_eager


# ------------------------------------------------------------------------------------------------------------------
def tiny_config(**over) -> Gemma2Config:
    kw = dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12,        # 4*12 = 48 != hidden 32
        query_pre_attn_scalar=20,                                          # != head_dim
        sliding_window=4, max_position_embeddings=64,
        attn_logit_softcapping=5.0, final_logit_softcapping=3.0,
        rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
        hidden_activation="gelu_pytorch_tanh",
    )
    kw.update(over)
    return Gemma2Config(**kw)


def build(cls_name: str, cfg: Gemma2Config, seed: int, std: float = 0.25, norm_std: float = 0.5):
    cls = getattr(transformers, cls_name)
    torch.manual_seed(seed)
    model = cls._from_config(copy.deepcopy(cfg), attn_implementation="eager")  # _from_config mutates its cfg
    model.eval()
    g = torch.Generator().manual_seed(seed + 1000)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = norm_std if "norm" in name else std
            if "q_proj" in name or "k_proj" in name:
                s = 1.1 * std  # larger scores so that the attention softcap saturates (but not everywhere)
            if name.endswith("embed_tokens.weight") or name == "lm_head.weight":
                # a small embedding keeps a random tied model from predicting its last input token forever
                # (the h . e_t self term dominates otherwise and greedy generation repeats one token)
                s = 0.4 * std
            if name.endswith("model.norm.weight"):
                s = 8 * norm_std  # large final-norm gains so that the final softcap still saturates
            p.copy_(torch.randn(p.shape, generator=g) * s)
    return model


def round_params_bf16(model):
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def rng(seed):
    return np.random.default_rng(seed)


def ids(r, b, t, lo=3):
    # tokens >= 3 so pad(0)/eos(1)/bos(2) only appear where a case puts them
    return r.integers(lo, VOCAB, size=(b, t)).astype(np.int64)


def left_pad(x, n_pads, pad=0):
    """x: (B, T) ids; n_pads[b] pads at the start of row b. -> (ids, mask)"""
    x = x.copy()
    m = np.ones_like(x)
    for b, n in enumerate(n_pads):
        x[b, :n] = pad
        m[b, :n] = 0
    return x, m


def right_pad(x, n_pads, pad=0):
    x = x.copy()
    m = np.ones_like(x)
    T = x.shape[1]
    for b, n in enumerate(n_pads):
        if n:
            x[b, T - n:] = pad
            m[b, T - n:] = 0
    return x, m


# ------------------------------------------------------------------------------------------------------------------
class Case:
    def __init__(self, name, cls_name, cfg, seed, std=0.25, norm_std=0.5, bf16=False, shard=None, note=""):
        self.name, self.cls_name, self.cfg, self.seed = name, cls_name, cfg, seed
        self.model = build(cls_name, cfg, seed, std, norm_std)
        if bf16:
            round_params_bf16(self.model)
        self.bf16, self.shard, self.note = bf16, shard, note
        self.dir = OUT / name
        self.arrays: dict[str, np.ndarray] = {}
        self.calls: list[dict] = []
        self.gens: list[dict] = []
        self.facts: dict = {}
        self.attn_precap = 0.0
        self.logit_precap = 0.0
        _BEYOND.update(n=0, total=0)

    # -- forward ---------------------------------------------------------------------------------------------------
    def call(self, inputs: dict, kwargs: dict | None = None, hidden=True, attn=True, note=""):
        """inputs: name -> np array (stored in the npz); kwargs: JSON scalars (e.g. logits_to_keep=3)."""
        kwargs = dict(kwargs or {})
        cname = f"call{len(self.calls)}"
        model = copy.deepcopy(self.model)  # fresh state, see module docstring
        tin = {}
        for k, v in inputs.items():
            self.arrays[f"{cname}.{k}"] = v
            tin[k] = torch.from_numpy(np.ascontiguousarray(v))
        _PRECAP["max"] = 0.0
        with torch.no_grad():
            out = model(**tin, **kwargs, output_hidden_states=hidden, output_attentions=attn)
            out_t = copy.deepcopy(self.model)(**tin, **kwargs, output_hidden_states=hidden, output_attentions=attn,
                                              return_dict=False)
        self.attn_precap = max(self.attn_precap, _PRECAP["max"])
        fields = list(out.keys())  # ModelOutput order of the non-None fields == the return_dict=False tuple order
        assert len(out_t) == len(fields), (fields, len(out_t))
        outputs = {}
        for i, f in enumerate(fields):
            v = out[f]
            if f == "past_key_values":
                continue  # a Cache object; not compared
            if isinstance(v, tuple):
                keys = []
                for j, t in enumerate(v):
                    key = f"{cname}.{f}.{j}"
                    self.arrays[key] = t.detach().float().numpy()
                    assert torch.equal(t, out_t[i][j])
                    keys.append(key)
                outputs[f] = keys
            else:
                key = f"{cname}.{f}"
                self.arrays[key] = v.detach().float().numpy()
                assert torch.equal(v, out_t[i]), f
                outputs[f] = key
        # how hard the final softcap bites: pre-cap logits from the final-normed hidden state
        if self.cls_name == "Gemma2ForCausalLM" and hidden and self.cfg.final_logit_softcapping:
            with torch.no_grad():
                pre = model.lm_head(out.hidden_states[-1])
            self.logit_precap = max(self.logit_precap, float(pre.abs().max()))
        self.calls.append(dict(name=cname, inputs={k: f"{cname}.{k}" for k in inputs}, kwargs=kwargs,
                               output_hidden_states=hidden, output_attentions=attn,
                               return_tuple_fields=fields, outputs=outputs, note=note))
        return out

    # -- greedy generation -------------------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask, n, min_new=True, note=""):
        gname = f"gen{len(self.gens)}" if self.gens else "gen"
        model = copy.deepcopy(self.model)
        kw = dict(max_new_tokens=n, do_sample=False)
        if min_new:
            kw["min_new_tokens"] = n
        with torch.no_grad():
            seq = model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                                 **kw)
        seq = seq.numpy().astype(np.int64)
        self.facts[f"{gname}_distinct_new_tokens_per_row"] = [len(set(r.tolist())) for r in seq[:, input_ids.shape[1]:]]
        self.arrays[f"{gname}.input_ids"] = input_ids
        self.arrays[f"{gname}.attention_mask"] = attention_mask
        self.arrays[f"{gname}.sequences"] = seq
        self.gens.append(dict(name=gname, inputs={"input_ids": f"{gname}.input_ids",
                                                  "attention_mask": f"{gname}.attention_mask"},
                              kwargs=kw, sequences=f"{gname}.sequences", note=note))
        return seq

    # -- files ---------------------------------------------------------------------------------------------------------
    def save(self):
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        to_save = self.model
        if self.bf16:
            to_save = copy.deepcopy(self.model).to(torch.bfloat16)  # params already bf16-exact
        kw = {"max_shard_size": self.shard} if self.shard else {}
        to_save.save_pretrained(self.dir, safe_serialization=True, **kw)
        np.savez_compressed(self.dir / "golden.npz", **self.arrays)
        facts = dict(self.facts)
        facts["max_abs_attn_score_before_softcap"] = round(self.attn_precap, 3)
        # over all visible (unmasked) scores of all golden forwards of this case
        facts["fraction_attn_scores_beyond_softcap"] = round(_BEYOND["n"] / max(_BEYOND["total"], 1), 3)
        facts["attn_logit_softcapping"] = self.cfg.attn_logit_softcapping
        if self.logit_precap:
            facts["max_abs_logit_before_softcap"] = round(self.logit_precap, 3)
            facts["final_logit_softcapping"] = self.cfg.final_logit_softcapping
        case = {"class": self.cls_name, "note": self.note, "dtype": "bfloat16" if self.bf16 else "float32",
                "tolerance": 1e-4, "calls": self.calls, "generate": self.gens, "facts": facts,
                "made_by": f"reference_outputs/make_goldens.py, torch {torch.__version__}, "
                           f"transformers {transformers.__version__}"}
        (self.dir / "case.json").write_text(json.dumps(case, indent=1) + "\n")
        self.check_reload()

    def check_reload(self):
        """The saved files must reproduce the goldens through transformers' own loader."""
        cls = getattr(transformers, self.cls_name)
        m = cls.from_pretrained(self.dir, attn_implementation="eager", dtype=torch.float32).eval()
        data = np.load(self.dir / "golden.npz")
        for c in self.calls:
            tin = {k: torch.from_numpy(data[v]) for k, v in c["inputs"].items()}
            with torch.no_grad():
                out = copy.deepcopy(m)(**tin, **c["kwargs"], output_hidden_states=c["output_hidden_states"],
                                       output_attentions=c["output_attentions"])
            key = c["outputs"].get("logits") or c["outputs"].get("last_hidden_state")
            f = "logits" if "logits" in c["outputs"] else "last_hidden_state"
            d = np.abs(out[f].float().numpy() - data[key]).max()
            assert d == 0.0, (self.name, c["name"], d)
        for g in self.gens:
            with torch.no_grad():
                seq = copy.deepcopy(m).generate(input_ids=torch.from_numpy(data[g["inputs"]["input_ids"]]),
                                                attention_mask=torch.from_numpy(data[g["inputs"]["attention_mask"]]),
                                                **g["kwargs"])
            assert np.array_equal(seq.numpy(), data[g["sequences"]]), (self.name, g["name"])
        print(f"  {self.name}: reloaded with transformers, identical")


# ------------------------------------------------------------------------------------------------------------------
# cases

def case_causal_gqa():
    """GQA 4/2, head_dim*heads != hidden, qpas != head_dim, window 4 < seq 12, default alternation, tied."""
    c = Case("causal_gqa", "Gemma2ForCausalLM", tiny_config(num_hidden_layers=4), seed=1,
             note="GQA 4q/2kv heads, head_dim 12 (4*12 != hidden 32), query_pre_attn_scalar 20, sliding_window 4 "
                  "< seq 12, default layer alternation, tied embeddings, gelu_pytorch_tanh")
    r = rng(1)
    x = ids(r, 2, 12)
    x[:, 0] = 2  # bos
    li, lm = left_pad(x, [0, 3])
    labels = li.copy()
    labels[lm == 0] = -100
    labels[0, 5] = -100
    c.call(dict(input_ids=li, attention_mask=lm, labels=labels), note="left padding, labels with -100")
    ri, rm = right_pad(x, [2, 0])
    labels = ri.copy()
    labels[rm == 0] = -100
    c.call(dict(input_ids=ri, attention_mask=rm, labels=labels), note="right padding, labels with -100")
    c.call(dict(input_ids=x), dict(logits_to_keep=3), note="logits_to_keep=3 (int), no mask")
    c.call(dict(input_ids=x, logits_to_keep=np.array([0, 5, 11], dtype=np.int64)),
           note="logits_to_keep as a 1-D index array")
    # explicit position_ids: what generate would pass for left padding (cumsum(mask)-1, pads -> 1)
    pos = np.cumsum(lm, -1) - 1
    pos[lm == 0] = 1
    c.call(dict(input_ids=li, attention_mask=lm, position_ids=pos.astype(np.int64)),
           note="explicit position_ids = cumsum(mask)-1 with pads filled with 1 (generate's rule)")
    c.call(dict(input_ids=x[:1], labels=x[:1]), note="batch 1, no mask, labels without -100")
    # generation: window 4 < prompt + new tokens, batch 2 left padding
    gi, gm = left_pad(ids(r, 2, 7), [0, 2])
    gi[0, 0] = 2
    gi[1, 2] = 2
    c.generate(gi, gm, 12, note="greedy, min_new_tokens=max_new_tokens=12, left padding, window 4")
    return c


def case_mha_untied_bias():
    c = Case("mha_untied_bias", "Gemma2ForCausalLM",
             tiny_config(num_attention_heads=4, num_key_value_heads=4, head_dim=8, tie_word_embeddings=False,
                         attention_bias=True, num_hidden_layers=2, sliding_window=6, query_pre_attn_scalar=8),
             seed=2, note="MHA 4/4, untied lm_head, attention_bias=True (q/k/v/o biases), head_dim*heads == hidden")
    r = rng(2)
    x = ids(r, 2, 10)
    li, lm = left_pad(x, [2, 0])
    c.call(dict(input_ids=li, attention_mask=lm, labels=np.where(lm == 1, li, -100)))
    gi, gm = left_pad(ids(r, 2, 5), [1, 0])
    c.generate(gi, gm, 12, note="greedy 12 tokens, window 6 < 5+12")
    return c


def case_window_one():
    """sliding_window = 1: transformers' cache then keeps every key and a decode step's 1 x 1 mask is
    broadcast over all of them, so generate() departs from the forward pass; both are recorded."""
    c = Case("window_one", "Gemma2ForCausalLM",
             tiny_config(num_hidden_layers=3, sliding_window=1, layer_types=["sliding_attention", "full_attention",
                                                                             "sliding_attention"]),
             seed=7, note="sliding_window 1 (self only in the forward pass); generate keeps every key in its cache")
    r = rng(7)
    x = ids(r, 2, 9)
    li, lm = left_pad(x, [0, 3])
    c.call(dict(input_ids=li, attention_mask=lm), note="forward: each sliding layer sees only the query itself")
    gi, gm = left_pad(ids(r, 2, 6), [0, 2])
    c.generate(gi, gm, 10, note="greedy 10 tokens: decode steps attend to all cached keys in window-1 layers")
    return c


def case_rope(kind):
    base = dict(num_hidden_layers=2, max_position_embeddings=8, sliding_window=5, head_dim=8,
                num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=8, hidden_size=32)
    hd2 = 4
    params = {
        "linear": {"rope_type": "linear", "factor": 2.0},
        "dynamic": {"rope_type": "dynamic", "factor": 3.0},
        "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 4,
                 "beta_fast": 8.0, "beta_slow": 1.0},
        "longrope": {"rope_type": "longrope", "original_max_position_embeddings": 4,
                     "short_factor": [1.0, 1.1, 1.5, 2.0][:hd2], "long_factor": [1.0, 2.0, 4.0, 8.0][:hd2]},
        "llama3": {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 4},
    }[kind]
    params = dict(params, rope_theta=100.0)  # small theta so even head_dim 8 spans wavelengths around the seq
    cfg = tiny_config(**base, rope_parameters=params)
    c = Case(f"rope_{kind}", "Gemma2ForCausalLM", cfg, seed=10 + len(kind),
             note=f"rope_parameters {params}; max_position_embeddings 8, calls of length 6 and 14 (> max_position)")
    r = rng(10 + len(kind))
    c.call(dict(input_ids=ids(r, 1, 6)), note="seq 6 <= max_position_embeddings 8")
    x = ids(r, 2, 14)
    xi, xm = left_pad(x, [0, 3])
    c.call(dict(input_ids=xi, attention_mask=xm), note="seq 14 > max_position_embeddings 8")
    if kind == "dynamic":
        c.facts["dynamic"] = ("inv_freq is recomputed when max(position_ids)+1 > max_position_embeddings with "
                              "seq_len=max(position_ids)+1 (over the whole batch); transformers caches the grown "
                              "inv_freq in the module (state): each golden call here ran on a fresh model")
    if kind in ("dynamic", "longrope"):
        # in generate, the frequencies change between steps once positions pass the threshold
        plen = 5 if kind == "dynamic" else 4  # longrope: prefill max position 2-3 <= 4 (short), decode > 4 (long)
        gi, gm = left_pad(ids(r, 2, plen), [0, 1])
        c.generate(gi, gm, 8, note="greedy, positions cross max_position_embeddings/original_max during decoding")
    return c


def case_layer_types_bidir():
    c = Case("layer_types_bidir", "Gemma2ForCausalLM",
             tiny_config(num_hidden_layers=3, layer_types=["full_attention", "sliding_attention", "sliding_attention"],
                         sliding_window=3, use_bidirectional_attention=True),
             seed=3, note="explicit layer_types full, sliding, sliding (not the default alternation), window 3, "
                          "use_bidirectional_attention=True (no effect on transformers' eager path: see facts)")
    r = rng(3)
    x = ids(r, 2, 9)
    ri, rm = right_pad(x, [0, 2])
    out = c.call(dict(input_ids=ri, attention_mask=rm))
    # the fact: same weights without the flag give the same outputs
    cfg2 = copy.deepcopy(c.cfg)
    cfg2.use_bidirectional_attention = False
    m2 = build("Gemma2ForCausalLM", cfg2, 3)
    with torch.no_grad():
        o2 = m2(input_ids=torch.from_numpy(ri), attention_mask=torch.from_numpy(rm), output_attentions=True)
    same = torch.equal(o2.logits, out.logits)
    upper = max(float(torch.triu(a[..., :, :], 1).abs().max()) for a in out.attentions)
    c.facts["use_bidirectional_attention"] = (
        f"outputs identical with the flag off: {same}; max attention weight above the diagonal: {upper} "
        "(eager path stays causal: the flag only sets Gemma2Attention.is_causal=False, which only sdpa/flash read; "
        "create_causal_mask ignores it)")
    assert same
    return c


def case_activation(act):
    c = Case(f"act_{act}", "Gemma2ForCausalLM", tiny_config(num_hidden_layers=2, hidden_activation=act), seed=4,
             note=f"hidden_activation={act!r}")
    r = rng(4 + len(act))
    c.call(dict(input_ids=ids(r, 1, 8)))
    return c


def case_bf16():
    c = Case("bf16_checkpoint", "Gemma2ForCausalLM", tiny_config(num_hidden_layers=2), seed=5, bf16=True,
             note="checkpoint saved in bfloat16; goldens computed in float32 from the bf16-rounded parameters "
                  "(a float32 model loading the bf16 file); embed scale sqrt(32) in float32")
    r = rng(5)
    x, m = left_pad(ids(r, 2, 8), [0, 2])
    c.call(dict(input_ids=x, attention_mask=m))
    return c


def case_sharded_embeds():
    c = Case("sharded_inputs_embeds", "Gemma2ForCausalLM", tiny_config(num_hidden_layers=3), seed=6,
             shard="20KB", note="sharded checkpoint (model.safetensors.index.json); a call with inputs_embeds")
    r = rng(6)
    x = ids(r, 2, 8)
    c.call(dict(input_ids=x))
    emb = (r.standard_normal((2, 8, 32)) * 3.0).astype(np.float32)
    c.call(dict(inputs_embeds=emb), note="inputs_embeds: NOT multiplied by sqrt(hidden) (only embed_tokens scales)")
    # proof of the fact: ids -> embeddings gathered by hand (unscaled) is NOT the same as passing input_ids
    with torch.no_grad():
        w = c.model.model.embed_tokens.weight
        o_raw = c.model(inputs_embeds=w[torch.from_numpy(x)]).logits
        o_scaled = c.model(inputs_embeds=w[torch.from_numpy(x)] * (32 ** 0.5)).logits
        o_ids = c.model(input_ids=torch.from_numpy(x)).logits
    c.facts["inputs_embeds_scaling"] = (
        f"inputs_embeds are used as given: max|logits(embeds=W[ids]*sqrt(H)) - logits(ids)| = "
        f"{float((o_scaled - o_ids).abs().max()):.2e}, max|logits(embeds=W[ids]) - logits(ids)| = "
        f"{float((o_raw - o_ids).abs().max()):.2e}")
    return c


def case_long_default_rope():
    c = Case("longer_than_max_position", "Gemma2ForCausalLM",
             tiny_config(num_hidden_layers=2, max_position_embeddings=8), seed=7,
             note="default rope, seq 16 > max_position_embeddings 8 (transformers just runs it)")
    r = rng(7)
    c.call(dict(input_ids=ids(r, 1, 16)))
    return c


def case_old_config():
    """A checkpoint whose config.json is in the 2024 layout (rope_theta, hidden_act, cache_implementation,
    torch_dtype, sliding_window_size, no layer_types / rope_parameters)."""
    cfg = tiny_config(num_hidden_layers=3, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    c = Case("old_config_format", "Gemma2ForCausalLM", cfg, seed=8,
             note="config.json rewritten in the 2024 layout; transformers loads it to the same model (checked)")
    r = rng(8)
    x, m = left_pad(ids(r, 2, 10), [0, 4])
    c.call(dict(input_ids=x, attention_mask=m))
    gi, gm = left_pad(ids(r, 2, 4), [0, 1])
    c.generate(gi, gm, 12)
    return c


def rewrite_old_config(case: Case):
    new = json.loads((case.dir / "config.json").read_text())
    cfg = case.cfg
    old = {
        "architectures": ["Gemma2ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attn_logit_softcapping": cfg.attn_logit_softcapping, "bos_token_id": 2, "cache_implementation": "hybrid",
        "eos_token_id": 1, "final_logit_softcapping": cfg.final_logit_softcapping, "head_dim": cfg.head_dim,
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings, "model_type": "gemma2",
        "num_attention_heads": cfg.num_attention_heads, "num_hidden_layers": cfg.num_hidden_layers,
        "num_key_value_heads": cfg.num_key_value_heads, "pad_token_id": 0,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": 500.0, "sliding_window": cfg.sliding_window, "sliding_window_size": cfg.sliding_window,
        "torch_dtype": "float32", "transformers_version": "4.42.4", "use_cache": True, "vocab_size": VOCAB,
    }
    assert "layer_types" in new and "rope_parameters" in new
    (case.dir / "config.json").write_text(json.dumps(old, indent=2) + "\n")
    # and the 2024 generation_config.json (cache_implementation "hybrid" = transformers' static sliding-window
    # cache at the time; 5.23 accepts it and generates the same tokens, checked below)
    gen_old = {"_from_model_config": True, "bos_token_id": 2, "cache_implementation": "hybrid", "eos_token_id": 1,
               "pad_token_id": 0, "transformers_version": "4.42.4"}
    (case.dir / "generation_config.json").write_text(json.dumps(gen_old, indent=2) + "\n")
    case.check_reload()  # same outputs from the old-layout file
    back = transformers.AutoConfig.from_pretrained(case.dir)
    assert back.layer_types == new["layer_types"], back.layer_types
    assert back.rope_parameters == new["rope_parameters"], (back.rope_parameters, new["rope_parameters"])
    print("  old_config_format: 2024 config.json + generation_config.json load to the same layer_types/rope_parameters and outputs")


def case_eos_list(it_style=False):
    """eos_token_id a list, no min_new_tokens: rows stop early and are padded with pad_token_id.
    it_style: like gemma-2-*-it, config.json says eos 1 and only generation_config.json says [1, 7]
    (transformers' generate reads generation_config.json)."""
    for seed in range(30, 200):
        if it_style:
            cfg = tiny_config(num_hidden_layers=2, eos_token_id=1, sliding_window=4)
            c = Case("generate_eos_in_generation_config", "Gemma2ForCausalLM", cfg, seed=seed,
                     note="config.json eos_token_id 1, generation_config.json eos_token_id [1, 7] (the gemma-2-it "
                          "layout); generate without min_new_tokens stops on 7 as well")
            c.model.generation_config.eos_token_id = [1, 7]
        else:
            cfg = tiny_config(num_hidden_layers=2, eos_token_id=[1, 7], sliding_window=4)
            c = Case("generate_eos_list", "Gemma2ForCausalLM", cfg, seed=seed,
                     note="eos_token_id [1, 7] in config.json (and so in generation_config.json); generate without "
                          "min_new_tokens: finished rows are padded with pad_token_id 0")
        # bias the head towards the eos ids a little so some rows stop (still a valid random model)
        with torch.no_grad():
            c.model.model.embed_tokens.weight[[1, 7]] *= 2.0
        r = rng(seed)
        gi, gm = left_pad(ids(r, 3, 5), [0, 2, 1])
        m = copy.deepcopy(c.model)
        with torch.no_grad():
            seq = m.generate(input_ids=torch.from_numpy(gi), attention_mask=torch.from_numpy(gm),
                             max_new_tokens=12, do_sample=False).numpy()
        new = seq[:, 5:]
        finished = [bool(np.isin(row, [1, 7]).any()) for row in new]
        early = [f and np.isin(row[:-1], [1, 7]).any() and (row == 0).any() for f, row in zip(finished, new)]
        stops_on_7 = any(7 in row[:list(row).index(0)] if 0 in row else False for row in new)
        if seq.shape[1] == 17 and sum(early) >= 1 and not all(finished) and (stops_on_7 or not it_style):
            c.generate(gi, gm, 12, min_new=False, note="rows finishing at different steps; one never finishes")
            c.call(dict(input_ids=gi, attention_mask=gm))
            c.facts["eos_search_seed"] = seed
            return c
    raise RuntimeError("no seed gives early-stopping rows")


def case_seq_cls():
    cfg = tiny_config(num_hidden_layers=2, num_labels=3)
    c = Case("seq_cls_single_label", "Gemma2ForSequenceClassification", cfg, seed=20,
             note="num_labels 3, int labels -> single_label_classification (CE); pooled at the rightmost token != "
                  "pad_token_id, left and right padding")
    r = rng(20)
    x = ids(r, 3, 9)
    li, lm = left_pad(x, [0, 3, 1])
    y = np.array([0, 2, 1], dtype=np.int64)
    c.call(dict(input_ids=li, attention_mask=lm, labels=y), note="left padding")
    ri, rm = right_pad(x, [2, 0, 4])
    c.call(dict(input_ids=ri, attention_mask=rm, labels=y), note="right padding")
    c.call(dict(inputs_embeds=(r.standard_normal((2, 6, 32)) * 3).astype(np.float32)),
           note="inputs_embeds: pools the last position (-1) whatever the mask")
    return c


def case_seq_regression():
    c = Case("seq_cls_regression", "Gemma2ForSequenceClassification", tiny_config(num_hidden_layers=2, num_labels=1),
             seed=21, note="num_labels 1 -> regression (MSE on squeezed logits)")
    r = rng(21)
    x, m = right_pad(ids(r, 2, 7), [0, 3])
    c.call(dict(input_ids=x, attention_mask=m, labels=np.array([0.5, -1.25], dtype=np.float32)))
    return c


def case_seq_multilabel():
    c = Case("seq_cls_multi_label", "Gemma2ForSequenceClassification",
             tiny_config(num_hidden_layers=2, num_labels=4, problem_type="multi_label_classification"), seed=22,
             note="problem_type multi_label_classification (BCE with logits), float labels")
    r = rng(22)
    x, m = left_pad(ids(r, 2, 7), [2, 0])
    c.call(dict(input_ids=x, attention_mask=m, labels=np.array([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=np.float32)))
    return c


def case_tok_cls():
    c = Case("token_cls", "Gemma2ForTokenClassification", tiny_config(num_hidden_layers=2, num_labels=5), seed=23,
             note="num_labels 5, score layer with bias, dropout inactive in eval, labels with -100")
    r = rng(23)
    x, m = right_pad(ids(r, 2, 8), [0, 3])
    y = r.integers(0, 5, size=(2, 8)).astype(np.int64)
    y[m == 0] = -100
    c.call(dict(input_ids=x, attention_mask=m, labels=y))
    return c


def case_base_model():
    c = Case("base_model", "Gemma2Model", tiny_config(num_hidden_layers=2), seed=24,
             note="Gemma2Model: last_hidden_state (after the final norm), hidden_states, attentions")
    r = rng(24)
    x, m = left_pad(ids(r, 2, 7), [0, 2])
    c.call(dict(input_ids=x, attention_mask=m))
    return c


CASES = {
    "causal_gqa": case_causal_gqa,
    "mha_untied_bias": case_mha_untied_bias,
    **{f"rope_{k}": (lambda k=k: case_rope(k)) for k in ["linear", "dynamic", "yarn", "longrope", "llama3"]},
    "layer_types_bidir": case_layer_types_bidir,
    "act_gelu": lambda: case_activation("gelu"),
    "act_silu": lambda: case_activation("silu"),
    "bf16_checkpoint": case_bf16,
    "sharded_inputs_embeds": case_sharded_embeds,
    "longer_than_max_position": case_long_default_rope,
    "old_config_format": case_old_config,
    "generate_eos_list": case_eos_list,
    "generate_eos_in_generation_config": lambda: case_eos_list(it_style=True),
    "seq_cls_single_label": case_seq_cls,
    "seq_cls_regression": case_seq_regression,
    "seq_cls_multi_label": case_seq_multilabel,
    "token_cls": case_tok_cls,
    "base_model": case_base_model,
    "window_one": case_window_one,
}


def main(names):
    for name in names or CASES:
        print(name)
        case = CASES[name]()
        case.save()
        if name == "old_config_format":
            rewrite_old_config(case)
        f = case.facts
        if case.cls_name == "Gemma2ForCausalLM":
            print(f"  beyond cap {_BEYOND['n'] / max(_BEYOND['total'], 1):.3f}; attn pre-cap max {case.attn_precap:.2f} (cap {case.cfg.attn_logit_softcapping}), "
              f"logit pre-cap max {case.logit_precap:.2f} (cap {case.cfg.final_logit_softcapping})")
        for k, v in f.items():
            print(f"  fact {k}: {v}")


if __name__ == "__main__":
    main(sys.argv[1:])
