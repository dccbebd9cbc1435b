"""``make eval``: the trio's held-out questions through lm-evaluation-harness, as a table.

Runs the local tasks ``trio_qa_mc`` (multiple choice, ``acc``) and ``trio_qa_gen``
(greedy generation, ``exact_match``) from this folder with the ``proxykern`` lm-eval
model, one row per model:

* base alone (``mode=base``) and expert alone (``mode=expert``);
* the proxy-tuned base (``alpha``, default 1.0);
* DExperts (``program=dexperts``) on the same trio -- base steered by expert minus
  anti-expert -- at the preset's own defaults (alpha 2.0, base top-p 0.9), so it differs
  from the proxy row by its alpha and by the base's nucleus masking z;
* contrastive decoding (``program=contrastive``, O'Brien & Lewis: beta 0.5, plausibility
  0.1) with the trio's tuned expert as the expert and its untuned anti-expert as the
  amateur (the base is not read): the expert's logits pushed away from the same-size
  untuned model's, which is the trio's natural expert/amateur pair (the papers' amateur is
  a smaller or weaker model of the same family).

Each row is what

    proxykern-lm-eval --model proxykern --model_args <args> \\
        --tasks trio_qa_mc,trio_qa_gen --include_path examples/trio/lm_eval

prints for that model. ``--sweep "0.5;1;2"`` adds a second table: trio_qa_mc accuracy of the
proxy-tuned base at each alpha, from one lm-eval run (every alpha scored from the same
forwards, ``alpha=A;B;C,sweep_output=...``). Needs the ``eval`` extra
(``pip install -e ".[eval]"``).

    python examples/trio/lm_eval/run_eval.py [--limit N] [--alpha 1.0] [--sweep "0.5;1;2"]
        [--rows base,expert,proxy,dexperts,contrastive] [--device cpu] [--threads 1]
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


ROWS = ("base", "expert", "proxy", "dexperts", "contrastive")


def rows_of(models: str, alpha: float, rows=ROWS) -> list[tuple[str, str]]:
    base, expert, anti = (os.path.join(models, n) for n in ("base", "expert", "anti_expert"))
    table = {
        "base": ("base alone", f"mode=base,base={base}"),
        "expert": ("expert alone", f"mode=expert,expert={expert}"),
        "proxy": (f"proxy-tuned base (alpha {alpha:g})",
                  f"base={base},expert={expert},anti_expert={anti},alpha={alpha}"),
        "dexperts": ("DExperts (alpha 2, base top-p 0.9)",
                     f"program=dexperts,base={base},expert={expert},anti_expert={anti}"),
        "contrastive": ("contrastive decoding (expert vs anti_expert as amateur, beta 0.5)",
                        f"program=contrastive,expert={expert},amateur={anti}"),
    }
    unknown = [r for r in rows if r not in table]
    if unknown:
        raise ValueError(f"--rows: unknown row(s) {', '.join(unknown)} (rows: {', '.join(ROWS)})")
    return [table[r] for r in rows]


def _quiet_simple_evaluate(**kwargs):
    import lm_eval

    return lm_eval.simple_evaluate(verbosity="ERROR", **kwargs)


def evaluate(models=MODELS, alpha=1.0, limit=None, batch_size=64, device="cpu", rows=ROWS):
    from lm_eval.tasks import TaskManager

    import proxykern.integrations.lm_eval_model  # noqa: F401  (registers "proxykern" on lm-eval < plugins)

    manager = TaskManager(include_path=HERE)
    table = []
    for label, args in rows_of(models, alpha, rows):
        t0 = time.time()
        out = _quiet_simple_evaluate(
            model="proxykern", model_args=f"{args},batch_size={batch_size},device={device}",
            tasks=list(TASKS), task_manager=manager, limit=limit)
        res = out["results"]
        table.append(dict(model=label, seconds=time.time() - t0, n=res[TASKS[0]].get("sample_len"),
                          **{t: res[t][METRICS[t]] for t in TASKS}))
    return table


def alpha_sweep(alphas, models=MODELS, limit=None, batch_size=64, device="cpu"):
    """trio_qa_mc accuracy of the proxy-tuned base at each alpha, from one lm-eval run:
    ``alpha=A;B;C`` scores every alpha from the same forwards, ``sweep_output`` holds each
    request's K log-likelihoods, and the logged samples give the gold choices.
    Returns (alphas, accuracies, lm-eval's own acc (the first alpha's), seconds)."""
    import tempfile

    from lm_eval.tasks import TaskManager

    from proxykern.integrations.lm_eval_model import sweep_accuracy

    base, expert, anti = (os.path.join(models, n) for n in ("base", "expert", "anti_expert"))
    values = ";".join(f"{a:g}" for a in alphas)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "sweep.json")
        t0 = time.time()
        out = _quiet_simple_evaluate(
            model="proxykern",
            model_args=(f"base={base},expert={expert},anti_expert={anti},alpha={values},"
                        f"sweep_output={path},batch_size={batch_size},device={device}"),
            tasks=["trio_qa_mc"], task_manager=TaskManager(include_path=HERE), limit=limit,
            log_samples=True)
        seconds = time.time() - t0
        gold = {s["doc_id"]: int(s["target"]) for s in out["samples"]["trio_qa_mc"]}
        acc = sweep_accuracy(path, gold, task="trio_qa_mc")
    return list(alphas), acc, out["results"]["trio_qa_mc"]["acc,none"], seconds


def format_sweep(alphas, acc, reported, seconds) -> str:
    lines = [f"alpha sweep of the proxy-tuned base, trio_qa_mc acc, one lm-eval run "
             f"({seconds:.0f} s; lm-eval reported the first alpha: {reported:.1%})", "",
             "| alpha | trio_qa_mc acc |", "|---|---|"]
    lines += [f"| {a:g} | {x:.1%} |" for a, x in zip(alphas, acc)]
    return "\n".join(lines)


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
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows of the table (default: {','.join(ROWS)})")
    parser.add_argument("--sweep", default=None, metavar="A;B;C",
                        help="also print trio_qa_mc acc of the proxy-tuned base at each of "
                             "these alphas (one run, one set of forwards)")
    args = parser.parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    rows_of(args.models, args.alpha, rows)  # unknown rows fail before anything runs
    alphas = None
    if args.sweep is not None:
        try:
            alphas = [float(a) for a in args.sweep.replace(",", ";").split(";") if a.strip()]
        except ValueError:
            parser.error(f"--sweep: expected numbers separated by ';', got {args.sweep!r}")
        if not alphas:
            parser.error("--sweep: no alpha given")
    import torch
    torch.set_num_threads(args.threads)
    for name in ("lm-eval", "lm_eval", "datasets"):  # the table is the output
        logging.getLogger(name).setLevel(logging.ERROR)
    if rows:
        table = evaluate(args.models, args.alpha, args.limit, args.batch_size, args.device, rows)
        print(format_table(table))
    if alphas:
        print()
        print(format_sweep(*alpha_sweep(alphas, args.models, args.limit, args.batch_size,
                                        args.device)))


if __name__ == "__main__":
    main()
