"""The decode loop every generation entry shares, and the streamer feed.

Decode loop (one screen, on purpose; ``step`` is a :class:`proxykern.engine.step.DecodeStep`)::

    prefill   every model's prompt (side streams first); token 0
    step t    every FINISHED_CHECK_INTERVAL steps: one host read of (all finished, any bad)
              advance: every model's forward of token t (side streams, then the main
              stream), join, the fused op -> token t + 1, bookkeeping on the device --
              replayed as one CUDA graph when graphs are on, else run eagerly
    trim      to N = max(lengths)

Finished rows keep running (their tokens are discarded and written as ``pad_token_id``);
the host learns they are done at the next check, so the loop may run up to
``FINISHED_CHECK_INTERVAL - 1`` extra steps on a GPU. On CPU the check runs every step
(there is nothing to overlap).
"""
from __future__ import annotations

from collections import deque

import torch

from ..outputs import ProxyGenerateOutput
from .step import raise_bad_generation_rows


#: Steps between host checks of the finished/bad-row flags on an accelerator (one sync each).
FINISHED_CHECK_INTERVAL = 8


class TokenFeed:
    """Hands each step's tokens to an HF streamer, stopping once every row has finished.

    On CUDA the tokens go to pinned host memory with a non-blocking copy and the
    streamer is served one step late, so the copy never stalls the GPU. The host
    copies also tell the loop when all rows are done (no extra sync).
    """

    def __init__(self, streamer, args):
        self.streamer = streamer
        self.eos = torch.tensor(args.eos_token_ids, dtype=torch.long)
        self.finished = torch.zeros(args.batch_size, dtype=torch.bool)
        self.all_done = False
        self.on_cuda = args.device.type == "cuda"
        self.lag = 1 if self.on_cuda else 0
        self.host = (torch.empty((max(args.max_new_tokens, 1), args.batch_size), dtype=torch.long,
                                 pin_memory=True) if self.on_cuda else None)
        self.pending = deque()
        streamer.put(args.input_ids.cpu())

    def push(self, step: int, tokens: torch.Tensor) -> None:
        if self.on_cuda:
            self.host[step].copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((self.host[step], event))
        else:
            self.pending.append((tokens.clone(), None))
        while len(self.pending) > self.lag:
            self._emit(*self.pending.popleft())

    def _emit(self, tokens, event) -> None:
        if event is not None:
            event.synchronize()
        if self.all_done:
            return
        self.streamer.put(tokens)
        if len(self.eos):
            self.finished |= torch.isin(tokens, self.eos)
            self.all_done = bool(self.finished.all())

    def close(self) -> None:
        while self.pending:
            self._emit(*self.pending.popleft())
        self.streamer.end()


def _check_interval(device: torch.device) -> int:
    return 1 if device.type == "cpu" else FINISHED_CHECK_INTERVAL


def decode(step, args, feed) -> ProxyGenerateOutput:
    """Run ``step`` (built for ``args``, ``max_new_tokens >= 1``) to the end; ``feed``: a
    :class:`TokenFeed` or None. Returns the step's output."""
    interval, last_check = _check_interval(args.device), -1
    step.prefill()                                    # prompts; token 0
    for t in range(args.max_new_tokens):
        if feed is not None:
            feed.push(t, step.last_token)
        if t + 1 == args.max_new_tokens or t - last_check >= interval or (
                feed is not None and feed.all_done):
            all_done, any_bad = step.flags()          # the only host sync
            if any_bad:
                raise_bad_generation_rows(step.status, last_check + 1, t)
            last_check = t
            if all_done or t + 1 == args.max_new_tokens:
                break
        step.advance()                                # token t + 1: replayed graph or eager
    if feed is not None:
        feed.close()
    return step.output()
