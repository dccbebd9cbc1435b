"""The vocabulary rule across widths (proxykern.generation_args, docs/api.md section 2).

The proxy vocabulary is the base's width V_b; on columns [V_d, V_b) (V_d: the narrowest
of expert, anti-expert and base) the delta is zero, so alpha = 0 and expert is anti_expert
give the base alone; a model that cannot read a base token reads pad_token_id instead;
model_logprobs are -inf outside a model's own columns. Tiny models, widths 161 and 150
(one vocabulary padded differently), with the base's extra columns made to win sometimes.
"""
from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessorList

from proxykern import (ProxyTuningLogitsProcessor, fused_proxy_generate, naive_proxy_generate,
                       proxy_logprobs)
from proxykern.engine import ProxyStep
from proxykern.generation_args import prepare_generation, shared_vocab_size, vocab_plan

from gen_fixtures import PAD_ID, full_logits, pad_left, tiny_model

WIDE, NARROW = 161, 150
N_NEW = 12
GENERATORS = [fused_proxy_generate, naive_proxy_generate]
CASES = {  # (base, expert, anti_expert) output widths
    "narrow_experts": (WIDE, NARROW, NARROW),
    "narrow_expert_only": (WIDE, NARROW, WIDE),
    "narrow_base": (NARROW, WIDE, WIDE),
}


def models(case: str):
    """(base, expert, anti) of the case's widths; the base's columns >= 150 (if any) are
    scaled up so that they win at some steps (asserted where it matters)."""
    wb, we, wa = CASES[case]
    base = tiny_model("llama", 0, vocab=wb)
    with torch.no_grad():
        base.get_output_embeddings().weight[NARROW:] *= 2
    return base, tiny_model("qwen2", 1, vocab=we), tiny_model("llama", 2, vocab=wa)


def prompts():
    return pad_left([[11, 57, 103, 9, 40], [77, 18], [5, 6, 7, 8, 9, 10, 149]])


def base_alone(base, ids, mask, n=N_NEW):
    """Oracle: HF greedy generate of the base alone."""
    out = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                        eos_token_id=None, pad_token_id=PAD_ID)
    return out[:, ids.shape[1]:]


def recompute(base, expert, anti, ids, mask, n, alpha, pad=PAD_ID):
    """Oracle: greedy proxy tuning by full no-cache forwards, the rule written out: z = base
    on every base column, + alpha * (expert - anti) on the columns all three have; the
    expert and anti-expert read ``pad`` for a token beyond their embeddings."""
    V_b = full_logits(base, ids, mask).shape[-1]
    toks = []
    for _ in range(n):
        reads = {m: torch.where(ids < m.get_input_embeddings().num_embeddings, ids, pad)
                 for m in (expert, anti)}
        b = full_logits(base, ids, mask)
        e, a = full_logits(expert, reads[expert], mask), full_logits(anti, reads[anti], mask)
        V_d = min(e.shape[-1], a.shape[-1], V_b)
        z = b.clone()
        z[:, :V_d] += alpha * (e[:, :V_d] - a[:, :V_d])
        tok = z.argmax(-1)
        toks.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(toks, 1)


def hand_z(base, expert, anti, ids, mask, alpha):
    """z of the next token by the rule, from full forwards (prompt ids all readable)."""
    b, e, a = (full_logits(m, ids, mask) for m in (base, expert, anti))
    V_d = min(e.shape[-1], a.shape[-1], b.shape[-1])
    z = b.clone()
    z[:, :V_d] += alpha * (e[:, :V_d] - a[:, :V_d])
    return z


# --------------------------------------------------------------------------- alpha = 0

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("fn", GENERATORS, ids=["fused", "naive"])
def test_alpha_zero_and_shared_expert_give_the_base_alone(case, fn):
    base, expert, anti = models(case)
    ids, mask = prompts()
    ref = base_alone(base, ids, mask)
    if case != "narrow_base":  # the base's own extra columns really win somewhere
        assert bool((ref >= NARROW).any()) and bool((ref < NARROW).any())
    zero = fn(base, expert, anti, ids, mask, max_new_tokens=N_NEW, alpha=0.0, eos_token_id=[])
    assert torch.equal(zero.tokens, ref)
    same = fn(base, expert, expert, ids, mask, max_new_tokens=N_NEW, alpha=1.5, eos_token_id=[])
    assert torch.equal(same.tokens, ref)


