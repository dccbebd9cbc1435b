"""Independent samples by default: per-row seeds and num_return_sequences.

A Python-number seed is mixed per row (reference.row_seeds, SplitMix64), so
identical rows of one call draw independently; a per-row seed tensor is used as
given, so a row's draw does not depend on its batch.
"""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from proxykern import fused_proxy_generate, naive_proxy_generate, proxy_sample
from proxykern.reference import row_seeds

from gen_fixtures import full_logits, ragged_batch, trio
from op_cases import random_logits

GENERATORS = [fused_proxy_generate, naive_proxy_generate]
MASK64 = (1 << 64) - 1


def splitmix64_outputs(seed: int, n: int) -> list[int]:
    """The first n outputs of SplitMix64 started at seed, in plain Python (as int64 bits)."""
    out, state = [], seed & MASK64
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        x = state
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
        x ^= x >> 31
        out.append(x - (1 << 64) if x >= 1 << 63 else x)
    return out


def chisquare_pvalue(tokens: torch.Tensor, p: torch.Tensor) -> float:
    """Goodness of fit of drawn ``tokens`` to probabilities ``p``; tokens expected fewer
    than 5 times are pooled into one bin."""
    n = tokens.numel()
    counts = torch.bincount(tokens, minlength=p.numel()).double()
    expected = p.double() * n
    big = expected >= 5
    assert big.sum() >= 10  # a spread-out distribution, so the test has power
    f_obs, f_exp = counts[big], expected[big]
    if (~big).any():
        f_obs = torch.cat([f_obs, counts[~big].sum(0, keepdim=True)])
        f_exp = torch.cat([f_exp, expected[~big].sum(0, keepdim=True)])
    return chisquare(f_obs.numpy(), f_exp.numpy() * n / f_exp.sum().item()).pvalue


# --------------------------------------------------------------------------- the mixing function

def test_row_seeds_is_splitmix64():
    # Known answer: SplitMix64 seeded with 1234567 first returns 6457827717110365317.
    assert row_seeds(1234567, torch.arange(1)).item() & MASK64 == 6457827717110365317
    for seed in (0, 1, -1, 2 ** 63 - 1, 2 ** 64 - 1, -(2 ** 63), 987654321012345):
        assert row_seeds(seed, torch.arange(40)).tolist() == splitmix64_outputs(seed, 40)
    # Unsigned and signed spellings of the same 64 bits are the same seed.
    assert torch.equal(row_seeds(2 ** 64 - 5, torch.arange(8)), row_seeds(-5, torch.arange(8)))
    # A tensor of base seeds mixes element-wise with its index.
    base = torch.tensor([3, 3, -7])
    assert row_seeds(base, torch.tensor([0, 1, 0])).tolist() == [
        splitmix64_outputs(3, 1)[0], splitmix64_outputs(3, 2)[1], splitmix64_outputs(-7, 1)[0]]


# --------------------------------------------------------------------------- the op

OP_BACKENDS = ["cpu", "torch"]


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_identical_rows_with_a_number_seed_draw_independently(backend):
    base, expert, anti = random_logits(1, 64, seed=5, scale=0.5)
    B = 256
    rows = [t.expand(B, -1).contiguous() for t in (base, expert, anti)]
    out = proxy_sample(*rows, temperature=1.0, seed=42, backend=backend)
    assert len(set(out.tokens.tolist())) > 20  # 64 tokens of similar mass: many distinct
    # The number is exactly the per-row tensor row_seeds(seed, row).
    given = proxy_sample(*rows, temperature=1.0, seed=row_seeds(42, torch.arange(B)),
                         backend=backend)
    assert torch.equal(out.tokens, given.tokens)
    # A 0-d tensor counts as a number.
    zero_d = proxy_sample(*rows, temperature=1.0, seed=torch.tensor(42), backend=backend)
    assert torch.equal(out.tokens, zero_d.tokens)


@pytest.mark.parametrize("backend", OP_BACKENDS)
def test_identical_rows_follow_the_proxy_distribution(backend):
    """Over many duplicated rows with one number seed, tokens ~ softmax(z / T) (chi-square)."""
    V, B, T = 40, 20000, 1.3
    base, expert, anti = random_logits(1, V, seed=9, scale=1.0)
    alpha = 0.7
    rows = [t.expand(B, -1).contiguous() for t in (base, expert, anti)]
    out = proxy_sample(*rows, alpha=alpha, temperature=T, seed=2024, step=3, backend=backend)
    p = torch.softmax((base + alpha * (expert - anti)).double()[0] / T, 0)
    assert chisquare_pvalue(out.tokens, p) > 1e-3


def test_per_row_seed_tensor_is_batch_invariant():
    base, expert, anti = random_logits(6, 500, seed=3)
    seeds = torch.tensor([11, -2, 2 ** 62, 11, 5, 0])
    kw = dict(temperature=0.8, top_p=0.95, step=7, backend="cpu")
    batch = proxy_sample(base, expert, anti, seed=seeds, **kw)
    for i in range(6):
        alone = proxy_sample(base[i:i + 1], expert[i:i + 1], anti[i:i + 1], seed=seeds[i:i + 1],
                             **kw)
        assert alone.tokens.item() == batch.tokens[i].item()
    # Rows 0 and 3 share a seed but not logits; rows with equal logits and equal seeds agree.
    same = [t[:1].expand(2, -1).contiguous() for t in (base, expert, anti)]
    twin = proxy_sample(*same, seed=torch.tensor([77, 77]), temperature=1.0, backend="cpu")
    assert twin.tokens[0] == twin.tokens[1]


# --------------------------------------------------------------------------- generation

