"""The CUDA backend (csrc/cuda_kernels.cuh and its units) against the reference, on a GPU.

Every test here is ``@pytest.mark.cuda`` (skipped without a GPU). The kernel's design
(slices, per-slice candidates, the row fallback) is described at the top of the .cu
file; some tests below aim at one path each (noted in their docstrings).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from proxykern import ops, reference
from op_cases import TOLERANCES, cuda_required, run

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BATCHES = [1, 3, 99, 256]
VOCABS = [111, 1000, 32000, 128256, 151936]
SAMPLING_MODES = {
    "temperature": dict(temperature=0.9),
    "top_k": dict(temperature=1.0, top_k=50),
    "top_p": dict(temperature=1.1, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "top_k+top_p": dict(temperature=1.0, top_k=50, top_p=0.9),
    "all": dict(temperature=0.8, top_k=200, top_p=0.8, min_p=0.02),
    # Kept sets too large for the per-slice candidates: the row fallback.
    "big_top_k": dict(temperature=1.0, top_k=5000),
    "wide_top_p": dict(temperature=4.0, top_p=0.99),
    "tiny_min_p": dict(temperature=2.0, min_p=1e-4),
}


def _cuda_ready():
    return torch.cuda.is_available() and ops.backend_unavailable_reason("cuda", torch.device("cuda")) is None


@pytest.fixture(autouse=True)
def _needs_cuda_kernel():
    if not _cuda_ready():
        if torch.cuda.is_available() and cuda_required():  # a GPU and a CUDA build: no skipping
            pytest.fail("the cuda backend is required here but not available: "
                        + str(ops.backend_unavailable_reason("cuda", torch.device("cuda"))))
        pytest.skip("the cuda backend is not available: "
                    + str(ops.backend_unavailable_reason("cuda", torch.device("cuda"))))


def gpu_logits(batch, vocab, dtype, *, seed, scale=3.0, width=None):
    """Three (batch, width) matrices drawn on the GPU (fast for the large sizes)."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    width = width or vocab
    return tuple((torch.randn(batch, width, generator=gen, device="cuda") * scale).to(dtype)
                 for _ in range(3))


def captured(fn):
    """(graph, fn's outputs as captured): fn called twice on a side stream (lazy set-up
    outside the capture), then recorded in a CUDA graph; a replay rewrites those outputs."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = fn()
    return graph, static


def check_close(got, ref, dtype, rows=None):
    rtol, atol = TOLERANCES[dtype]
    g, r = got.cpu(), ref.cpu()
    if rows is not None:
        g, r = g[rows], r[rows]
    torch.testing.assert_close(g, r, rtol=rtol, atol=atol)


def compare(inputs, dtype, min_agree=0.99, **kwargs):
    """Runs cuda and the reference; checks status, lse, and the tokens' agreement."""
    ref = run("torch", *inputs, **kwargs)
    got = run("cuda", *inputs, **kwargs)
    assert torch.equal(got[3].cpu(), ref[3].cpu())
    check_close(got[2], ref[2], dtype)
    same = got[0].cpu() == ref[0].cpu()
    assert same.float().mean().item() >= min_agree, f"{int(same.sum())}/{same.numel()} tokens agree"
    check_close(got[1], ref[1], dtype, rows=same)
    return ref, got


# --------------------------------------------------------------------------- accuracy

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("batch", BATCHES)
def test_against_reference(batch, vocab, dtype):
    inputs = gpu_logits(batch, vocab, dtype, seed=batch * 7 + vocab)
    # Greedy: exact tokens.
    ref, got = compare(inputs, dtype, min_agree=1.0, alpha=0.7)
    assert torch.equal(got[0].cpu(), ref[0].cpu())
    # Sampling with every filter on.
    seed = torch.arange(batch, device="cuda") * 1000 + 17
    compare(inputs, dtype, alpha=1.3, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01,
            seed=seed, step=5)
    # Plain temperature sampling.
    compare(inputs, dtype, alpha=0.5, temperature=1.0, seed=seed, step=6)


