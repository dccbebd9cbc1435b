"""``proxykern demo`` (``make demo``): proxy-tuned answers side by side, then what it costs.

With a trio folder made by ``examples/trio/make_trio.py`` (default: the shipped
``examples/trio/models``) it asks held-out questions and prints the base's, the expert's
and the proxy-tuned base's greedy answers with whether each is right, and how many of the
first ``--scored`` held-out questions each gets right.

Then the speed section, every number a median [interquartile range] over rounds timed
interleaved (A B C, A B C, ...), so a change of load hits every variant alike; on CPU with
one thread (``--threads``) and the process's CPU time, which other processes' load does
not stretch as it stretches wall time:

* greedy decoding of one batch: the base alone, proxy-tuned with ``fused_proxy_generate``,
  with ``naive_proxy_generate`` and (``--draft-tokens``) speculatively, with the per-round
  ratios between them;
* the sampling step alone at realistic vocabularies (``proxykern.bench.kernel_rows``: the
  naive step against the fused op), and at the trio's own vocabulary, set against the
  trio's decode step: on the trio the three models' forwards dominate a step.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from typing import Callable

import torch

from . import SHIPPED_TRIO
from ..baseline import naive_proxy_generate
from ..generate import fused_proxy_generate

DEFAULT_TRIO = SHIPPED_TRIO


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


def print_quality(tok, base, expert, anti, heldout, *, questions: int, scored: int,
                  alpha: float, title: str) -> None:
    """The quality table: ``questions`` answers side by side, then right answers over ``scored``."""
    items = heldout["items"][:questions]
    scored_items = heldout["items"][:max(scored, questions)]
    prompts = [it["prompt"] for it in scored_items]
    columns = {
        "base": answers(tok, base, base, base, prompts, 0.0),
        "expert": answers(tok, expert, expert, expert, prompts, 0.0),
        f"proxy (alpha {alpha:g})": answers(tok, base, expert, anti, prompts, alpha),
    }
    right = {name: right_answers(texts, scored_items, heldout["values"])
             for name, texts in columns.items()}
    print(f"proxy tuning on {title}: held-out questions, greedy answers\n")
    for i, it in enumerate(items):
        print(f"Q: {it['prompt']}   [truth: {it['answer']}]")
        for name, texts in columns.items():
            answer = texts[i].split(".")[0].strip() + " ."
            print(f"   {name:<16} {'RIGHT' if right[name][i] else 'wrong':<6} {answer}")
        print()
    print(f"right answers over the first {len(scored_items)} held-out questions: " + ", ".join(
        f"{name} {sum(r)}/{len(r)}" for name, r in right.items()) + "\n")


# --- timing ---------------------------------------------------------------------------------

def interleaved_times(fns: dict[str, Callable[[], object]], rounds: int, *,
                      clock: Callable[[], float] = time.perf_counter,
                      sync: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """Seconds of each call of each of ``fns``, called in turn round by round (A B C, A B C,
    ...; ``rounds`` rounds): {name: [seconds per round]}. ``sync`` (e.g. a device
    synchronize) runs before each reading of ``clock``. Warm-up is the caller's."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if sync:
                sync()
            start = clock()
            fn()
            if sync:
                sync()
            times[name].append(clock() - start)
    return times


def spread(values) -> tuple[float, float, float]:
    """(median, first quartile, third quartile) of ``values`` (inclusive quartiles: of one
    value, that value thrice). Quartiles, not min-max: on a shared machine one disturbed
    round would set the range."""
    values = list(values)
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return median, q1, q3


def ratios(numerators, denominators) -> list[float]:
    """Round-by-round ratios: a ratio within one round compares runs made under the same load."""
    return [n / d for n, d in zip(numerators, denominators)]


def fmt_spread(values, fmt: str = "{:.2f}", unit: str = "x") -> str:
    """'median<unit> [q1-q3]' of ``values``, each number through ``fmt``."""
    mid, lo, hi = spread(values)
    return f"{fmt.format(mid)}{unit} [{fmt.format(lo)}-{fmt.format(hi)}]"


# --- the speed section ----------------------------------------------------------------------

@torch.no_grad()
def base_alone_generate(base, input_ids, attention_mask, max_new_tokens: int) -> torch.Tensor:
    """Greedy tokens (B, max_new_tokens) of ``base`` alone, no EOS stop, through the same
    static-cache runner as fused decoding: what proxy tuning adds is then the two experts
    and the combination, not a different decode loop."""
    from ..engine import StaticRunner

    runner = StaticRunner(base, input_ids, attention_mask, max_new_tokens)
    tokens = [runner.prefill().argmax(-1)]
    for _ in range(max_new_tokens - 1):
        tokens.append(runner.step(tokens[-1]).argmax(-1))
    return torch.stack(tokens, dim=1)


