"""``make eval``: the trio's held-out questions through lm-evaluation-harness, as a table.

Runs the local tasks ``trio_qa_mc`` (multiple choice, ``acc``) and ``trio_qa_gen``
(greedy generation, ``exact_match``) from this folder with the ``proxykern`` lm-eval
model, for the base alone (``mode=base``), the expert alone (``mode=expert``) and the
proxy-tuned base (``alpha``), then prints one row per model. Each row is what

    proxykern-lm-eval --model proxykern --model_args <args> \\
        --tasks trio_qa_mc,trio_qa_gen --include_path examples/trio/lm_eval

prints for that model. Needs the ``eval`` extra (``pip install -e ".[eval]"``).

    python examples/trio/lm_eval/run_eval.py [--limit N] [--alpha 1.0] [--device cpu] [--threads 1]
"""
from __future__ import annotations

import argparse
import logging
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODELS = os.path.join(os.path.dirname(HERE), "models")
TASKS = ("trio_qa_mc", "trio_qa_gen")
METRICS = {"trio_qa_mc": "acc,none", "trio_qa_gen": "exact_match,none"}


def rows_of(models: str, alpha: float) -> list[tuple[str, str]]:
    base, expert, anti = (os.path.join(models, n) for n in ("base", "expert", "anti_expert"))
    return [("base alone", f"mode=base,base={base}"),
            ("expert alone", f"mode=expert,expert={expert}"),
            (f"proxy-tuned base (alpha {alpha:g})",
             f"base={base},expert={expert},anti_expert={anti},alpha={alpha}")]


def evaluate(models=MODELS, alpha=1.0, limit=None, batch_size=64, device="cpu"):
    import lm_eval
    from lm_eval.tasks import TaskManager

    import proxykern.integrations.lm_eval_model  # noqa: F401  (registers "proxykern" on lm-eval < plugins)

    manager = TaskManager(include_path=HERE)
    table = []
    for label, args in rows_of(models, alpha):
        t0 = time.time()
        out = lm_eval.simple_evaluate(
            model="proxykern", model_args=f"{args},batch_size={batch_size},device={device}",
            tasks=list(TASKS), task_manager=manager, limit=limit, verbosity="ERROR")
        res = out["results"]
        table.append(dict(model=label, seconds=time.time() - t0, n=res[TASKS[0]].get("sample_len"),
                          **{t: res[t][METRICS[t]] for t in TASKS}))
    return table


def format_table(table) -> str:
    n = table[0]["n"]
    lines = [f"lm-eval on the trio's held-out questions ({n} items per task, proxykern model)", "",
             "| model | trio_qa_mc acc | trio_qa_gen exact_match |", "|---|---|---|"]
    for r in table:
        lines.append(f"| {r['model']} | {r['trio_qa_mc']:.1%} | {r['trio_qa_gen']:.1%} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=MODELS)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--limit", type=int, default=None, help="items per task (default all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the trio is tiny: more threads only add overhead)")
    args = parser.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    for name in ("lm-eval", "lm_eval", "datasets"):  # the table is the output
        logging.getLogger(name).setLevel(logging.ERROR)
    table = evaluate(args.models, args.alpha, args.limit, args.batch_size, args.device)
    print(format_table(table))


if __name__ == "__main__":
    main()
