"""ProxyTuningLogitsProcessor inside Hugging Face generate (CPU, fp32, tiny models)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessorList

from proxykern import ProxyTuningLogitsProcessor, fused_proxy_generate

from gen_fixtures import PAD_ID, VOCAB, full_logits, pad_left, ragged_batch, tiny_model, trio


def hf_generate(base, ids, mask, processor, **kw):
    kw = {"max_new_tokens": 8, "do_sample": False, "eos_token_id": None,
          "pad_token_id": PAD_ID, **kw}
    return base.generate(input_ids=ids, attention_mask=mask,
                         logits_processor=LogitsProcessorList([processor]), **kw)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_generate_matches_fused(family):
    base, expert, anti = trio(family)
    ids, mask = ragged_batch()
    proc = ProxyTuningLogitsProcessor(expert, anti, alpha=1.0, attention_mask=mask)
    hf = hf_generate(base, ids, mask, proc)
    fused = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(hf, fused.sequences)


def test_reused_for_a_new_prompt_starts_over():
    base, expert, anti = trio("llama")
    proc = ProxyTuningLogitsProcessor(expert, anti)  # unpadded prompts: no mask needed
    for prompt, n in (([5, 6, 7, 8], 6), ([5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], 4),
                      ([40, 41], 5)):
        row = torch.tensor([prompt])
        hf = hf_generate(base, row, None, proc, max_new_tokens=n)
        fused = fused_proxy_generate(base, expert, anti, row, max_new_tokens=n, eos_token_id=[])
        assert torch.equal(hf, fused.sequences)


def test_expert_prompt_and_alpha():
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    e_ids, e_mask = pad_left([[2, 20, 21] + ids[i][mask[i].bool()].tolist() for i in range(3)])
    proc = ProxyTuningLogitsProcessor(expert, anti, alpha=0.7, expert_input_ids=e_ids,
                                      expert_attention_mask=e_mask, attention_mask=mask)
    hf = hf_generate(base, ids, mask, proc)
    fused = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, alpha=0.7,
                                 eos_token_id=[], expert_input_ids=e_ids,
                                 expert_attention_mask=e_mask)
    assert torch.equal(hf, fused.sequences)


def test_padded_base_vocabulary_keeps_the_base_columns():
    """A base wider than the experts keeps its extra columns (zero delta there), as
    fused_proxy_generate does; the experts read pad_token_id for those tokens."""
    base, expert, anti = trio("llama")
    wide = copy.deepcopy(base)
    wide.resize_token_embeddings(1024, mean_resizing=False)
    with torch.no_grad():  # extra columns that win: the old narrowest rule would drop them
        wide.get_output_embeddings().weight[VOCAB:] = 5 * wide.get_output_embeddings().weight[:24]
    ids, mask = ragged_batch()
    proc = ProxyTuningLogitsProcessor(expert, anti, attention_mask=mask)
    hf = hf_generate(wide, ids, mask, proc)
    fused = fused_proxy_generate(wide, expert, anti, ids, mask, max_new_tokens=8, eos_token_id=[])
    assert torch.equal(hf, fused.sequences)
    assert bool((fused.tokens >= VOCAB).any())


class Recorder:
    """Wraps a processor and keeps (input_ids, scores in, scores out) of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, input_ids, scores):
        out = self.inner(input_ids, scores.clone())
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


def test_beam_search_follows_reordered_beams():
    """Under beam search each call adds exactly expert - anti of the beams' current rows."""
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    ids, mask = ids[:2], mask[:2]
    beams = 3
    rec = Recorder(ProxyTuningLogitsProcessor(expert, anti, alpha=1.0, attention_mask=mask))
    hf_generate(base, ids, mask, rec, num_beams=beams, max_new_tokens=6)
    assert len(rec.calls) >= 3
    prompt_mask = mask.repeat_interleave(beams, 0)
    reordered = False
    for k, (seen, scores_in, scores_out) in enumerate(rec.calls):
        if k and not torch.equal(seen[:, :-1], rec.calls[k - 1][0]):
            reordered = True
        m = torch.cat([prompt_mask, torch.ones_like(seen[:, prompt_mask.shape[1]:])], 1)
        delta = full_logits(expert, seen, m) - full_logits(anti, seen, m)
        torch.testing.assert_close(scores_out - scores_in, delta, atol=1e-4, rtol=1e-4)
    assert reordered  # the test exercised a beam reordering


def test_alpha_zero_leaves_beam_search_unchanged():
    base, expert, anti = trio("gpt2")
    ids, mask = ragged_batch()
    proc = ProxyTuningLogitsProcessor(expert, anti, alpha=0.0, attention_mask=mask)
    with_proc = hf_generate(base, ids, mask, proc, num_beams=2, max_new_tokens=5)
    plain = base.generate(input_ids=ids, attention_mask=mask, num_beams=2, max_new_tokens=5,
                          do_sample=False, eos_token_id=None, pad_token_id=PAD_ID)
    assert torch.equal(with_proc, plain)


def test_bad_arguments_raise_naming_them():
    _, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    with pytest.raises(ValueError, match="alpha"):
        ProxyTuningLogitsProcessor(expert, anti, alpha=float("inf"))
    with pytest.raises(TypeError, match="anti_expert"):
        ProxyTuningLogitsProcessor(expert, "anti")
    with pytest.raises(ValueError, match="expert_attention_mask"):
        ProxyTuningLogitsProcessor(expert, anti, expert_attention_mask=mask)
    with pytest.raises(ValueError, match="expert_attention_mask"):
        ProxyTuningLogitsProcessor(expert, anti, expert_input_ids=ids,
                                   expert_attention_mask=mask[:1])
    with pytest.raises(ValueError, match="anti_expert has a vocabulary"):
        ProxyTuningLogitsProcessor(expert, tiny_model("gpt2", 3, vocab=4000))
    proc = ProxyTuningLogitsProcessor(expert, anti, attention_mask=mask[:2])
    with pytest.raises(ValueError, match="attention_mask"):
        proc(ids, torch.zeros(3, VOCAB))
