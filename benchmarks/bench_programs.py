"""CPU timing of the fused N-input logit-program op (program_ops.program_rows, cpu backend)
against (a) the fused 3-input op (ops.sample_rows) for N = 3 and (b) today's two-pass
path (reference.program_logits writes z, then ops.sample_rows on (z, z, z), alpha 0).

bf16 inputs, linear programs with per-row coefficients (and, marked "+mask", a
plausibility mask on input 0), greedy and sampled (T 0.7, top_k 50, top_p 0.9). Median
of --rounds calls after --warmup, every method at the same torch.set_num_threads.

    python benchmarks/bench_programs.py [--threads N] [--rounds 9] [--quick]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import types

import torch

from proxykern import ops, program_ops, reference
from proxykern.params import SamplingParams

GREEDY = dict(temperature=0.0)
SAMPLED = dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0, seed=1)


def build_params(sampling, B, V, alpha=None):
    values = dict(sampling, **({} if alpha is None else {"alpha": alpha}))
    return SamplingParams.build(values, B, torch.device("cpu"), V)


def sample_rows(b, e, a, params, step, V):
    return ops.sample_rows(b, e, a, params, step, V, "cpu")


def median_ms(fn, warmup, rounds):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--quick", action="store_true", help="V = 32000 only")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, bf16 inputs, "
          f"median of {args.rounds} (after {args.warmup} warm-up) in ms")
    header = (f"{'N':>7} {'B':>3} {'V':>7} {'mode':>8} | {'fused N-input':>13} "
              f"{'3-input op':>10} {'two-pass':>9} | {'vs 2-pass':>9}")
    print(header)
    print("-" * len(header))
    vocabs = (32000,) if args.quick else (32000, 128256)
    for N, masked in ((2, False), (2, True), (3, False), (5, False)):
        for B in (1, 32):
            for V in vocabs:
                inputs = [torch.randn(B, V).mul_(3.0).to(torch.bfloat16) for _ in range(N)]
                coef = (torch.rand(B, N) * 2.0 - 1.0).contiguous()
                log_a = torch.log(torch.full((B,), 0.1))
                r = 0 if masked else -1
                roles = tuple(str(i) for i in range(N))
                mask = (types.SimpleNamespace(kind="plausibility", role="0", value=torch.exp(log_a))
                        if masked else None)
                program = types.SimpleNamespace(
                    roles=roles, difference=None, mask=mask,
                    coefficients=tuple(coef[:, i] for i in range(N)))
                logits = dict(zip(roles, inputs))
                step = torch.zeros(B, dtype=torch.int64)
                for mode, sampling in (("greedy", GREEDY), ("sampled", SAMPLED)):
                    params = build_params(sampling, B, V)
                    zero = build_params(sampling, B, V, alpha=0.0)

                    def fused():
                        return program_ops.program_rows(inputs, coef, "linear", r, log_a,
                                                        params, step, V, "cpu")

                    def two_pass():
                        z = reference.program_logits(program, logits, V)
                        return sample_rows(z, z, z, zero, step, V)

                    t_fused = median_ms(fused, args.warmup, args.rounds)
                    t_two = median_ms(two_pass, args.warmup, args.rounds)
                    t_three = float("nan")
                    if N == 3 and not masked:
                        alpha = build_params(sampling, B, V, alpha=coef[:, 2].neg().contiguous())
                        t_three = median_ms(lambda: sample_rows(*inputs, alpha, step, V),
                                            args.warmup, args.rounds)
                    three = f"{t_three:10.3f}" if t_three == t_three else f"{'-':>10}"
                    name = f"{N}{'+mask' if masked else ''}"
                    print(f"{name:>7} {B:>3} {V:>7} {mode:>8} | {t_fused:13.3f} {three} "
                          f"{t_two:9.3f} | {t_two / t_fused:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
