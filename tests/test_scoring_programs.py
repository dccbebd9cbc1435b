"""program_logprobs and sweeps (proxykern.scoring) on tiny random Llama models (CPU, fp32):
every preset against its formula written out here in plain torch over full-sequence
logits, proxy tuning against proxy_logprobs, sweeps against separate calls, forwards
counted, bad inputs."""
from __future__ import annotations

import functools
import math

import pytest
import torch

from proxykern import programs
from proxykern.scoring import program_logprobs, proxy_logprobs

from gen_fixtures import VOCAB, tiny_model

NINF = float("-inf")
CONTEXTS = [[11, 57, 203, 9, 400], [77], [5, 6, 7, 8, 9, 10, 999], [42, 43]]
CONTINUATIONS = [[12, 13, 14, 500, 7], [600, 1, 2, 3, 4, 5], [], [999, 31]]
CHAT_CONTEXTS = [[2, 30, 31, 11, 57, 203, 9, 400, 3], [2, 77, 3], [5, 999], [2, 3, 42, 43, 8]]
LENGTHS = [len(x) for x in CONTINUATIONS]


@functools.lru_cache(maxsize=None)
def llama(seed: int, vocab: int = VOCAB):
    return tiny_model("llama", seed, vocab)


def trio():
    return llama(10), llama(11), llama(12)


# --------------------------------------------------------------------------- the formulas

def row_logits(model, ctx, cont):
    """One row alone, no padding, the whole sequence: fp32 logits (len(cont), V) whose
    row j predicts cont[j]."""
    with torch.no_grad():
        logits = model(torch.tensor([ctx + cont])).logits[0].float()
    return logits[len(ctx) - 1:len(ctx) - 1 + len(cont)]


def nucleus(L, p):
    """Holtzman et al.'s top-p set of softmax(L) (float64): the smallest top prefix whose
    mass reaches p, ties at its last value kept."""
    probs = torch.softmax(L.double(), -1)
    sp, _ = torch.sort(probs, -1, descending=True)
    cum = sp.cumsum(-1)
    n = (cum < p * cum[:, -1:]).sum(-1, keepdim=True).clamp(max=L.shape[-1] - 1)
    return probs >= sp.gather(-1, n)


def plausible(L, a):
    """Li et al.'s V_head: p(v) >= a max p (float64)."""
    probs = torch.softmax(L.double(), -1)
    return probs >= a * probs.max(-1, keepdim=True).values


def formula(name, L, **kw):
    """(z, kept) of one row's positions from the papers' formulas; L: role -> (n, V)."""
    if name == "dexperts":
        return (L["base"] + kw["alpha"] * (L["expert"] - L["anti_expert"]),
                nucleus(L["base"], kw["base_top_p"]))
    if name == "contrastive":
        beta = kw["beta"]
        return ((1 + beta) * L["expert"] - beta * L["amateur"],
                plausible(L["expert"], kw["plausibility"]))
    if name == "contrastive_li":
        return L["expert"] - L["amateur"], plausible(L["expert"], kw["plausibility"])
    if name == "ensemble":
        z = sum(w * L[r] for r, w in kw["weights"].items())
        return z, torch.ones_like(z, dtype=torch.bool)
    raise ValueError(name)


def expected(name, models, role_context=None, temperature=1.0, **kw):
    """Per row: (logprobs, greedy flags) of the continuation under the formula."""
    out = []
    for i, (c, x) in enumerate(zip(CONTEXTS, CONTINUATIONS)):
        L = {r: row_logits(m, (role_context or {}).get(r, CONTEXTS)[i], x)
             for r, m in models.items()}
        z, kept = formula(name, L, **kw)
        z = z.masked_fill(~kept, NINF)
        tok = torch.tensor(x, dtype=torch.long)[:, None]
        out.append((torch.log_softmax(z / temperature, -1).gather(1, tok).squeeze(1),
                    z.argmax(-1) == tok.squeeze(1)))
    return out


def assert_rows(logprobs, greedy, ref):
    assert logprobs.shape == (len(LENGTHS), max(LENGTHS)) and logprobs.dtype == torch.float32
    for i, ((lp, g), n) in enumerate(zip(ref, LENGTHS)):
        assert torch.equal(torch.isneginf(logprobs[i, :n]), torch.isneginf(lp)), i
        finite = ~torch.isneginf(lp)
        torch.testing.assert_close(logprobs[i, :n][finite], lp[finite], atol=1e-4, rtol=1e-4)
        assert torch.equal(greedy[i, :n], g)
        assert (logprobs[i, n:] == 0).all() and greedy[i, n:].all()


