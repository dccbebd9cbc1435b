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
  in any input stays ``-inf``). The vocabulary rule is generation's
  (:mod:`proxykern.generation_args`): ``scores`` keep every base column; where the
  expert or anti-expert is narrower the delta is zero (``z = scores``), and a
  token one of them cannot read is fed to it as ``pad_token_id`` -- pass the one
  ``generate`` uses (default: the expert's generation config, else its first EOS,
  else 0) to match ``fused_proxy_generate`` exactly.
"""
from __future__ import annotations

import numbers

import torch
from transformers import LogitsProcessor

from ..generation_args import (_check_id_range, _check_ids, _check_mask, plan_vocabulary,
                               resolve_pad_token_id, same_vocabulary)
from ..models import input_width, model_device, output_width
from ..ops import check_sampling_arg
from ..reference import combine_logits
from ..engine.runner import ModelRunner


class ProxyTuningLogitsProcessor(LogitsProcessor):
    """An HF ``LogitsProcessor`` adding ``alpha * (expert - anti_expert)`` to the scores.

    ``expert_input_ids`` / ``expert_attention_mask``: the expert's own prompt (e.g. a
    chat template), batch size B of the ``generate`` call. ``attention_mask``: the
    base prompt's mask (see the module docstring). ``pad_token_id``: the stand-in fed to
    the expert or anti-expert for a base token it cannot read (module docstring). Call
    :meth:`reset` to drop the state between calls explicitly (it also resets itself on a
    new prompt).
    """

    def __init__(self, expert, anti_expert, *, alpha=1.0, expert_input_ids=None,
                 expert_attention_mask=None, attention_mask=None, pad_token_id=None):
        for name, model in (("expert", expert), ("anti_expert", anti_expert)):
            if not isinstance(model, torch.nn.Module):
                raise TypeError(f"{name} must be a Hugging Face causal LM, "
                                f"got {type(model).__name__}")
        if model_device(expert) != model_device(anti_expert):
            raise ValueError(f"anti_expert is on {model_device(anti_expert)} but expert is on "
                             f"{model_device(expert)}")
        if isinstance(alpha, torch.Tensor) or not isinstance(alpha, numbers.Real):
            raise ValueError(f"alpha must be a finite number, got {alpha!r}")
        alpha = check_sampling_arg("alpha", alpha, 1)  # generation's rule: finite in float32
        if expert_attention_mask is not None and expert_input_ids is None:
            raise ValueError("expert_attention_mask is given without expert_input_ids")
        # The prompt tensors get generation's checks (integer ids the expert can read, 0/1
        # left-padded masks), here at the edge rather than as an error inside generate.
        device = model_device(expert)
        if expert_input_ids is not None:
            expert_input_ids = _check_ids("expert_input_ids", expert_input_ids, device)
            expert_attention_mask = _check_mask("expert_attention_mask", expert_attention_mask,
                                                expert_input_ids, "expert_input_ids", device)
            _check_id_range("expert_input_ids", expert_input_ids, (expert,))
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2 \
                    or attention_mask.numel() == 0:
                raise ValueError("attention_mask must be a non-empty 2-D tensor (batch, length)")
            attention_mask = _check_mask("attention_mask", attention_mask, attention_mask,
                                         "attention_mask", attention_mask.device)
        e_width, a_width = output_width(expert), output_width(anti_expert)
        if not same_vocabulary(e_width, a_width):
            raise ValueError(f"anti_expert has a vocabulary of {a_width} tokens but expert has "
                             f"{e_width}: more than padding apart")
        self.expert, self.anti_expert = expert, anti_expert
        self.alpha = float(alpha)
        self.expert_input_ids, self.expert_attention_mask = expert_input_ids, expert_attention_mask
        self.attention_mask = attention_mask
        self.widths = {"expert": e_width, "anti_expert": a_width}
        self.reads = {"expert": input_width(expert), "anti_expert": input_width(anti_expert)}
        eos = getattr(getattr(expert, "generation_config", None), "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_token_id = resolve_pad_token_id(expert, pad_token_id, eos)
        self.reset()

    def reset(self) -> None:
        """Forget the caches; the next call prefills."""
        self._runners = None
        self._seen = None  # (rows, length) the runners have consumed
        self._plan = None  # the VocabPlan, made at the prefill (the base's width is the scores')

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

    def _vocab_plan(self, base_width: int):
        """The generation rule's plan for the base's ``scores`` width (checks it is the
        experts' vocabulary up to padding)."""
        for name, width in self.widths.items():
            if not same_vocabulary(width, base_width):
                raise ValueError(f"the base's scores have {base_width} columns but {name}'s "
                                 f"vocabulary has {width}: more than padding apart")
        return plan_vocabulary({"base": base_width, **self.widths},
                               {"base": None, **self.reads}, self.pad_token_id)

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
        stand_in = self._plan.stand_ins
        expert = ModelRunner(self.expert, e_ids.long(), e_mask.long(), capacity=64,
                             stand_in=stand_in["expert"])
        anti = ModelRunner(self.anti_expert, input_ids.to(dev).long(), mask.long(), capacity=64,
                           stand_in=stand_in["anti_expert"])
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
                self._plan = self._vocab_plan(scores.shape[-1])
                e_logits, a_logits = self._prefill(input_ids)
            else:
                if not torch.equal(src, torch.arange(len(src), device=src.device)):
                    for r in self._runners:
                        r.reorder(src.to(r.mask.device))
                new = input_ids[:, self._seen.shape[1]:].to(model_device(self.expert))
                for i in range(new.shape[1]):  # normally one token per call
                    e_logits, a_logits = (r.step(new[:, i]) for r in self._runners)
            self._seen = input_ids.clone()

            alpha = torch.full((scores.shape[0],), self.alpha, device=scores.device)
            e_logits, a_logits = self._plan.widen(e_logits.to(scores.device),
                                                  a_logits.to(scores.device))
            z = combine_logits(scores, e_logits, a_logits, alpha, scores.shape[-1])
            return z.to(scores.dtype)

