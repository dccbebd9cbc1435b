"""The spec itself: Philox known answers, the noise mapping, and the kept-set rules."""
import math

import pytest
import torch
from scipy import stats

from proxykern import reference

# Known-answer vectors of Philox4x32-10 from the Random123 distribution (kat_vectors).
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    words = reference.philox4x32(*counter, *key)
    assert tuple(int(w) for w in words) == expected


def test_noise_mapping_is_documented_one():
    seed, step = -123456789012345, 2 ** 35 + 17
    bits = reference.philox_bits(torch.tensor([seed]), torch.tensor([step]), 11)[0]
    s, t = seed % 2 ** 64, step % 2 ** 64
    for v in range(11):
        words = reference.philox4x32(v >> 2, t & 0xFFFFFFFF, t >> 32, 0, s & 0xFFFFFFFF, s >> 32)
        assert int(bits[v]) == int(words[v & 3])


def test_noise_depends_only_on_seed_step_token():
    seeds = torch.tensor([1, 2, 1])
    steps = torch.tensor([0, 0, 1])
    g = reference.gumbel_noise(seeds, steps, 100)
    assert not torch.equal(g[0], g[1]) and not torch.equal(g[0], g[2])
    wider = reference.gumbel_noise(seeds[:1], steps[:1], 300)
    assert torch.equal(wider[0, :100], g[0])


def test_uniform_and_gumbel_distributions():
    u = reference.uniform_noise(torch.tensor([7]), torch.tensor([0]), 200_000)[0]
    assert 0 < u.min() and u.max() < 1
    assert stats.kstest(u.numpy(), "uniform").pvalue > 1e-3
    g = reference.gumbel_noise(torch.tensor([8]), torch.tensor([3]), 200_000)[0]
    assert stats.kstest(g.numpy(), "gumbel_r").pvalue > 1e-3


def brute_force_kept(row, top_k, top_p, min_p):
    """The kept-set rules written out with Python lists, for small rows."""
    finite = [v for v in range(len(row)) if row[v] > -math.inf]
    order = sorted(finite, key=lambda v: (-row[v], v))
    kept = set(finite)
    if 0 < top_k < len(order):
        kth = row[order[top_k - 1]]
        kept = {v for v in kept if row[v] >= kth}
    if top_p < 1:
        m = row[order[0]]
        ordered = [v for v in order if v in kept]
        total = sum(math.exp(row[v] - m) for v in ordered)
        cum, threshold = 0.0, row[ordered[-1]]
        for v in ordered:
            cum += math.exp(row[v] - m)
            if cum >= top_p * total:
                threshold = row[v]
                break
        kept = {v for v in kept if row[v] >= threshold}
    m = row[order[0]]
    kept = {v for v in kept if math.exp(row[v] - m) >= min_p}
    return kept


@pytest.mark.parametrize("top_k,top_p,min_p", [
    (0, 1.0, 0.0), (1, 1.0, 0.0), (5, 1.0, 0.0), (0, 0.5, 0.0), (0, 0.999, 0.0),
    (0, 1.0, 0.2), (8, 0.7, 0.05), (3, 0.01, 0.5),
])
def test_kept_set_rules(top_k, top_p, min_p):
    gen = torch.Generator().manual_seed(top_k * 31 + int(top_p * 100))
    # Coarse values force ties at the thresholds; -inf entries are never kept.
    rows = torch.randint(-6, 6, (20, 40), generator=gen).float() / 2
    rows[rows < -2.5] = float("-inf")
    B = rows.shape[0]
    kept = reference.kept_mask(rows, torch.full((B,), top_k), torch.full((B,), top_p),
                               torch.full((B,), min_p))
    for r in range(B):
        expected = brute_force_kept(rows[r].tolist(), top_k, top_p, min_p)
        assert set(torch.nonzero(kept[r]).flatten().tolist()) == expected


def test_greedy_lowest_index_on_ties_and_logprobs():
    base = torch.tensor([[0.0, 3.0, 1.0, 3.0]])
    zero = torch.zeros_like(base)
    one = torch.ones(1)
    tok, lp, lse, status = reference.proxy_sample_reference(
        base, zero + 0.5, zero + 0.5, one, torch.zeros(1), torch.zeros(1, dtype=torch.long), one,
        torch.zeros(1), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4)
    assert tok.item() == 1 and status.item() == 0
    assert lse.item() == pytest.approx(torch.logsumexp(base, 1).item())
    assert lp.item() == pytest.approx(torch.log_softmax(base, 1)[0, 1].item())
