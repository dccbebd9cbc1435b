"""What generation returns: :class:`ProxyGenerateOutput` and the helpers that fill it."""
from __future__ import annotations

from typing import NamedTuple

import torch

from .models import MODEL_NAMES


class ProxyGenerateOutput(NamedTuple):
    """Result of :func:`fused_proxy_generate` / :func:`naive_proxy_generate`.

    ``sequences`` (B, T + N) int64, ``tokens`` (B, N) int64 (``pad_token_id`` after a
    row's EOS), ``lengths`` (B,) int64 (new tokens per row, EOS included),
    ``logprobs`` (B, N) float32 or None, ``model_logprobs`` dict
    ``{"base", "expert", "anti_expert"}`` -> (B, N) float32, or None. ``stats``:
    a :class:`proxykern.engine.rounds.SpeculativeStats` (acceptance rate, base
    forwards per token) when ``num_draft_tokens > 0``, else None.
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor | None
    model_logprobs: dict | None
    stats: object = None


def own_logprobs(logits: torch.Tensor, tokens: torch.Tensor, own_width: int) -> torch.Tensor:
    """A model's own log-softmax (T = 1, fp32) over its columns ``[0, own_width)`` at
    ``tokens``; ``-inf`` for a token outside them (a base token the model has no logit for)."""
    logp = torch.log_softmax(logits[:, :own_width].float(), dim=-1)
    tokens = tokens.reshape(-1)
    own = logp.gather(1, tokens.clamp(0, own_width - 1)[:, None]).squeeze(1)
    return own.masked_fill(tokens >= own_width, float("-inf"))


def empty_output(args) -> ProxyGenerateOutput:
    """The result of ``max_new_tokens=0``: no forward runs."""
    B, dev = args.batch_size, args.device
    empty = torch.empty((B, 0), dtype=torch.float32, device=dev)
    return ProxyGenerateOutput(
        sequences=args.input_ids.clone(), tokens=torch.empty((B, 0), dtype=torch.long, device=dev),
        lengths=torch.zeros(B, dtype=torch.long, device=dev),
        logprobs=empty.clone() if args.return_logprobs else None,
        model_logprobs={n: empty.clone() for n in getattr(args, "roles", MODEL_NAMES)}
        if args.return_model_logprobs else None)