# --------------------------------------------------------------------------- alpha != 0

@pytest.mark.parametrize("case", CASES)
def test_greedy_follows_the_rule_and_the_stand_in(case):
    """fused == naive == the written-out rule with the stand-in, for two pad ids."""
    base, expert, anti = models(case)
    ids, mask = prompts()
    for pad in (PAD_ID, 7):
        ref = recompute(base, expert, anti, ids, mask, N_NEW, alpha=1.0, pad=pad)
        for fn in GENERATORS:
            out = fn(base, expert, anti, ids, mask, max_new_tokens=N_NEW, alpha=1.0,
                     eos_token_id=[], pad_token_id=pad)
            assert torch.equal(out.tokens, ref), (fn.__name__, pad)
        # A tail token is fed back mid-generation (not only drawn last), so the stand-in is used.
        if case != "narrow_base":
            assert bool((ref[:, :-1] >= NARROW).any())


def test_one_step_of_the_op_is_the_hand_formula():
    base, expert, anti = models("narrow_experts")
    ids, mask = prompts()
    alpha = 1.5
    z = hand_z(base, expert, anti, ids, mask, alpha)
    # Columns [150, 161) are the base's own logits; [0, 150) the steered ones.
    torch.testing.assert_close(z[:, NARROW:], full_logits(base, ids, mask)[:, NARROW:])
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, mask, max_new_tokens=1, alpha=alpha, eos_token_id=[],
                 return_logprobs=True)
        tok = z.argmax(-1)
        assert torch.equal(out.tokens[:, 0], tok)
        torch.testing.assert_close(out.logprobs[:, 0],
                                   torch.log_softmax(z, -1).gather(1, tok[:, None])[:, 0],
                                   atol=1e-5, rtol=1e-5)
    # The whole distribution, through scoring: every base token as a one-token continuation.
    ctx = [ids[1][mask[1].bool()].tolist()] * WIDE
    scored = proxy_logprobs(base, expert, anti, ctx, [[t] for t in range(WIDE)], alpha=alpha)
    torch.testing.assert_close(scored.logprobs[:, 0], torch.log_softmax(z[1], -1),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_sampled_fused_equals_naive(case):
    base, expert, anti = models(case)
    ids, mask = prompts()
    kw = dict(max_new_tokens=N_NEW, alpha=0.8, temperature=1.0, seed=11, eos_token_id=[],
              return_logprobs=True, return_model_logprobs=True)
    fused = fused_proxy_generate(base, expert, anti, ids, mask, **kw)
    naive = naive_proxy_generate(base, expert, anti, ids, mask, **kw)
    assert torch.equal(fused.tokens, naive.tokens)
    torch.testing.assert_close(fused.logprobs, naive.logprobs, atol=1e-4, rtol=1e-4)
    for name, lp in naive.model_logprobs.items():
        torch.testing.assert_close(fused.model_logprobs[name], lp, atol=1e-4, rtol=1e-4)
    if case != "narrow_base":
        assert bool((fused.tokens >= NARROW).any())


def test_stand_in_must_be_readable():
    base, expert, anti = models("narrow_experts")
    ids, mask = prompts()
    for fn in GENERATORS:
        with pytest.raises(ValueError, match="pad_token_id 155 .*expert"):
            fn(base, expert, anti, ids, mask, max_new_tokens=2, pad_token_id=155)
    with pytest.raises(ValueError, match="pad_token_id 155"):
        proxy_logprobs(base, expert, anti, [[5, 6]], [[7]], pad_token_id=155)
    # No model needs a stand-in (the base is the narrowest): no constraint beyond the usual.
    nb = models("narrow_base")
    assert fused_proxy_generate(*nb, ids, mask, max_new_tokens=2, pad_token_id=155,
                                eos_token_id=[]).tokens.shape == (3, 2)


# --------------------------------------------------------------------------- model_logprobs

def test_model_logprobs_are_own_columns_and_minus_inf_outside():
    base, expert, anti = models("narrow_expert_only")  # expert 150, anti 161
    ids, mask = prompts()
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, mask, max_new_tokens=N_NEW, alpha=0.0,
                 eos_token_id=[], return_model_logprobs=True)
        tail = out.tokens >= NARROW
        assert bool(tail.any()) and bool((~tail).any())
        lp = out.model_logprobs
        assert bool(torch.isneginf(lp["expert"][tail]).all())
        assert bool(torch.isfinite(lp["expert"][~tail]).all())
        assert bool(torch.isfinite(lp["base"]).all()) and bool(torch.isfinite(lp["anti_expert"]).all())
        # The anti-expert's own distribution: all its 161 columns, the stand-in-free prompt.
        first = torch.log_softmax(full_logits(anti, ids, mask), -1)
        torch.testing.assert_close(lp["anti_expert"][:, 0],
                                   first.gather(1, out.tokens[:, :1])[:, 0], atol=1e-5, rtol=1e-5)
        expert_first = torch.log_softmax(full_logits(expert, ids, mask), -1)
        keep = ~tail[:, 0]
        torch.testing.assert_close(
            lp["expert"][keep, 0],
            expert_first[keep].gather(1, out.tokens[keep, :1])[:, 0], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- processor

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_processor_equals_fused(case, alpha):
    base, expert, anti = models(case)
    ids, mask = prompts()
    proc = ProxyTuningLogitsProcessor(expert, anti, alpha=alpha, attention_mask=mask)
    hf = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=N_NEW, do_sample=False,
                       eos_token_id=None, pad_token_id=PAD_ID,
                       logits_processor=LogitsProcessorList([proc]))
    fused = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=N_NEW,
                                 alpha=alpha, eos_token_id=[])
    assert torch.equal(hf, fused.sequences)
    if case != "narrow_base":
        assert bool((fused.tokens[:, :-1] >= NARROW).any())


