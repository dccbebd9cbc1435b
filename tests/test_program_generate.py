"""program_generate: logit programs over N models by role, through the decode engine.

Each preset is checked against an oracle written here from the papers' formulas in plain
torch (full no-cache forwards over the growing sequences, the formula applied by hand,
the op's sampling spec on the result), on ragged batches of tiny random-weight models of
three families; proxy tuning as a program gives exactly fused_proxy_generate's output.
"""
from __future__ import annotations

import math

import pytest
import torch

import proxykern
from proxykern import fused_proxy_generate, program_generate, programs, reference
from proxykern.params import row_tensor
from gen_fixtures import EOS_ID, full_logits, ragged_batch, tiny_model, trio

NINF = float("-inf")


def _top_p_keep(lg, p):
    """The base's own nucleus (DExperts): smallest prefix of sorted softmax reaching p, ties kept."""
    probs = torch.softmax(lg, -1)
    sorted_p, order = probs.sort(-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p
    keep_sorted = before < p
    threshold = torch.where(keep_sorted, sorted_p, torch.ones_like(sorted_p)).min(-1).values
    return probs >= threshold[:, None]


def formula(name, L, **kw):
    """z of a preset from the papers, on fp32 logits by role (B, V)."""
    if name == "contrastive":      # O'Brien & Lewis 2023: (1 + beta) L_e - beta L_a, plausibility
        beta, a = kw.get("beta", 0.5), kw.get("plausibility", 0.1)
        p = torch.softmax(L["expert"], -1)
        keep = p >= a * p.max(-1, keepdim=True).values
        z = (1 + beta) * L["expert"] - beta * L["amateur"]
        return z.masked_fill(~keep, NINF)
    if name == "contrastive_li":   # Li et al. 2022: L_e - L_a under the same constraint
        a = kw.get("plausibility", 0.1)
        p = torch.softmax(L["expert"], -1)
        keep = p >= a * p.max(-1, keepdim=True).values
        return (L["expert"] - L["amateur"]).masked_fill(~keep, NINF)
    if name == "dexperts":         # Liu et al. 2021: top-p of the base, then the ensemble
        alpha, top_p = kw.get("alpha", 2.0), kw.get("base_top_p", 0.9)
        keep = _top_p_keep(L["base"], top_p)
        z = L["base"] + alpha * (L["expert"] - L["anti_expert"])
        return z.masked_fill(~keep, NINF)
    if name == "ensemble":
        return sum(w * L[r] for r, w in kw["weights"].items())
    raise ValueError(name)


def oracle(models, prompts, n, name, temperature=0.0, seed=0, **kw):
    """Tokens (B, n) by full forwards; sampled draws use the op's spec on the oracle's z."""
    state = {r: (ids.clone(), mask.clone()) for r, (ids, mask) in prompts.items()}
    B = next(iter(prompts.values()))[0].shape[0]
    V = min(m.config.vocab_size for m in models.values())
    toks = []
    for t in range(n):
        L = {r: full_logits(models[r], *state[r])[:, :V] for r in models}
        z = formula(name, L, **kw)
        if temperature == 0:
            tok = z.argmax(-1)
        else:
            p = {k: row_tensor(k, v, B, z.device) for k, v in dict(
                temperature=temperature, top_k=0, top_p=1.0, min_p=0.0, seed=seed,
                step=t).items()}
            tok = reference.sample_logits_reference(z, p["temperature"], p["top_k"], p["top_p"],
                                                     p["min_p"], p["seed"], p["step"])[0]
        toks.append(tok)
        state = {r: (torch.cat([i, tok[:, None]], 1), torch.cat([m, torch.ones_like(m[:, :1])], 1))
                 for r, (i, m) in state.items()}
    return torch.stack(toks, 1)


PRESETS = [
    # Plausibility 0.5 / 0.3 keep 14-70 / 107-339 of the tiny models' 1000 tokens, so the
    # mask decides tokens here (at the papers' 0.1 it keeps 75-94% of these flat rows).
    ("contrastive", lambda: programs.contrastive(beta=0.5, plausibility=0.5),
     {"beta": 0.5, "plausibility": 0.5}, ("expert", "amateur")),
    ("contrastive_li", lambda: programs.contrastive(variant="li", plausibility=0.3),
     {"plausibility": 0.3}, ("expert", "amateur")),
    ("dexperts", lambda: programs.dexperts(alpha=2.0, base_top_p=0.9), {},
     ("base", "expert", "anti_expert")),
    ("ensemble", lambda: programs.ensemble({"a": 0.5, "b": 0.3, "c": 0.2}),
     {"weights": {"a": 0.5, "b": 0.3, "c": 0.2}}, ("a", "b", "c")),
]


def _models(roles):
    base, expert, anti = trio("llama")
    return dict(zip(roles, (base, expert, anti)))


@pytest.mark.parametrize("name,make,kw,roles", PRESETS, ids=[p[0] for p in PRESETS])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_presets_match_the_papers_formulas(name, make, kw, roles, temperature):
    models = _models(roles)
    ids, mask = ragged_batch()
    n = 6
    out = program_generate(make(), models, ids, mask, max_new_tokens=n, eos_token_id=[],
                           temperature=temperature, seed=5, return_logprobs=True)
    want = oracle(models, {r: (ids, mask) for r in roles}, n, name, temperature, seed=5, **kw)
    assert torch.equal(out.tokens, want), (out.tokens, want)
    assert out.sequences.shape == (3, ids.shape[1] + n)
    assert torch.isfinite(out.logprobs).all()


def test_proxy_tuning_program_is_fused_proxy_generate():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=7, temperature=0.9, top_p=0.9, seed=3, return_logprobs=True,
              return_model_logprobs=True)
    want = fused_proxy_generate(base, expert, anti, ids, mask, alpha=1.5, **kw)
    roles = {"base": base, "expert": expert, "anti_expert": anti}
    got = program_generate(programs.proxy_tuning(1.5), roles, ids, mask, **kw)
    for a, b in zip(got[:4], want[:4]):
        assert torch.equal(a, b)
    # The engine's own program path (role names that do not delegate) gives the same tokens.
    prog = programs.LogitProgram(("b", "e", "a"), difference=("b", "e", "a", 1.5))
    own = program_generate(prog, {"b": base, "e": expert, "a": anti}, ids, mask, **kw)
    assert torch.equal(own.tokens, want.tokens)
    assert torch.equal(own.lengths, want.lengths)
    torch.testing.assert_close(own.logprobs, want.logprobs)
    assert set(own.model_logprobs) == {"b", "e", "a"}
    torch.testing.assert_close(own.model_logprobs["e"], want.model_logprobs["expert"])


