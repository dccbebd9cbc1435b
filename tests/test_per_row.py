"""Per-row sampling parameters: each row of one call follows its own parameters.

Two kinds of test, on every backend that runs on CPU tensors (CUDA ones in
``test_per_row_statistics_cuda``, run by ``make gpu-check``):

* deterministic: a permissive row next to a restrictive one (``top_p`` tiny, ``top_k=1``,
  ``min_p`` near 1, greedy, another ``alpha``): the restrictive rows must give their
  argmax, the permissive rows must vary with the seed. A backend (or the reference) that
  reads row 0's value for every row fails one of the two orders.
* statistical: groups of rows with different ``temperature``, ``top_k``, ``top_p``,
  ``min_p`` and ``alpha`` interleaved in one call, each row with its own seed (a tensor,
  so the coming per-row mixing of a scalar seed does not matter), and a chi-square test
  of each group's draws against that group's own kept distribution, computed here
  independently of :mod:`proxykern.reference` (numpy, float64).

The Triton interpreter runs one Python program per row, so it gets fewer draws per
group (``DRAWS["triton"]``); the C++ backend and the reference get many more.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from op_cases import fused_backends, random_logits, run

CPU_BACKENDS = fused_backends("cpu") + ["torch"]
VOCAB = 64

# name: (permissive value, restrictive value that keeps only the argmax); temperature 1.2.
RESTRICTIONS = {
    "top_p": (1.0, 1e-4),
    "top_k": (0, 1),
    "min_p": (0.0, 0.999),
    "temperature": (1.2, 0.0),
}


def _logits(seed=31, batch=1):
    return random_logits(batch, VOCAB, torch.float32, seed=seed, scale=1.0)


def _z(base, expert, anti, alpha):
    """z = base + alpha * (expert - anti), fp32, for one row (1, V) and one alpha."""
    return base[0].float() + torch.tensor(alpha, dtype=torch.float32) * (
        expert[0].float() - anti[0].float())


@pytest.mark.parametrize("order", ["permissive_first", "restrictive_first"])
@pytest.mark.parametrize("name", RESTRICTIONS)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_restrictive_rows_beside_permissive_rows(backend, name, order):
    pairs = 16
    loose, tight = RESTRICTIONS[name]
    values = [loose, tight] if order == "permissive_first" else [tight, loose]
    rows = [t.expand(2 * pairs, VOCAB) for t in _logits()]
    dtype = torch.int64 if name == "top_k" else torch.float32
    kwargs = dict(temperature=1.2, seed=torch.arange(2 * pairs) * 7919 + 5,
                  step=torch.arange(2 * pairs) // 2)
    kwargs[name] = torch.tensor(values * pairs, dtype=dtype)
    tokens, _, _, status = run(backend, *rows, **kwargs)
    assert (status == 0).all()
    argmax = int(_z(*_logits(), 1.0).argmax())
    is_tight = torch.tensor([v == tight for v in values] * pairs)
    assert (tokens[is_tight] == argmax).all(), f"{name}: a restricted row drew another token"
    loose_tokens = set(tokens[~is_tight].tolist())
    assert len(loose_tokens) >= 3, f"{name}: the permissive rows did not sample ({loose_tokens})"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_alpha_greedy(backend):
    """Greedy rows with alphas 0, 1, -1, 3 in one call: each the argmax of its own z."""
    base, expert, anti = _logits(seed=33)
    alphas = [0.0, 1.0, -1.0, 3.0]
    expected = [int(_z(base, expert, anti, a).argmax()) for a in alphas]
    assert len(set(expected)) >= 3, "the alphas should pick different tokens"
    rows = [t.expand(2 * len(alphas), VOCAB) for t in (base, expert, anti)]
    tokens, _, _, status = run(backend, *rows, alpha=torch.tensor(alphas * 2))
    assert (status == 0).all()
    assert tokens.tolist() == expected * 2


# --------------------------------------------------------------------------- statistics

# Groups interleaved row by row (row r belongs to group r % len(GROUPS)); group 0 is the
# most permissive, so a backend reading row 0's parameters for every row draws outside
# the other groups' kept sets.
GROUPS = [
    dict(temperature=1.3, top_k=0, top_p=1.0, min_p=0.0, alpha=1.0),
    dict(temperature=0.6, top_k=0, top_p=1.0, min_p=0.0, alpha=1.0),
    dict(temperature=1.0, top_k=7, top_p=1.0, min_p=0.0, alpha=0.5),
    dict(temperature=1.1, top_k=0, top_p=0.7, min_p=0.0, alpha=2.0),
    dict(temperature=2.0, top_k=0, top_p=1.0, min_p=0.3, alpha=-0.5),
    dict(temperature=0.9, top_k=20, top_p=0.85, min_p=0.03, alpha=1.5),
    dict(temperature=0.0, top_k=3, top_p=0.5, min_p=0.1, alpha=1.0),   # greedy: filters unused
]
# Draws per group. The Triton interpreter runs one Python program per row (~30 ms each on
# 2 busy cores): 120 draws per group keep it near 30 s; its per-row bugs are also caught by
# the deterministic tests above. On a GPU every backend gets 20k per group.
DRAWS = {"cpu": 8000, "torch": 8000, "triton": 120, "cuda": 20000}
PVALUE_MIN = 1e-4


def kept_distribution(z: np.ndarray, temperature, top_k, top_p, min_p) -> np.ndarray:
    """The spec's kept distribution of one row of z (float64), written from docs/api.md alone."""
    if temperature == 0:
        probs = np.zeros_like(z)
        probs[int(np.argmax(z))] = 1.0
        return probs
    zp = z / temperature
    keep = np.isfinite(zp)
    order = np.sort(zp[keep])[::-1]
    if 0 < top_k < len(order):
        keep &= zp >= order[top_k - 1]
    if top_p < 1.0:
        vals = np.sort(zp[keep])[::-1]
        mass = np.exp(vals - vals[0])
        cum = np.cumsum(mass) / mass.sum()
        cut = vals[min(int(np.searchsorted(cum, top_p)), len(vals) - 1)]
        keep &= zp >= cut
    keep &= np.exp(zp - zp[keep].max()) >= min_p
    probs = np.where(keep, np.exp(zp - zp[keep].max()), 0.0)
    return probs / probs.sum()


