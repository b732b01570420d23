"""The `gemma2np` command (also `python -m gemma2np`).

    gemma2np generate --prompt "ROMEO:" --max-new-tokens 60     # stream a continuation
    gemma2np chat                                              # talk to the model, multi-turn
    gemma2np info                                              # what is in a checkpoint

Each subcommand is registered by one small `add_<name>_parser(subparsers)` function that sets
`func` (parsed args -> exit status). Subcommands living in other modules (compare, convert, bench)
are picked up when their module exists (see `_OPTIONAL_COMMANDS`).

Exit status: 0 success, 2 a user mistake (one line on stderr, never a traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time

from .safeio import read_json_file
from .cli_models import DEFAULT_MODEL_DIR, ModelSource, UserError, add_model_args, load_config, load_model
from .cli_models import load_tokenizer, one_line as _one_line, resolve_model, runtime_kwargs, system_info

# (module, function) pairs that register further subcommands when the module is present
_OPTIONAL_COMMANDS = [
    ("gemma2np.compare", "add_compare_parser"),
    ("gemma2np.convert", "add_convert_parser"),
    ("gemma2np.bench", "add_bench_parser"),
    ("gemma2np.perplexity", "add_perplexity_parser"),
]


# ============================================================================ shared helpers
# (the model options live in cli_models.py, shared with compare and perplexity)


def _add_model_args(p: argparse.ArgumentParser, *, runtime: bool = True) -> None:
    add_model_args(p, runtime=runtime)
    if runtime:
        p.add_argument("--cache-dtype", choices=("float32", "bfloat16"), default=None,
                       help="KV cache storage: float32 (default) or bfloat16 (half the cache memory; keys and "
                            "values rounded when written, see docs/precision.md)")
        p.add_argument("-v", "--verbose", action="store_true",
                       help="print what runs (backend, weight format, SIMD path, OpenMP, threads) and the load time")


def _add_sampling_args(p: argparse.ArgumentParser, default_new: int | None, from_checkpoint: bool = False) -> None:
    title = ("decoding (default: the checkpoint's generation_config.json; --greedy or a sampling option overrides it)"
             if from_checkpoint else "decoding (greedy unless --do-sample or a sampling option is given)")
    g = p.add_argument_group(title)
    g.add_argument("--max-new-tokens", type=int, default=default_new, metavar="N",
                   help=f"generate at most N tokens (default {default_new})" if default_new is not None else
                   "generate at most N tokens (default: generation_config.json's max_new_tokens, else 200)")
    g.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    if from_checkpoint:
        g.add_argument("--greedy", action="store_true", help="always take the most likely token")
    g.add_argument("--temperature", type=float, default=None,
                   help="> 0; lower is more conservative (implies --do-sample; 0 means greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (implies --do-sample; "
                   "default 50, 0 disables)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling, in (0, 1] (implies --do-sample; default 1.0 = off)")
    g.add_argument("--min-p", type=float, default=None,
                   help="drop tokens less likely than P times the most likely one, in [0, 1] (implies --do-sample)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 0; above 1 discourages repeating tokens (default 1.0 = off)")
    g.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                   help="never repeat an N-gram of tokens (prompt included; default 0 = off)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop once the text ends with TEXT (repeatable; a newline: --stop $'\\n' in bash)")
    if not from_checkpoint:
        g.add_argument("--num-return-sequences", type=int, default=None, metavar="N",
                       help="N sampled continuations of the prompt, printed one after another (needs sampling)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same sample")
    g.add_argument("--prefill-chunk-size", type=int, default=None, metavar="N",
                   help="feed the prompt N tokens per forward pass (transformers' prefill_chunk_size): a long "
                        "prompt then needs the activations of N tokens, not of all of them (default: one pass)")


def _model_source(args) -> ModelSource:
    """The model named by --model / --gguf-file (default: the bundled one), checked to exist."""
    return resolve_model(args)


_model_dir = _model_source  # older name: its result is passed on to _load_tokenizer / _load_model


def _load_config(src: ModelSource):
    return load_config(src)


def _load_model(args, src: ModelSource):
    bar = _ProgressBar("loading") if sys.stderr.isatty() else None
    t0 = time.perf_counter()
    try:
        model = load_model(args, src, progress=bar, tensor_parallel=True)  # under mpiexec (parallel/launch.py)
    finally:
        if bar is not None:
            bar.close()
    if getattr(args, "verbose", False):
        print(f"[loaded {src.label} in {time.perf_counter() - t0:.2f} s; {system_info(model)}]", file=sys.stderr)
    return model


def _load_tokenizer(args, src: ModelSource):
    return load_tokenizer(args, src)


class _ProgressBar:
    """`loading [#########.........]  9/26 layers` on stderr, redrawn in place."""

    def __init__(self, label: str, width: int = 30):
        self.label, self.width, self.drawn = label, width, False

    def __call__(self, done: int, total: int) -> None:
        n = int(self.width * done / max(total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * n}{'.' * (self.width - n)}] {done}/{total} layers")
        sys.stderr.flush()
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _sampling_kwargs(args, from_checkpoint: bool = False) -> dict:
    """generate() keyword arguments from the decoding options, checked before anything runs.

    from_checkpoint (chat): only the options given are passed, so the rest come from the checkpoint's
    generation_config.json, as transformers does; otherwise (generate) decoding is greedy unless asked."""
    from .generation import GenerationConfig, GenerationError, check_seed, validate

    if (args.max_new_tokens is not None and args.max_new_tokens < 1) or (args.max_new_tokens is None and not from_checkpoint):
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    sampling_opts = (args.temperature, args.top_k, args.top_p, args.min_p)
    do_sample = args.do_sample or any(v is not None for v in sampling_opts)
    if args.temperature == 0 or getattr(args, "greedy", False):  # the common convention: temperature 0 = greedy
        do_sample = False
    if getattr(args, "greedy", False) and (args.do_sample or any(v not in (None, 0) for v in sampling_opts)):
        raise UserError("--greedy contradicts --do-sample / --temperature / --top-k / --top-p / --min-p")
    explicit = getattr(args, "greedy", False) or args.do_sample or any(v is not None for v in sampling_opts)
    kw = dict(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
              no_repeat_ngram_size=args.no_repeat_ngram_size, stop_strings=args.stop,
              num_return_sequences=getattr(args, "num_return_sequences", None),
              prefill_chunk_size=getattr(args, "prefill_chunk_size", None))
    if explicit or not from_checkpoint:
        kw["do_sample"] = do_sample
    if do_sample:
        kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p)
    kw = {k: v for k, v in kw.items() if v is not None}
    try:
        validate(GenerationConfig(**kw))
        check_seed(args.seed)
    except GenerationError as e:
        raise UserError(_one_line(e).replace("`", "").replace("_", "-")) from None
    if args.seed is not None:
        kw["seed"] = args.seed
    return kw


def _fit_context(n_prompt: int, max_new: int, context: int, what: str = "the prompt") -> int:
    """Refuse a prompt that leaves no room in the context; shorten max_new_tokens to fit."""
    if n_prompt >= context:
        raise UserError(f"{what} is {n_prompt} tokens but the model's context is {context} tokens "
                        "(max_position_embeddings): shorten it")
    if n_prompt + max_new > context:
        new = context - n_prompt
        print(f"note: generating at most {new} tokens to stay within the {context}-token context", file=sys.stderr)
        return new
    return max_new


class _TimedStreamer:
    """Wraps a streamer: records time to first token and the number of new tokens."""

    def __init__(self, inner):
        self.inner = inner
        self.start = time.perf_counter()
        self.first = None
        self.n = 0
        self.prompt_seen = False

    def put(self, value):
        if self.prompt_seen:
            if self.first is None:
                self.first = time.perf_counter()
            self.n += 1
        self.prompt_seen = True
        self.inner.put(value)

    def end(self):
        self.inner.end()
        self.stop = time.perf_counter()

    def report(self, n_prompt: int) -> str:
        ttft = (self.first or self.stop) - self.start
        decode = self.stop - (self.first or self.stop)
        rate = (self.n - 1) / decode if self.n > 1 and decode > 0 else float("nan")
        return (f"[{n_prompt} prompt tokens, {self.n} new tokens; time to first token {ttft:.3f} s; "
                f"{rate:.2f} tokens/s after it]")


def _eos_ids(model, tok, chat: bool) -> list[int]:
    """The model's eos ids (generation_config.json / config.json), plus <end_of_turn> in chat mode."""
    from .generation import _eos_list, get_generation_config

    eos = _eos_list(get_generation_config(model).eos_token_id)
    if chat:
        try:
            eot = tok.convert_tokens_to_ids("<end_of_turn>")
        except (ValueError, KeyError):
            eot = None
        if isinstance(eot, int) and eot not in eos and eot != getattr(tok, "unk_token_id", None):
            eos.append(eot)
    return eos