# --------------------------------------------------------------------------- proxy tuning

@pytest.mark.parametrize("alpha", [0.8, torch.tensor([0.0, 1.5, -0.5, 2.0])],
                         ids=["scalar", "per-row"])
def test_proxy_tuning_program_is_proxy_logprobs(alpha):
    base, expert, anti = trio()
    for temperature in (1.0, 0.7):
        want = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS,
                              expert_context=CHAT_CONTEXTS, alpha=alpha, temperature=temperature,
                              return_model_logprobs=True, chunk_size=5)
        got = program_logprobs(programs.proxy_tuning(alpha),
                               {"base": base, "expert": expert, "anti_expert": anti},
                               CONTEXTS, CONTINUATIONS, role_context={"expert": CHAT_CONTEXTS},
                               temperature=temperature, return_model_logprobs=True,
                               chunk_size=5)
        assert torch.equal(got.logprobs, want.logprobs)
        assert torch.equal(got.greedy, want.greedy)
        assert torch.equal(got.lengths, want.lengths)
        for name in ("base", "expert", "anti_expert"):
            assert torch.equal(got.model_logprobs[name], want.model_logprobs[name])


def test_narrower_expert_gets_a_zero_delta_as_in_proxy_logprobs():
    base, expert, anti = llama(10), llama(11, VOCAB - 8), llama(12)
    models = {"base": base, "expert": expert, "anti_expert": anti}
    ctx = [[11, 57, 203], [77], [5, 6, 7], [42, 43]]  # ids every model reads
    cont = [[12, VOCAB - 3], [VOCAB - 1, 5, 6], [], [4]]  # the expert reads a stand-in
    want = proxy_logprobs(base, expert, anti, ctx, cont, alpha=1.3)
    got = program_logprobs(programs.proxy_tuning(1.3), models, ctx, cont)
    assert torch.equal(got.logprobs, want.logprobs) and torch.equal(got.greedy, want.greedy)
    # A linear program scores over the narrowest width: a wider token is out of range.
    ens = programs.ensemble({"base": 0.5, "expert": 0.3, "anti_expert": 0.2})
    with pytest.raises(ValueError, match=r"continuation\[0\] holds token id 997"):
        program_logprobs(ens, models, ctx, cont)


# --------------------------------------------------------------------------- the presets

PRESETS = [
    ("dexperts", dict(alpha=2.0, base_top_p=0.9), ("base", "expert", "anti_expert")),
    ("contrastive", dict(beta=0.5, plausibility=0.1), ("expert", "amateur")),
    ("contrastive_li", dict(plausibility=0.1), ("expert", "amateur")),
    ("ensemble", dict(weights={"a": 0.5, "b": 0.3, "c": 0.7}), ("a", "b", "c")),
]


def preset(name, **kw):
    if name == "contrastive_li":
        return programs.contrastive(variant="li", **kw)
    return getattr(programs, name)(**kw)


@pytest.mark.parametrize("name, kw, roles", PRESETS, ids=[p[0] for p in PRESETS])
def test_presets_equal_their_formulas(name, kw, roles):
    models = dict(zip(roles, trio()))
    role_context = {roles[0]: CHAT_CONTEXTS}  # the first role reads its own prompt
    for temperature in (1.0, 1.3):
        out = program_logprobs(preset(name, **kw), models, CONTEXTS, CONTINUATIONS,
                               role_context=role_context, temperature=temperature,
                               chunk_size=4, return_model_logprobs=True)
        ref = expected(name, models, role_context, temperature, **kw)
        assert_rows(out.logprobs, out.greedy, ref)
        assert set(out.model_logprobs) == set(roles)
        for r, m in models.items():
            ctx = role_context.get(r, CONTEXTS)
            for i, x in enumerate(CONTINUATIONS):
                own = torch.log_softmax(row_logits(m, ctx[i], x), -1)
                torch.testing.assert_close(out.model_logprobs[r][i, :len(x)],
                                           own.gather(1, torch.tensor(x)[:, None]).squeeze(1),
                                           atol=1e-4, rtol=1e-4)
    if name != "ensemble":  # the masks drop some continuation tokens and keep others
        flat = torch.cat([lp for lp, _g in ref])
        assert torch.isneginf(flat).any() and torch.isfinite(flat).any()
        assert torch.isneginf(out.logprobs.sum(1)).any()  # impossible continuations