@pytest.mark.parametrize("mode", list(SAMPLING_MODES))
@pytest.mark.parametrize("vocab", [1000, 4099, 32000, 151936])
def test_filter_modes_across_seeds(mode, vocab):
    """>= 99.5% of draws agree with the reference over many seeds, in every filter mode."""
    batch = 64
    inputs = gpu_logits(batch, vocab, torch.float32, seed=vocab, scale=2.0)
    matches = total = 0
    for step in range(4):
        kwargs = dict(SAMPLING_MODES[mode], seed=torch.arange(batch, device="cuda") * 7919 + step,
                      step=step)
        ref = run("torch", *inputs, **kwargs)
        got = run("cuda", *inputs, **kwargs)
        assert torch.equal(got[3].cpu(), ref[3].cpu())
        check_close(got[2], ref[2], torch.float32)
        matches += int((ref[0].cpu() == got[0].cpu()).sum())
        total += batch
    assert matches / total >= 0.995, f"{mode}: {matches}/{total} draws agree"


@pytest.mark.parametrize("case", ["clustered", "ties", "max_ties", "flat", "sparse", "signed_zeros"])
def test_hard_distributions(case):
    """Top values packed into one slice, exact ties, > 64 copies of the max in one slice
    (the candidates cannot hold them: row fallback), near-uniform rows, mostly -inf rows."""
    batch, vocab = 8, 20000
    gen = torch.Generator(device="cuda").manual_seed(3)
    base = torch.randn(batch, vocab, generator=gen, device="cuda")
    expert = torch.zeros_like(base)
    anti = torch.zeros_like(base)
    if case == "clustered":
        base[:, :300] += 8
    elif case == "ties":
        base = (base * 2).round()
    elif case == "max_ties":
        base[:, 100:300] = 5.0
    elif case == "flat":
        base = base * 0.05
    elif case == "sparse":
        base[torch.rand(batch, vocab, generator=gen, device="cuda") < 0.97] = float("-inf")
    elif case == "signed_zeros":
        base.zero_()
        base[:, ::2] = -0.0
        base[:, 5] = 1.0
    matches = total = 0
    for name, mode in SAMPLING_MODES.items():
        for step in range(3):
            kwargs = dict(mode, seed=torch.arange(batch, device="cuda") + 11 * step, step=step)
            ref = run("torch", base, expert, anti, **kwargs)
            got = run("cuda", base, expert, anti, **kwargs)
            assert torch.equal(got[3].cpu(), ref[3].cpu())
            same = int((got[0].cpu() == ref[0].cpu()).sum())
            assert same >= batch - 1, (case, name, step, got[0].tolist(), ref[0].tolist())
            matches += same
            total += batch
    # A logic error disagrees often; fp32-vs-fp64 mass rounding only at rare near-ties.
    assert matches >= total - 2, f"{case}: {matches}/{total} draws agree"


def test_greedy_ties_take_the_lowest_index():
    base = torch.zeros(4, 9000, device="cuda")
    base[:, [8100, 4500, 4096, 8191]] = 2.0  # ties across slices
    zeros = torch.zeros_like(base)
    got = run("cuda", base, zeros, zeros)
    assert got[0].tolist() == [4096] * 4


def test_mixed_per_row_parameters():
    """Greedy rows, plain rows and filtered rows side by side, each as if alone."""
    batch, vocab = 6, 5777
    inputs = gpu_logits(batch, vocab, torch.bfloat16, seed=9)
    d = "cuda"
    kwargs = dict(alpha=torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -1.0], device=d),
                  temperature=torch.tensor([0.0, 0.7, 0.0, 1.0, 1.3, 0.5], device=d),
                  top_k=torch.tensor([0, 5, 0, 0, 100, 1], device=d),
                  top_p=torch.tensor([1.0, 1.0, 0.5, 0.9, 0.7, 1.0], device=d),
                  min_p=torch.tensor([0.0, 0.0, 0.3, 0.0, 0.1, 0.0], device=d),
                  seed=torch.tensor([1, 2, 3, -4, 2 ** 40, 2 ** 62], device=d),
                  step=torch.tensor([0, 1, 2, 3, 2 ** 33, 5], device=d))
    ref = run("torch", *inputs, **kwargs)
    got = run("cuda", *inputs, **kwargs)
    assert torch.equal(got[0].cpu(), ref[0].cpu())
    for row in range(batch):
        single = {k: v[row:row + 1] for k, v in kwargs.items()}
        alone = run("cuda", *(t[row:row + 1] for t in inputs), **single)
        assert alone[0].item() == got[0][row].item()