# --------------------------------------------------------------------------- scoring

@pytest.mark.parametrize("case", CASES)
def test_scoring_alpha_zero_is_the_base_and_rule_holds(case):
    base, expert, anti = models(case)
    ids, mask = prompts()
    cont = base_alone(base, ids, mask, n=8)
    ctx = [ids[i][mask[i].bool()].tolist() for i in range(3)]
    out = proxy_logprobs(base, expert, anti, ctx, cont, alpha=0.0, return_model_logprobs=True)
    full_ids, full_mask = torch.cat([ids, cont], 1), torch.cat([mask, torch.ones_like(cont)], 1)
    with torch.no_grad():
        logits = base(input_ids=full_ids, attention_mask=full_mask,
                      position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits
    own = torch.log_softmax(logits[:, ids.shape[1] - 1:-1].float(), -1)
    want = own.gather(2, cont[:, :, None])[:, :, 0]
    torch.testing.assert_close(out.logprobs, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.model_logprobs["base"], want, atol=1e-5, rtol=1e-5)
    assert bool(out.greedy.all())
    if case != "narrow_base":
        assert bool((cont >= NARROW).any())
        assert bool(torch.isneginf(out.model_logprobs["expert"][cont >= NARROW]).all())
    # alpha != 0: scoring what fused generation chose gives its logprobs (same stand-in).
    gen = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, alpha=1.0,
                               eos_token_id=[], return_logprobs=True)
    scored = proxy_logprobs(base, expert, anti, ctx, gen.tokens, alpha=1.0)
    torch.testing.assert_close(scored.logprobs, gen.logprobs, atol=1e-4, rtol=1e-4)
    assert bool(scored.greedy.all())


# --------------------------------------------------------------------------- speculative

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("sampling", [{}, dict(temperature=1.0, seed=5)],
                         ids=["greedy", "sampled"])