def timing_clock(device: torch.device) -> Callable[[], float]:
    """The demo's clock: on CPU the process's CPU time (one thread: on a shared machine the
    other processes' load stretches wall time, not CPU time), else wall time."""
    return time.process_time if device.type == "cpu" else time.perf_counter


def generation_speed(tok, base, expert, anti, prompts, *, alpha: float, new_tokens: int,
                     rounds: int, draft_tokens: int) -> tuple[list[str], float]:
    """Times greedy decoding of ``prompts`` as one batch, EOS ignored so every variant makes
    the same tokens: the base alone, proxy-tuned fused, naive and (``draft_tokens`` > 0)
    speculative. Returns (report lines, median seconds per decode step of the fused
    proxy decoding: a call's time over ``new_tokens``, prefill included)."""
    device = base.device
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
    kwargs = dict(max_new_tokens=new_tokens, alpha=alpha, eos_token_id=[],
                  pad_token_id=tok.pad_token_id)

    def proxy(generate, **extra):
        return lambda: generate(base, expert, anti, enc.input_ids, enc.attention_mask,
                                **kwargs, **extra)

    base_name, fused_name, naive_name = ("base alone (1 model, static cache)",
                                         "proxy-tuned, fused_proxy_generate",
                                         "proxy-tuned, naive_proxy_generate")
    spec_name = f"proxy-tuned, fused, num_draft_tokens={draft_tokens}"
    fns = {base_name: lambda: base_alone_generate(base, enc.input_ids, enc.attention_mask,
                                                  new_tokens),
           fused_name: proxy(fused_proxy_generate), naive_name: proxy(naive_proxy_generate)}
    if draft_tokens > 0:
        fns[spec_name] = proxy(fused_proxy_generate, num_draft_tokens=draft_tokens)
    # One untimed round: warm-up (allocations, lazy inits), and the outputs checked below.
    outs = {name: fn() for name, fn in fns.items()}
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    times = interleaved_times(fns, rounds, clock=timing_clock(device), sync=sync)
    n = enc.input_ids.shape[0] * new_tokens
    fused_t = times[fused_name]

    def same_tokens(name):
        return "yes" if torch.equal(outs[name].tokens, outs[fused_name].tokens) else "NO"

    lines = [f"greedy decoding, batch {len(prompts)}, {new_tokens} new tokens per prompt "
             f"(EOS ignored, so every variant does the same work), {rounds} rounds:"]
    width = max(map(len, fns))
    for name, secs in times.items():
        rates = fmt_spread([n / s for s in secs], "{:.0f}", " tokens/s")
        lines.append(f"   {name:<{width}} {rates}")
    lines.append(f"   proxy-tuned (fused) vs base alone: "
                 f"{fmt_spread(ratios(times[base_name], fused_t))} the tokens/s "
                 "(three models a token instead of one)")
    lines.append(f"   fused vs naive proxy-tuned:        "
                 f"{fmt_spread(ratios(times[naive_name], fused_t))}; same tokens: "
                 f"{same_tokens(naive_name)}")
    if draft_tokens > 0:
        stats = outs[spec_name].stats
        lines.append(
            f"   speculative vs plain fused:        {fmt_spread(ratios(fused_t, times[spec_name]))}"
            f"; same tokens: {same_tokens(spec_name)}; base forwards/token "
            f"{stats.base_forwards / max(1, stats.steps):.2f}, acceptance "
            f"{stats.accepted / max(1, stats.drafted):.2f}")
        lines.append("      (drafting pays where a base forward costs many expert forwards; "
                     "here the base is small)")
    return lines, statistics.median(fused_t) / new_tokens


