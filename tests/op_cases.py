"""Inputs and comparisons shared by the op tests and the benchmarks."""
from __future__ import annotations

import torch

from proxykern import ops

# Per-dtype tolerances (rtol, atol) for logprobs and lse against the reference. The
# inputs convert exactly to fp32, so what differs is exp/log and summation order;
# half inputs get a little more room for their larger logits spread after rounding.
TOLERANCES = {
    torch.float32: (2e-5, 2e-4),
    torch.bfloat16: (2e-5, 3e-4),
    torch.float16: (2e-5, 3e-4),
}


def random_logits(batch: int, vocab: int, dtype=torch.float32, *, seed: int, scale: float = 3.0,
                  width: int | None = None, device="cpu"):
    """Three fresh (batch, width) logits matrices drawn from N(0, scale^2) (never zeros)."""
    gen = torch.Generator().manual_seed(seed)
    width = width or vocab
    mats = [(torch.randn(batch, width, generator=gen) * scale).to(dtype).to(device)
            for _ in range(3)]
    return tuple(mats)


def run(backend: str, base, expert, anti, **kwargs):
    """(tokens, logprobs, lse, status) of one backend, without raising on bad rows."""
    out, status = ops.proxy_sample_with_status(base, expert, anti, backend=backend, **kwargs)
    return out.tokens, out.logprobs, out.lse, status


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    device = torch.device(device)
    return [b for b in ops.BACKENDS if ops.backend_unavailable_reason(b, device) is None]
