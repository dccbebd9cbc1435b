"""Inputs and comparisons shared by the op tests and the benchmarks."""
from __future__ import annotations

import os

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


# --------------------------------------------------------------------------- required backends
#
# A backend the suite must test where it runs. Test parametrizations are built from
# these lists (not from what happens to load), so a backend that fails to build or
# import fails its tests with the reason (the import error) instead of vanishing.

def cuda_required() -> bool:
    """Whether the CUDA kernel must exist: ``PROXYKERN_REQUIRE_CUDA=1`` (or ``0``) decides;
    unset, it must on a machine with a GPU and a CUDA torch, unless ``PROXYKERN_SKIP_CUDA=1``
    (the build's own switch for leaving the CUDA sources out)."""
    flag = os.environ.get("PROXYKERN_REQUIRE_CUDA", "")
    if flag in ("0", "1"):
        return flag == "1"
    return (torch.cuda.is_available() and torch.version.cuda is not None
            and os.environ.get("PROXYKERN_SKIP_CUDA") != "1")


def required_backends(device: torch.device | str = "cpu") -> list[str]:
    """The fused backends (not ``torch``) that must run on ``device`` on this machine.

    CPU tensors: ``cpu`` always, and ``triton`` (its interpreter) on a machine without a
    GPU. CUDA tensors: ``cuda`` when :func:`cuda_required`, ``triton`` on a GPU.
    """
    device = torch.device(device)
    if device.type == "cpu":
        return ["cpu"] + ([] if torch.cuda.is_available() else ["triton"])
    if device.type == "cuda":
        return (["cuda"] if cuda_required() else []) + (
            ["triton"] if torch.cuda.is_available() else [])
    return []


def fused_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends to test on ``device``: the required ones, whether or not they load, then
    any other fused backend that happens to be available."""
    required = required_backends(device)
    extra = [b for b in available_backends(device) if b != "torch" and b not in required]
    return required + extra


def missing_required_backends() -> list[tuple[str, str, str]]:
    """(backend, device type, why it cannot run) for every required backend that cannot."""
    missing = []
    for device in ("cpu", "cuda"):
        for backend in required_backends(device):
            reason = ops.backend_unavailable_reason(backend, torch.device(device))
            if reason is not None:
                missing.append((backend, device, reason))
    return missing
