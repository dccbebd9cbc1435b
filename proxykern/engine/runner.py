"""Per-model decoding state for proxy tuning: KV cache, attention mask, positions, stream.

One :class:`ModelRunner` drives one Hugging Face causal LM through a prompt
prefill and then one token per step. It owns everything that differs between
the three models (their prompts may have different lengths), so the decode
loop in :mod:`proxykern.generate` stays model-agnostic. The state is laid out
so a static cache and CUDA-graph capture can replace the eager path later:
the attention mask is one preallocated buffer and positions live in a device
tensor (no Python ints that would change shapes between steps).

Positions come from the attention mask: ``position_ids = cumsum(mask) - 1``
(padding clamped to 0), and each new token takes the next one. A left-padded
row therefore sees exactly the positions it would see alone.
"""
from __future__ import annotations

import torch

from ..models import accepts_logits_to_keep, cache_kwarg








def new_dynamic_cache(model):
    """An empty HF ``DynamicCache`` laid out for ``model`` (sliding layers etc.)."""
    from transformers import DynamicCache
    try:
        return DynamicCache(config=model.config)
    except TypeError:  # older signature without ``config``
        return DynamicCache()


def left_pad(rows, pad_id: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> left-padded ``(ids, mask)`` int64 tensors (B, longest row)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.as_tensor(list(r), dtype=torch.long)
        mask[i, T - len(r):] = 1
    return ids.to(device), mask.to(device)


class SideStreamLaunch:
    """How a runner works beside the base: ``launch_prefill()`` / ``launch_step(tokens)``
    (or ``launch(fn, *args)`` for any forward of its model) queue the work on
    ``self.stream`` (after it waits on the current stream), and
    ``join()`` returns the logits once the current stream may read them. Without a
    stream (CPU, or the base) the work runs inline. Subclasses define ``prefill()`` and
    ``step(tokens)``; ``keep_alive`` makes the caching allocator keep the arguments and
    the logits alive across streams (eager runners whose tensors come and go; a
    capture-ready runner uses persistent buffers and sets it False).
    """

    stream = None
    keep_alive = True
    _done = None
    _logits = None

    def launch(self, fn, *args) -> None:
        """``fn(*args)`` on :attr:`stream` (inline without one); :meth:`join` gives its result."""
        if self.stream is None:
            self._logits = fn(*args)
            return
        self.stream.wait_stream(torch.cuda.current_stream())  # the tokens (and prompt) are ready
        if self.keep_alive:
            for t in args:
                t.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            self._logits = fn(*args)
            self._done = torch.cuda.Event()
            self._done.record(self.stream)

    def launch_prefill(self) -> None:
        self.launch(self.prefill)

    def launch_step(self, tokens: torch.Tensor) -> None:
        self.launch(self.step, tokens)

    def join(self) -> torch.Tensor:
        """The logits of the last launch, safe to read on the current stream."""
        logits, self._logits = self._logits, None
        if self.stream is not None:
            consumer = torch.cuda.current_stream()
            consumer.wait_event(self._done)
            if self.keep_alive:
                logits.record_stream(consumer)
        return logits


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """``cumsum(mask) - 1`` clamped at 0: the position of every prompt column."""
    return (mask.long().cumsum(-1) - 1).clamp_(min=0)


def forward_logits(model, input_ids, attention_mask, position_ids, cache, last_only=True):
    """One cached forward; returns the logits of the last position (B, V), or all of them."""
    kwargs = {cache_kwarg(model): cache}
    if last_only and accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = 1  # the prefill needs one row of logits, not T
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, **kwargs)
    logits = out.logits
    return logits[:, -1, :] if last_only else logits


