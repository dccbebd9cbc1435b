"""Generation benchmark: naive_proxy_generate against the engine (eager and CUDA graphs).

    proxykern bench generate --out DIR [--configs paper,small] [--batches 1,16]
                             [--prompt-len 128] [--new-tokens 128] [--device cuda]

(also ``python benchmarks/bench_generate.py ...``, which ``make gpu-check`` runs).

Random-weight Llama models built from configs straight on the device in bf16
(nothing is downloaded):

* ``paper``: a 13B-shaped base with two 7B-shaped experts, V = 32000;
* ``small``: a 1B-shaped base (tied embeddings) with two 135M-shaped experts, V = 128256;
* ``tiny``:  a few-layer trio for a CPU smoke run of this script.

and the shipped trained trio (``examples/trio/models``, V = 161) inflated exactly
(:mod:`proxykern.inflate`: same logits, the named shapes' cost; built on the device
from the small checkpoints) so that its real behaviour runs at paper-like cost:

* ``trio-paper``: the base as ``13b``, the experts as ``7b`` (head_dim 128);
* ``trio-small``: the base as ``1b``, the experts as ``135m``;
* ``trio-13b-small``: the base as ``13b``, the experts as ``135m`` (where drafting pays);
* ``trio-tiny``: a small inflation for a CPU run.

Columns, in ms per decode step (after the prompt) and tokens/s (B / step time):
``naive`` (naive_proxy_generate: (T(N) - T(1)) / (N - 1) over whole calls),
``eager`` and ``graphs`` (the engine's ProxyStep.advance, timed with CUDA events
over the steps after warm-up/capture), ``base_graph`` and ``expert_graph`` (the
base's and the expert's own static steps, each captured alone: the proxy step hides the
two experts beside the base when ``graphs`` is near ``base_graph``, runs them one after
the other when it is near ``base_graph + 2 * expert_graph``) and ``floor`` (bytes of the three models' weights over the
device-to-device copy bandwidth measured in the same run). Writes
``generate.json``, ``generate.md`` and ``generate.png`` under ``--out`` and
prints the table last.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from ..baseline import naive_proxy_generate
from . import SHIPPED_TRIO
from .bench import graph_replay
from ..engine import ProxyStep, StaticRunner
from ..generation_args import prepare_generation

# (hidden, intermediate, layers, heads, kv heads, tied embeddings)
SHAPES = {
    "13b": (5120, 13824, 40, 40, 40, False),
    "7b": (4096, 11008, 32, 32, 32, False),
    "1b": (2048, 8192, 16, 32, 8, True),
    "135m": (576, 1536, 30, 9, 3, True),
    "tiny-base": (128, 256, 4, 4, 2, False),
    "tiny-expert": (64, 128, 2, 4, 2, False),
    # trio-tiny's shapes: at least the trio's own (base 128/384/4 layers, expert 32/96/1)
    "tiny-trio-base": (256, 512, 6, 4, 4, True),
    "tiny-trio-expert": (64, 192, 2, 2, 2, True),
}
CONFIGS = {
    "paper": ("13b", "7b", 32000),
    "small": ("1b", "135m", 128256),
    "tiny": ("tiny-base", "tiny-expert", 1000),
}
#: Positions of every benchmark model (the trio's 128 would not hold --prompt-len 128
#: plus --new-tokens 128; the inflated trio computes its own function at any position).
BENCH_POSITIONS = 4096
# The shipped trio inflated to (base shape, expert shape); their tied flag is the trio's.
TRIO_CONFIGS = {
    "trio-paper": ("13b", "7b"),
    "trio-small": ("1b", "135m"),
    "trio-13b-small": ("13b", "135m"),  # speculative decoding's case: a costly base, cheap drafts
    "trio-tiny": ("tiny-trio-base", "tiny-trio-expert"),
}
TRIO_DIR = SHIPPED_TRIO


def build_model(shape: str, vocab: int, device, dtype, seed: int):
    """A random Llama of ``shape`` built directly on ``device`` in ``dtype``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hidden, inter, layers, heads, kv, tied = SHAPES[shape]
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, max_position_embeddings=BENCH_POSITIONS,
                         tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2,
                         pad_token_id=0)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialised on the device: seconds, not minutes
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.to(dtype).eval()


