"""The `gale` command line: generate, chat, info (heavier commands import their modules lazily)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator

HELP_MODEL = "a Mistral folder (params.json), a Hugging Face folder (config.json) or a .gguf file; default: SmolLM2"


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None, help=HELP_MODEL)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--context-len", type=int, default=None,
                   help="stop sequences at this many tokens (default: the model's context)")
    p.add_argument("--lora", default=None, metavar="PATH", help="a LoRA adapter folder (from gale finetune) to apply")
    p.add_argument("--prefix-cache", type=int, default=2048, metavar="TOKENS",
                   help="positions of keys/values kept for prompts that begin alike (0 = off)")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", "-t", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
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
               prefix_cache_tokens=a.prefix_cache)
    if a.lora:  # merged in place: inference runs at the base model's speed
        from .lora import load_adapter

        load_adapter(a.lora, llm.model, merge=True)
    return llm


def _print_stream(pieces: Iterator[str]) -> None:
    for piece in pieces:
        print(piece, end="", flush=True)
    print()


def cmd_generate(a: argparse.Namespace) -> None:
    if not a.prompt:
        raise ValueError("prompt is empty")
    sampling = _sampling(a)
    _print_stream(_load(a).stream(a.prompt, **sampling))


def _conversation(system: str | None) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}] if system else []


def cmd_chat(a: argparse.Namespace) -> None:
    sampling = _sampling(a)
    llm = _load(a)
    history = _conversation(a.system)
    if a.message is not None and a.moderate is not None:
        from .safety import moderated_chat

        text, _ = moderated_chat(llm, history + [{"role": "user", "content": a.message}], safe=a.safe,
                                    threshold=a.moderate, **sampling)
        print(text)
        return
    if a.message is not None:  # one question, one answer
        _print_stream(llm.stream(history + [{"role": "user", "content": a.message}], safe=a.safe, **sampling))
        return
    print("gale chat: /reset clears the conversation, /system TEXT sets the system prompt, /exit quits.",
          file=sys.stderr)
    system = a.system
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line.startswith("/system"):
            system = line.removeprefix("/system").strip() or None
        if line == "/reset" or line.startswith("/system"):
            history = _conversation(system)
            print("(conversation cleared)", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        answer = []
        for piece in llm.stream(history, safe=a.safe, **sampling):
            answer.append(piece)
            print(piece, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(answer)})


def cmd_info(a: argparse.Namespace) -> None:
    from .tokenizer import load_tokenizer
    from .weights import describe_checkpoint, open_checkpoint

    ckpt = open_checkpoint(a.model)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gale", description="Run Mistral-7B-class models.")
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
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
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
    for flag, kind in (("rank", int), ("alpha", float), ("dropout", float), ("lr", float), ("weight-decay", float),
                       ("warmup-steps", int), ("min-lr-ratio", float), ("epochs", float), ("steps", int),
                       ("seq-len", int), ("grad-accum", int), ("max-grad-norm", float), ("eval-every", int),
                       ("save-every", int), ("seed", int)):
        p.add_argument(f"--{flag}", type=kind, default=None)
    p.add_argument("--targets", nargs="+", default=None, help="LoRA layers among wq wk wv wo w1 w2 w3 (default all)")
    p.add_argument("--schedule", default=None, choices=("cosine", "linear"))
    p.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false", default=None)
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

    p = sub.add_parser("info", help="describe a checkpoint without loading it")
    p.add_argument("model", nargs="?", default=None, help=HELP_MODEL)
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    if a.command == "info" and a.model is None:
        from .llm import default_model_path

        a.model = default_model_path()
    try:
        a.func(a)
    except (ValueError, FileNotFoundError) as e:
        print(f"gale: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