def test_per_row_program_values():
    models = dict(zip(("expert", "amateur"), trio()))
    beta = torch.tensor([0.0, 0.5, 1.0, 2.0])
    a = torch.tensor([0.1, 0.2, 0.05, 0.3])
    out = program_logprobs(programs.contrastive(beta=beta, plausibility=a), models, CONTEXTS,
                           CONTINUATIONS)
    for i in range(len(CONTEXTS)):
        ref = expected("contrastive", models, beta=float(beta[i]), plausibility=float(a[i]))
        lp, g = ref[i]
        n = LENGTHS[i]
        assert torch.equal(torch.isneginf(out.logprobs[i, :n]), torch.isneginf(lp))
        finite = ~torch.isneginf(lp)
        torch.testing.assert_close(out.logprobs[i, :n][finite], lp[finite], atol=1e-4, rtol=1e-4)
        assert torch.equal(out.greedy[i, :n], g)


# --------------------------------------------------------------------------- sweeps

def test_alpha_sweep_equals_separate_calls():
    base, expert, anti = trio()
    alphas = [0.0, 0.5, 1.0, 2.0]
    for kwargs in ({}, dict(expert_context=CHAT_CONTEXTS, temperature=0.8, chunk_size=3)):
        sweep = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=alphas,
                               return_model_logprobs=True, **kwargs)
        B, L = len(CONTEXTS), max(LENGTHS)
        assert sweep.logprobs.shape == (4, B, L) and sweep.greedy.shape == (4, B, L)
        assert sweep.lengths.tolist() == LENGTHS
        for k, a in enumerate(alphas):
            one = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=a,
                                 return_model_logprobs=True, **kwargs)
            assert one.logprobs.shape == (B, L)
            assert torch.equal(sweep.logprobs[k], one.logprobs)
            assert torch.equal(sweep.greedy[k], one.greedy)
            for name, lp in one.model_logprobs.items():
                assert torch.equal(sweep.model_logprobs[name], lp)
    single = proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=(1.0,))
    assert single.logprobs.shape == (1, len(CONTEXTS), max(LENGTHS))
    empty = proxy_logprobs(base, expert, anti, [[1]], [[]], alpha=[0.0, 1.0])
    assert empty.logprobs.shape == (2, 1, 0) and empty.greedy.shape == (2, 1, 0)


def test_program_list_equals_separate_calls():
    models = dict(zip(("expert", "amateur"), trio()))
    progs = [programs.contrastive(beta=b) for b in (0.0, 0.5, 1.0)]
    progs.append(programs.contrastive(variant="li", plausibility=0.2))
    progs.append(programs.ensemble({"amateur": -0.5, "expert": 1.5}))  # same roles, other order
    sweep = program_logprobs(progs, models, CONTEXTS, CONTINUATIONS, chunk_size=4,
                             role_context={"expert": CHAT_CONTEXTS})
    assert sweep.logprobs.shape == (len(progs), len(CONTEXTS), max(LENGTHS))
    for k, p in enumerate(progs):
        one = program_logprobs(p, models, CONTEXTS, CONTINUATIONS, chunk_size=4,
                               role_context={"expert": CHAT_CONTEXTS})
        assert torch.equal(sweep.logprobs[k], one.logprobs)
        assert torch.equal(sweep.greedy[k], one.greedy)


def count_forwards(monkeypatch, *models):
    """Wrap each distinct model's forward; returns the list of models called, in order."""
    calls = []
    for m in dict.fromkeys(models):
        original = m.forward

        def forward(*args, _m=m, _f=original, **kwargs):
            calls.append(_m)
            return _f(*args, **kwargs)
        monkeypatch.setattr(m, "forward", forward)
    return calls


