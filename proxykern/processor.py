"""``ProxyTuningLogitsProcessor``: proxy tuning inside Hugging Face ``generate``.

For users who keep ``base.generate(...)`` (beam search, constraints, other
processors). The processor runs the expert and the anti-expert beside the base,
each with its own KV cache, following the tokens ``generate`` has chosen, and
returns ``scores + alpha * (expert - anti_expert)`` over the shared vocabulary.

Contract and choices:

* First call (or a call whose ``input_ids`` do not extend what it saw last, i.e.
  a new ``generate``): prefill. The anti-expert reads ``input_ids``; the expert
  reads ``expert_input_ids`` when given, else ``input_ids``. Later calls feed
  the tokens appended since the previous call.
* ``generate`` does not show the attention mask to processors. For a
  left-padded batch pass the same ``attention_mask`` you give ``generate``
  (an extension of the API's signature); without it every prompt column counts
  as a token.
* Rows expanded by ``generate`` (``num_beams`` / ``num_return_sequences``) are
  matched by repeating the prompts; beam reordering is detected by comparing
  the rows with the ones seen last and the caches are reordered to match.
* ``scores`` is what ``generate`` hands over: the base's logits after the
  processors that ran before this one (e.g. a repetition penalty). They are raw,
  not tempered, also with ``do_sample=True``: ``generate`` (transformers 5.x)
  runs its sampling warpers (temperature, top-k, top-p, min-p) after every
  custom processor, so they apply to the combined
  ``z = scores + alpha * (expert - anti_expert)`` -- the op's order, softmax(z / T)
  then the filters (pinned by ``tests/test_generation_edges.py``). Greedy
  ``generate`` with this processor alone picks the tokens of
  ``fused_proxy_generate(temperature=0)``. The combination is the op's
  (:func:`proxykern.reference.combine_logits`, fp32; a token that is ``-inf``
  in any input stays ``-inf``); columns of ``scores`` beyond the shared
  vocabulary are set to ``-inf``.
"""
from __future__ import annotations

import math
import numbers

import torch
from transformers import LogitsProcessor

