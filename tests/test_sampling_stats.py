"""Each sampling mode draws from the reference's kept distribution (>= 50k draws, chi-square)."""
import pytest
import torch
from scipy import stats

from proxykern import reference
from op_cases import fused_backends, random_logits, run

DRAWS = 50_000
MODES = {
    "temperature": dict(temperature=0.8),
    "top_k": dict(temperature=1.0, top_k=10),
    "top_p": dict(temperature=1.2, top_p=0.8),
    "min_p": dict(temperature=1.0, min_p=0.1),
    "all": dict(temperature=0.9, top_k=25, top_p=0.9, min_p=0.03),
}
# The interpreter runs one Python program per row: 50k rows would take minutes there.
BACKENDS = [b for b in fused_backends("cpu") if b != "triton"] + ["torch"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_draws_follow_the_kept_distribution(backend, mode):
    vocab = 64
    base, expert, anti = random_logits(1, vocab, torch.float32, seed=21, scale=1.0)
    kwargs = MODES[mode]
    # Every row is the same logits row (stride 0); only the seed differs.
    rows = [t.expand(DRAWS, vocab) for t in (base, expert, anti)]
    tokens, _, _, status = run(backend, *rows, seed=torch.arange(DRAWS), step=1, **kwargs)
    assert (status == 0).all()

    z = reference.combine_logits(base, expert, anti, torch.ones(1), vocab)
    zp = z / kwargs["temperature"]
    one = torch.ones(1)
    kept = reference.kept_mask(zp, kwargs.get("top_k", 0) * one.long(),
                               kwargs.get("top_p", 1.0) * one, kwargs.get("min_p", 0.0) * one)[0]
    probs = torch.where(kept, torch.softmax(zp[0].double(), 0), 0.0)
    probs /= probs.sum()

    counts = torch.bincount(tokens, minlength=vocab).double()
    assert counts[~kept].sum() == 0, "a token outside the kept set was drawn"
    if mode != "all":
        assert kept.sum() > 3, "the mode should keep several tokens for the test to mean much"
    expected = probs[kept] * DRAWS
    observed = counts[kept]
    # Merge bins expected below 5 into one, as the chi-square approximation needs.
    small = expected < 5
    if small.any():
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    result = stats.chisquare(observed.numpy(), expected.numpy())
    assert result.pvalue > 1e-3, f"{backend}/{mode}: chi-square p = {result.pvalue:.2e}"
