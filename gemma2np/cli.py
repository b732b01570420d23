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
import warnings

DEFAULT_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "gemma2-shakespeare")

# (module, function) pairs that register further subcommands when the module is present
_OPTIONAL_COMMANDS = [
    ("gemma2np.compare", "add_compare_parser"),
    ("gemma2np.convert", "add_convert_parser"),
    ("gemma2np.bench", "add_bench_parser"),
]


class UserError(Exception):
    """A mistake of the user's (bad path, bad value, prompt too long): reported in one line, exit status 2."""


# ============================================================================ shared helpers


def _add_model_args(p: argparse.ArgumentParser, *, runtime: bool = True) -> None:
    p.add_argument("--model", metavar="DIR", default=None,
                   help="Hugging Face-format model directory: config.json + model.safetensors (+ tokenizer.model). "
                        "Default: the bundled Shakespeare model")
    if not runtime:
        return
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="directory holding tokenizer.model (default: the model directory)")
    p.add_argument("--backend", choices=("numpy", "native"), default="numpy",
                   help="numpy: the readable reference (default); native: the C/OpenMP kernels (faster)")
    p.add_argument("--weights", choices=("float32", "bfloat16", "int8"), default=None,
                   help="in-memory weight format of the native backend (default: as the checkpoint)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads of the native backend")


def _add_sampling_args(p: argparse.ArgumentParser, default_new: int) -> None:
    g = p.add_argument_group("decoding (greedy unless --do-sample or a sampling option is given)")
    g.add_argument("--max-new-tokens", type=int, default=default_new, metavar="N",
                   help=f"generate at most N tokens (default {default_new})")
    g.add_argument("--do-sample", action="store_true", help="sample instead of taking the most likely token")
    g.add_argument("--temperature", type=float, default=None,
                   help="> 0; lower is more conservative (implies --do-sample; 0 means greedy)")
    g.add_argument("--top-k", type=int, default=None, help="sample among the K most likely tokens (implies --do-sample; "
                   "default 50, 0 disables)")
    g.add_argument("--top-p", type=float, default=None,
                   help="nucleus sampling, in (0, 1] (implies --do-sample; default 1.0 = off)")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="> 0; above 1 discourages repeating tokens (default 1.0 = off)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same sample")