def test_role_prompts_eos_samples_and_per_row_values():
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    e_ids = torch.tensor([[2, 11, 57], [2, 77, 18], [2, 5, 6]])
    beta = torch.tensor([0.5, 0.0, 1.0])
    prog = programs.contrastive(beta=beta, plausibility=0.1)
    models = {"expert": expert, "amateur": anti}
    out = program_generate(prog, models, ids, mask, max_new_tokens=5, eos_token_id=[],
                           role_input_ids={"expert": e_ids})
    for row in range(3):  # per-row beta: each row as if alone with its number
        alone = program_generate(programs.contrastive(beta=float(beta[row]), plausibility=0.1),
                                 models, ids[row:row + 1, mask[row].bool()], max_new_tokens=5,
                                 eos_token_id=[], role_input_ids={"expert": e_ids[row:row + 1]})
        assert torch.equal(out.tokens[row], alone.tokens[0])
    # num_return_sequences with per-prompt values; EOS stops rows and pads them
    free = program_generate(prog, models, ids, mask, max_new_tokens=6, eos_token_id=[],
                            role_input_ids={"expert": e_ids}, temperature=1.0,
                            num_return_sequences=2, seed=1)
    assert free.tokens.shape == (6, 6)
    eos = int(free.tokens[0, 2])
    stopped = program_generate(prog, models, ids, mask, max_new_tokens=6, eos_token_id=eos,
                               pad_token_id=0, role_input_ids={"expert": e_ids},
                               temperature=1.0, num_return_sequences=2, seed=1)
    assert int(stopped.lengths[0]) <= 3 and (stopped.tokens[0, int(stopped.lengths[0]):] == 0).all()