@pytest.mark.parametrize("vocab", [1000, 151936])
def test_batch_invariance(vocab):
    """A row gives bitwise the same token, logprob, lse and status alone as in any batch."""
    batch = 9
    base, expert, anti = gpu_logits(batch, vocab, torch.bfloat16, seed=5)
    d = "cuda"
    kwargs = dict(temperature=torch.linspace(0.0, 1.5, batch, device=d), top_p=0.95,
                  top_k=torch.tensor([0, 0, 50, 0, 7, 0, 0, 3000, 0], device=d),
                  min_p=torch.tensor([0, 0, 0, 0.1, 0, 0, 0, 0, 1e-4], device=d),
                  seed=torch.arange(batch, device=d) + 100, step=3)
    full = run("cuda", base, expert, anti, **kwargs)
    bigger = [torch.cat([t, t.flip(0)]) for t in (base, expert, anti)]
    big_kwargs = {k: (torch.cat([v, v.flip(0)]) if isinstance(v, torch.Tensor) else v)
                  for k, v in kwargs.items()}
    big = run("cuda", *bigger, **big_kwargs)
    for row in range(batch):
        single = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        alone = run("cuda", base[row:row + 1], expert[row:row + 1], anti[row:row + 1], **single)
        for a, b, c in zip(alone, full, big):
            assert torch.equal(a[0], b[row]) and torch.equal(a[0], c[row])


