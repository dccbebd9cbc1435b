"""Logit programs (proxykern.programs, docs/api.md section 1b): every preset against its
paper's formula written out here in plain torch, every CPU backend against
reference.program_reference, masks, per-row values, bad inputs, one chi-square check."""
from __future__ import annotations


import pytest
import torch
from scipy import stats

import proxykern
from proxykern import ops, programs, reference
from proxykern.params import SamplingParams, row_tensor
from op_cases import fused_backends

BACKENDS = [pytest.param(b, marks=pytest.mark.triton) if b == "triton" else b
            for b in fused_backends("cpu") + ["torch"]]
NINF = float("-inf")


def row_params(values: dict, B: int, device) -> dict:
    """(B,) tensors of the given sampling values (the op's own rule, proxykern.params)."""
    return {name: row_tensor(name, value, B, device) for name, value in values.items()}


def logits_for(roles, B, V, *, seed, dtype=torch.float32, scale=3.0, widths=None):
    gen = torch.Generator().manual_seed(seed)
    widths = widths or {}
    return {r: (torch.randn(B, widths.get(r, V), generator=gen) * scale).to(dtype) for r in roles}


# --------------------------------------------------------------------------- the papers' formulas

def nucleus_set(L, p):
    """Holtzman et al.'s top-p set of softmax(L), float64: the smallest top prefix whose
    mass reaches p, ties at its last value kept."""
    probs = torch.softmax(L.double(), dim=1)
    sp, _ = torch.sort(probs, dim=1, descending=True)
    cum = sp.cumsum(1)
    p = torch.as_tensor(p, dtype=torch.float64).reshape(-1, 1).expand(L.shape[0], 1)
    n = (cum < p * cum[:, -1:]).sum(1, keepdim=True).clamp(max=L.shape[1] - 1)
    threshold = sp.gather(1, n)
    return probs >= threshold


def plausible_set(L, a):
    """Li et al.'s V_head: p(v) >= a * max p (float64 probabilities)."""
    probs = torch.softmax(L.double(), dim=1)
    a = torch.as_tensor(a, dtype=torch.float64).reshape(-1, 1)
    return probs >= a * probs.max(1, keepdim=True).values


def col(x, B):
    return torch.as_tensor(x, dtype=torch.float32).reshape(-1, 1).expand(B, 1)


def paper_z(name, L, **kw):
    """z of each preset from its paper, plain torch; the kept mask separately."""
    B = next(iter(L.values())).shape[0]
    if name == "proxy_tuning":
        return L["base"] + col(kw["alpha"], B) * (L["expert"] - L["anti_expert"]), None
    if name == "dexperts":
        z = L["base"] + col(kw["alpha"], B) * (L["expert"] - L["anti_expert"])
        return z, nucleus_set(L["base"], kw["base_top_p"])
    if name == "contrastive":
        beta = col(kw["beta"], B)
        return (1 + beta) * L["expert"] - beta * L["amateur"], plausible_set(L["expert"], kw["a"])
    if name == "contrastive_li":
        return L["expert"] - L["amateur"], plausible_set(L["expert"], kw["a"])
    if name == "ensemble":
        z = sum(col(w, B) * L[r] for r, w in kw["weights"].items())
        return z, None
    raise AssertionError(name)


PRESETS = {
    "proxy_tuning": (lambda: programs.proxy_tuning(alpha=1.5), dict(alpha=1.5)),
    "dexperts": (lambda: programs.dexperts(), dict(alpha=2.0, base_top_p=0.9)),
    "contrastive": (lambda: programs.contrastive(), dict(beta=0.5, a=0.1)),
    "contrastive_li": (lambda: programs.contrastive(variant="li", plausibility=0.1), dict(a=0.1)),
    "ensemble": (lambda: programs.ensemble(weights={"a": 0.5, "b": 0.3, "c": 0.2}),
                 dict(weights={"a": 0.5, "b": 0.3, "c": 0.2})),
}


