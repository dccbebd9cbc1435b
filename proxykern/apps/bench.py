"""Kernel benchmark: the naive sampling step as users write it against proxykern's backends.

``proxykern bench kernel`` (this module) prints, for the device at hand, the median time of the
naive step and of each available backend, the effective bandwidth (three input
reads once) and the speed-up over the naive step measured in the same run.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import torch

from .. import ops
from ..engine.graphs import capture, warm_up


def graph_replay(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph after one warm-up call on a side stream (the engine's
    rule, :mod:`proxykern.engine.graphs`; fn has run twice when this returns); returns the
    graph's replay, so timings hold the GPU's work without the host's launch costs."""
    device = torch.device("cuda", torch.cuda.current_device())
    warm_up(fn, device)
    return capture(fn, device).replay


def naive_sample_step(base, expert, anti, *, alpha=1.0, temperature=1.0, top_k=0, top_p=1.0):
    """The step as users write it: upcast, combine, /T, sort-based top-k/top-p,
    log_softmax, torch.multinomial. Returns (tokens, logprobs)."""
    z = base.float() + alpha * (expert.float() - anti.float())
    if temperature == 0:
        logp = torch.log_softmax(z, dim=-1)
        tokens = z.argmax(dim=-1)
        return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)
    z = z / temperature
    logp = torch.log_softmax(z, dim=-1)
    if top_k > 0:
        kth = torch.topk(z, top_k, dim=-1).values[:, -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=True)
        cumulative = sorted_z.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative > top_p
        remove[:, 1:] = remove[:, :-1].clone()
        remove[:, 0] = False
        z = z.scatter(-1, order, sorted_z.masked_fill(remove, float("-inf")))
    probs = torch.softmax(z, dim=-1)
    tokens = torch.multinomial(probs, 1).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _median_time(fn: Callable[[int], object], device: torch.device, *, min_time: float,
                 rotations: int, cpu_clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds of fn(i) over repeated calls after warm-up (i rotates input sets);
    off CUDA each call is read on ``cpu_clock`` (time.process_time: CPU time, blind to
    other processes' load)."""
    for i in range(min(3, rotations) or 1):
        fn(i)
    samples: list[float] = []
    start = time.perf_counter()
    i = 0
    while (time.perf_counter() - start < min_time or len(samples) < 5) and len(samples) < 2000:
        if device.type == "cuda":
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn(i % rotations)
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = cpu_clock()
            fn(i % rotations)
            samples.append(cpu_clock() - t0)
        i += 1
    return statistics.median(samples)


def kernel_rows(device: torch.device, batches, vocabs, modes, *, dtype=torch.bfloat16,
                backends=None, min_time=0.5, include_compile=False, progress=None,
                cpu_clock=time.perf_counter):
    """Measure every (vocab, batch, mode): a list of dicts, the naive step first per case
    (``cpu_clock``: as in :func:`_median_time`)."""
    if backends is None:
        backends = [b for b in ops.BACKENDS
                    if b != "torch" and ops.backend_unavailable_reason(b, device) is None]
    cache_bytes = 256 << 20 if device.type == "cuda" else 64 << 20
    rows = []
    for vocab in vocabs:
        for batch in batches:
            set_bytes = 3 * batch * vocab * torch.empty((), dtype=dtype).element_size()
            rotations = max(1, min(16, math.ceil(cache_bytes / set_bytes)))
            gen = torch.Generator(device="cpu").manual_seed(batch * 31 + vocab)
            sets = [tuple((torch.randn(batch, vocab, generator=gen) * 3).to(dtype).to(device)
                          for _ in range(3)) for _ in range(rotations)]
            for mode_name, mode in modes.items():
                impls = {"naive": lambda i, m=mode: naive_sample_step(*sets[i], **m)}
                if include_compile:
                    compiled = torch.compile(lambda b, e, a, m=mode: naive_sample_step(b, e, a, **m))
                    impls["torch.compile"] = lambda i, c=compiled: c(*sets[i])
                for backend in backends:
                    impls[backend] = (lambda i, m=mode, b=backend:
                                      ops.proxy_sample_with_status(*sets[i], backend=b, seed=i, **m))
                naive_time = None
                for name, fn in impls.items():
                    seconds = _median_time(fn, device, min_time=min_time, rotations=rotations,
                                           cpu_clock=cpu_clock)
                    naive_time = seconds if name == "naive" else naive_time
                    rows.append(dict(vocab=vocab, batch=batch, mode=mode_name, impl=name,
                                     us=seconds * 1e6, gbps=set_bytes / seconds / 1e9,
                                     speedup=naive_time / seconds))
                    if progress:
                        progress(rows[-1])
            sets = None  # free this case's inputs before the next is made
    return rows


def format_table(rows, device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU ({torch.get_num_threads()} threads)")
    lines = [f"device: {name}; median times; speed-up vs the naive step of the same run",
             f"{'vocab':>7} {'batch':>5} {'mode':<12} {'impl':<14} {'time_us':>10} {'GB/s':>8} {'speedup':>8}"]
    for r in rows:
        lines.append(f"{r['vocab']:>7} {r['batch']:>5} {r['mode']:<12} {r['impl']:<14} "
                     f"{r['us']:>10.1f} {r['gbps']:>8.2f} {r['speedup']:>7.2f}x")
    return "\n".join(lines)


DEFAULT_MODES = {"temperature": dict(temperature=1.0), "top_p=0.9": dict(temperature=1.0, top_p=0.9)}
GPU_MODES = dict(DEFAULT_MODES, **{"top_k=50": dict(temperature=1.0, top_k=50),
                                   "top_k+top_p": dict(temperature=1.0, top_k=50, top_p=0.9)})


def main(argv=None) -> int:
    argv = list(argv or [])
    if argv[:1] == ["kernel"]:
        argv = argv[1:]
    parser = argparse.ArgumentParser(
        prog="proxykern bench kernel", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="The fused op against the naive sampling step (upcast, combine, /T, "
                    "sort-based filters, log_softmax, multinomial), timed in the same run: "
                    "median time, effective bandwidth (three input reads once) and speed-up.",
        epilog="example: proxykern bench kernel --batch 1 8 --vocab 32000 128256")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+",
                        help="batch sizes (default: 1 8 64 256 on a GPU, 1 8 64 on CPU)")
    parser.add_argument("--vocab", type=int, nargs="+",
                        help="vocabulary widths (default: 32000 128256 151936 on a GPU, "
                             "32000 128256 on CPU)")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds per measurement")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    batches = args.batch or ([1, 8, 64, 256] if gpu else [1, 8, 64])
    vocabs = args.vocab or ([32000, 128256, 151936] if gpu else [32000, 128256])
    rows = kernel_rows(device, batches, vocabs, GPU_MODES if gpu else DEFAULT_MODES,
                       min_time=args.min_time, include_compile=gpu,
                       progress=lambda r: print(f"  {r['vocab']}x{r['batch']} {r['mode']} "
                                                f"{r['impl']}: {r['us']:.1f} us", flush=True))
    print(format_table(rows, device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