def kernel_speed(device: torch.device, *, batch: int, vocabs, rounds: int, min_time: float,
                 trio_vocab: int, trio_batch: int, trio_step_seconds: float) -> list[str]:
    """The sampling step alone, ``proxykern.bench.kernel_rows`` (the naive step against the
    fused op of the backend ``"auto"`` picks) in ``rounds`` rounds: sampling at T=1 on bf16
    logits at ``vocabs`` x ``batch``, and the trio's own greedy step on fp32 logits
    (``trio_vocab`` x ``trio_batch``) set against its decode step (``trio_step_seconds``)."""
    from .bench import kernel_rows
    from ..ops import resolve_backend

    backend = resolve_backend("auto", device)
    sampling, greedy = dict(temperature=1.0), dict(temperature=0.0)
    cases = [(batch, v, torch.bfloat16, sampling) for v in vocabs]
    cases.append((trio_batch, trio_vocab, torch.float32, greedy))
    naive_us: list[list[float]] = [[] for _ in cases]
    fused_us: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):  # every case each round, so a change of load hits them alike
        for i, (b, v, dtype, mode) in enumerate(cases):
            rows = {r["impl"]: r["us"] for r in kernel_rows(device, [b], [v], {"": mode},
                                                              dtype=dtype, backends=[backend],
                                                              min_time=min_time,
                                                              cpu_clock=timing_clock(device))}
            naive_us[i].append(rows["naive"])
            fused_us[i].append(rows[backend])
    lines = [f"sampling step alone (proxykern.bench.kernel_rows: naive step = upcast, combine, "
             f"log_softmax, multinomial; fused = backend {backend!r}), {rounds} rounds:"]
    for i, (b, v, _, _) in enumerate(cases[:-1]):
        lines.append(f"   vocab {v:>6}, batch {b}, bf16, T=1: naive "
                     f"{fmt_spread(naive_us[i], '{:.0f}', ' us')}, fused "
                     f"{fmt_spread(fused_us[i], '{:.0f}', ' us')}: "
                     f"{fmt_spread(ratios(naive_us[i], fused_us[i]))}")
    naive_ms, fused_ms = (statistics.median(t[-1]) / 1e3 for t in (naive_us, fused_us))
    lines.append(f"   why the trio shows little of this: its greedy step (vocab {trio_vocab}, "
                 f"batch {trio_batch}) takes {naive_ms:.2f} ms naive / {fused_ms:.2f} ms fused "
                 f"of {trio_step_seconds * 1e3:.1f} ms per decode step; the three models' "
                 f"forwards are the rest")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="proxykern demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trio", default=DEFAULT_TRIO, help="folder made by make_trio.py")
    parser.add_argument("--questions", type=int, default=6, help="questions shown")
    parser.add_argument("--scored", type=int, default=90, help="questions scored")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads on CPU (the trio's forwards are too small to gain "
                             "from more, and on a busy machine extra threads make timings erratic)")
    parser.add_argument("--batch", type=int, default=32, help="prompts decoded as one batch")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--draft-tokens", type=int, default=2,
                        help="num_draft_tokens of the speculative variant (0: none)")
    parser.add_argument("--kernel-vocab", type=int, nargs="*", default=[32000, 128256],
                        help="vocabularies of the sampling-step lines")
    # Batch 1 (local decoding): at batch 8 the naive step's CPU time was bimodal across runs
    # (25 or 40-46 ms at vocab 128256), with the allocator's state left by what ran before.
    parser.add_argument("--kernel-batch", type=int, default=1)
    parser.add_argument("--kernel-rounds", type=int, default=15)
    parser.add_argument("--kernel-min-time", type=float, default=0.2,
                        help="seconds per kernel measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    with _demo_settings(device, args.threads):
        run_demo(args, device)
    return 0


@contextlib.contextmanager
def _demo_settings(device: torch.device, threads: int):
    """On CPU ``threads`` torch threads, and no HF progress bars, inside the block; the
    previous settings after it (main may run inside a test session)."""
    from transformers.utils import logging as hf_logging

    old_threads, old_bars = torch.get_num_threads(), hf_logging.is_progress_bar_enabled()
    if device.type == "cpu":
        torch.set_num_threads(threads)
    hf_logging.disable_progress_bar()  # the trio's "Loading weights" bars only add noise
    try:
        yield
    finally:
        torch.set_num_threads(old_threads)
        if old_bars:
            hf_logging.enable_progress_bar()


def run_demo(args, device: torch.device) -> None:
    """The demo proper: the quality table, then the speed section, printed as they come."""
    print(f"loading the trio from {args.trio} and answering held-out questions with the base, "
          f"the expert and the proxy-tuned base ({device})...\n", flush=True)
    tok, base, expert, anti, heldout = load_trio(args.trio, device)
    print_quality(tok, base, expert, anti, heldout, questions=args.questions,
                  scored=args.scored, alpha=args.alpha, title=f"{args.trio} ({device})")

    where = (f"{device}, {torch.get_num_threads()} thread(s), CPU time of this process" if
             device.type == "cpu" else f"{torch.cuda.get_device_name(device)}, wall time")
    print(f"speed ({where}); each number: median [interquartile range] of rounds timed "
          "interleaved", flush=True)
    prompts = [it["prompt"] for it in heldout["items"][:args.batch]]
    lines, step_seconds = generation_speed(tok, base, expert, anti, prompts, alpha=args.alpha,
                                           new_tokens=args.new_tokens, rounds=args.rounds,
                                           draft_tokens=args.draft_tokens)
    print("\n".join(lines), flush=True)
    print("\n".join(kernel_speed(device, batch=args.kernel_batch, vocabs=args.kernel_vocab,
                                 rounds=args.kernel_rounds, min_time=args.kernel_min_time,
                                 trio_vocab=base.config.vocab_size, trio_batch=len(prompts),
                                 trio_step_seconds=step_seconds)))


if __name__ == "__main__":
    raise SystemExit(main())
