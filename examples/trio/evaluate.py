"""Score the shipped trio on held-out task items, as in the proxy-tuning paper's tables.

Rows: the base alone, the expert alone, the proxy-tuned base (alpha sweep) and the directly
tuned base, on the held-out items of ``heldout.json``; each answer is greedy
(``fused_proxy_generate``, temperature 0) and scored as ``proxykern demo`` scores it.
Prints a table with the fraction of the base -> tuned-base gap that proxy tuning closes,
and writes it to ``results.md`` / ``results.json`` beside the models.

    python examples/trio/evaluate.py [--models examples/trio/models] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from transformers import AutoModelForCausalLM

from proxykern.apps.demo import answers, load_trio, right_answers

HERE = os.path.dirname(os.path.abspath(__file__))


def evaluate(models_dir: str, limit: int | None = None, alphas=(0.5, 1.0, 1.5, 2.0)):
    tok, base, expert, anti, heldout = load_trio(models_dir, torch.device("cpu"))
    tuned = AutoModelForCausalLM.from_pretrained(os.path.join(models_dir, "tuned_base")).eval()
    items = heldout["items"][:limit]
    prompts = [it["prompt"] for it in items]
    rows = []

    def score(label, base, expert, anti, alpha):
        t0 = time.time()
        right = right_answers(answers(tok, base, expert, anti, prompts, alpha), items,
                              heldout["values"])
        acc = sum(right) / max(1, len(items))
        rows.append(dict(model=label, alpha=alpha, accuracy=acc, seconds=time.time() - t0))
        print(f"  {label:<28} {acc:6.1%}", flush=True)

    score("base (large, untuned)", base, base, base, 0.0)
    score("expert (small, tuned)", expert, expert, expert, 0.0)
    score("anti-expert (small, untuned)", anti, anti, anti, 0.0)
    for a in alphas:
        score(f"proxy-tuned base, alpha {a:g}", base, expert, anti, a)
    score("tuned base (large, tuned)", tuned, tuned, tuned, 0.0)

    base_acc, tuned_acc = rows[0]["accuracy"], rows[-1]["accuracy"]
    gap = tuned_acc - base_acc
    for r in rows:
        r["gap_closed"] = (r["accuracy"] - base_acc) / gap if gap > 0 else float("nan")
    return rows, len(items)


def format_table(rows, n_items) -> str:
    lines = [f"Held-out task items: {n_items} (greedy answers; right = the asked fact)", "",
             "| model | accuracy | gap closed |", "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['accuracy']:.1%} | {r['gap_closed']:.1%} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=os.path.join(HERE, "models"))
    parser.add_argument("--limit", type=int, default=None)
    args = parser.parse_args(argv)
    rows, n = evaluate(args.models, args.limit)
    table = format_table(rows, n)
    print(table)
    with open(os.path.join(args.models, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(args.models, "results.json"), "w") as f:
        json.dump(dict(items=n, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