# ============================================================================ generate


GENERATE_EPILOG = """\
examples:
  gemma2np generate --prompt "ROMEO:" --max-new-tokens 60
  echo "JULIET:" | gemma2np generate                         # the prompt from stdin
  gemma2np generate --prompt-file scene.txt --do-sample --temperature 0.8 --seed 1
  gemma2np generate --chat --prompt "Who art thou?"           # wrap in the chat template
  gemma2np generate --model ~/gemma-2-2b --backend native --weights int8 --prompt "Hello"

The prompt and its continuation are streamed to stdout as the text is produced (--no-echo: the
continuation only); timing (time to first token, tokens/s) goes to stderr.
"""


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "generate", help="continue a prompt (streams text to stdout)",
        description="Continue a prompt with the model, streaming the new text to stdout.",
        epilog=GENERATE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the chat template (a user turn, then the model's turn)")
    p.add_argument("--no-echo", dest="echo", action="store_false",
                   help="print only the continuation, not the prompt before it (with --chat the "
                        "template is never echoed: only the reply is printed)")
    _add_model_args(p)
    _add_sampling_args(p, default_new=100)
    p.set_defaults(func=run_generate)
    return p


def _check_utf8(text: str, where: str) -> str:
    """Text that came from bytes (argv, stdin, a terminal) must have been valid UTF-8. Python decodes argv and
    (under a C/UTF-8 locale) stdin with surrogateescape: an invalid byte 0xNN becomes U+DCNN, which would only
    fail later, deep in the tokenizer. Report it here in one line (exit 2), as --prompt-file does."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"U+{c:04X}"
        raise UserError(f"{where} is not valid UTF-8 ({what} at character {e.start})") from None
    return text


def _read_prompt(args) -> str:
    if args.prompt is not None:
        return _check_utf8(args.prompt, "--prompt")
    if args.prompt_file is not None:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --prompt-file {args.prompt_file}: {_one_line(e)}") from None
    if sys.stdin.isatty():
        print("reading the prompt from stdin (end with Ctrl-D); or pass --prompt TEXT", file=sys.stderr)
    try:
        return _check_utf8(sys.stdin.read(), "the prompt on stdin")
    except UnicodeDecodeError as e:
        raise UserError(f"the prompt on stdin is not UTF-8: {e}") from None


def run_generate(args) -> int:
    import numpy as np

    from .generation import TextStreamer

    kw = _sampling_kwargs(args)
    runtime_kwargs(args)  # --threads / --weights mistakes before reading a prompt from stdin
    text = _read_prompt(args)
    if not text.strip() and not args.chat:
        raise UserError("the prompt is empty: pass --prompt TEXT, --prompt-file FILE or text on stdin")
    model_dir = _model_dir(args)
    tok = _load_tokenizer(args, model_dir)
    model = _load_model(args, model_dir)
    if args.chat:
        try:
            ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                          return_dict=False)
        except ValueError as e:
            raise UserError(f"cannot apply the chat template: {_one_line(e)}") from None
    else:
        ids = tok(text)["input_ids"]
    ids = np.asarray([ids], dtype=np.int64)
    if ids.max(initial=0) >= model.config.vocab_size:
        raise UserError(f"the tokenizer produced id {int(ids.max())} but the model's vocabulary has "
                        f"{model.config.vocab_size} tokens: tokenizer and model do not match")
    kw["max_new_tokens"] = _fit_context(ids.shape[1], kw["max_new_tokens"], model.config.max_position_embeddings)
    eos = _eos_ids(model, tok, args.chat) or []
    # Echo: the streamer decodes prompt + continuation together (transformers' TextStreamer with
    # skip_prompt=False), so stdout is exactly tok.decode(prompt + new tokens) and a continuation that
    # starts with a space or mid-word joins the prompt as the model sees it.
    echo = args.echo and not args.chat
    if kw.get("num_return_sequences", 1) > 1:  # several rows: printed when done, one after another
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=np.ones_like(ids), eos_token_id=eos, tokenizer=tok, **kw)
        for i, row in enumerate(out):
            print(f"--- sequence {i + 1} of {len(out)} ---")
            print(tok.decode(row if echo else row[ids.shape[1]:], skip_special_tokens=True))
        print(f"[{ids.shape[1]} prompt tokens, {len(out)} sequences in {time.perf_counter() - t0:.3f} s]",
              file=sys.stderr)
        return 0
    streamer = _TimedStreamer(TextStreamer(tok, skip_prompt=not echo, skip_special_tokens=True))
    model.generate(ids, attention_mask=np.ones_like(ids), eos_token_id=eos, streamer=streamer, tokenizer=tok, **kw)
    print(streamer.report(ids.shape[1]), file=sys.stderr)
    return 0


# ============================================================================ chat


CHAT_EPILOG = """\
In the session: type a message and press Enter. Commands:
  /reset   forget the conversation so far
  /exit    leave (Ctrl-D or Ctrl-C at the prompt leave too)
Ctrl-C while the model replies stops the reply and returns to the prompt.

The conversation stays in the KV cache: each turn only the new message is read.
Decoding follows the checkpoint's generation_config.json (the bundled model samples with
temperature 0.8, top-p 0.9, top-k 50, at most 80 tokens) unless options override it.