def check_groups(tokens: torch.Tensor, base, expert, anti, draws: int) -> None:
    G = len(GROUPS)
    for g, params in enumerate(GROUPS):
        z = _z(base, expert, anti, params["alpha"]).double().numpy()
        probs = kept_distribution(z, params["temperature"], params["top_k"], params["top_p"],
                                  params["min_p"])
        counts = np.bincount(tokens[g::G].cpu().numpy(), minlength=VOCAB).astype(float)
        kept = probs > 0
        assert counts[~kept].sum() == 0, (
            f"group {g} {params}: drew tokens outside its kept set: "
            f"{np.flatnonzero(counts * ~kept).tolist()}")
        if kept.sum() == 1:
            continue
        expected, observed = probs[kept] * draws, counts[kept]
        small = expected < 5  # merge sparse bins, as the chi-square approximation needs
        if small.any():
            expected = np.append(expected[~small], expected[small].sum())
            observed = np.append(observed[~small], observed[small].sum())
        p = stats.chisquare(observed, expected).pvalue
        assert p > PVALUE_MIN, f"group {g} {params}: chi-square p = {p:.2e} over {draws} draws"


def sample_groups(backend, device="cpu"):
    base, expert, anti = (t.to(device) for t in _logits(seed=37))
    draws = DRAWS[backend]
    G, rows = len(GROUPS), len(GROUPS) * DRAWS[backend]
    col = {k: [grp[k] for grp in GROUPS] * draws for k in GROUPS[0]}
    kwargs = {k: torch.tensor(v, dtype=torch.int64 if k == "top_k" else torch.float32,
                              device=device) for k, v in col.items()}
    r = torch.arange(rows, device=device)
    kwargs.update(seed=r * 1_000_003 + 77, step=r % 5)
    tokens, _, _, status = run(backend, *(t.expand(rows, VOCAB) for t in (base, expert, anti)),
                               **kwargs)
    assert (status == 0).all()
    assert tokens.shape == (rows,) and G * draws == rows
    check_groups(tokens, base.cpu(), expert.cpu(), anti.cpu(), draws)


def test_oracle_is_the_reference_kept_set():
    """The numpy kept sets above agree with reference.kept_mask on these groups."""
    from proxykern import reference
    base, expert, anti = _logits(seed=37)
    for params in GROUPS:
        if params["temperature"] == 0:
            continue
        zp = (_z(base, expert, anti, params["alpha"]) / params["temperature"])[None]
        ref = reference.kept_mask(zp, torch.tensor([params["top_k"]]),
                                  torch.tensor([params["top_p"]]), torch.tensor([params["min_p"]]))
        mine = kept_distribution(_z(base, expert, anti, params["alpha"]).double().numpy(),
                                 params["temperature"], params["top_k"], params["top_p"],
                                 params["min_p"]) > 0
        assert ref[0].numpy().tolist() == mine.tolist(), params
        filtered = params["top_k"] or params["top_p"] < 1 or params["min_p"] > 0
        assert 1 < mine.sum() and (mine.sum() < VOCAB or not filtered), params


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_per_row_statistics(backend):
    sample_groups(backend)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_per_row_statistics_cuda(backend):
    if backend not in fused_backends("cuda"):
        pytest.skip(f"{backend} is not required on CUDA here")
    sample_groups(backend, "cuda")