def inflated_trio(config: str, device, dtype):
    """(base, expert, anti_expert): the shipped trio inflated to ``TRIO_CONFIGS[config]``."""
    from transformers import AutoModelForCausalLM
    from ..inflate import inflate_llama
    base_shape, expert_shape = TRIO_CONFIGS[config]
    models = []
    for name, shape in (("base", base_shape), ("expert", expert_shape),
                        ("anti_expert", expert_shape)):
        hidden, inter, layers, heads, kv, _ = SHAPES[shape]
        small = AutoModelForCausalLM.from_pretrained(os.path.join(TRIO_DIR, name))
        models.append(inflate_llama(
            small, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
            max_position_embeddings=BENCH_POSITIONS, dtype=dtype, device=device))
    return tuple(models)


def build_models(config: str, device, dtype):
    """(base, expert, anti_expert) of a named config: random-weight or the inflated trio."""
    if config in TRIO_CONFIGS:
        return inflated_trio(config, device, dtype)
    base_shape, expert_shape, vocab = CONFIGS[config]
    return tuple(build_model(shape, vocab, device, dtype, seed)
                 for shape, seed in ((base_shape, 0), (expert_shape, 1), (expert_shape, 2)))


def weight_bytes(*models) -> int:
    seen, total = set(), 0
    for m in models:
        for p in m.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
    return total


def copy_bandwidth(device) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), median of 20."""
    if device.type != "cuda":
        return float("nan")
    src = torch.empty(512 * 2 ** 20, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if i >= 5:
            times.append(begin.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() / times[len(times) // 2]


class Timer:
    """Wall time of a region, synchronising the device around it."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def time_steps(advance, steps: int, device) -> float:
    """Median-free mean ms per call of ``advance`` over ``steps`` calls (events on CUDA)."""
    if device.type == "cuda":
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        for _ in range(steps):
            advance()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / steps
    with Timer(device) as t:
        for _ in range(steps):
            advance()
    return t.seconds * 1e3 / steps


def gen_args(models, ids, n_new, graphs):
    return prepare_generation(
        *models, ids, None, max_new_tokens=n_new, alpha=1.0, temperature=0.0, top_k=0,
        top_p=1.0, min_p=0.0, seed=0, eos_token_id=[], pad_token_id=0, expert_input_ids=None,
        expert_attention_mask=None, return_logprobs=False, return_model_logprobs=False,
        streamer=None, backend="auto", cuda_graphs=graphs)


def engine_ms(models, ids, n_new, graphs: bool, device) -> float:
    """ms per ProxyStep.advance after the warm-up (and capture) steps."""
    step = ProxyStep(*models, gen_args(models, ids, n_new, graphs), graphs=graphs)
    with torch.no_grad():
        step.prefill()
        step.advance()
        step.advance()  # with graphs: warm-up, then capture + first replay
        return time_steps(step.advance, n_new - 3, device)


def model_graph_ms(model, ids, n_new, device) -> float:
    """ms per replay of one model's own static decode step captured alone."""
    if device.type != "cuda":
        return float("nan")
    runner = StaticRunner(model, ids, torch.ones_like(ids), n_new)
    tokens = torch.ones(ids.shape[0], dtype=torch.long, device=device)
    with torch.no_grad():
        runner.prefill()
        replay = graph_replay(lambda: runner.step(tokens))
        replay()
        return time_steps(replay, n_new - 3, device)


def naive_ms(models, ids, n_new, device) -> float:
    """(T(N) - T(1)) / (N - 1) of whole naive_proxy_generate calls: ms per decode step."""
    def call(n, repeats=2):  # the best of two: one noisy call must not make a step negative
        best = float("inf")
        for _ in range(repeats):
            with Timer(device) as t:
                naive_proxy_generate(*models, ids, max_new_tokens=n, eos_token_id=[],
                                     pad_token_id=0)
            best = min(best, t.seconds)
        return best
    call(2, repeats=1)  # warm-up
    return (call(n_new) - call(1)) * 1e3 / (n_new - 1)


