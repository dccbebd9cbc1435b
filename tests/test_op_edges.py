"""Edges of the op that each backend must meet against the reference (and the reference
against a direct computation, so the ``torch`` cases do not compare it with itself)."""
from __future__ import annotations

import pytest
import torch

from proxykern import reference
from op_cases import fused_backends, random_logits, run

CPU_BACKENDS = fused_backends("cpu") + ["torch"]
NEG_INF = float("-inf")


# --------------------------------------------------------------------------- top_k > vocab

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_top_k_beyond_the_vocabulary_keeps_everything(backend):
    """top_k >= vocab_size (scalar or per row, up to 10**9) is top_k = 0: no filter."""
    V, B = 37, 6
    inputs = random_logits(B, V, torch.float32, seed=41, scale=1.5, width=V + 5)
    seeds = torch.arange(B) * 101 + 3
    for extra in (dict(), dict(top_p=0.9), dict(min_p=0.05)):
        base_kw = dict(temperature=1.0, seed=seeds, step=2, vocab_size=V, **extra)
        plain = run(backend, *inputs, **base_kw)
        assert (plain[3] == 0).all()
        for top_k in (V, V + 1, 10 ** 6,
                      torch.tensor([0, V + 3, 10 ** 9, V, V + 5, 2 ** 40])):
            got = run(backend, *inputs, top_k=top_k, **base_kw)
            assert (got[3] == 0).all(), f"top_k={top_k}"
            assert torch.equal(got[0], plain[0]), f"top_k={top_k} {extra}"
            torch.testing.assert_close(got[1], plain[1])
    # And the draws are not all one token: the filter-free sets are really sampled from.
    assert len(set(plain[0].tolist())) > 1


# --------------------------------------------------------------------------- the -inf rule

ALPHAS = [0.0, -0.5, 1.0, 2.0]


def _neg_inf_inputs(which: str):
    """A finite base; ``which`` of expert/anti are -inf at the base's 6 largest tokens."""
    B, V = 5, 300
    base, expert, anti = random_logits(B, V, torch.float32, seed=43, scale=2.0)
    excluded = torch.zeros(B, V, dtype=torch.bool)
    excluded.scatter_(1, base.topk(6, dim=1).indices, True)
    if "expert" in which:
        expert = expert.masked_fill(excluded, NEG_INF)
    if "anti" in which:
        anti = anti.masked_fill(excluded, NEG_INF)
    return (base, expert, anti), excluded


def _direct(base, expert, anti, excluded, alpha, temperature, seed, step):
    """Token and lse written out from docs/api.md: -inf in any input excludes the token."""
    e = expert.masked_fill(excluded, 0.0)
    a = anti.masked_fill(excluded, 0.0)
    z = (base + torch.tensor(alpha, dtype=torch.float32) * (e - a)).masked_fill(excluded, NEG_INF)
    if temperature == 0:
        return z.argmax(1), torch.logsumexp(z, 1)
    zp = z / temperature
    g = reference.gumbel_noise(seed, torch.full_like(seed, step), z.shape[1])
    return (zp + g).argmax(1), torch.logsumexp(zp, 1)


@pytest.mark.parametrize("which", ["expert+anti", "expert", "anti"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neg_inf_rule_against_the_reference(backend, which):
    (base, expert, anti), excluded = _neg_inf_inputs(which)
    B = base.shape[0]
    seed = torch.arange(B) * 977 + 11
    for alpha in ALPHAS:
        for temperature, filters in ((0.0, {}), (1.0, {}), (0.7, {}),
                                     (1.0, dict(top_p=0.8, top_k=20))):
            kw = dict(alpha=alpha, temperature=temperature, seed=seed, step=4, **filters)
            ref = run("torch", base, expert, anti, **kw)
            got = run(backend, base, expert, anti, **kw)
            case = f"alpha={alpha} T={temperature} {filters}"
            assert (ref[3] == 0).all() and (got[3] == 0).all(), case
            assert torch.equal(got[0], ref[0]), case
            torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=2e-4)
            torch.testing.assert_close(got[2], ref[2], rtol=2e-5, atol=2e-4)
            assert not excluded.gather(1, got[0][:, None]).any(), case
            if not filters:  # the reference itself against the rule written out
                token, lse = _direct(base, expert, anti, excluded, alpha, temperature, seed, 4)
                assert torch.equal(ref[0], token), case
                torch.testing.assert_close(ref[2], lse)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_neg_inf_rule_matters_here(backend):
    """The excluded tokens are the base's best: a backend that let them through would pick them."""
    (base, expert, anti), excluded = _neg_inf_inputs("expert+anti")
    greedy = run(backend, base, expert, anti, alpha=0.0)[0]
    assert torch.equal(greedy, base.masked_fill(excluded, NEG_INF).argmax(1))
    assert not torch.equal(greedy, base.argmax(1))


# --------------------------------------------------------------------------- padded widths

@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_padded_widths_against_narrow_reference(backend):
    """Wide, differently padded inputs with vocab_size give the narrow reference's draws."""
    V = 1000
    base, expert, anti = random_logits(4, V, torch.float32, seed=47, width=1024)
    expert = torch.cat([expert, torch.randn(4, 40)], dim=1)
    base[:, V:] = 1e4
    anti[:, V:] = -1e4
    narrow = [t[:, :V].contiguous() for t in (base, expert, anti)]
    kw = dict(alpha=1.5, temperature=0.8, top_p=0.95, seed=torch.arange(4) + 9, step=1)
    got = run(backend, base, expert, anti, vocab_size=V, **kw)
    ref = run("torch", *narrow, **kw)
    assert torch.equal(got[0], ref[0])
    torch.testing.assert_close(got[2], ref[2])
    greedy = run(backend, base, expert, anti, vocab_size=V, alpha=1.5)[0]
    direct = (narrow[0] + 1.5 * (narrow[1] - narrow[2])).argmax(1)
    assert torch.equal(greedy, direct)