def test_deterministic_across_runs():
    inputs = gpu_logits(32, 32000, torch.bfloat16, seed=21)
    kwargs = dict(temperature=1.0, top_k=100, top_p=0.9, seed=7, step=1)
    first = run("cuda", *inputs, **kwargs)
    for _ in range(5):
        again = run("cuda", *inputs, **kwargs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- inputs

def test_mixed_dtypes():
    vocab = 32000
    b32, e32, a32 = gpu_logits(5, vocab, torch.float32, seed=31)
    inputs = (b32.to(torch.bfloat16), e32, a32.to(torch.float16))
    for kwargs in (dict(), dict(temperature=0.8, seed=3), dict(temperature=1.0, top_p=0.9, seed=4)):
        ref = run("torch", *inputs, **kwargs)
        got = run("cuda", *inputs, **kwargs)
        assert torch.equal(got[0].cpu(), ref[0].cpu())
        check_close(got[2], ref[2], torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_misaligned_and_strided_inputs(dtype):
    """A view starting at column 1 (no 16-byte alignment), an odd row stride, and a
    vocab_size smaller than the width: the scalar-load path gives the same answer."""
    vocab = 4099
    wide = gpu_logits(7, vocab + 14, dtype, seed=41)
    views = [t[:, 1:] for t in wide]                      # misaligned start, odd stride 4113
    packed = [v[:, :vocab].contiguous() for v in views]    # aligned copies
    for kwargs in (dict(), dict(temperature=0.9, top_k=30, seed=2), dict(temperature=1.2, top_p=0.8, seed=5)):
        a = run("cuda", *views, vocab_size=vocab, **kwargs)
        b = run("cuda", *packed, **kwargs)
        ref = run("torch", *packed, **kwargs)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
        assert torch.equal(a[0].cpu(), ref[0].cpu())


def test_non_contiguous_rows():
    base, expert, anti = gpu_logits(8, 2000, torch.float16, seed=2)
    strided = [t[::2] for t in (base, expert, anti)]
    packed = [t.contiguous() for t in strided]
    a = run("cuda", *strided, temperature=0.5, seed=3)
    b = run("cuda", *packed, temperature=0.5, seed=3)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_neg_inf_inputs_are_excluded():
    vocab = 5000
    base, expert, anti = gpu_logits(6, vocab, torch.float32, seed=3)
    allowed = torch.zeros(6, vocab, dtype=torch.bool, device="cuda")
    allowed[:, [17, 250, 4999]] = True
    for i, t in enumerate((base, expert, anti)):
        t[(~allowed) & (torch.arange(vocab, device="cuda") % 3 == i)] = float("-inf")
    for kwargs in (dict(), dict(temperature=2.0), dict(temperature=1.0, top_p=0.5, top_k=2),
                   dict(temperature=1.0, min_p=0.5)):
        for seed in range(10):
            got = run("cuda", base, expert, anti, seed=seed, **kwargs)
            assert allowed.gather(1, got[0][:, None]).all()
            assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
            ref = run("torch", base, expert, anti, seed=seed, **kwargs)
            assert torch.equal(got[0].cpu(), ref[0].cpu())


def test_bad_rows_status():
    base, expert, anti = gpu_logits(4, 30000, torch.float32, seed=4)
    base[1, 20000] = float("nan")
    expert[2, 7] = float("inf")
    base[3] = float("-inf")
    for kwargs in (dict(), dict(temperature=1.0, top_p=0.5, seed=1)):
        out, status = ops.proxy_sample_with_status(base, expert, anti, backend="cuda", **kwargs)
        assert status.tolist() == [0, reference.STATUS_NONFINITE, reference.STATUS_NONFINITE,
                                   reference.STATUS_EMPTY]
        assert out.tokens[1:].tolist() == [-1, -1, -1] and out.tokens[0] >= 0
        assert torch.isnan(out.lse[1]) and out.lse[3] == float("-inf")


def test_empty_batch():
    base = torch.randn(0, 10, device="cuda")
    out = ops.proxy_sample_with_status(base, base, base, temperature=1.0, backend="cuda")[0]
    assert out.tokens.shape == (0,)


def test_opcheck():
    base, expert, anti = gpu_logits(3, 257, torch.bfloat16, seed=13)
    B, d = 3, "cuda"
    args = (base, expert, anti, torch.full((B,), 0.8, device=d), torch.full((B,), 0.9, device=d),
            torch.full((B,), 20, dtype=torch.long, device=d), torch.full((B,), 0.9, device=d),
            torch.full((B,), 0.01, device=d), torch.arange(B, dtype=torch.long, device=d),
            torch.zeros(B, dtype=torch.long, device=d), 257)
    torch.library.opcheck(torch.ops.proxykern.fused_sample.default, args)


# --------------------------------------------------------------------------- capture

def replays_and_eager(sample, seed, step, replays, eager=None):
    """sample() captured once; then `replays` times: seed += 1000 and step = i + 1 in place,
    a replay, and eager() (default: sample) on the same seed and step. Yields (i, the
    replay's outputs, eager's outputs)."""
    graph, static = captured(sample)
    for i in range(replays):
        seed.add_(1000)
        step.fill_(i + 1)
        graph.replay()
        yield i, static, (eager or sample)()


@pytest.mark.parametrize("filters", [dict(), dict(top_k=50, top_p=0.9), dict(min_p=1e-4, top_p=0.99)])
def test_cuda_graph_capture_and_replay(filters):
    """Captured once, replayed with seed/step updated in place: the tokens of eager runs."""
    batch, vocab = 8, 32000
    base, expert, anti = gpu_logits(batch, vocab, torch.bfloat16, seed=51)
    seed = torch.arange(batch, dtype=torch.long, device="cuda") * 3 + 1
    step = torch.zeros(batch, dtype=torch.long, device="cuda")
    kwargs = dict(temperature=1.0, **filters)

    def sample():
        out, status = ops.proxy_sample_with_status(base, expert, anti, seed=seed, step=step,
                                                   backend="cuda", **kwargs)
        return out.tokens, out.logprobs, status

    drawn = []
    for _, static, eager in replays_and_eager(sample, seed, step, 5):
        for a, b in zip(static, eager):
            assert torch.equal(a, b)
        assert (static[2] == 0).all()
        drawn.append(static[0].clone())
    # Each replay read the updated seed and step: the draws differ somewhere.
    assert any(not torch.equal(drawn[0], d) for d in drawn[1:])


# --------------------------------------------------------------------------- kernel variants
#
# The extension holds four builds of the kernel (csrc/cuda_sample.h, KernelVariant): v0.4
# (the default), v0.5, v0.6 (v0.5's arithmetic, K2 fused into K1 at small grids) and v0.7
# (v0.5's arithmetic and two launches: K1's noise pruned after Philox, K2's whole-row
# fallback spread over G blocks a row).
# benchmarks/gpu_check.py times them in one process; here each must meet the contract,
# v04 and v05 must agree except at noise near-ties, and v06 and v07 must return v05's bits.

VARIANTS = ["v04", "v05", "v06", "v07"]
FIELDS = ("tokens", "logprobs", "lse", "status")


def _cases():
    """benchmarks/gpu_check_cases.py: the LM-like inputs and the bitwise comparison, shared
    with gpu_check (imported on first use, as only the GPU tests need it)."""
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
    if path not in sys.path:
        sys.path.insert(0, path)
    import gpu_check_cases
    return gpu_check_cases


def _lm_like(batch, vocab, seed):
    return _cases().lm_like_logits(batch, vocab, device="cuda",
                                   generator=torch.Generator(device="cuda").manual_seed(seed))


@pytest.fixture
def variant():
    """Runs the test body under a chosen variant (variant(name)), restoring the default."""
    previous = torch.ops.proxykern.cuda_kernel_variant("")
    yield lambda name: torch.ops.proxykern.cuda_kernel_variant(name)
    torch.ops.proxykern.cuda_kernel_variant(previous)


def _assert_rows_alone_as_in(full, inputs, kwargs):
    """Each row run alone (a batch of 1, its own parameters) gives full's four outputs for
    that row bit for bit."""
    for row in range(inputs[0].shape[0]):
        single = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        alone = run("cuda", *(t[row:row + 1] for t in inputs), **single)
        for field, a, b in zip(FIELDS, alone, full):
            assert torch.equal(a[0], b[row]), f"row {row}: {field} differs alone"


def test_default_variant_and_switch(variant):
    expected = os.environ.get("PROXYKERN_CUDA_KERNEL") or "v04"
    assert torch.ops.proxykern.cuda_kernel_variant("") == expected
    assert variant("v05") == expected
    assert torch.ops.proxykern.cuda_kernel_variant("") == "v05"
    assert variant("v06") == "v05"
    assert torch.ops.proxykern.cuda_kernel_variant("") == "v06"
    assert variant("v07") == "v06"
    assert torch.ops.proxykern.cuda_kernel_variant("") == "v07"
    with pytest.raises(RuntimeError, match="'v04', 'v05', 'v06' or 'v07'"):
        torch.ops.proxykern.cuda_kernel_variant("v03")


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("mode", ["temperature", "top_p", "top_k+top_p", "wide_top_p", "tiny_min_p"])
def test_each_variant_against_reference(variant, name, mode):
    variant(name)
    batch, vocab = 64, 32000
    inputs = gpu_logits(batch, vocab, torch.bfloat16, seed=91, scale=2.0)
    kwargs = dict(SAMPLING_MODES[mode], seed=torch.arange(batch, device="cuda") * 13 + 5, step=2)
    compare(inputs, torch.bfloat16, min_agree=0.98, **kwargs)


@pytest.mark.parametrize("family", ["randn3", "lm"])
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_variants_agree(variant, family, vocab):
    """v0.5 against v0.4 over 256 rows a mode: status and greedy exact, lse to rounding,
    sampled tokens >= 99.5% (the noise differs in its last bits only)."""
    batch = 256
    inputs = (gpu_logits(batch, vocab, torch.bfloat16, seed=vocab) if family == "randn3"
              else _lm_like(batch, vocab, seed=vocab))
    seed = torch.arange(batch, device="cuda") * 7 + 1
    modes = [dict(), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
             dict(temperature=1.0, top_k=50, top_p=0.9), dict(temperature=4.0, top_p=0.99),
             dict(temperature=1.0, min_p=0.05)]
    for kw in modes:
        variant("v04")
        old = run("cuda", *inputs, seed=seed, step=3, **kw)
        variant("v05")
        new = run("cuda", *inputs, seed=seed, step=3, **kw)
        assert torch.equal(old[3], new[3])
        check_close(new[2], old[2], torch.bfloat16)
        same = (old[0] == new[0]).float().mean().item()
        assert same >= (1.0 if not kw else 0.995), f"{kw}: {same:.4f} of the tokens agree"


def test_lm_like_against_reference():
    """LM-like rows (low entropy, heavy-tailed): the reference's tokens in every mode."""
    batch, vocab = 64, 128256
    inputs = _lm_like(batch, vocab, seed=3)
    for kw in (dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
               dict(temperature=1.0, top_k=50), dict(temperature=4.0, top_p=0.99)):
        compare(inputs, torch.bfloat16, min_agree=0.98,
                seed=torch.arange(batch, device="cuda") + 11, step=1, **kw)


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_batch_invariant_and_deterministic(variant, name):
    variant(name)
    batch, vocab = 6, 128256
    inputs = _lm_like(batch, vocab, seed=8)
    kwargs = dict(temperature=torch.tensor([0.0, 1.0, 0.7, 1.0, 4.0, 1.3], device="cuda"),
                  top_p=torch.tensor([1.0, 1.0, 0.9, 0.95, 0.99, 1.0], device="cuda"),
                  top_k=torch.tensor([0, 0, 0, 40, 0, 0], device="cuda"),
                  seed=torch.arange(batch, device="cuda") + 40, step=9)
    full = run("cuda", *inputs, **kwargs)
    assert all(torch.equal(a, b) for a, b in zip(full, run("cuda", *inputs, **kwargs)))
    _assert_rows_alone_as_in(full, inputs, kwargs)


# --------------------------------------------------------------------------- v06 and v07
#
# Both run v05's arithmetic and must return v05's four outputs bit for bit whatever their
# plan. v06: where csrc/cuda_sample.h's rule says so (K1's grid of at most 256 blocks,
# aligned inputs of one dtype) the last K1 block of each row runs K2's merge (one launch).
# v07: two launches; K1 skips the noise of columns whose uniform rules them out (every
# sampled row; the records must stay v05's), and K2's whole-row fallback (kept sets too
# large for the per-slice candidates) is spread over G blocks a row, G =
# cuda_v07_spread(batch, vocab, SMs) for aligned inputs of one dtype (G = 1, and the other
# loaders: v05's K2 exactly).

V06_MODES = [dict(), dict(temperature=1.0), dict(temperature=0.7, top_p=0.9),
             dict(temperature=1.0, top_k=50, top_p=0.9), dict(temperature=1.0, min_p=0.05),
             dict(temperature=4.0, top_p=0.99),          # the top_p fallback (whole row)
             dict(temperature=1.0, top_k=5000),          # the top_k fallback
             dict(temperature=2.0, min_p=1e-4),          # the min_p draw over the row
             dict(temperature=2e-38, top_p=0.9)]         # the overflow rule (row sums)
# The whole-row fallbacks alone: where v07's plan differs from v05's.
FALLBACK_MODES = [dict(temperature=4.0, top_p=0.99), dict(temperature=1.0, top_k=5000),
                  dict(temperature=2.0, min_p=1e-4)]


def _same_as_v05(variant, name, inputs, **kwargs):
    """Runs one call under v05 and under `name`; asserts the four outputs are the same bits
    and returns v05's."""
    variant("v05")
    old = run("cuda", *inputs, **kwargs)
    variant(name)
    new = run("cuda", *inputs, **kwargs)
    for field, a, b in zip(FIELDS, old, new):  # bits: a bad row's NaNs too
        assert _cases().same_bits(a, b), f"{kwargs}: {name}'s {field} differ from v05's"
    return old


def _check_shape_as_v05(variant, name, batch, vocab):
    """`name` against v05 at (batch, vocab) in every V06_MODES mode, then (batch > 1) with
    a NaN row beside good ones on the fast and the slow path."""
    width = (vocab + 7) // 8 * 8
    if vocab >= 32000:
        inputs = _lm_like(batch, vocab, seed=vocab + batch)
    else:  # rows 16-byte aligned (the vector loads), an odd vocabulary (masked tail)
        inputs = tuple(t[:, :vocab] for t in gpu_logits(batch, vocab, torch.bfloat16,
                                                          seed=vocab + batch, width=width))
    seed = torch.arange(batch, device="cuda") * 5 + 3
    for kw in V06_MODES:
        _same_as_v05(variant, name, inputs, vocab_size=vocab, seed=seed, step=4, **kw)
    if batch > 1:  # copies with the same aligned row strides
        bad = tuple(torch.empty(batch, width, dtype=t.dtype, device="cuda")[:, :vocab].copy_(t)
                    for t in inputs)
        bad[1][0, 7] = float("nan")
        for kw in (dict(temperature=1.0, top_p=0.9), dict(temperature=4.0, top_p=0.99)):
            old = _same_as_v05(variant, name, bad, vocab_size=vocab, seed=seed, step=4, **kw)
            assert old[3][0] != 0 and (old[3][1:] == 0).all()


def _check_layouts_as_v05(variant, name, dtype):
    """fp32 / fp16 rows 16-byte aligned (strided: width 32008), unaligned rows (a view from
    column 1) and mixed dtypes, filtered and on the fallbacks: v05's bits."""
    base, expert, anti = gpu_logits(2, 32000, dtype, seed=77, width=32008)
    seed = torch.tensor([5, 6], device="cuda")
    for inputs in ((base[:, :32000], expert[:, :32000], anti[:, :32000]),   # aligned, strided rows
                   (base[:, 1:32001], expert[:, 1:32001], anti[:, 1:32001]),  # unaligned
                   (base[:, :32000], expert[:, :32000].to(torch.bfloat16), anti[:, :32000])):  # mixed
        for kw in [dict(temperature=0.9, top_k=40, top_p=0.9)] + FALLBACK_MODES:
            _same_as_v05(variant, name, inputs, vocab_size=32000, seed=seed, step=1, **kw)


# Rows of every plan, each row's fallback included: alone (batch 1) and in a batch of 9 at
# 128256, where v06 launches once alone and twice in the batch and v07 spreads a row over
# 16 blocks alone and 14 in the batch (132 SMs).
PLANS_BATCH, PLANS_VOCAB = 9, 128256


def _check_rows_alone_across_plans(variant, name):
    variant(name)
    d = "cuda"
    inputs = _lm_like(PLANS_BATCH, PLANS_VOCAB, seed=12)
    kwargs = dict(temperature=torch.tensor([0.0, 1.0, 0.7, 1.0, 4.0, 2e-38, 1.0, 2.0, 4.0], device=d),
                  top_p=torch.tensor([1.0, 1.0, 0.9, 0.95, 0.99, 1.0, 1.0, 1.0, 0.99], device=d),
                  top_k=torch.tensor([0, 0, 0, 40, 0, 0, 5000, 0, 0], device=d),
                  min_p=torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1e-4, 0.0], device=d),
                  seed=torch.arange(PLANS_BATCH, device=d) + 40, step=9)
    _assert_rows_alone_as_in(run("cuda", *inputs, **kwargs), inputs, kwargs)


