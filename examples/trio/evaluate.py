"""Score the shipped trio on held-out task items, as in the proxy-tuning paper's tables.

Rows: the base alone, the expert alone, the proxy-tuned base (alpha sweep) and the directly
tuned base; each answer is greedy (``fused_proxy_generate``, temperature 0). Prints a table
with the fraction of the base -> tuned-base gap that proxy tuning closes, and writes it to
``results.md`` / ``results.json`` beside the models.

    python examples/trio/evaluate.py [--models examples/trio/models] [--limit N]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import world  # noqa: E402

import proxykern  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_NAMES = ("base", "expert", "anti_expert", "tuned_base")


def load_trio(models_dir: str, device="cpu", dtype=torch.float32):
    """(tokenizer, {name: model}) from a folder made by make_trio.py."""
    tok = AutoTokenizer.from_pretrained(os.path.join(models_dir, "tokenizer"))
    models = {n: AutoModelForCausalLM.from_pretrained(os.path.join(models_dir, n), dtype=dtype)
              .to(device).eval() for n in MODEL_NAMES}
    return tok, models


def heldout_items(models_dir: str):
    with open(os.path.join(models_dir, "world.json")) as f:
        meta = json.load(f)
    people = world.make_people(meta["settings"]["people"], meta["seed"])
    return world.qa_split(people, meta["seed"])[1]


@torch.no_grad()
def answers(tok, base, expert, anti, items, *, alpha, generate=None, batch_size=128,
            max_new_tokens=10):
    """Greedy answers (decoded text) of base steered by (expert, anti) at ``alpha``."""
    generate = generate or proxykern.fused_proxy_generate
    texts = []
    for i in range(0, len(items), batch_size):
        enc = tok([it.prompt for it in items[i:i + batch_size]], return_tensors="pt",
                  padding=True, add_special_tokens=False).to(base.device)
        out = generate(base, expert, anti, enc.input_ids, enc.attention_mask,
                       max_new_tokens=max_new_tokens, alpha=alpha,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        texts += tok.batch_decode(out.tokens, skip_special_tokens=True)
    return texts


def accuracy(texts, items) -> float:
    right = sum(world.answer_of(t, it.attribute) == it.answer for t, it in zip(texts, items))
    return right / max(1, len(items))


def evaluate(models_dir: str, limit: int | None = None, alphas=(0.5, 1.0, 1.5, 2.0)):
    tok, m = load_trio(models_dir)
    items = heldout_items(models_dir)[:limit]
    rows = []

    def score(label, base, expert, anti, alpha):
        t0 = time.time()
        acc = accuracy(answers(tok, base, expert, anti, items, alpha=alpha), items)
        rows.append(dict(model=label, alpha=alpha, accuracy=acc, seconds=time.time() - t0))
        print(f"  {label:<28} {acc:6.1%}", flush=True)

    score("base (large, untuned)", m["base"], m["base"], m["base"], 0.0)
    score("expert (small, tuned)", m["expert"], m["expert"], m["expert"], 0.0)
    score("anti-expert (small, untuned)", m["anti_expert"], m["anti_expert"], m["anti_expert"], 0.0)
    for a in alphas:
        score(f"proxy-tuned base, alpha {a:g}", m["base"], m["expert"], m["anti_expert"], a)
    score("tuned base (large, tuned)", m["tuned_base"], m["tuned_base"], m["tuned_base"], 0.0)

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
