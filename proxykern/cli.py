"""The ``proxykern`` console script.

``proxykern generate --base B --expert E --anti-expert A --prompt TEXT [...]``
loads three HF causal LMs (local folders or hub names) and the base's
tokenizer, runs :func:`proxykern.fused_proxy_generate` and streams the new
text to stdout as it is generated (with ``--num-return-sequences n > 1`` the n
samples are printed one after another). ``--chat-expert`` gives the expert its
own prompt: the expert tokenizer's chat template applied to TEXT as one user
turn (with the generation prompt); the expert's EOS ids then also stop generation.

``proxykern generate ... --input prompts.jsonl --output results.jsonl`` is the
file mode (:mod:`proxykern.jsonl_generate` documents the line format).
Errors (bad arguments, a bad input line, a model that cannot load) print
``proxykern: error: ...`` and exit with status 1.

``proxykern bench [kernel|generate] [...]`` runs :mod:`proxykern.bench` or
:mod:`proxykern.bench_generate`, and ``proxykern demo [...]``
:func:`proxykern.demo.main` with the remaining arguments (imported only then).
"""
from __future__ import annotations

import argparse
import sys

DTYPES = ("auto", "float32", "bfloat16", "float16")
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="proxykern", description="Fast proxy tuning "
                                     "(Liu et al. 2024): base + alpha * (expert - anti-expert).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench,demo}")

    gen = sub.add_parser("generate", help="proxy-tuned generation, streamed to stdout")
    gen.add_argument("--base", required=True, help="base model (folder or hub name)")
    gen.add_argument("--expert", required=True, help="tuned expert model")
    gen.add_argument("--anti-expert", required=True, help="untuned anti-expert model")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt; its text is streamed to stdout")
    src.add_argument("--input", metavar="PROMPTS.jsonl",
                     help="a JSON-lines file of prompts (file mode; needs --output)")
    gen.add_argument("--output", metavar="RESULTS.jsonl",
                     help="file mode: where the input lines go, each with its completion")
    gen.add_argument("--batch-size", type=int, default=8,
                     help="file mode: prompts per generation call (sorted by length)")
    gen.add_argument("--skip-bad-lines", action="store_true",
                     help="file mode: report malformed lines on stderr and go on")
    gen.add_argument("--logprobs", action="store_true",
                     help="file mode: add the log-probability of every new token")
    gen.add_argument("--num-draft-tokens", type=int, default=0,
                     help="speculative proxy decoding: the expert drafts up to K tokens a "
                          "round (same output as 0, fewer base forwards)")
    gen.add_argument("--num-return-sequences", type=int, default=1,
                     help="samples per prompt (use a temperature > 0 for distinct ones)")
    gen.add_argument("--chat-expert", action="store_true",
                     help="give the expert the prompt in its tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--alpha", type=float, default=1.0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto",
                     help="'auto' (cuda if available), cpu, cuda:0, ...")
    gen.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="'auto': bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--backend", choices=BACKENDS, default="auto", help="the fused op's backend")

    sub.add_parser("bench", add_help=False,
                   help="kernel and generation benchmarks against the naive baseline "
                        "(arguments go to proxykern.bench)")
    sub.add_parser("demo", add_help=False,
                   help="the shipped trio's answers side by side, and tokens/s (proxykern.demo)")
    return parser