examples:
  gemma2np chat
  gemma2np chat --greedy --max-new-tokens 60
  gemma2np chat --temperature 0.7 --seed 1 --stop $'\\n\\n'      # end each reply at a blank line
"""


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="interactive multi-turn chat with the chat template",
        description="Talk to the model with Gemma 2's chat template. The conversation is kept in the KV cache, so "
                    "each turn only reads the new message; the oldest turns are dropped when it outgrows the context.",
        epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    _add_sampling_args(p, default_new=None, from_checkpoint=True)
    p.set_defaults(func=run_chat)
    return p


def _decoding_summary(model, kw: dict, max_new: int) -> str:
    from .generation import GenerationConfig, get_generation_config

    base = get_generation_config(model).to_dict()
    gc = GenerationConfig(**{**{k: v for k, v in base.items() if k in GenerationConfig.__dataclass_fields__}, **kw})
    if not gc.do_sample:
        how = "greedy"
    else:
        parts = [f"temperature {gc.temperature if gc.temperature is not None else 1.0:g}"]
        parts += [f"{n} {getattr(gc, a):g}" for n, a in (("top-k", "top_k"), ("top-p", "top_p"), ("min-p", "min_p"))
                  if getattr(gc, a) is not None]
        how = "sampling, " + ", ".join(parts)
    if gc.repetition_penalty not in (None, 1.0):
        how += f", repetition penalty {gc.repetition_penalty:g}"
    return f"{how}; at most {max_new} tokens per reply"


def run_chat(args) -> int:
    from .chat_session import ChatSession
    from .generation import GenerationError, TextStreamer

    kw = _sampling_kwargs(args, from_checkpoint=True)
    model_dir = _model_dir(args)
    tok = _load_tokenizer(args, model_dir)
    t0 = time.perf_counter()
    model = _load_model(args, model_dir)
    load_seconds = time.perf_counter() - t0
    seed, max_new = kw.pop("seed", None), kw.pop("max_new_tokens", None)
    try:
        session = ChatSession(model, tok, kw, max_new_tokens=max_new, seed=seed)
    except GenerationError as e:
        raise UserError(_one_line(e)) from None
    print("chat with the model; /reset clears the conversation, /exit or Ctrl-D leaves, Ctrl-C stops a reply",
          file=sys.stderr)
    print(f"[model loaded in {load_seconds:.2f} s; {_decoding_summary(model, kw, session.max_new_tokens)}]",
          file=sys.stderr)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D / Ctrl-C at the prompt: leave
            print(file=sys.stderr)
            return 0
        except UnicodeDecodeError as e:  # stdin with errors="strict"
            raise UserError(f"chat input is not UTF-8: {e}") from None
        msg = _check_utf8(line, "chat input").strip()
        if not msg:
            continue
        if msg in ("/exit", "/quit"):
            return 0
        if msg == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        sys.stdout.write("model> ")
        sys.stdout.flush()
        try:
            r = session.send(msg, streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
        except GenerationError as e:
            print(f"\nerror: {_one_line(e)}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # Ctrl-C just outside the reply's generation: the reply is over anyway
            session.cache = None
            print("\n[interrupted]", file=sys.stderr)
            continue
        if r.interrupted:
            print("\n[interrupted]", file=sys.stderr)
        note = " (oldest turns dropped to fit the context)" if r.truncated_history else ""
        print(f"[{r.prefilled} tokens read, {r.cached} from the cache{note}; {r.new_tokens} new tokens; "
              f"time to first token {r.time_to_first_token:.3f} s; {r.tokens_per_second:.2f} tokens/s after it]",
              file=sys.stderr)


# ============================================================================ info


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info", help="config summary, layer types, parameter count, memory per weight format",
        description="Describe a model (directory or GGUF file) without loading its weights: the checkpoint's "
                    "headers are checked (a truncated or incomplete checkpoint is an error, exit status 2), and "
                    "the last line says what the native backend runs here (SIMD path, OpenMP, threads).",
        epilog="examples:\n  gemma2np info\n  gemma2np info --model ~/gemma-2-2b --json\n"
               "  gemma2np info --model ~/models/gemma-2-2b-it-Q8_0.gguf",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p, runtime=False)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=run_info)
    return p


def _weight_bytes(cfg) -> dict[str, int]:
    """Bytes the causal-LM weights take in each in-memory format. Matrices: 4 (float32) / 2 (bfloat16) /
    1 + 4/32 (int8: one float32 scale per 32 inputs of a row, the native backend's layout) bytes per weight;
    vectors (norms, biases) stay float32 in every format."""
    shapes = dict(cfg.parameter_shapes())
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    mats = [s for s in shapes.values() if len(s) == 2]
    vec = sum(math.prod(s) for s in shapes.values() if len(s) != 2)
    n_mat = sum(math.prod(s) for s in mats)
    int8 = sum(r * c + r * math.ceil(c / 32) * 4 for r, c in mats)
    # int4: 4.5 bits per weight (kernels/int4.py); the embedding / LM head (kept int8, like the head of
    # every int4 model) and a matrix whose in_features is not a multiple of 256 count as int8
    int4 = sum(r * c + r * math.ceil(c / 32) * 4 if (c % 256 or n.endswith(("embed_tokens.weight", "lm_head.weight")))
               else r * c * 9 // 16 for n, (r, c) in ((n, s) for n, s in shapes.items() if len(s) == 2))
    return {"float32": 4 * n_mat + 4 * vec, "bfloat16": 2 * n_mat + 4 * vec, "int8": int8 + 4 * vec,
            "int4": int4 + 4 * vec}


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return str(n)


def _runs(types: list[str]) -> str:
    """['sliding', 'full', 'sliding', 'full'] -> '(sliding, full) x 2'; otherwise a compact list."""
    short = ["sliding" if t == "sliding_attention" else "full" for t in types]
    for period in (1, 2):
        if len(short) % period == 0 and short == short[:period] * (len(short) // period):
            return f"({', '.join(short[:period])}) x {len(short) // period}"
    return ", ".join(short)


def _checkpoint_summary(src: ModelSource, cfg) -> tuple[list[str], int, dict[str, int]]:
    """(weight files, bytes on disk, {tensor dtype/type: count}) of the checkpoint, after checking that it is
    whole: every file's tensors lie inside it (a truncated download is refused) and every tensor the config
    needs is there with its shape. Only headers are read (safetensors are memory-mapped, not paged in)."""
    from collections import Counter

    from .checkpoint import CheckpointError, check_state_dict, checkpoint_files, load_state_dict

    expected = dict(cfg.parameter_shapes())
    if not cfg.tie_word_embeddings:
        expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    if src.gguf_file is not None:
        return [os.path.basename(src.gguf_file)], os.path.getsize(src.gguf_file), _gguf_types(src.gguf_file)
    try:
        files = checkpoint_files(src.directory)
        state = load_state_dict(src.directory, mmap=True)
        if state and not any(k.startswith("model.") for k in state):  # a base-model checkpoint
            state = {"model." + k: v for k, v in state.items()}
        missing, _ = check_state_dict(state, expected)
    except CheckpointError as e:
        raise UserError(f"the checkpoint in {src.directory} is damaged or incomplete: {_one_line(e)}") from None
    if missing:
        raise UserError(f"the checkpoint in {src.directory} is incomplete: {len(missing)} tensor(s) the config "
                        f"needs are missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
    types = Counter(str(v.dtype) for v in state.values())
    return [os.path.relpath(f, src.directory) for f in files], sum(os.path.getsize(f) for f in files), dict(types)


def _gguf_types(path: str) -> dict[str, int]:
    """{GGML tensor type: count} of a GGUF file, refusing one whose tensors run past its end."""
    from collections import Counter

    try:
        import gguf

        reader = gguf.GGUFReader(path, "r")
        size = os.path.getsize(path)
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name} runs past the end of the file (truncated)")
        return dict(Counter(t.tensor_type.name for t in reader.tensors))
    except Exception as e:  # the gguf reader raises ValueError / IndexError / struct errors on bad input
        raise UserError(f"{path} is damaged or incomplete: {_one_line(e)}") from None


def _gguf_native_bytes(path: str) -> int:
    """Bytes of the weights the native backend holds for a GGUF (kernels/gguf_repack.py: Q4_0 / Q4_K at the
    file's 4.5 bits, Q8_0 / Q6_K as int8, other types bf16; vectors float32). The embedding is read by row
    from the file's map; its bytes count once, as the (tied) LM head the backend repacks."""
    import gguf

    from .kernels.gguf_repack import native_nbytes

    total = 0
    for t in gguf.GGUFReader(path, "r").tensors:  # the file was checked by _checkpoint_summary
        dims = [int(d) for d in t.shape]
        if len(dims) == 2:
            total += native_nbytes(t.tensor_type.name, dims[1], dims[0])
        else:
            total += 4 * math.prod(dims)
    return total


def run_info(args) -> int:
    src = _model_source(args)
    path = src.directory
    cfg = _load_config(src)
    n = cfg.num_parameters("causal_lm")
    files, on_disk, types = _checkpoint_summary(src, cfg)
    wb = _weight_bytes(cfg)
    if src.gguf_file is not None:  # what the native backend holds for this file's own formats
        wb = {"gguf native": _gguf_native_bytes(src.gguf_file), **wb}
    gen_path = os.path.join(path, "generation_config.json")
    info = {
        "model": src.label,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "sliding_window": cfg.sliding_window,
        "attn_logit_softcapping": cfg.attn_logit_softcapping, "final_logit_softcapping": cfg.final_logit_softcapping,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "hidden_activation": cfg.hidden_activation,
        "rope_parameters": cfg.rope_parameters, "tie_word_embeddings": cfg.tie_word_embeddings,
        "layer_types": list(cfg.layer_types), "parameters": n, "weight_bytes": wb,
        "checkpoint_files": files, "checkpoint_bytes": on_disk, "checkpoint_tensor_types": types,
        "tokenizer": os.path.isfile(os.path.join(path, "tokenizer.model")),
        "eos_token_id": cfg.eos_token_id,
        "system": system_info(),
    }
    if os.path.isfile(gen_path):
        try:
            info["generation_config"] = read_json_file(gen_path, UserError)
        except UserError as e:
            raise UserError(f"cannot read {gen_path}: {_one_line(e)}") from None
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    gqa = cfg.num_attention_heads // cfg.num_key_value_heads
    print(f"model            {path}")
    print(f"parameters       {n:,} ({n / 1e6:.2f} M)")
    print(f"shape            hidden {cfg.hidden_size}, intermediate {cfg.intermediate_size}, "
          f"{cfg.num_hidden_layers} layers, vocab {cfg.vocab_size}")
    print(f"attention        {cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} kv heads "
          f"(GQA {gqa}:1), head_dim {cfg.head_dim}, scale query_pre_attn_scalar={cfg.query_pre_attn_scalar}")
    print(f"layer types      {_runs(list(cfg.layer_types))}; sliding window {cfg.sliding_window}")
    print(f"context          {cfg.max_position_embeddings} tokens; rope {cfg.rope_parameters}")
    print(f"softcaps         attention {cfg.attn_logit_softcapping}, final {cfg.final_logit_softcapping}")
    print(f"activation       {cfg.hidden_activation}; tied embeddings {cfg.tie_word_embeddings}")
    print("weights need     " + ", ".join(f"{k} {_human(v)}" for k, v in wb.items()))
    print(f"checkpoint       {', '.join(files)} ({_human(on_disk)} on disk; "
          + ", ".join(f"{k} x {v}" for k, v in sorted(types.items())) + " tensors)")
    print(f"tokenizer        {'tokenizer.model present' if info['tokenizer'] else 'none in this directory'}")
    eos = info.get("generation_config", {}).get("eos_token_id", cfg.eos_token_id)
    print(f"stops on         eos_token_id {eos}")
    print(f"runs on          {info['system']}")
    return 0


# ============================================================================ the parser


DESCRIPTION = """\
gemma2np: Google's Gemma 2 in NumPy. Run a model, chat with it, or inspect a checkpoint.
Without --model, the small bundled Shakespeare model is used.
"""

EPILOG = """\
examples:
  gemma2np generate --prompt "ROMEO:" --max-new-tokens 60
  gemma2np chat
  gemma2np info --model path/to/gemma-2-2b

Run `gemma2np COMMAND --help` for the options of each command.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gemma2np", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"gemma2np {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_generate_parser(sub)
    add_chat_parser(sub)
    add_info_parser(sub)
    for module, func in _OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        register = getattr(mod, func, None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    from .parallel.launch import cli_session

    try:
        with cli_session(args):  # under mpiexec: tensor-parallel, only rank 0 prints (one process: nothing)
            return int(args.func(args) or 0)
    except UserError as e:
        print(f"gemma2np {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: leaving a chat is normal (0); interrupting anything else is 130
        print(file=sys.stderr)
        return 0 if args.command == "chat" else 130
    except BrokenPipeError:  # e.g. `gemma2np generate ... | head`
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 0


if __name__ == "__main__":
    sys.exit(main())