from .generation_args import output_width, same_vocabulary
from .reference import combine_logits
from .runner import ModelRunner, model_device


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """An HF ``LogitsProcessor`` adding ``alpha * (expert - anti_expert)`` to the scores.

    ``expert_input_ids`` / ``expert_attention_mask``: the expert's own prompt (e.g. a
    chat template), batch size B of the ``generate`` call. ``attention_mask``: the
    base prompt's mask (see the module docstring). Call :meth:`reset` to drop the
    state between calls explicitly (it also resets itself on a new prompt).
    """

    def __init__(self, expert, anti_expert, *, alpha=1.0, expert_input_ids=None,
                 expert_attention_mask=None, attention_mask=None):
        for name, model in (("expert", expert), ("anti_expert", anti_expert)):
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"{name} must be a Hugging Face causal LM, "
                                f"got {type(model).__name__}")
        if model_device(expert) != model_device(anti_expert):
            raise ValueError(f"anti_expert is on {model_device(anti_expert)} but expert is on "
                             f"{model_device(expert)}")
        if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real)
                or not math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        if expert_attention_mask is not None and expert_input_ids is None:
            raise ValueError("expert_attention_mask is given without expert_input_ids")
        for name, ids, mask in (("expert_input_ids", expert_input_ids, expert_attention_mask),
                                ("attention_mask", attention_mask, None)):
            if ids is not None and (not isinstance(ids, torch.Tensor) or ids.dim() != 2
                                    or ids.numel() == 0):
                raise ValueError(f"{name} must be a non-empty 2-D tensor (batch, length)")
            if mask is not None and (not isinstance(mask, torch.Tensor)
                                     or tuple(mask.shape) != tuple(ids.shape)):
                raise ValueError(f"expert_attention_mask must have the shape of expert_input_ids "
                                 f"{tuple(ids.shape)}")
        e_width, a_width = output_width(expert), output_width(anti_expert)
        if not same_vocabulary(e_width, a_width):
            raise ValueError(f"anti_expert has a vocabulary of {a_width} tokens but expert has "
                             f"{e_width}: more than padding apart")
        self.expert, self.anti_expert = expert, anti_expert
        self.alpha = float(alpha)
        self.expert_input_ids, self.expert_attention_mask = expert_input_ids, expert_attention_mask
        self.attention_mask = attention_mask
        self.width = min(e_width, a_width)
        self.reset()

    def reset(self) -> None:
        """Forget the caches; the next call prefills."""
        self._runners = None
        self._seen = None  # (rows, length) the runners have consumed

    # ------------------------------------------------------------------ helpers

    @staticmethod
    def _expand(name, t, rows, device):
        """Repeat a (B, ...) prompt tensor for the rows ``generate`` expanded (beams/returns)."""
        if t.shape[0] == rows:
            return t.to(device)
        if rows % t.shape[0]:
            raise ValueError(f"{name} has batch size {t.shape[0]}, which does not divide the "
                             f"{rows} rows generate passes")
        return t.to(device).repeat_interleave(rows // t.shape[0], dim=0)

    def _prefill(self, input_ids):
        rows, dev = input_ids.shape[0], model_device(self.expert)
        mask = (self._expand("attention_mask", self.attention_mask, rows, dev)
                if self.attention_mask is not None else torch.ones_like(input_ids, device=dev))
        if tuple(mask.shape) != tuple(input_ids.shape):
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but generate's prompt "
                             f"has {tuple(input_ids.shape)}")
        if self.expert_input_ids is not None:
            e_ids = self._expand("expert_input_ids", self.expert_input_ids, rows, dev)
            e_mask = (self._expand("expert_attention_mask", self.expert_attention_mask, rows, dev)
                      if self.expert_attention_mask is not None else torch.ones_like(e_ids))
        else:
            e_ids, e_mask = input_ids.to(dev), mask
        expert = ModelRunner(self.expert, e_ids.long(), e_mask.long(), capacity=64)
        anti = ModelRunner(self.anti_expert, input_ids.to(dev).long(), mask.long(), capacity=64)
        self._runners = (expert, anti)
        return expert.prefill(), anti.prefill()

    def _source_rows(self, input_ids):
        """For each row, a row seen last time with the same prefix (beam reordering), or None."""
        seen = self._seen
        if (seen is None or input_ids.shape[0] != seen.shape[0]
                or input_ids.shape[1] <= seen.shape[1]):
            return None
        prefix = input_ids[:, :seen.shape[1]].to(seen.device)
        match = (prefix[:, None, :] == seen[None, :, :]).all(-1)  # (rows, rows)
        if not bool(match.any(1).all()):
            return None
        return match.to(torch.int8).argmax(1)

    # ------------------------------------------------------------------ the hook

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        with torch.no_grad():
            src = self._source_rows(input_ids)
            if src is None:
                e_logits, a_logits = self._prefill(input_ids)
            else:
                if not torch.equal(src, torch.arange(len(src), device=src.device)):
                    for r in self._runners:
                        r.reorder(src.to(r.mask.device))
                new = input_ids[:, self._seen.shape[1]:].to(model_device(self.expert))
                for i in range(new.shape[1]):  # normally one token per call
                    e_logits, a_logits = (r.step(new[:, i]) for r in self._runners)
            self._seen = input_ids.clone()

            V = min(self.width, scores.shape[-1])
            if not same_vocabulary(self.width, scores.shape[-1]):
                raise ValueError(f"the base's scores have {scores.shape[-1]} columns but the "
                                 f"expert's vocabulary has {self.width}: more than padding apart")
            alpha = torch.full((scores.shape[0],), self.alpha, device=scores.device)
            z = combine_logits(scores, e_logits.to(scores.device), a_logits.to(scores.device),
                               alpha, V)
            out = torch.full_like(scores, float("-inf"), dtype=z.dtype)
            out[:, :V] = z
            return out.to(scores.dtype)