def test_program_generate_refuses_bad_input():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    prog = programs.contrastive()
    ok = {"expert": expert, "amateur": anti}
    with pytest.raises(ValueError, match=r"missing \['amateur'\]"):
        program_generate(prog, {"expert": expert}, ids, mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="models must be a dict"):
        program_generate(prog, [expert, anti], ids, mask, max_new_tokens=2)
    with pytest.raises(TypeError, match="program must be a LogitProgram"):
        program_generate("contrastive", ok, ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="role_input_ids names unknown role"):
        program_generate(prog, ok, ids, mask, max_new_tokens=2, role_input_ids={"x": ids})
    with pytest.raises(ValueError, match=r"row 1: beta must be finite"):
        program_generate(programs.contrastive(beta=torch.tensor([0.5, math.nan, 1.0])), ok,
                         ids, mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="plausibility must be a number or a 1-D tensor of length 3"):
        program_generate(programs.contrastive(plausibility=torch.tensor([0.1, 0.2])), ok, ids,
                         mask, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_draft_tokens must be >= 0"):
        program_generate(prog, ok, ids, mask, max_new_tokens=2, num_draft_tokens=-1)
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be honoured: CUDA graphs need"):
        program_generate(prog, ok, ids, mask, max_new_tokens=2, num_draft_tokens=2,
                         cuda_graphs=True)
    with pytest.raises(ValueError, match="draft_role"):
        program_generate(prog, ok, ids, mask, max_new_tokens=2, draft_role="base")
    wide = tiny_model("llama", 3, vocab=4000)
    with pytest.raises(ValueError, match=r"models\['amateur'\] has a vocabulary of 4000"):
        program_generate(prog, {"expert": expert, "amateur": wide}, ids, mask, max_new_tokens=2)


def test_proxy_program_speculative_goes_through_the_proxy_engine():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    roles = {"base": base, "expert": expert, "anti_expert": anti}
    plain = program_generate(programs.proxy_tuning(1.0), roles, ids, mask, max_new_tokens=6)
    spec = program_generate(programs.proxy_tuning(1.0), roles, ids, mask, max_new_tokens=6,
                            num_draft_tokens=2, draft_role="expert")
    assert torch.equal(spec.tokens, plain.tokens) and spec.stats is not None


@pytest.mark.parametrize("name,make,kw,roles", PRESETS, ids=[p[0] for p in PRESETS])
@pytest.mark.parametrize("temperature,rounds", [(0.0, "static"), (1.0, "static"),
                                                (1.0, "eager")])
def test_speculative_programs_give_the_plain_tokens(monkeypatch, name, make, kw, roles,
                                                    temperature, rounds):
    """Every preset, each role drafting in turn, k = 3: the plain-decoding output, EOS and
    budget inside drafts, ragged rows; on static caches (the default for these models) and
    eagerly on dynamic caches."""
    import proxykern.engine.speculative as speculative
    monkeypatch.setattr(speculative, "STATIC_ROUNDS", rounds == "static")
    models = _models(roles)
    ids, mask = ragged_batch()
    common = dict(max_new_tokens=9, temperature=temperature, seed=2, return_logprobs=True,
                  return_model_logprobs=True)
    free = program_generate(make(), models, ids, mask, eos_token_id=[], **common)
    eos = int(free.tokens[1, 3])
    plain = program_generate(make(), models, ids, mask, eos_token_id=eos, **common)
    for drafter in roles:
        spec = program_generate(make(), models, ids, mask, eos_token_id=eos, num_draft_tokens=3,
                                draft_role=drafter, **common)
        assert torch.equal(spec.tokens, plain.tokens), (drafter, spec.tokens, plain.tokens)
        assert torch.equal(spec.lengths, plain.lengths)
        torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-4, rtol=1e-4)
        for r in roles:
            torch.testing.assert_close(spec.model_logprobs[r], plain.model_logprobs[r],
                                       atol=1e-4, rtol=1e-4)
        assert spec.stats is not None and spec.stats.num_draft_tokens == 3


def test_speculative_program_default_drafter_and_per_row_values():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    models = {"x": base, "y": tiny_model("llama", 7)}
    models["y"].model.layers = models["y"].model.layers[:1]  # fewer parameters: the default drafter
    weights = {"x": torch.tensor([0.2, 0.5, 0.9]), "y": 0.6}
    prog = programs.ensemble(weights)
    plain = program_generate(prog, models, ids, mask, max_new_tokens=7, eos_token_id=[],
                             temperature=0.7, seed=9, num_return_sequences=2)
    spec = program_generate(prog, models, ids, mask, max_new_tokens=7, eos_token_id=[],
                            temperature=0.7, seed=9, num_return_sequences=2, num_draft_tokens=2)
    assert torch.equal(spec.tokens, plain.tokens)
    drafted = []
    real = models["y"].forward

    def spy(*a, **k):
        drafted.append(k["input_ids"].shape[1])
        return real(*a, **k)

    models["y"].forward = spy
    try:
        program_generate(prog, models, ids, mask, max_new_tokens=5, eos_token_id=[],
                         num_draft_tokens=2)
    finally:
        del models["y"].forward
    assert drafted and max(drafted[1:]) == 1  # y runs one token at a time: it drafts


def test_zero_new_tokens_and_exports():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    out = program_generate(programs.ensemble({"x": 1.0, "y": 1.0}), {"x": base, "y": anti}, ids,
                           mask, max_new_tokens=0, return_model_logprobs=True)
    assert out.tokens.shape == (3, 0) and set(out.model_logprobs) == {"x", "y"}
    assert proxykern.program_generate is program_generate
    assert EOS_ID == 3


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("name,make,kw,roles", PRESETS, ids=[p[0] for p in PRESETS])
def test_program_step_replays_as_a_cuda_graph(name, make, kw, roles):
    """On CUDA the program step (a runner and side stream per role, the N-input op through
    Triton, a top-p pre-pass for DExperts) is captured once and replayed: the eager tokens;
    so are the static speculative rounds."""
    import copy
    models = {r: copy.deepcopy(m).to("cuda") for r, m in _models(roles).items()}
    ids, mask = (t.cuda() for t in ragged_batch())
    common = dict(max_new_tokens=12, eos_token_id=[], temperature=0.8, seed=4,
                  return_logprobs=True)
    graphed = program_generate(make(), models, ids, mask, cuda_graphs=True, **common)
    eager = program_generate(make(), models, ids, mask, cuda_graphs=False, **common)
    assert torch.equal(graphed.tokens, eager.tokens)
    torch.testing.assert_close(graphed.logprobs, eager.logprobs)
    rounds = program_generate(make(), models, ids, mask, cuda_graphs=True, num_draft_tokens=3,
                              **common)  # the speculative rounds captured (side streams)
    assert torch.equal(rounds.tokens, eager.tokens)
    torch.testing.assert_close(rounds.logprobs, eager.logprobs, atol=1e-4, rtol=1e-4)
