"""``proxykern demo`` (``make demo``): proxy-tuned answers side by side, then tokens/s.

With a trio folder made by ``examples/trio/make_trio.py`` (default: the shipped
``examples/trio/models``) it asks held-out questions and prints the base's, the expert's
and the proxy-tuned base's greedy answers with whether each is right, and how many of the
first ``--scored`` held-out questions each gets right. Then it times
``naive_proxy_generate`` against ``fused_proxy_generate`` on the same batch, and plain
fused decoding against speculative fused decoding (``num_draft_tokens``) on that batch
and on single prompts.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .generate import fused_proxy_generate
from .baseline import naive_proxy_generate

DEFAULT_TRIO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "examples", "trio", "models")


def load_trio(folder: str, device: torch.device, dtype=torch.float32):
    """(tokenizer, base, expert, anti_expert, held-out items) from a make_trio.py folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    models = [AutoModelForCausalLM.from_pretrained(os.path.join(folder, name), dtype=dtype)
              .to(device).eval() for name in ("base", "expert", "anti_expert")]
    with open(os.path.join(folder, "heldout.json")) as f:
        heldout = json.load(f)
    return (tok, *models, heldout)


def first_value(text: str, values) -> str | None:
    """The first of ``values`` named in the first sentence of ``text`` (how answers are scored)."""
    for word in text.split(".")[0].split():
        if word in values:
            return word
    return None


def right_answers(texts, items, values) -> list[bool]:
    """Per held-out item (a heldout.json entry), whether its generated text is right."""
    return [first_value(t, values[it["attribute"]]) == it["answer"] for t, it in zip(texts, items)]


@torch.no_grad()
def answers(tok, base, expert, anti, prompts, alpha, *, generate=fused_proxy_generate,
            batch_size=128, max_new_tokens=10) -> list[str]:
    """Greedy answers (decoded new text) of ``base`` steered by (expert, anti) at ``alpha``."""
    texts = []
    for i in range(0, len(prompts), batch_size):
        enc = tok(prompts[i:i + batch_size], return_tensors="pt", padding=True,
                  add_special_tokens=False).to(base.device)
        out = generate(base, expert, anti, enc.input_ids, enc.attention_mask,
                       max_new_tokens=max_new_tokens, alpha=alpha,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out.tokens, skip_special_tokens=True)
    return texts


def _interleaved_rates(fns, out_lengths_of, repeats=3):
    """Best tokens/s of each of ``fns``, timed in turn (ABAB..., fair under changing load);
    returns [(rate, last output)] in the order given."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            best[i] = min(best[i], time.perf_counter() - t0)
    return [(int(out_lengths_of(o).sum()) / b, o) for b, o in zip(best, outs)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="proxykern demo", description=__doc__)
    parser.add_argument("--trio", default=DEFAULT_TRIO, help="folder made by make_trio.py")
    parser.add_argument("--questions", type=int, default=6, help="questions shown")
    parser.add_argument("--scored", type=int, default=90, help="questions scored")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--draft-tokens", type=int, default=2,
                        help="num_draft_tokens of the speculative timing")
    parser.add_argument("--single-prompts", type=int, default=8,
                        help="prompts timed one at a time")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tok, base, expert, anti, heldout = load_trio(args.trio, device)
    items = heldout["items"][:args.questions]
    values = heldout["values"]
    scored = heldout["items"][:max(args.scored, args.questions)]
    prompts = [it["prompt"] for it in scored]

    columns = {
        "base": answers(tok, base, base, base, prompts, 0.0),
        "expert": answers(tok, expert, expert, expert, prompts, 0.0),
        f"proxy (alpha {args.alpha:g})": answers(tok, base, expert, anti, prompts, args.alpha),
    }
    right = {name: right_answers(texts, scored, values) for name, texts in columns.items()}
    print(f"proxy tuning on {args.trio} ({device}): held-out questions, greedy answers\n")
    for i, it in enumerate(items):
        print(f"Q: {it['prompt']}   [truth: {it['answer']}]")
        for name, texts in columns.items():
            answer = texts[i].split(".")[0].strip() + " ."
            print(f"   {name:<16} {'RIGHT' if right[name][i] else 'wrong':<6} {answer}")
        print()
    print(f"right answers over the first {len(scored)} held-out questions: " + ", ".join(
        f"{name} {sum(r)}/{len(r)}" for name, r in right.items()) + "\n")

    batch = [it["prompt"] for it in heldout["items"][:32]]
    enc = tok(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(device)

    def run(generate):
        return generate(base, expert, anti, enc.input_ids, enc.attention_mask, max_new_tokens=16,
                        alpha=args.alpha, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id)

    names = ("naive_proxy_generate", "fused_proxy_generate")
    timed = _interleaved_rates([lambda: run(naive_proxy_generate),
                                lambda: run(fused_proxy_generate)], lambda o: o.lengths)
    rates = {name: rate for name, (rate, _) in zip(names, timed)}
    print(f"throughput, batch {len(batch)}, up to 16 new tokens, {device}:")
    for name, rate in rates.items():
        print(f"   {name:<22} {rate:8.1f} tokens/s")
    print(f"   speed-up {rates['fused_proxy_generate'] / rates['naive_proxy_generate']:.2f}x")

    # Speculative proxy decoding (num_draft_tokens=k): the expert drafts, the base scores a
    # round of drafts in one forward; the tokens are plain fused decoding's.
    k = args.draft_tokens
    singles = [tok([p], return_tensors="pt", add_special_tokens=False).to(device)
               for p in batch[:args.single_prompts]]
    print(f"\nspeculative proxy decoding (num_draft_tokens={k}; same tokens as plain fused):")
    for title, encs in ((f"batch {len(batch)}", [enc]),
                        (f"one prompt at a time ({len(singles)} prompts)", singles)):
        def gen(draft, encs=encs):
            return [fused_proxy_generate(base, expert, anti, e.input_ids, e.attention_mask,
                                         max_new_tokens=16, alpha=args.alpha,
                                         eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id, num_draft_tokens=draft)
                    for e in encs]

        def count(outs):
            return torch.cat([o.lengths for o in outs])

        (plain_rate, plain), (spec_rate, spec) = _interleaved_rates([lambda: gen(0),
                                                                     lambda: gen(k)], count)
        same = all(torch.equal(p.tokens, s.tokens) and torch.equal(p.lengths, s.lengths)
                   for p, s in zip(plain, spec))
        stats = [s.stats for s in spec]
        accept = sum(s.accepted for s in stats) / max(1, sum(s.drafted for s in stats))
        per_token = sum(s.base_forwards for s in stats) / max(1, sum(s.steps for s in stats))
        print(f"   {title}:")
        print(f"      fused_proxy_generate      {plain_rate:8.1f} tokens/s   base forwards/token 1.00")
        print(f"      fused, num_draft_tokens={k} {spec_rate:8.1f} tokens/s   base forwards/token "
              f"{per_token:.2f}, acceptance {accept:.2f}, same tokens: {'yes' if same else 'NO'}")
        print(f"      speed-up {spec_rate / plain_rate:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
