"""Speculative proxy decoding on the shipped trio: tokens/s, acceptance, base forwards/token.

``--inflate CONFIG`` runs the trio inflated exactly to a larger shape (a 13B-shaped base
with small experts: ``trio-13b-small``), so acceptance is the trained trio's while a base
forward costs what a large base's does: where speculative decoding is meant to pay.

For each batch size, sampling mode and ``num_draft_tokens`` k (k = 0 is plain fused
decoding) it times ``fused_proxy_generate`` over the same held-out prompts (best of
``--repeats``), and checks that every k gives k = 0's tokens and lengths (fp32: must be
identical; bf16: a batched forward may round a near-tie differently, so the differing
rows and tokens are counted). Prints a table; ``--json PATH`` also writes the rows.

    python benchmarks/bench_speculative.py --device cpu --json spec.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

from proxykern import fused_proxy_generate
from proxykern.apps.bench_generate import TRIO_CONFIGS, inflated_trio, model_graph_ms
from proxykern.apps.demo import DEFAULT_TRIO, load_trio

MODES = {"greedy": {}, "sampled": dict(temperature=0.8, top_p=0.9, seed=1)}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(models, batches, ks, kw, device, repeats, warmup=1):
    """Best-of-``repeats`` wall time over ``batches`` for every k, the ks timed in turn
    (k0 k1 .. k0 k1 ..: fair under a changing load), after ``warmup`` untimed calls of the
    first batch per k (one-time costs: kernel loading, cuBLAS and Triton set-up); returns
    {k: (seconds, outputs)}. On CUDA every call captures its own step or round (cuda_graphs
    "auto"), so the capture is inside the timed call, as for a user."""
    for _ in range(warmup):
        for k in ks:
            fused_proxy_generate(*models, *batches[0], num_draft_tokens=k, **kw)
    res = {k: (float("inf"), None) for k in ks}
    for _ in range(repeats):
        for k in ks:
            _sync(device)
            t0 = time.perf_counter()
            outs = [fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, **kw)
                    for ids, mask in batches]
            _sync(device)
            res[k] = (min(res[k][0], time.perf_counter() - t0), outs)
    return res


def compare(outs, ref_outs):
    """(rows whose tokens or length differ, tokens from each such row's first difference on)."""
    rows = toks = 0
    for o, r in zip(outs, ref_outs):
        for i in range(r.tokens.shape[0]):
            a = o.tokens[i, :int(o.lengths[i])].tolist()
            b = r.tokens[i, :int(r.lengths[i])].tolist()
            if a != b:
                rows += 1
                first = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                toks += max(len(a), len(b)) - first
    return rows, toks


def run(args) -> list[dict]:
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    tok, base, expert, anti, heldout = load_trio(args.trio, device, dtype=dtype)
    if args.inflate:  # the same trained trio at paper-like cost (proxykern.inflate)
        del base, expert, anti
        base, expert, anti = inflated_trio(args.inflate, device, dtype)
    prompts = [it["prompt"] for it in heldout["items"][:args.prompts]]
    rows = []
    for bs in args.batch_sizes:
        batches = []
        for i in range(0, len(prompts), bs):
            enc = tok(prompts[i:i + bs], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(device)
            batches.append((enc.input_ids, enc.attention_mask))
        for mode in args.modes:
            kw = dict(max_new_tokens=args.max_new_tokens, alpha=args.alpha,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **MODES[mode])
            ref_outs, ref_seconds = None, None
            timed = measure((base, expert, anti), batches, args.ks, kw, device, args.repeats,
                            args.warmup)
            for k in args.ks:
                seconds, outs = timed[k]
                tokens = sum(int(o.lengths.sum()) for o in outs)
                if k == 0:
                    ref_outs, ref_seconds = outs, seconds
                stats = [o.stats for o in outs if o.stats is not None]
                drafted = sum(s.drafted for s in stats)
                row = dict(device=str(device), dtype=args.dtype, batch=batches[0][0].shape[0],
                           mode=mode, k=k,
                           calls=len(batches), tokens=tokens, seconds=seconds,
                           tokens_per_s=tokens / seconds,
                           speedup=(ref_seconds / seconds) if ref_seconds else None,
                           acceptance=(sum(s.accepted for s in stats) / drafted) if drafted
                           else None,
                           base_forwards_per_token=(
                               sum(s.base_forwards for s in stats) / sum(s.steps for s in stats)
                               if stats else 1.0),
                           rounds=sum(s.rounds for s in stats) if stats else None)
                if ref_outs is not None:
                    diff_rows, diff_tokens = compare(outs, ref_outs)
                    row.update(rows=sum(o.tokens.shape[0] for o in outs), differing_rows=diff_rows,
                               differing_tokens=diff_tokens, identical=diff_rows == 0)
                rows.append(row)
                print(format_row(row), flush=True)
        if device.type == "cuda":  # the moonshot's bar: the base alone, captured, no experts
            ms = model_graph_ms(base, batches[0][0], max(args.max_new_tokens, 8), device)
            row = dict(device=str(device), dtype=args.dtype, batch=batches[0][0].shape[0],
                       mode="base-alone", k=None, step_ms=ms,
                       tokens_per_s=batches[0][0].shape[0] * 1e3 / ms)
            rows.append(row)
            print(f"{row['batch']:>5} base alone: its captured decode step {ms:.3f} ms = "
                  f"{row['tokens_per_s']:.1f} tokens/s (steady state, no prefill: an upper "
                  f"bound for the base alone)", flush=True)
    return rows


HEADER = (f"{'batch':>5} {'mode':<8} {'k':>2} {'tokens/s':>9} {'speed-up':>8} {'accept':>7} "
          f"{'base fwd/tok':>12} {'identical to k=0':<18}")


def format_row(r) -> str:
    acc = f"{r['acceptance']:.3f}" if r["acceptance"] is not None else "-"
    sp = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
    same = ("yes" if r.get("identical") else
            f"no: {r['differing_rows']}/{r['rows']} rows" if "identical" in r else "?")
    return (f"{r['batch']:>5} {r['mode']:<8} {r['k']:>2} {r['tokens_per_s']:>9.1f} {sp:>8} "
            f"{acc:>7} {r['base_forwards_per_token']:>12.3f} {same:<18}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the rows as JSON to this path")
    parser.add_argument("--trio", default=DEFAULT_TRIO)
    parser.add_argument("--inflate", choices=sorted(TRIO_CONFIGS),
                        help="run the shipped trio inflated exactly to these shapes "
                             "(proxykern.apps.bench_generate.TRIO_CONFIGS: same tokens, a large "
                             "model's cost), e.g. trio-13b-small on a GPU")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4, 8])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--prompts", type=int, default=32, help="held-out prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed calls of the first batch per k before timing")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = parser.parse_args(argv)
    if 0 not in args.ks:
        args.ks = [0] + args.ks
    args.ks = sorted(set(args.ks))
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore", RuntimeWarning)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU ({torch.get_num_threads()} threads)"
    print(f"speculative proxy decoding, {args.trio}"
          f"{' inflated as ' + args.inflate if args.inflate else ''}, {name}, {args.dtype}, "
          f"{args.prompts} prompts, up to {args.max_new_tokens} new tokens, alpha {args.alpha:g}, "
          f"best of {args.repeats}")
    print(HEADER)
    rows = run(args)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": name, "args": vars(args), "rows": rows}, f, indent=1)
    bad = [r for r in rows if args.dtype == "fp32" and r.get("identical") is False]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