def test_a_sweep_runs_one_forward_per_model(monkeypatch):
    base, expert, anti = trio()
    calls = count_forwards(monkeypatch, base, expert, anti)
    proxy_logprobs(base, expert, anti, CONTEXTS, CONTINUATIONS, alpha=[0.0, 0.5, 1.0, 2.0],
                   expert_context=CHAT_CONTEXTS)
    assert sorted(map(id, calls)) == sorted(map(id, (base, expert, anti)))
    calls.clear()
    progs = [programs.dexperts(alpha=a) for a in (0.5, 1.0, 2.0)] + [programs.proxy_tuning(1.0)]
    program_logprobs(progs, {"base": base, "expert": expert, "anti_expert": anti}, CONTEXTS,
                     CONTINUATIONS, role_context={"expert": CHAT_CONTEXTS})
    assert len(calls) == 3 and set(map(id, calls)) == {id(base), id(expert), id(anti)}
    calls.clear()
    # A model read twice with the same context runs once; with two contexts, twice.
    program_logprobs(programs.proxy_tuning(1.0), {"base": base, "expert": expert,
                                                 "anti_expert": expert}, CONTEXTS, CONTINUATIONS)
    assert len(calls) == 2
    calls.clear()
    program_logprobs(programs.contrastive(), {"expert": expert, "amateur": expert}, CONTEXTS,
                     CONTINUATIONS, role_context={"expert": CHAT_CONTEXTS})
    assert len(calls) == 2


# --------------------------------------------------------------------------- bad input

def esc(name):
    return name.replace("[", r"\[").replace("]", r"\]")


@pytest.mark.parametrize("alpha, exc, name", [
    ([], ValueError, "alpha"),
    ([1.0, "x"], TypeError, "alpha[1]"),
    ([True], TypeError, "alpha[0]"),
    ([0.5, torch.tensor(1.0)], TypeError, "alpha[1]"),
    ([1.0, math.nan], ValueError, "alpha[1]"),
    ([math.inf], ValueError, "alpha[0]"),
])
def test_bad_alpha_sweeps_name_the_argument(alpha, exc, name):
    base, expert, anti = trio()
    with pytest.raises(exc, match=esc(name)):
        proxy_logprobs(base, expert, anti, [[1, 2], [3]], [[4], [5, 6]], alpha=alpha)


def bad_program_cases():
    pt = programs.proxy_tuning()
    return [
        (dict(program=[]), ValueError, "program"),
        (dict(program="proxy"), TypeError, "program"),
        (dict(program=[pt, "x"]), TypeError, "program[1]"),
        (dict(program=[pt, programs.contrastive()]), ValueError, "program[1]"),
        (dict(models=[1, 2, 3]), TypeError, "models"),
        (dict(models={"base": 0, "expert": 0}), ValueError, "models"),
        (dict(models={"base": 0, "expert": 0, "anti_expert": 0, "x": 0}), ValueError, "models"),
        (dict(models="bad-expert"), TypeError, "models['expert']"),
        (dict(role_context={"amateur": [[1], [2]]}), ValueError, "role_context"),
        (dict(role_context=[[1], [2]]), TypeError, "role_context"),
        (dict(role_context={"expert": [[1]]}), ValueError, "role_context['expert']"),
        (dict(role_context={"expert": [[1], []]}), ValueError, "role_context['expert'][1]"),
        (dict(role_context={"expert": [[1], [VOCAB]]}), ValueError, "role_context['expert'][1]"),
        (dict(continuation=[[1], [VOCAB]]), ValueError, "continuation[1]"),
        (dict(program=programs.proxy_tuning(torch.ones(3))), ValueError, "alpha"),
        (dict(program=programs.proxy_tuning(torch.tensor([1.0, math.nan]))), ValueError, "alpha"),
        (dict(program=programs.dexperts(base_top_p=torch.tensor([0.5, 2.0]))), ValueError,
         "base_top_p"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
        (dict(return_model_logprobs="yes"), TypeError, "return_model_logprobs"),
    ]


@pytest.mark.parametrize("kwargs, exc, name", bad_program_cases(),
                         ids=lambda v: None if isinstance(v, dict) else str(v))
def test_bad_program_arguments_name_the_argument(kwargs, exc, name):
    base, expert, anti = trio()
    args = dict(program=programs.proxy_tuning(), context=[[1, 2], [3]],
                continuation=[[4], [5, 6]],
                models={"base": base, "expert": expert, "anti_expert": anti})
    if kwargs.get("models") == "bad-expert":
        kwargs = dict(kwargs, models={"base": base, "expert": "x", "anti_expert": anti})
    args.update(kwargs)
    with pytest.raises(exc, match=esc(name)):
        program_logprobs(args.pop("program"), args.pop("models"), **args)