def sampled_from(z, kept, temperature, seed, step):
    """The op's draw on an independently computed z (reference's post-combine part)."""
    z = z.float()
    if kept is not None:
        z = z.masked_fill(~kept, NINF)
    B = z.shape[0]
    params = row_params(dict(temperature=temperature, top_k=0, top_p=1.0, min_p=0.0,
                                 seed=seed, step=step), B, z.device)
    return reference.sample_logits_reference(z, params["temperature"], params["top_k"],
                                             params["top_p"], params["min_p"], params["seed"],
                                             params["step"])


def test_presets_defaults_and_roles():
    assert programs.proxy_tuning().roles == ("base", "expert", "anti_expert")
    d = programs.dexperts()
    assert d.roles == ("base", "expert", "anti_expert")
    assert d.difference[3] == 2.0 and d.mask.kind == "top_p" and d.mask.value == 0.9
    c = programs.contrastive()
    assert c.roles == ("expert", "amateur") and c.coefficients == (1.5, -0.5)
    assert c.mask.kind == "plausibility" and c.mask.role == "expert" and c.mask.value == 0.1
    li = programs.contrastive(variant="li")
    assert li.coefficients == (1.0, -1.0) and li.mask.value == 0.1
    assert programs.ensemble(weights={"x": 0.5, "y": 0.5}).roles == ("x", "y")
    assert proxykern.program_sample is programs.program_sample


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_preset_matches_its_paper_formula(preset, backend):
    make, kw = PRESETS[preset]
    prog = make()
    B, V = 6, 300 if backend == "triton" else 1000
    L = logits_for(prog.roles, B, V, seed=11)
    z, kept = paper_z(preset, L, **kw)
    masked = z if kept is None else z.masked_fill(~kept, NINF)
    # greedy: the argmax of the paper's z
    out = proxykern.program_sample(prog, L, backend=backend)
    assert torch.equal(out.tokens, masked.argmax(1))
    torch.testing.assert_close(out.logprobs, torch.log_softmax(masked, 1).gather(
        1, out.tokens[:, None])[:, 0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.lse, torch.logsumexp(masked, 1), rtol=1e-5, atol=1e-4)
    # sampled, same seed: the op's draw from the paper's z
    for seed, T in ((0, 1.0), (123, 0.7)):
        out = proxykern.program_sample(prog, L, temperature=T, seed=seed, step=5, backend=backend)
        tokens, logprobs, lse, status = sampled_from(z, kept, T, seed, 5)
        assert torch.equal(out.tokens, tokens)
        torch.testing.assert_close(out.logprobs, logprobs, rtol=1e-5, atol=2e-4)
        torch.testing.assert_close(out.lse, torch.logsumexp(masked / T, 1), rtol=1e-5, atol=2e-4)


def run_program(prog, L, backend, **kw):
    out = proxykern.program_sample(prog, L, backend=backend, **kw)
    return out


def reference_of(prog, L, vocab_size=None, **kw):
    B = next(iter(L.values())).shape[0]
    V = vocab_size or min(t.shape[1] for t in L.values())
    sampling = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0)
    sampling.update(kw)
    p = row_params(sampling, B, torch.device("cpu"))
    return reference.program_reference(prog, L, p["temperature"], p["top_k"], p["top_p"],
                                       p["min_p"], p["seed"], p["step"], V)