def _model_dir(args) -> str:
    path = args.model or DEFAULT_MODEL_DIR
    if not os.path.isdir(path):
        if args.model is None:
            raise UserError(f"the bundled model is not installed at {path}; pass --model DIR")
        raise UserError(f"model directory not found: {path}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        if args.model is None:
            raise UserError(f"the bundled model at {path} is incomplete (no config.json); pass --model DIR")
        raise UserError(f"{path} is not a model directory (no config.json)")
    return path


def _load_config(path: str):
    from .config import Gemma2Config

    try:
        return Gemma2Config.from_pretrained(path)
    except (ValueError, OSError) as e:  # ConfigError is a ValueError
        raise UserError(f"cannot read the config of {path}: {_one_line(e)}") from None


def _load_model(args, path: str):
    from .modeling import Gemma2ForCausalLM

    bar = _ProgressBar("loading") if sys.stderr.isatty() else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = Gemma2ForCausalLM.from_pretrained(
                path, backend=args.backend, weights=args.weights, n_threads=args.threads, progress=bar,
            )
    except (ValueError, OSError, KeyError, ImportError) as e:  # CheckpointError/ConfigError are ValueErrors
        raise UserError(f"cannot load the model from {path}: {_one_line(e)}") from None
    finally:
        if bar is not None:
            bar.close()
    return model


def _load_tokenizer(args, model_dir: str):
    from .tokenizer import GemmaTokenizer

    path = args.tokenizer or model_dir
    try:
        return GemmaTokenizer.from_pretrained(path)
    except (ValueError, OSError) as e:  # TokenizerError is a ValueError
        raise UserError(f"cannot load the tokenizer from {path}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


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


def _sampling_kwargs(args) -> dict:
    """generate() keyword arguments from the decoding options, checked before anything runs."""
    from .generation import GenerationConfig, _validate

    if args.max_new_tokens is None or args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    do_sample = args.do_sample or any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    if args.temperature == 0:  # the common convention: temperature 0 = greedy
        do_sample = False
    kw = dict(max_new_tokens=args.max_new_tokens, do_sample=do_sample, repetition_penalty=args.repetition_penalty)
    if do_sample:
        kw.update(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    try:
        _validate(GenerationConfig(**{k: v for k, v in kw.items() if v is not None}))
    except ValueError as e:
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

The continuation is streamed to stdout as it is produced; timing (time to first token,
tokens/s) goes to stderr.
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
    streamer = _TimedStreamer(TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    model.generate(ids, attention_mask=np.ones_like(ids), eos_token_id=_eos_ids(model, tok, args.chat) or [],
                   streamer=streamer, **kw)
    print(streamer.report(ids.shape[1]), file=sys.stderr)
    return 0


# ============================================================================ chat


CHAT_EPILOG = """\
In the session: type a message and press Enter. Commands:
  /reset   forget the conversation so far
  /exit    leave (Ctrl-D and Ctrl-C leave too)

examples:
  gemma2np chat
  gemma2np chat --do-sample --temperature 0.7 --max-new-tokens 200
"""


def add_chat_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "chat", help="interactive multi-turn chat with the chat template",
        description="Talk to the model. The whole conversation is kept and re-sent each turn with Gemma 2's "
                    "chat template; the oldest turns are dropped when it outgrows the context.",
        epilog=CHAT_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    _add_sampling_args(p, default_new=200)
    p.set_defaults(func=run_chat)
    return p


def run_chat(args) -> int:
    import numpy as np

    from .generation import TextStreamer

    kw = _sampling_kwargs(args)
    model_dir = _model_dir(args)
    tok = _load_tokenizer(args, model_dir)
    model = _load_model(args, model_dir)
    eos = _eos_ids(model, tok, chat=True)
    context = model.config.max_position_embeddings
    interactive = sys.stdin.isatty()
    history: list[dict] = []
    print("chat with the model; /reset clears the conversation, /exit or Ctrl-D leaves", file=sys.stderr)
    try:
        while True:
            try:
                line = input("you> " if interactive else "")
            except EOFError:
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
                history.clear()
                print("(conversation cleared)", file=sys.stderr)
                continue
            turn = history + [{"role": "user", "content": msg}]
            try:
                while True:  # drop the oldest exchanges until the prompt fits
                    ids = tok.apply_chat_template(turn, add_generation_prompt=True, return_dict=False)
                    if len(ids) < context or len(turn) == 1:
                        break
                    turn = turn[2:]
            except ValueError as e:
                print(f"error: {_one_line(e)}", file=sys.stderr)
                continue
            if len(ids) >= context:
                print(f"error: that message is {len(ids)} tokens; the context is {context}", file=sys.stderr)
                continue
            ids = np.asarray([ids], dtype=np.int64)
            new = min(kw["max_new_tokens"], context - ids.shape[1])
            sys.stdout.write("model> ")
            sys.stdout.flush()
            out = model.generate(ids, attention_mask=np.ones_like(ids), eos_token_id=eos or [],
                                 streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True),
                                 **{**kw, "max_new_tokens": new})
            reply = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            history = turn + [{"role": "assistant", "content": reply}]
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 0


# ============================================================================ info


def add_info_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "info", help="config summary, layer types, parameter count, memory per weight format",
        description="Describe a model directory without loading its weights.",
        epilog="examples:\n  gemma2np info\n  gemma2np info --model ~/gemma-2-2b --json",
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
    return {"float32": 4 * n_mat + 4 * vec, "bfloat16": 2 * n_mat + 4 * vec, "int8": int8 + 4 * vec}


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


def run_info(args) -> int:
    path = _model_dir(args)
    cfg = _load_config(path)
    n = cfg.num_parameters("causal_lm")
    files = [f for f in sorted(os.listdir(path)) if f.endswith((".safetensors", ".gguf"))]
    on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    wb = _weight_bytes(cfg)
    gen_path = os.path.join(path, "generation_config.json")
    info = {
        "model": path,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings, "sliding_window": cfg.sliding_window,
        "attn_logit_softcapping": cfg.attn_logit_softcapping, "final_logit_softcapping": cfg.final_logit_softcapping,
        "query_pre_attn_scalar": cfg.query_pre_attn_scalar, "hidden_activation": cfg.hidden_activation,
        "rope_parameters": cfg.rope_parameters, "tie_word_embeddings": cfg.tie_word_embeddings,
        "layer_types": list(cfg.layer_types), "parameters": n, "weight_bytes": wb,
        "checkpoint_files": files, "checkpoint_bytes": on_disk,
        "tokenizer": os.path.isfile(os.path.join(path, "tokenizer.model")),
        "eos_token_id": cfg.eos_token_id,
    }
    if os.path.isfile(gen_path):
        try:
            with open(gen_path, encoding="utf-8") as f:
                info["generation_config"] = json.load(f)
        except (OSError, ValueError) as e:
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
    print(f"checkpoint       {', '.join(files) or '(no weight files)'} ({_human(on_disk)} on disk)")
    print(f"tokenizer        {'tokenizer.model present' if info['tokenizer'] else 'none in this directory'}")
    eos = info.get("generation_config", {}).get("eos_token_id", cfg.eos_token_id)
    print(f"stops on         eos_token_id {eos}")
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
    try:
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