def run(config: str, batch: int, args, device, bandwidth: float, bar) -> dict:
    models = build_models(config, device, args.dtype)
    base, expert, anti = models
    vocab = base.config.vocab_size
    gen = torch.Generator().manual_seed(batch)
    ids = torch.randint(3, vocab, (batch, args.prompt_len), generator=gen).to(device)
    n_naive = min(args.new_tokens, args.naive_tokens)
    row = {"config": config, "batch": batch, "weight_bytes": weight_bytes(*models)}
    row["floor"] = row["weight_bytes"] / bandwidth * 1e3
    for name, fn in (("naive", lambda: naive_ms(models, ids, n_naive, device)),
                     ("eager", lambda: engine_ms(models, ids, args.new_tokens, False, device)),
                     ("graphs", lambda: engine_ms(models, ids, args.new_tokens, True, device)
                      if device.type == "cuda" else float("nan")),
                     ("base_graph", lambda: model_graph_ms(base, ids, args.new_tokens, device)),
                     ("expert_graph", lambda: model_graph_ms(expert, ids, args.new_tokens, device))):
        bar.set_description(f"{config} B={batch} {name}")
        try:
            row[name] = fn()
        except Exception as exc:  # one failing column must not lose the others' numbers
            row[name] = float("nan")
            row.setdefault("errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            print(f"{config} B={batch} {name}: {row['errors'][name]}", file=sys.stderr, flush=True)
        bar.update(1)
    del base, expert, anti, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


COLUMNS = ("naive", "eager", "graphs", "base_graph", "expert_graph", "floor")


def markdown(rows, device_name, bandwidth) -> str:
    lines = [f"Device: {device_name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
             f"ms per decode step (tokens/s)", "",
             "| config | B | " + " | ".join(COLUMNS) + " | graphs vs naive | graphs / floor "
             "| graphs / base_graph |", "|" + "---|" * (len(COLUMNS) + 5)]
    for r in rows:
        cells = [f"{r[c]:.2f} ({r['batch'] * 1e3 / r[c]:.0f})" if r[c] == r[c] else "n/a"
                 for c in COLUMNS]
        ratio = (lambda a, b: f"{r[a] / r[b]:.2f}x" if r[a] == r[a] and r[b] == r[b] else "n/a")
        lines.append(f"| {r['config']} | {r['batch']} | " + " | ".join(cells)
                     + f" | {ratio('naive', 'graphs')} | {ratio('graphs', 'floor')} | "
                     f"{ratio('graphs', 'base_graph')} |")
    return "\n".join(lines)


def plot(rows, path) -> bool:
    """A grouped bar chart of ms/step per column; False when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(COLUMNS)
    for j, c in enumerate(COLUMNS):
        ax.bar([i + j * width for i in range(len(rows))], [r[c] for r in rows], width, label=c)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(rows))])
    ax.set_xticklabels([f"{r['config']} B={r['batch']}" for r in rows])
    ax.set_yscale("log")
    ax.set_ylabel("ms per decode step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="proxykern bench generate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench_out")
    p.add_argument("--configs", default="paper,small")
    p.add_argument("--batches", default="1,16")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--naive-tokens", type=int, default=32,
                   help="new tokens of the naive calls (its steps cost the same throughout)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    device = torch.device(args.device)
    configs = args.configs.split(",")
    batches = [int(b) for b in args.batches.split(",")]
    if any(c not in CONFIGS and c not in TRIO_CONFIGS for c in configs):
        p.error(f"--configs: choose from {sorted(CONFIGS) + sorted(TRIO_CONFIGS)}")
    if args.new_tokens < 5:
        p.error("--new-tokens must be >= 5")
    os.makedirs(args.out, exist_ok=True)
    from tqdm.auto import tqdm

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    bandwidth = copy_bandwidth(device)
    rows = []

    def save():  # after every row: a run stopped at its time limit keeps what it measured
        with open(os.path.join(args.out, "generate.json"), "w") as f:
            json.dump({"device": device_name, "copy_bandwidth": bandwidth, "rows": rows,
                       "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
                       "dtype": str(args.dtype)}, f, indent=1)

    with tqdm(total=len(configs) * len(batches) * 5, file=sys.stderr) as bar:
        for config in configs:
            for batch in batches:
                rows.append(run(config, batch, args, device, bandwidth, bar))
                save()
                print(json.dumps(rows[-1]), flush=True)
    table = markdown(rows, device_name, bandwidth)
    with open(os.path.join(args.out, "generate.md"), "w") as f:
        f.write(table + "\n")
    plotted = plot(rows, os.path.join(args.out, "generate.png"))
    print(table)
    if not plotted:
        print("(matplotlib is not installed: no generate.png)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
