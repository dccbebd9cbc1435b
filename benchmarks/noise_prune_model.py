"""How much of K1's Gumbel noise v07 skips, modelled on CPU (no GPU needed).

K1 (csrc/cuda_kernels.cuh, slice_block) gives a column noise when its z' = x passes the
x test (x + 17 >= F, F = fl(m - 3), m the slice max); v07 also needs its uniform u to pass
1 - u <= exp(x - F) (noise_prune_ratio), and a warp skips the noise of one column slot
unless some lane needs it (a warp vote). This replays that on the kernel's layout at
1024-column slices (256 threads x 4 consecutive columns; a warp: 128 columns, 4 slots)
with uniform u in place of Philox's (the same distribution) and prints, per input family
and temperature, the share of columns whose noise v05 and v07 compute and the share of
warp slots v07 still executes. The families are gpu_check's (gpu_check_cases).

    python benchmarks/noise_prune_model.py [--vocab 128256] [--batch 8]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_cases import lm_like_logits  # noqa: E402

SLICE, WARP_COLS, SLOTS = 1024, 128, 4


def shares(x: torch.Tensor, generator: torch.Generator) -> dict:
    """x: [batch, vocab] of z'. The shares of columns with noise (v05, v07) and of warp
    slots v07 executes."""
    batch, vocab = x.shape
    pad = (-vocab) % SLICE
    x = torch.cat([x, torch.full((batch, pad), float("-inf"))], dim=1)
    slices = x.view(batch, -1, SLICE)
    valid = slices > float("-inf")
    floor = slices.amax(dim=-1, keepdim=True) - 3.0
    x_test = valid & (slices + 17.0 >= floor)
    u = torch.rand(slices.shape, generator=generator, dtype=torch.float64)
    u_test = (1.0 - u) <= torch.exp(slices.double() - floor.double())
    noise = x_test & u_test
    # [batch, slices, warps, lanes, slots]: lane l of warp w owns columns 128 w + 4 l + j.
    per_slot = noise.view(batch, slices.shape[1], SLICE // WARP_COLS, 32, SLOTS).any(dim=3)
    n = valid.sum().item()
    return dict(v05=x_test.sum().item() / n, v07=noise.sum().item() / n,
                slots=per_slot.float().mean().item())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    print(f"{'inputs':8} {'T':>4} {'v05 noise':>10} {'v07 noise':>10} {'v07 slots':>10}")
    for family in ("randn3", "lm"):
        if family == "lm":
            b, e, a = (t.float() for t in lm_like_logits(args.batch, args.vocab, generator=gen, device="cpu"))
        else:
            b, e, a = ((torch.randn(args.batch, args.vocab, generator=gen) * 3).bfloat16().float()
                       for _ in range(3))
        z = b + (e - a)
        for temperature in (1.0, 0.7, 4.0):
            s = shares(z / temperature, gen)
            print(f"{family:8} {temperature:4.1f} {s['v05']:10.3f} {s['v07']:10.4f} {s['slots']:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
