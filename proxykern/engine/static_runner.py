"""A capture-ready runner for one model: HF ``StaticCache`` and every input in a fixed buffer.

Laid out the way gpt-fast decodes: the KV cache is sized once for the prompt and
``max_new_tokens``; the attention mask is one full-width (B, L) buffer whose
column ``cache_position`` is set to 1 in place before each step; ``position_ids``
(B, 1) and ``cache_position`` (1,) are device tensors advanced in place; the
logits land in one (B, V) buffer. A step therefore has the same shapes and
addresses every time, reads no Python state that changes, and can be captured
in a CUDA graph and replayed.

Positions come from the attention mask (``cumsum(mask) - 1`` over the prompt,
then one more per token), so a left-padded row sees the positions it would see
alone; cache slots are shared by the batch (slot ``T + t`` holds token ``t`` of
every row), and the padding slots of a row are masked out.
"""
from __future__ import annotations

import torch

from ..models import accepts_logits_to_keep, cache_kwarg
from .runner import SideStreamLaunch, positions_from_mask


class StaticRunner(SideStreamLaunch):
    """One model's static decode state; same calls as :class:`proxykern.runner.ModelRunner`.

    ``launch_prefill()`` runs the prompt, ``launch_step(tokens)`` appends one token per
    row; both write the logits of the next token into :attr:`logits` (B, V), and
    ``join()`` returns that buffer once it is safe to read on the current stream
    (:class:`proxykern.runner.SideStreamLaunch`). ``stand_in``: as for ``ModelRunner``
    (one device op per step, into the token buffer).
    """

    keep_alive = False  # persistent buffers; record_stream has no place in a captured step

    def __init__(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 capacity: int, stream=None, stand_in=None):
        from transformers import StaticCache

        self.model = model
        self.stream = stream
        self.stand_in = stand_in
        self.batch_size, self.prompt_len = input_ids.shape
        self.max_len = self.prompt_len + max(int(capacity), 1)
        device = input_ids.device
        self.cache = StaticCache(config=model.config, max_cache_len=self.max_len)
        self.input_ids = input_ids
        self.mask = attention_mask.new_zeros((self.batch_size, self.max_len))
        self.mask[:, :self.prompt_len] = attention_mask
        self.tokens = torch.zeros((self.batch_size, 1), dtype=torch.long, device=device)
        self.position_ids = attention_mask.long().sum(-1, keepdim=True)
        self.cache_position = torch.full((1,), self.prompt_len, dtype=torch.long, device=device)
        self.logits = None  # (B, V), allocated by the prefill in the model's output dtype
        self._cache_arg = cache_kwarg(model)

    def _forward(self, input_ids, position_ids, cache_position, **extra):
        out = self.model(input_ids=input_ids, attention_mask=self.mask, position_ids=position_ids,
                         cache_position=cache_position, use_cache=True,
                         **{self._cache_arg: self.cache}, **extra)
        return out.logits[:, -1, :]

    def prefill(self) -> torch.Tensor:
        mask = self.mask[:, :self.prompt_len]
        extra = {"logits_to_keep": 1} if accepts_logits_to_keep(self.model) else {}
        logits = self._forward(self.input_ids, positions_from_mask(mask),
                               torch.arange(self.prompt_len, device=self.input_ids.device),
                               **extra)
        self.logits = logits.clone()
        return self.logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` (B,) at slot ``cache_position``; logits of the next token (in place)."""
        if self.stand_in is not None:
            tokens = self.stand_in(tokens)
        self.tokens.copy_(tokens.reshape(-1, 1))
        self.mask.index_fill_(1, self.cache_position, 1)
        self.logits.copy_(self._forward(self.tokens, self.position_ids, self.cache_position))
        self.position_ids.add_(1)
        self.cache_position.add_(1)
        return self.logits
