"""proxy_logprobs on tiny random models (CPU, fp32): teacher-forced proxy-tuned log-probs."""
from __future__ import annotations


import pytest
import torch

import proxykern
from proxykern import fused_proxy_generate, proxy_logprobs

from gen_fixtures import FAMILIES, VOCAB, pad_left, ragged_batch, trio

CONTEXTS = [[11, 57, 203, 9, 400], [77], [5, 6, 7, 8, 9, 10, 999], [42, 43]]
CONTINUATIONS = [[12, 13, 14], [600, 1, 2, 3, 4, 5], [], [999]]
EXPERT_CONTEXTS = [[2, 30, 31, 11, 57, 203, 9, 400, 3], [2, 77, 3], [5, 999], [2, 3, 42, 43, 8]]


def own_logits(model, ctx, cont):
    """One row alone, no padding: fp32 logits (len(cont), V) predicting ``cont``."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0].float()
    return logits[len(ctx) - 1:len(ctx) - 1 + len(cont)]


def reference(base, expert, anti, ctx, cont, e_ctx=None, alpha=1.0, temperature=1.0):
    """Per row: log_softmax((b + alpha (e - a)) / T)[token], argmax flags, own log-probs."""
    e_ctx = ctx if e_ctx is None else e_ctx
    rows = []
    for i, (c, x, ec) in enumerate(zip(ctx, cont, e_ctx)):
        a_i = float(alpha[i]) if isinstance(alpha, torch.Tensor) else alpha
        t_i = float(temperature[i]) if isinstance(temperature, torch.Tensor) else temperature
        lb, le, la = own_logits(base, c, x), own_logits(expert, ec, x), own_logits(anti, c, x)
        z = lb + a_i * (le - la)
        tok = torch.tensor(x, dtype=torch.long)[:, None]
        rows.append(dict(
            logprobs=torch.log_softmax(z / t_i, -1).gather(1, tok).squeeze(1),
            greedy=z.argmax(-1) == tok.squeeze(1),
            own={n: torch.log_softmax(lg, -1).gather(1, tok).squeeze(1)
                 for n, lg in (("base", lb), ("expert", le), ("anti_expert", la))}))
    return rows


def assert_matches(out, ref, lengths, model_logprobs=True):
    assert out.lengths.tolist() == lengths
    assert out.logprobs.shape == (len(lengths), max(lengths))
    assert out.logprobs.dtype == torch.float32
    for i, (r, n) in enumerate(zip(ref, lengths)):
        torch.testing.assert_close(out.logprobs[i, :n], r["logprobs"], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.greedy[i, :n], r["greedy"])
        assert (out.logprobs[i, n:] == 0).all() and out.greedy[i, n:].all()
        if model_logprobs:
            for name in ("base", "expert", "anti_expert"):
                torch.testing.assert_close(out.model_logprobs[name][i, :n], r["own"][name],
                                           atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("expert_prompt", [False, True], ids=["shared", "expert-prompt"])
def test_equals_reference_on_ragged_batches(family, expert_prompt):
    base, expert, anti = trio(family)
    e_ctx = EXPERT_CONTEXTS if expert_prompt else None
    out = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, expert_context=e_ctx,
                         alpha=0.8, return_model_logprobs=True)
    ref = reference(base, expert, anti, CONTEXTS, CONTINUATIONS, e_ctx, alpha=0.8)
    assert_matches(out, ref, [len(x) for x in CONTINUATIONS])
    totals = out.logprobs.sum(1)
    for i, r in enumerate(ref):
        torch.testing.assert_close(totals[i], r["logprobs"].sum(), atol=1e-4, rtol=1e-4)


def test_per_row_alpha_temperature_and_chunks():
    base, expert, anti = trio("qwen2")
    alpha = torch.tensor([0.0, 1.5, -0.5, 2.0])
    temperature = torch.tensor([1.0, 0.7, 2.0, 1.3])
    ref = reference(base, expert, anti, CONTEXTS, CONTINUATIONS, EXPERT_CONTEXTS, alpha=alpha,
                    temperature=temperature)
    lengths = [len(x) for x in CONTINUATIONS]
    for chunk_size in (1, 3, 1024):
        out = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS,
                             expert_context=EXPERT_CONTEXTS, alpha=alpha,
                             temperature=temperature, chunk_size=chunk_size,
                             return_model_logprobs=True)
        assert_matches(out, ref, lengths)
    scalar = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=1.0,
                            temperature=0.5, chunk_size=2, backend="torch")
    assert_matches(scalar, reference(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=1.0,
                                     temperature=0.5), lengths, model_logprobs=False)
    assert scalar.model_logprobs is None


def test_tensor_inputs_and_empty_continuations():
    base, expert, anti = trio("llama")
    ctx = torch.tensor([[11, 57, 203], [5, 6, 7]])
    cont = torch.tensor([[9, 400], [8, 9]])
    a = proxy_logprobs(base, expert, anti, ctx, cont)
    b = proxy_logprobs(base, expert, anti, ctx.tolist(), [torch.tensor(r) for r in cont.tolist()])
    assert torch.equal(a.logprobs, b.logprobs)
    empty = proxy_logprobs(base, expert, anti, [[1, 2]], [[]], return_model_logprobs=True)
    assert empty.logprobs.shape == (1, 0) and empty.lengths.tolist() == [0]
    assert set(empty.model_logprobs) == {"base", "expert", "anti_expert"}


# --------------------------------------------------------------------------- generation, alpha 0

@pytest.mark.parametrize("family", FAMILIES)
def test_equals_generation_logprobs_of_its_greedy_output(family):
    base, expert, anti = trio(family)
    ids, mask = ragged_batch()
    e_ids, e_mask = pad_left([[2, 11, 57, 203, 9, 400, 3], [2, 77, 18, 3], [7, 8, 9, 10, 999]])
    for expert_kwargs in ({}, dict(expert_input_ids=e_ids, expert_attention_mask=e_mask)):
        gen = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=7, alpha=1.2,
                                   eos_token_id=[], return_logprobs=True,
                                   return_model_logprobs=True, **expert_kwargs)
        ctx = [ids[i][mask[i].bool()].tolist() for i in range(ids.shape[0])]
        cont = [gen.tokens[i, :int(gen.lengths[i])].tolist() for i in range(ids.shape[0])]
        e_ctx = ([e_ids[i][e_mask[i].bool()].tolist() for i in range(e_ids.shape[0])]
                 if expert_kwargs else None)
        out = proxy_logprobs(base, expert, anti, ctx, cont, expert_context=e_ctx, alpha=1.2,
                             return_model_logprobs=True)
        torch.testing.assert_close(out.logprobs, gen.logprobs, atol=1e-4, rtol=1e-4)
        assert out.greedy.all()  # the generated tokens are the greedy ones
        for name in ("base", "expert", "anti_expert"):
            torch.testing.assert_close(out.model_logprobs[name], gen.model_logprobs[name],
                                       atol=1e-4, rtol=1e-4)


def test_alpha_zero_gives_the_base_log_probs():
    base, expert, anti = trio("gpt2")
    out = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=0.0,
                         expert_context=EXPERT_CONTEXTS, return_model_logprobs=True)
    torch.testing.assert_close(out.logprobs, out.model_logprobs["base"], atol=1e-5, rtol=1e-5)
    for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS)):
        own = torch.log_softmax(own_logits(base, c, x), -1)
        torch.testing.assert_close(out.logprobs[i, :len(x)],
                                   own.gather(1, torch.tensor(x)[:, None]).squeeze(1),
                                   atol=1e-5, rtol=1e-5)
    shared = proxy_logprobs(base, expert, expert, CONTEXTS, CONTINUATIONS, alpha=1.7)
    torch.testing.assert_close(shared.logprobs, out.logprobs, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, exc, name", [
    (dict(context=[[1, 2], []]), ValueError, "context[1]"),
    (dict(context="hello"), TypeError, "context"),
    (dict(continuation=[[1]]), ValueError, "continuation"),
    (dict(continuation=[[1], [VOCAB]]), ValueError, "continuation[1]"),
    (dict(continuation=[[1.5], [2]]), TypeError, "continuation[0]"),
    (dict(context=torch.ones(2, 2)), TypeError, "context"),
    (dict(expert_context=[[1]]), ValueError, "expert_context"),
    (dict(expert_context=[[1], [-1]]), ValueError, "expert_context[1]"),
    (dict(alpha=float("nan")), ValueError, "alpha"),
    (dict(alpha=torch.tensor([1.0, float("inf")])), ValueError, "alpha[1]"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=torch.ones(3)), ValueError, "temperature"),
    (dict(chunk_size=0), ValueError, "chunk_size"),
    (dict(return_model_logprobs=1), TypeError, "return_model_logprobs"),
    (dict(backend="nope"), ValueError, "backend"),
])
def test_bad_arguments_name_the_argument(kwargs, exc, name):
    base, expert, anti = trio("llama")
    args = dict(context=[[1, 2], [3]], continuation=[[4], [5, 6]])
    args.update(kwargs)
    with pytest.raises(exc, match=name.replace("[", r"\[").replace("]", r"\]")):
        proxy_logprobs(base, expert, anti, **args)


def test_bad_models_and_exports():
    base, expert, anti = trio("llama")
    with pytest.raises(TypeError, match="expert"):
        proxy_logprobs(base, "expert", anti, [[1]], [[2]])
    assert proxykern.proxy_logprobs is proxy_logprobs
    assert "proxy_logprobs" in proxykern.__all__