def _load(args):
    """(base, expert, anti_expert, tokenizer, expert_tokenizer); equal paths share one model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(args.device if args.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    dtype = (getattr(torch, args.dtype) if args.dtype != "auto"
             else torch.bfloat16 if device.type == "cuda" else torch.float32)
    loaded = {}

    def loads(flag, path, load):  # name the flag and the path of what does not load
        try:
            return load(path)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{flag} {path!r} does not load: {exc}") from None

    def model(flag, path):
        if path not in loaded:
            loaded[path] = loads(flag, path, lambda p: AutoModelForCausalLM.from_pretrained(
                p, dtype=dtype).to(device).eval())
        return loaded[path]

    tokenizer = loads("--base", args.base, AutoTokenizer.from_pretrained)
    expert_tokenizer = (loads("--expert", args.expert, AutoTokenizer.from_pretrained)
                        if args.chat_expert else None)
    return (model("--base", args.base), model("--expert", args.expert),
            model("--anti-expert", args.anti_expert), tokenizer, expert_tokenizer)


def _eos_ids(*models) -> list:
    ids = []
    for m in models:
        eos = getattr(getattr(m, "generation_config", None), "eos_token_id", None)
        for e in ([eos] if isinstance(eos, int) else list(eos or [])):
            if e not in ids:
                ids.append(e)
    return ids


def _expert_encoder(args, tokenizer, expert_tokenizer):
    """prompt record -> the expert's token ids (its own prompt or the chat template), or
    None when the expert reads the base prompt."""
    if args.chat_expert and not getattr(expert_tokenizer, "chat_template", None):
        raise ValueError(f"--chat-expert: the tokenizer of {args.expert!r} has no chat template")

    def encode(record: dict) -> list | None:
        if "expert_prompt" in record:
            return (expert_tokenizer or tokenizer)(record["expert_prompt"])["input_ids"]
        if not args.chat_expert:
            return None  # the expert reads the base prompt
        text = expert_tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], tokenize=False,
            add_generation_prompt=True)
        return expert_tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode


def generate_main(args) -> int:
    from transformers import TextStreamer

    from .generate import fused_proxy_generate
    from .jsonl_generate import generate_file
    from .runner import left_pad

    if (args.input is None) != (args.output is None):
        raise ValueError("--input and --output go together (file mode)")
    base, expert, anti, tokenizer, expert_tokenizer = _load(args)
    device = base.device
    encode_expert = _expert_encoder(args, tokenizer, expert_tokenizer)
    # A chat expert ends its turn with its own EOS.
    eos = _eos_ids(base, expert) if args.chat_expert else _eos_ids(base)
    pad = base.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    if args.input is not None:
        generate_file(args, (base, expert, anti), tokenizer, encode_expert, eos, pad, device)
        return 0

    n = args.num_return_sequences
    record = {"prompt": args.prompt}
    ids, mask = left_pad([tokenizer(args.prompt)["input_ids"]], pad)
    e_row = encode_expert(record)
    e_ids, e_mask = left_pad([e_row], pad) if e_row is not None else (None, None)
    # One sequence streams as it is generated; n > 1 are printed one after another.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if n == 1 else None
    out = fused_proxy_generate(
        base, expert, anti, ids.to(device), mask.to(device),
        max_new_tokens=args.max_new_tokens, alpha=args.alpha, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        eos_token_id=eos or None, pad_token_id=pad,
        expert_input_ids=e_ids.to(device) if e_ids is not None else None,
        expert_attention_mask=e_mask.to(device) if e_mask is not None else None,
        streamer=streamer, backend=args.backend,
        num_return_sequences=n, num_draft_tokens=args.num_draft_tokens)
    if streamer is None:
        for j in range(n):
            text = tokenizer.decode(out.tokens[j, :int(out.lengths[j])].tolist(),
                                    skip_special_tokens=True)
            print(f"--- sequence {j + 1} of {n} ---\n{text}", flush=True)
    return 0


BENCH_USAGE = """usage: proxykern bench {kernel,generate} [options]

  kernel     the fused op against the naive sampling step (the default)
  generate   naive_proxy_generate against the engine, eager and CUDA graphs

'proxykern bench kernel --help' and 'proxykern bench generate --help' list the options.
"""


def _bench(argv: list) -> int:
    if argv[:1] == ["generate"]:
        from . import bench_generate
        return bench_generate.main(argv[1:]) or 0
    if argv[:1] in (["-h"], ["--help"]):
        print(BENCH_USAGE, end="")
        return 0
    from . import bench
    return bench.main(argv) or 0


def main(argv=None) -> int:
    """Entry point of the ``proxykern`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] == "bench":  # benchmark code loads only when asked for
        return _bench(argv[1:])
    if argv and argv[0] == "demo":
        from . import demo
        return demo.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        return generate_main(args)
    except (ValueError, OSError) as exc:  # bad arguments, models that cannot load
        parser.exit(1, f"proxykern: error: {exc}\n")


if __name__ == "__main__":
    sys.exit(main())