def _check_graph_replay_as_v05(variant, name, **mode):
    """`name`'s call at B = 1, 128256 captured once, replayed 4 times with new seeds: eager
    v05's four outputs after each replay. Returns the tokens drawn."""
    variant(name)
    base, expert, anti = _lm_like(1, 128256, seed=5)
    seed = torch.tensor([17], dtype=torch.long, device="cuda")
    step = torch.zeros(1, dtype=torch.long, device="cuda")

    def sample():
        out, status = ops.proxy_sample_with_status(base, expert, anti, seed=seed, step=step,
                                                   backend="cuda", **mode)
        return out.tokens, out.logprobs, out.lse, status

    def eager_v05():
        variant("v05")
        try:
            return sample()
        finally:
            variant(name)

    drawn = []
    for i, static, eager in replays_and_eager(sample, seed, step, 4, eager=eager_v05):
        for field, a, b in zip(FIELDS, static, eager):
            assert _cases().same_bits(a, b), f"replay {i}: {name}'s {field} differ from eager v05's"
        drawn.append(static[0].item())
    return drawn


# --------------------------------------------------------------------------- v06

# (batch, vocab, one launch): 1, 5, 126, 32 and 149 slices a row.
V06_SHAPES = [(1, 111, True), (3, 5003, True), (1, 128256, True), (2, 128256, True),
              (3, 128256, False), (8, 32000, True), (9, 32000, False), (1, 151936, True)]