class ModelRunner(SideStreamLaunch):
    """One model's decode state: its KV cache, attention mask buffer and next positions.

    ``prefill()`` runs the prompt and returns the last position's logits (B, V);
    ``step(tokens)`` appends one token per row and returns the new logits. The
    logits are the model's own tensor (its dtype, no copy). With ``stream``
    (CUDA) the work is queued on that stream: call :meth:`launch_step` /
    :meth:`launch_prefill` and then :meth:`join` on the consuming stream.

    ``capacity`` is the number of new tokens planned (the mask buffer grows if
    more come, e.g. under a Hugging Face ``generate`` of unknown length).
    ``stand_in``: a :class:`proxykern.generation_args.StandIn` replacing the new tokens
    this model cannot read (a base wider than it), or None: tokens are fed as given.
    """

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 capacity: int = 0, stream=None, stand_in=None):
        self.model = model
        self.stream = stream
        self.stand_in = stand_in
        self.input_ids = input_ids
        self.batch_size, self.prompt_len = input_ids.shape
        self.mask = attention_mask.new_zeros((self.batch_size, self.prompt_len + max(capacity, 1)))
        self.mask[:, :self.prompt_len] = attention_mask
        if stream is not None:  # made here, used on the side stream: free only after its work
            self.mask.record_stream(stream)
            input_ids.record_stream(stream)
        self.length = 0          # columns of the mask (and KV cache) in use
        self.next_pos = None     # (B, 1) int64, position of the next token per row
        self.uncommitted = 0     # tentative columns appended by extend(), not yet kept
        self.cache = None

    # ------------------------------------------------------------------ eager calls

    def prefill(self) -> torch.Tensor:
        self.cache = new_dynamic_cache(self.model)
        mask = self.mask[:, :self.prompt_len]
        logits = forward_logits(self.model, self.input_ids, mask, positions_from_mask(mask),
                                self.cache)
        self.length = self.prompt_len
        self.next_pos = mask.long().sum(-1, keepdim=True)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) to every row and return the logits for the next one."""
        if self.length >= self.mask.shape[1]:
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], dim=1)
        self.mask[:, self.length] = 1
        self.length += 1
        if self.stand_in is not None:
            tokens = self.stand_in(tokens)
        logits = forward_logits(self.model, tokens.reshape(-1, 1), self.mask[:, :self.length],
                                self.next_pos, self.cache)
        self.next_pos = self.next_pos + 1
        return logits

    # ------------------------------------------------------------------ speculative rounds

    def extend(self, tokens: torch.Tensor, max_pos: torch.Tensor | None = None) -> torch.Tensor:
        """Append ``tokens`` (B, n) tentatively; return the logits after each (B, n, V).

        The new columns get mask 1 and positions ``next_pos + uncommitted + 0..n-1``
        (clamped to ``max_pos`` (B, 1) when given); they stay tentative, and may be
        appended to again, until :meth:`keep` commits a prefix of them per row.
        """
        n = tokens.shape[1]
        need = self.length + n
        while need > self.mask.shape[1]:
            self.mask = torch.cat([self.mask, torch.zeros_like(self.mask)], dim=1)
        self.mask[:, self.length:need] = 1
        pos = self.next_pos + self.uncommitted + torch.arange(n, device=self.next_pos.device)
        if max_pos is not None:
            pos = torch.minimum(pos, max_pos)
        self.length, self.uncommitted = need, self.uncommitted + n
        if self.stand_in is not None:
            tokens = self.stand_in(tokens)
        return forward_logits(self.model, tokens, self.mask[:, :self.length], pos, self.cache,
                              last_only=False)

    def keep(self, valid: torch.Tensor, max_valid: int | None = None) -> None:
        """Commit the first ``valid[row]`` tentative columns of each row, roll back the rest.

        Rolled-back columns get mask 0 (never attended again, their positions are
        reused); columns no row keeps are cropped off the KV cache. ``max_valid``:
        ``int(valid.max())`` when the caller knows it (saves a sync).
        """
        u = self.uncommitted
        if u:
            start = self.length - u
            cols = torch.arange(u, device=valid.device)
            self.mask[:, start:self.length] = (cols[None, :] < valid[:, None]).to(self.mask.dtype)
            drop = u - (int(valid.max()) if max_valid is None else max_valid)
            if drop > 0:
                self.cache.crop(-drop)
                self.length -= drop
            self.next_pos = self.next_pos + valid.reshape(-1, 1)
        self.uncommitted = 0

    def reorder(self, index: torch.Tensor) -> None:
        """Permute the batch (beam search): row i takes the state of row ``index[i]``."""
        self.cache.reorder_cache(index)
        self.mask = self.mask.index_select(0, index)
        self.next_pos = self.next_pos.index_select(0, index)