SAMPLING = [dict(), dict(temperature=1.0, seed=7), dict(temperature=0.8, top_k=20, seed=3, step=2),
            dict(temperature=1.2, top_p=0.8, min_p=0.01, seed=-5, step=9)]


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backends_match_program_reference(preset, backend, dtype):
    prog = PRESETS[preset][0]()
    L = logits_for(prog.roles, 5, 333, seed=3, dtype=dtype)
    for kw in SAMPLING:
        out = run_program(prog, L, backend, **kw)
        tokens, logprobs, lse, status = reference_of(prog, L, **kw)
        assert torch.equal(out.tokens, tokens), kw
        torch.testing.assert_close(out.logprobs, logprobs, rtol=1e-5, atol=2e-4)
        torch.testing.assert_close(out.lse, lse, rtol=1e-5, atol=2e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_proxy_tuning_program_is_proxy_sample_bitwise(backend):
    L = logits_for(("base", "expert", "anti_expert"), 7, 500, seed=5, dtype=torch.bfloat16,
                   widths={"base": 512})
    alpha = torch.linspace(0.0, 2.0, 7)
    slow = backend == "triton"  # the interpreter: fewer launches
    for a in ((0.3, alpha) if slow else (1.0, 0.3, alpha)):
        for kw in (SAMPLING[1::2] if slow else SAMPLING):
            got = proxykern.program_sample(programs.proxy_tuning(a), L, backend=backend, **kw)
            want = proxykern.proxy_sample(L["base"], L["expert"], L["anti_expert"], alpha=a,
                                          backend=backend, **kw)
            for g, w in zip(got, want):
                assert torch.equal(g, w)


def _one_row(value, r):
    return value[r].item() if isinstance(value, torch.Tensor) else value


@pytest.mark.parametrize("backend", BACKENDS)
def test_per_row_coefficients_and_masks(backend):
    B, V = 4, 200
    seeds = torch.tensor([1, 2, 3, 4])
    cases = [
        (programs.dexperts, dict(alpha=torch.tensor([0.0, 1.0, 2.0, 3.5]),
                                 base_top_p=torch.tensor([0.5, 0.9, 1.0, 0.2]))),
        (programs.contrastive, dict(beta=torch.tensor([0.0, 0.5, 1.0, 2.0]),
                                    plausibility=torch.tensor([1.0, 0.1, 0.01, 0.5]))),
        (lambda **k: programs.contrastive(variant="li", **k),
         dict(plausibility=torch.tensor([0.3, 0.1, 1.0, 0.05]))),
        (lambda **k: programs.ensemble(weights=k),
         dict(a=torch.tensor([1.0, 0.5, 0.0, 2.0]), b=0.5, c=torch.tensor([0.0, 0.5, 1.0, -1.0]))),
    ]
    for make, kw in cases:
        prog = make(**kw)
        L = logits_for(prog.roles, B, V, seed=9)
        out = proxykern.program_sample(prog, L, temperature=1.0, seed=seeds, backend=backend)
        tokens, logprobs, lse, status = reference_of(prog, L, temperature=1.0, seed=seeds)
        assert torch.equal(out.tokens, tokens)
        for r in range(B):
            row_prog = make(**{k: _one_row(v, r) for k, v in kw.items()})
            one = proxykern.program_sample(row_prog, {k: v[r:r + 1] for k, v in L.items()},
                                           temperature=1.0, seed=seeds[r:r + 1], backend=backend)
            assert one.tokens.item() == out.tokens[r].item()
            torch.testing.assert_close(one.lse, out.lse[r:r + 1])


def test_plausibility_mask_keeps_exactly_the_plausible_set():
    B, V = 64, 500
    L = logits_for(("expert", "amateur"), B, V, seed=21, scale=2.0)
    a = torch.rand(B, generator=torch.Generator().manual_seed(1)) * 0.99 + 0.01
    a[0] = 1.0
    drop = reference.program_mask("plausibility", a, L["expert"])
    assert torch.equal(~drop, plausible_set(L["expert"], a))
    # and the op's lse is over exactly that set (masked tokens carry no mass)
    prog = programs.contrastive(variant="li", plausibility=a)
    out = proxykern.program_sample(prog, L, temperature=1.0)
    z = (L["expert"] - L["amateur"]).masked_fill(~plausible_set(L["expert"], a), NINF)
    torch.testing.assert_close(out.lse, torch.logsumexp(z, 1), rtol=1e-5, atol=1e-4)
    assert plausible_set(L["expert"], a).gather(1, out.tokens[:, None]).all()
    # a hand-made row: p proportional to 1, 0.5, 0.1, 0.09, with a = 0.1
    L1 = torch.log(torch.tensor([[1.0, 0.5, 0.1, 0.09]]))
    assert (~reference.program_mask("plausibility", 0.1, L1)).tolist() == [[True, True, True, False]]


def test_dexperts_masks_with_the_bases_own_top_p_set():
    B, V = 32, 400
    L = logits_for(("base", "expert", "anti_expert"), B, V, seed=4, scale=2.0)
    p = torch.rand(B, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    drop = reference.program_mask("top_p", p, L["base"])
    assert torch.equal(~drop, nucleus_set(L["base"], p))
    out = proxykern.program_sample(programs.dexperts(alpha=2.0, base_top_p=p), L, temperature=1.0,
                                   seed=1)
    assert nucleus_set(L["base"], p).gather(1, out.tokens[:, None]).all()
    z = (L["base"] + 2.0 * (L["expert"] - L["anti_expert"])).masked_fill(drop, NINF)
    torch.testing.assert_close(out.lse, torch.logsumexp(z, 1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_neg_inf_inputs_excluded_and_widths(backend):
    L = logits_for(("a", "b", "c"), 3, 120, seed=8, widths={"b": 128, "c": 125})
    L["a"][0, :60] = NINF
    L["b"][1, 5] = NINF
    L["c"][2, :] = 0.0
    prog = programs.ensemble(weights={"a": 1.0, "b": 0.0, "c": -1.0})  # 0 * -inf is not NaN here
    L["b"][0, 100] = NINF
    out = proxykern.program_sample(prog, L, temperature=1.0, seed=2, backend=backend)
    tokens, logprobs, lse, status = reference_of(prog, L, temperature=1.0, seed=2)
    assert torch.equal(out.tokens, tokens) and (status == 0).all()
    assert out.tokens[0] >= 60 and out.tokens[0] != 100
    z = L["a"][:, :120] - L["c"][:, :120]
    z[1, 5] = NINF
    z[0, 100] = NINF
    torch.testing.assert_close(out.lse, torch.logsumexp(z, 1), rtol=1e-5, atol=1e-4)
    out = proxykern.program_sample(prog, L, vocab_size=80, seed=2, temperature=1.0, backend=backend)
    assert (out.tokens < 80).all() and out.tokens[0] >= 60
    assert torch.equal(out.tokens, reference_of(prog, L, vocab_size=80, temperature=1.0, seed=2)[0])


def test_combine_of_z_z_z_alpha_0_is_z_exactly():
    """The general path hands the op (z, z, z) with alpha 0: its z is the program's z."""
    z = torch.randn(4, 300) * 50
    z[0, :10] = NINF
    z[1, 3] = -0.0
    for backend in [b if isinstance(b, str) else b.values[0] for b in BACKENDS]:
        got = ops.proxy_sample(z, z, z, alpha=0.0, temperature=0.9, seed=4, backend=backend)
        params = row_params(dict(temperature=0.9, top_k=0, top_p=1.0, min_p=0.0, seed=4,
                                     step=0), 4, z.device)
        want = reference.sample_logits_reference(z, params["temperature"], params["top_k"],
                                                 params["top_p"], params["min_p"],
                                                 params["seed"], params["step"])
        assert torch.equal(got.tokens, want[0])
        torch.testing.assert_close(got.logprobs, want[1], rtol=1e-5, atol=2e-4)


def _two(B=2, V=10, **kw):
    return logits_for(("expert", "amateur"), B, V, seed=0, **kw)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: programs.contrastive(plausibility=0.0), ValueError, "plausibility"),
    (lambda: programs.contrastive(plausibility=1.5), ValueError, "plausibility"),
    (lambda: programs.contrastive(beta=float("nan")), ValueError, "beta"),
    (lambda: programs.contrastive(variant="li", beta=0.5), ValueError, "beta"),
    (lambda: programs.contrastive(variant="x"), ValueError, "variant"),
    (lambda: programs.contrastive(beta="1"), TypeError, "beta"),
    (lambda: programs.dexperts(base_top_p=0.0), ValueError, "base_top_p"),
    (lambda: programs.dexperts(base_top_p=1.01), ValueError, "base_top_p"),
    (lambda: programs.dexperts(alpha=float("inf")), ValueError, "alpha"),
    (lambda: programs.proxy_tuning(alpha=torch.ones(2, 2)), ValueError, "alpha"),
    (lambda: programs.ensemble(weights={"a": 1.0}), ValueError, "weights"),
    (lambda: programs.ensemble(weights={str(i): 1.0 for i in range(9)}), ValueError, "weights"),
    (lambda: programs.ensemble(weights={"a": 1.0, "b": float("nan")}), ValueError, "weights\\['b'\\]"),
    (lambda: programs.ensemble(weights=[1.0, 2.0]), TypeError, "weights"),
    (lambda: programs.LogitProgram(("a", "a"), coefficients=(1.0, 1.0)), ValueError, "roles"),
    (lambda: programs.LogitProgram(("a", "b"), coefficients=(1.0, 1.0),
                                   mask=programs.ProgramMask("plausibility", "c", 0.1)),
     ValueError, "unknown role 'c'"),
    (lambda: programs.ProgramMask("top_k", "a", 0.1), ValueError, "kind"),
    (lambda: proxykern.program_sample(programs.contrastive(), {"expert": _two()["expert"]}),
     ValueError, "missing role.*amateur"),
    (lambda: proxykern.program_sample(programs.contrastive(), {**_two(), "base": _two()["expert"]}),
     ValueError, "unknown role.*base"),
    (lambda: proxykern.program_sample(programs.contrastive(),
                                      {"expert": _two()["expert"], "amateur": torch.zeros(3, 10)}),
     ValueError, "logits\\['amateur'\\] has batch size 3"),
    (lambda: proxykern.program_sample(programs.contrastive(),
                                      {"expert": _two()["expert"], "amateur": torch.zeros(2, 10, 1)}),
     ValueError, "logits\\['amateur'\\] must be 2-D"),
    (lambda: proxykern.program_sample(programs.contrastive(),
                                      {"expert": _two()["expert"],
                                       "amateur": torch.zeros(2, 10, dtype=torch.int64)}),
     TypeError, "logits\\['amateur'\\] must be float32"),
    (lambda: proxykern.program_sample(programs.contrastive(), _two(), vocab_size=11),
     ValueError, "vocab_size"),
    (lambda: proxykern.program_sample(programs.contrastive(), _two(), temperature=-1.0),
     ValueError, "temperature"),
    (lambda: proxykern.program_sample(programs.contrastive(), _two(), top_p=0.0),
     ValueError, "top_p"),
    (lambda: proxykern.program_sample(programs.contrastive(), _two(), backend="nope"),
     ValueError, "backend"),
    (lambda: proxykern.program_sample(programs.contrastive(beta=torch.ones(3)), _two()),
     ValueError, "beta must be .* length 2"),
    (lambda: proxykern.program_sample(programs.contrastive(plausibility=torch.tensor([0.1, 0.0])),
                                      _two()), ValueError, "row 1: plausibility"),
    (lambda: proxykern.program_sample(programs.dexperts(base_top_p=torch.tensor([0.9, 2.0])),
                                      logits_for(("base", "expert", "anti_expert"), 2, 10, seed=0)),
     ValueError, "row 1: base_top_p"),
    (lambda: proxykern.program_sample(programs.contrastive(beta=torch.tensor([float("nan"), 1.0])),
                                      _two()), ValueError, "row 0: beta"),
    (lambda: proxykern.program_sample(
        programs.ensemble(weights={"expert": torch.tensor([1.0, float("inf")]), "amateur": 1.0}),
        _two()), ValueError, "row 1: weights\\['expert'\\]"),
    (lambda: proxykern.program_sample(programs.proxy_tuning(alpha=torch.tensor([1.0, float("nan")])),
                                      logits_for(("base", "expert", "anti_expert"), 2, 10, seed=0)),
     ValueError, "row 1: alpha"),
    (lambda: proxykern.program_sample(programs.contrastive(variant="li"),
                                      {"expert": torch.full((2, 10), NINF), "amateur": torch.zeros(2, 10)}),
     ValueError, "row 0: no token can be kept"),
    (lambda: proxykern.program_sample(programs.ensemble(weights={"expert": 1.0, "amateur": 1.0}),
                                      {"expert": torch.tensor([[0.0, float("nan")]] * 2),
                                       "amateur": torch.zeros(2, 2)}),
     ValueError, "row 0: its combined logits hold NaN"),
    (lambda: proxykern.program_sample(programs.contrastive(),
                                      {"expert": torch.tensor([[0.0, float("nan")]] * 2),
                                       "amateur": torch.zeros(2, 2)}),
     ValueError, "row 0: its combined logits hold NaN"),
    (lambda: proxykern.program_sample("contrastive", _two()), TypeError, "program"),
])
def test_bad_inputs_name_the_argument(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_chi_square_of_contrastive_draws():
    """O'Brien & Lewis's preset, sampled at T = 0.8 with top_k 6: draw frequencies against
    the renormalised softmax of the paper's z over the kept set."""
    V, n = 12, 40000
    gen = torch.Generator().manual_seed(3)
    Le, La = torch.randn(1, V, generator=gen), torch.randn(1, V, generator=gen)
    z, kept = paper_z("contrastive", {"expert": Le, "amateur": La}, beta=0.5, a=0.1)
    zp = z.masked_fill(~kept, NINF) / 0.8
    top6 = zp >= torch.sort(zp, descending=True).values[:, 5:6]
    probs = torch.softmax(zp.masked_fill(~top6, NINF).double(), 1)[0]
    L = {"expert": Le.expand(n, V), "amateur": La.expand(n, V)}
    out = proxykern.program_sample(programs.contrastive(), L, temperature=0.8, top_k=6, seed=17)
    counts = torch.bincount(out.tokens, minlength=V).double()
    support = probs > 0
    assert counts[~support].sum() == 0
    result = stats.chisquare(counts[support].numpy(), (probs[support] * n).numpy())
    assert result.pvalue > 1e-3, result


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("preset", ["contrastive", "dexperts", "ensemble"])
def test_program_sample_traces_whole_under_torch_compile(compiler, backend, preset):
    """fullgraph=True through program_sample (the binding, the masks, the N-input op, the
    status handling) and the engine's no-check entry, giving the eager tokens."""
    torch._dynamo.reset()
    B, V = 3, 200
    per_row = torch.tensor([0.5, 1.0, 2.0])
    prog = {"contrastive": programs.contrastive(beta=per_row, plausibility=0.05),
            "dexperts": programs.dexperts(alpha=per_row, base_top_p=0.8),
            "ensemble": programs.ensemble({"a": per_row, "b": 0.5, "c": -0.25})}[preset]
    L = logits_for(prog.roles, B, V, seed=21)

    def sample(*tensors):
        out = programs.program_sample(prog, dict(zip(prog.roles, tensors)), temperature=0.8,
                                      top_k=50, seed=3, step=2, backend=backend)
        return out.tokens, out.logprobs

    tensors = [L[r] for r in prog.roles]
    tokens, logprobs = torch.compile(sample, backend=compiler, fullgraph=True)(*tensors)
    want_tokens, want_logprobs = sample(*tensors)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs)

    bound = programs.bind_program(prog, B, torch.device("cpu"))
    params = SamplingParams.build(dict(temperature=0.8, top_k=50, seed=3,
                                       alpha=bound.scale if bound.scale is not None else 0.0),
                                  B, torch.device("cpu"), V)
    step = torch.full((B,), 2, dtype=torch.long)

    def engine_entry(*tensors):
        return programs.program_rows(bound, list(tensors), params, step, V, backend)[0]

    traced = torch.compile(engine_entry, backend=compiler, fullgraph=True)(*tensors)
    assert torch.equal(traced, want_tokens)
