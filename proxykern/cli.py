"""The ``proxykern`` console script.

``proxykern generate --base B --expert E --anti-expert A --prompt TEXT [...]``
loads three HF causal LMs (local folders or hub names) and the base's
tokenizer, runs :func:`proxykern.fused_proxy_generate` and streams the new
text to stdout. ``--chat-expert`` gives the expert its own prompt: the expert
tokenizer's chat template applied to TEXT as one user turn (with the
generation prompt); the expert's EOS ids then also stop generation.

``proxykern bench [...]`` runs :func:`proxykern.bench.main` and ``proxykern demo [...]``
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
    gen.add_argument("--prompt", required=True, help="prompt text")
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

    def model(path):
        if path not in loaded:
            loaded[path] = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
        return loaded[path]

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    expert_tokenizer = AutoTokenizer.from_pretrained(args.expert) if args.chat_expert else None
    return (model(args.base), model(args.expert), model(args.anti_expert), tokenizer,
            expert_tokenizer)


def _eos_ids(*models) -> list:
    ids = []
    for m in models:
        eos = getattr(getattr(m, "generation_config", None), "eos_token_id", None)
        for e in ([eos] if isinstance(eos, int) else list(eos or [])):
            if e not in ids:
                ids.append(e)
    return ids


def generate_main(args) -> int:
    from transformers import TextStreamer

    from .generate import fused_proxy_generate

    base, expert, anti, tokenizer, expert_tokenizer = _load(args)
    device = base.device
    enc = tokenizer(args.prompt, return_tensors="pt")
    expert_ids = expert_mask = None
    eos = _eos_ids(base)
    if args.chat_expert:
        if not getattr(expert_tokenizer, "chat_template", None):
            raise ValueError(f"--chat-expert: the tokenizer of {args.expert!r} has no "
                             f"chat template")
        text = expert_tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
        e_enc = expert_tokenizer(text, return_tensors="pt", add_special_tokens=False)
        expert_ids, expert_mask = e_enc["input_ids"].to(device), e_enc["attention_mask"].to(device)
        eos = _eos_ids(base, expert)  # a chat expert ends its turn with its own EOS
    pad = base.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    fused_proxy_generate(
        base, expert, anti, enc["input_ids"].to(device), enc["attention_mask"].to(device),
        max_new_tokens=args.max_new_tokens, alpha=args.alpha, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
        eos_token_id=eos or None, pad_token_id=pad, expert_input_ids=expert_ids,
        expert_attention_mask=expert_mask, streamer=streamer, backend=args.backend)
    return 0


def main(argv=None) -> int:
    """Entry point of the ``proxykern`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] == "bench":
        from . import bench  # benchmark code loads only when asked for
        return bench.main(argv[1:]) or 0
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