def test_duplicated_prompts_give_distinct_samples():
    base, expert, anti = trio("llama")
    ids = torch.tensor([[11, 57, 203, 9, 400]]).expand(6, -1)
    kw = dict(max_new_tokens=8, eos_token_id=[], temperature=1.5, seed=7)
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, **kw)
        assert len({tuple(r) for r in out.tokens.tolist()}) == 6, fn.__name__
    assert torch.equal(fused_proxy_generate(base, expert, anti, ids, **kw).tokens,
                       naive_proxy_generate(base, expert, anti, ids, **kw).tokens)


def test_duplicated_prompts_first_token_distribution():
    """First tokens of many duplicated rows (number seed) ~ the single-row proxy distribution."""
    base, expert, anti = trio("llama")
    prompt = torch.tensor([[11, 57, 203, 9, 400]])
    B, T, alpha = 3000, 2.0, 1.0
    out = fused_proxy_generate(base, expert, anti, prompt.expand(B, -1), max_new_tokens=1,
                               eos_token_id=[], temperature=T, alpha=alpha, seed=123)
    mask = torch.ones_like(prompt)
    z = full_logits(base, prompt, mask) + alpha * (full_logits(expert, prompt, mask)
                                                   - full_logits(anti, prompt, mask))
    p = torch.softmax(z.double()[0] / T, 0)
    assert chisquare_pvalue(out.tokens[:, 0], p) > 1e-3


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_per_row_seeds_make_rows_batch_invariant(temperature):
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    seeds = torch.tensor([1, 2 ** 63 - 1, -9])
    kw = dict(max_new_tokens=6, eos_token_id=[], temperature=temperature, top_k=30)
    batch = fused_proxy_generate(base, expert, anti, ids, mask, seed=seeds, **kw)
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = fused_proxy_generate(base, expert, anti, row, seed=seeds[i:i + 1], **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_num_return_sequences_shapes_grouping_and_distinctness():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    n = 4
    kw = dict(max_new_tokens=7, eos_token_id=[], temperature=1.2, top_p=0.95, seed=5,
              num_return_sequences=n, return_logprobs=True, return_model_logprobs=True)
    outs = [fn(base, expert, anti, ids, mask, **kw) for fn in GENERATORS]
    out = outs[0]
    assert out.sequences.shape == (3 * n, ids.shape[1] + 7)
    assert out.tokens.shape == (3 * n, 7) and out.lengths.tolist() == [7] * (3 * n)
    assert out.logprobs.shape == (3 * n, 7)
    assert out.model_logprobs["base"].shape == (3 * n, 7)
    for i in range(3):  # rows i*n .. i*n+n-1 are prompt i's samples
        group = out.sequences[i * n:(i + 1) * n]
        assert torch.equal(group[:, :ids.shape[1]], ids[i].expand(n, -1))
        assert len({tuple(r) for r in group[:, ids.shape[1]:].tolist()}) == n
    assert torch.equal(outs[0].tokens, outs[1].tokens)  # fused == naive, same seeds
    torch.testing.assert_close(outs[0].logprobs, outs[1].logprobs)


def test_num_return_sequences_seeds_per_prompt_and_per_row():
    base, expert, anti = trio("gpt2")
    ids, mask = ragged_batch()
    n = 3
    kw = dict(max_new_tokens=5, eos_token_id=[], temperature=1.0, num_return_sequences=n)
    per_prompt = torch.tensor([10, 20, 30])
    batch = fused_proxy_generate(base, expert, anti, ids, mask, seed=per_prompt, **kw)
    # Per-prompt seeds: sample j of prompt i uses row_seeds(seed[i], j), independent of the batch.
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = fused_proxy_generate(base, expert, anti, row, seed=per_prompt[i:i + 1], **kw)
        assert torch.equal(alone.tokens, batch.tokens[i * n:(i + 1) * n])
    # Per returned row: used exactly as given.
    derived = row_seeds(per_prompt.repeat_interleave(n), torch.arange(n).repeat(3))
    given = fused_proxy_generate(base, expert, anti, ids, mask, seed=derived, **kw)
    assert torch.equal(given.tokens, batch.tokens)
    # Other per-row parameters: per prompt (repeated) or per returned row.
    temps = torch.tensor([0.0, 1.0, 0.0])
    a = fused_proxy_generate(base, expert, anti, ids, mask, seed=1,
                             **{**kw, "temperature": temps})
    b = fused_proxy_generate(base, expert, anti, ids, mask, seed=1,
                             **{**kw, "temperature": temps.repeat_interleave(n)})
    assert torch.equal(a.tokens, b.tokens)
    greedy_rows = a.tokens[:n]  # prompt 0 is greedy: its n rows agree
    assert all(torch.equal(r, greedy_rows[0]) for r in greedy_rows)


@pytest.mark.parametrize("fn", GENERATORS)
def test_num_return_sequences_bad_input(fn):
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=2, eos_token_id=[])
    with pytest.raises(ValueError, match="num_return_sequences"):
        fn(base, expert, anti, ids, mask, num_return_sequences=0, **kw)
    with pytest.raises(TypeError, match="num_return_sequences"):
        fn(base, expert, anti, ids, mask, num_return_sequences=2.0, **kw)
    with pytest.raises(ValueError, match=r"seed must be .* length 3 \(one per prompt\) or 6"):
        fn(base, expert, anti, ids, mask, num_return_sequences=2, seed=torch.arange(4), **kw)
    with pytest.raises(ValueError, match=r"temperature\[4\]"):
        fn(base, expert, anti, ids, mask, num_return_sequences=2,
           temperature=torch.tensor([1.0, 1, 1, 1, -1, 1]), **kw)