def test_speculative_equals_plain(case, sampling):
    base, expert, anti = models(case)
    ids, mask = prompts()
    kw = dict(max_new_tokens=N_NEW, alpha=1.0, eos_token_id=[], return_logprobs=True,
              return_model_logprobs=True, **sampling)
    plain = fused_proxy_generate(base, expert, anti, ids, mask, **kw)
    spec = fused_proxy_generate(base, expert, anti, ids, mask, num_draft_tokens=2, **kw)
    assert torch.equal(spec.tokens, plain.tokens)
    torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)
    for name, lp in plain.model_logprobs.items():
        torch.testing.assert_close(spec.model_logprobs[name], lp, atol=1e-4, rtol=1e-4)
    if case != "narrow_base":
        assert bool((plain.tokens[:, :-1] >= NARROW).any())


# --------------------------------------------------------------------------- the plan, the engine

def test_plan_and_the_narrowest_width_helper():
    base, expert, anti = models("narrow_expert_only")
    plan = vocab_plan(base, expert, anti, PAD_ID)
    assert (plan.vocab_size, plan.delta_width, plan.widens) == (WIDE, NARROW, True)
    assert plan.own_widths == {"base": WIDE, "expert": NARROW, "anti_expert": WIDE}
    assert plan.stand_ins["base"] is None and plan.stand_ins["anti_expert"] is None
    assert tuple(plan.stand_ins["expert"]) == (NARROW, PAD_ID)
    assert shared_vocab_size(base, expert, anti) == NARROW  # kept: the common columns
    wide = vocab_plan(*models("narrow_base"), PAD_ID)
    assert (wide.vocab_size, wide.delta_width, wide.widens) == (NARROW, NARROW, False)
    assert all(s is None for s in wide.stand_ins.values())
    e, a = torch.randn(2, WIDE), torch.randn(2, WIDE)
    same_e, same_a = wide.widen(e, a)  # nothing narrower: the same tensors, no copy
    assert same_e is e and same_a is a


@pytest.mark.parametrize("case", ["narrow_experts", "narrow_base"])
def test_step_widens_into_persistent_buffers_only_when_needed(case):
    base, expert, anti = models(case)
    ids, mask = prompts()
    args = prepare_generation(
        base, expert, anti, ids, mask, max_new_tokens=5, alpha=1.0, temperature=0.0, top_k=0,
        top_p=1.0, min_p=0.0, seed=0, eos_token_id=[], pad_token_id=None, expert_input_ids=None,
        expert_attention_mask=None, return_logprobs=False, return_model_logprobs=False,
        streamer=None, backend="auto", cuda_graphs=False)
    step = ProxyStep(base, expert, anti, args)
    with torch.no_grad():
        step.prefill()
        if case == "narrow_base":
            assert step.wide is None
            return
        ptrs = [w.data_ptr() for w in step.wide]
        for _ in range(4):
            step.advance()
            assert [w.data_ptr() for w in step.wide] == ptrs
            assert all(w.shape == (3, WIDE) and not w[:, NARROW:].any() for w in step.wide)
    assert torch.equal(step.output().tokens, recompute(base, expert, anti, ids, mask, 5, 1.0))


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("case", ["narrow_experts", "narrow_expert_only"])
def test_graph_replay_with_widths_equals_naive(case):
    ms = [m.to("cuda") for m in models(case)]
    ids, mask = (t.cuda() for t in prompts())
    for sampling in ({}, dict(temperature=1.0, seed=torch.tensor([1, 2, 3], device="cuda"))):
        kw = dict(max_new_tokens=24, alpha=1.0, eos_token_id=[], return_logprobs=True,
                  return_model_logprobs=True, **sampling)
        graphed = fused_proxy_generate(*ms, ids, mask, cuda_graphs=True, **kw)
        naive = naive_proxy_generate(*ms, ids, mask, **kw)
        assert torch.equal(graphed.tokens, naive.tokens)
        assert bool((graphed.tokens >= NARROW).any())
        torch.testing.assert_close(graphed.logprobs, naive.logprobs, atol=1e-4, rtol=1e-4)
        for name, lp in naive.model_logprobs.items():
            torch.testing.assert_close(graphed.model_logprobs[name], lp, atol=1e-4, rtol=1e-4)