@pytest.mark.parametrize("batch,vocab,one_launch", V06_SHAPES)
def test_v06_bitwise_equals_v05(variant, batch, vocab, one_launch):
    if os.environ.get("PROXYKERN_CUDA_SLICE_EPT"):
        pytest.skip("PROXYKERN_CUDA_SLICE_EPT changes the slices, hence the plan")
    assert torch.ops.proxykern.cuda_v06_one_launch(batch, vocab) == one_launch
    _check_shape_as_v05(variant, "v06", batch, vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_v06_other_dtypes_and_layouts(variant, dtype):
    """fp32 / fp16 (one launch), and unaligned rows and mixed dtypes (two launches: the
    fused kernel is built for the vector loaders only): v05's bits."""
    assert torch.ops.proxykern.cuda_v06_one_launch(2, 32000)
    _check_layouts_as_v05(variant, "v06", dtype)


def test_v06_batch_invariant_across_plans(variant):
    """Rows alone (one launch) and in a batch of 9 at 128256 (two launches): the same bits."""
    assert torch.ops.proxykern.cuda_v06_one_launch(1, PLANS_VOCAB)
    assert not torch.ops.proxykern.cuda_v06_one_launch(PLANS_BATCH, PLANS_VOCAB)
    _check_rows_alone_across_plans(variant, "v06")


def test_v06_cuda_graph_replay(variant):
    """A capture of v06's one launch (the counters' memset and the fused kernel), replayed
    with new seeds: eager v05's outputs each time (the counters are zero at every replay)."""
    assert torch.ops.proxykern.cuda_v06_one_launch(1, 128256)
    _check_graph_replay_as_v05(variant, "v06", temperature=1.0, top_p=0.9)


# --------------------------------------------------------------------------- v07

def _v07_spread(batch, vocab):
    """The G v07 spreads a row's fallback over on this GPU (aligned rows of one dtype)."""
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    return torch.ops.proxykern.cuda_v07_spread(batch, vocab, sms)


# (batch, vocab, G on 132 SMs (H100 SXM, H200)): spread by the row's rounds of 8192 columns
# (16 at 128256, 4 at 32000, 19 at 151936), by SMs // batch (2 at 64 rows), and not spread
# (SMs // batch < 2 at 200 rows; one round at 5003 and 111, masked tails).
V07_SHAPES = [(1, 128256, 16), (8, 128256, 16), (64, 128256, 2), (200, 32000, 1),
              (3, 32000, 4), (1, 151936, 19), (1, 5003, 1), (1, 111, 1)]


@pytest.mark.parametrize("batch,vocab,spread", V07_SHAPES)
def test_v07_bitwise_equals_v05(variant, batch, vocab, spread):
    if torch.cuda.get_device_properties(0).multi_processor_count == 132:  # the plan picked for
        assert _v07_spread(batch, vocab) == spread
    _check_shape_as_v05(variant, "v07", batch, vocab)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_v07_other_dtypes_and_layouts(variant, dtype):
    """fp32 / fp16 aligned (spread over G = 4), and unaligned rows and mixed dtypes (never
    spread: v05's K2): v05's bits."""
    assert _v07_spread(2, 32000) == 4
    _check_layouts_as_v05(variant, "v07", dtype)


def test_v07_batch_invariant_across_plans(variant):
    """Rows alone and in a batch of 9 at 128256, spread over different G: the same bits."""
    assert _v07_spread(1, PLANS_VOCAB) != _v07_spread(PLANS_BATCH, PLANS_VOCAB)
    _check_rows_alone_across_plans(variant, "v07")


def test_v07_cuda_graph_replay(variant):
    """A capture of v07's spread slow path (K1, which zeroes the rows' handshake words, and
    the spread K2), replayed with new seeds: eager v05's outputs each time (handshake words
    left over from the previous replay would hang or change them)."""
    assert _v07_spread(1, 128256) > 1
    drawn = _check_graph_replay_as_v05(variant, "v07", temperature=4.0, top_p=0.99)
    assert len(set(drawn)) > 1  # each replay read its new seed (T = 4: ~11 nats a draw)


# --------------------------------------------------------------------------- sanitizer

_SANITIZER_SCRIPT = textwrap.dedent("""
    import torch
    from proxykern import ops
    torch.manual_seed(0)
    def go(b, e, a, **kw):
        out, status = ops.proxy_sample_with_status(b, e, a, backend="cuda", **kw)
        torch.cuda.synchronize()
    for dtype in (torch.float32, torch.bfloat16):
        b, e, a = (torch.randn(3, 5003, device="cuda").to(dtype) for _ in range(3))
        go(b, e, a)
        go(b, e, a, temperature=0.9, seed=1)
        go(b, e, a, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=2)
        go(b * 0.01, e * 0.01, a * 0.01, temperature=5.0, top_p=0.99, min_p=1e-5, seed=3)  # fallback
        go(b, e, a, temperature=1.0, top_k=3000, seed=4)                                   # fallback
        w = [torch.randn(3, 5010, device="cuda").to(dtype) for _ in range(3)]
        go(*(t[:, 1:] for t in w), vocab_size=5003, temperature=1.0, top_p=0.5, seed=5)  # unaligned
    go(b.float(), e.half(), a, temperature=1.0, top_p=0.9, seed=6)                          # mixed
    b[1, 3] = float("nan")
    go(b, e, a, temperature=1.0, top_p=0.9, seed=7)
    print("SANITIZER-SCRIPT-OK")
""")


@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer(tool, tmp_path):
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        pytest.skip("compute-sanitizer is not on PATH")
    script = tmp_path / "run.py"
    script.write_text(_SANITIZER_SCRIPT)
    # Without the caching allocator, memcheck sees every allocation's true bounds.
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    cmd = [exe, "--tool", tool, "--error-exitcode", "1"]
    if tool == "initcheck":  # only our kernels: torch's own may read padding on purpose
        cmd += ["--kernel-name", "kns=proxykern"]
    cmd += [sys.executable, str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0 and "SANITIZER-SCRIPT-OK" in proc.stdout, (
        proc.stdout[-4000:] + proc.stderr[-4000:])
