"""Generation edges: finished rows' garbage, bf16 models, the logits processor past its
initial capacity and under sampling (CPU, tiny models)."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LogitsProcessorList

from proxykern import ProxyTuningLogitsProcessor, fused_proxy_generate, naive_proxy_generate

from gen_fixtures import PAD_ID, full_logits, ragged_batch, trio

GENERATORS = [fused_proxy_generate, naive_proxy_generate]


# --------------------------------------------------------------------------- finished rows

@pytest.mark.parametrize("fn", GENERATORS)
def test_a_finished_rows_bad_logits_are_ignored(fn):
    """After row 0's EOS its logits turn NaN: the call neither raises nor changes a token."""
    base, expert, anti = (copy.deepcopy(m) for m in trio("llama"))
    ids, mask = ragged_batch()
    free = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10,
                                eos_token_id=[]).tokens
    eos = int(free[0, 1])  # row 0 ends at its 2nd token
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=PAD_ID, return_logprobs=True)
    clean = fn(base, expert, anti, ids, mask, **kw)
    assert clean.lengths[0] == 2 and clean.lengths.max() > 3
    calls = []

    def nan_row_0_after_its_eos(module, inputs, output):
        calls.append(1)
        if len(calls) >= 3:  # prefill, token 1, then the logits of token 2 onwards
            output.logits[0] = float("nan")
        return output

    expert.register_forward_hook(nan_row_0_after_its_eos)
    out = fn(base, expert, anti, ids, mask, **kw)
    assert len(calls) > 3
    assert torch.equal(out.tokens, clean.tokens) and torch.equal(out.lengths, clean.lengths)
    torch.testing.assert_close(out.logprobs, clean.logprobs)


# --------------------------------------------------------------------------- bf16

def _bf16_trio(family):
    return tuple(copy.deepcopy(m).to(torch.bfloat16) for m in trio(family))


def test_bf16_models_fused_equals_naive():
    """bf16 Llama base, Qwen2 expert, GPT-2 anti-expert: the fused op on bf16 logits."""
    family = "llama"
    base, expert, anti = _bf16_trio(family)
    ids, mask = ragged_batch()
    for kw in (dict(), dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02,
                            seed=torch.tensor([3, 4, 5]), alpha=torch.tensor([1.0, 0.5, 2.0]))):
        fused = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                     eos_token_id=[], return_logprobs=True,
                                     return_model_logprobs=True, **kw)
        naive = naive_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                     eos_token_id=[], return_logprobs=True,
                                     return_model_logprobs=True, **kw)
        assert torch.equal(fused.tokens, naive.tokens), kw
        assert fused.logprobs.dtype == torch.float32
        # bf16 forwards round differently in the engine's static cache and the baseline's
        # dynamic one (seen: up to 0.016 in a logprob); the tokens must still agree.
        torch.testing.assert_close(fused.logprobs, naive.logprobs, atol=5e-2, rtol=2e-2)
        for name, lp in naive.model_logprobs.items():
            torch.testing.assert_close(fused.model_logprobs[name], lp, atol=5e-2, rtol=2e-2)
    # bf16 really reached the op: the tokens are not the fp32 models' ones everywhere.
    fp32 = fused_proxy_generate(*trio(family), ids, mask, max_new_tokens=12, eos_token_id=[],
                                return_logprobs=True)
    assert not torch.equal(fp32.logprobs, fused.logprobs)


# --------------------------------------------------------------------------- processor

class Recorder:
    """Wraps a processor and keeps (input_ids, scores in, scores out) of every call."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __call__(self, input_ids, scores):
        scores_in = scores.clone()
        out = self.inner(input_ids, scores)
        self.calls.append((input_ids.clone(), scores_in, out.clone()))
        return out


def test_processor_past_its_initial_capacity():
    """90 new tokens (the runners start with room for 64): still fused_proxy_generate's."""
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    proc = ProxyTuningLogitsProcessor(expert, anti, attention_mask=mask)
    hf = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=90, do_sample=False,
                       eos_token_id=None, pad_token_id=PAD_ID,
                       logits_processor=LogitsProcessorList([proc]))
    fused = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=90,
                                 eos_token_id=[])
    assert hf.shape[1] == ids.shape[1] + 90
    assert torch.equal(hf, fused.sequences)


def test_processor_under_sampling_gets_raw_scores():
    """do_sample=True: generate applies its warpers (temperature, top-k) after custom
    processors, so the processor sees the base's raw logits and adds expert - anti; the
    temperature then scales the combined z, as in the op. 66 tokens: past capacity too."""
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    rec = Recorder(ProxyTuningLogitsProcessor(expert, anti, alpha=0.8, attention_mask=mask))
    torch.manual_seed(0)
    out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=66, do_sample=True,
                        temperature=0.6, top_k=20, eos_token_id=None, pad_token_id=PAD_ID,
                        logits_processor=LogitsProcessorList([rec]))
    assert out.shape[1] == ids.shape[1] + 66 and len(rec.calls) == 66
    for k in (0, 1, 63, 64, 65):
        seen, scores_in, scores_out = rec.calls[k]
        m = torch.cat([mask, torch.ones_like(seen[:, mask.shape[1]:])], 1)
        raw = full_logits(base, seen, m)
        torch.testing.assert_close(scores_in, raw, atol=1e-4, rtol=1e-4)  # not raw / 0.6
        delta = full_logits(expert, seen, m) - full_logits(anti, seen, m)
        torch.testing.assert_close(scores_out - scores_in, 0.8 * delta, atol=1e-4, rtol=1e-4)
