"""Every available backend of proxy_sample against the reference (proxykern.reference)."""
from __future__ import annotations

import itertools

import pytest
import torch

import proxykern
from proxykern import ops, reference
from op_cases import TOLERANCES, fused_backends, random_logits, run

# The required ones whether or not they load (a missing one fails, see conftest.py).
CPU_BACKENDS = fused_backends("cpu")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SAMPLING_MODES = {
    "temperature": dict(temperature=0.9),
    "top_k": dict(temperature=1.0, top_k=50),
    "top_p": dict(temperature=1.1, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "all": dict(temperature=0.8, top_k=200, top_p=0.8, min_p=0.02),
}

# The interpreter runs Triton programs in Python: smaller grids keep CI quick.
SIZES = {
    "cpu": (list(itertools.product([1, 3, 99], [111, 1000, 32000, 128256, 151936]))),
    "triton": [(1, 111), (3, 1000), (99, 111), (3, 32000)],
}
if torch.cuda.is_available():
    SIZES["triton"] = SIZES["cpu"]
    SIZES["cuda"] = SIZES["cpu"]


def backend_sizes(backends):
    return [(b, batch, vocab) for b in backends for batch, vocab in SIZES[b]]


def assert_close_to_reference(backend, inputs, dtype, **kwargs):
    ref = run("torch", *inputs, **kwargs)
    got = run(backend, *inputs, **kwargs)
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got[2].cpu(), ref[2].cpu(), rtol=rtol, atol=atol)
    torch.testing.assert_close(got[3].cpu(), ref[3].cpu())
    return ref, got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend,batch,vocab", backend_sizes(CPU_BACKENDS))
def test_against_reference(backend, batch, vocab, dtype):
    inputs = random_logits(batch, vocab, dtype, seed=batch * 7 + vocab)
    rtol, atol = TOLERANCES[dtype]
    # Greedy: exact tokens, logprobs within tolerance.
    ref, got = assert_close_to_reference(backend, inputs, dtype, alpha=0.7)
    assert torch.equal(got[0].cpu(), ref[0].cpu())
    torch.testing.assert_close(got[1].cpu(), ref[1].cpu(), rtol=rtol, atol=atol)
    # Sampling with every filter on: same tokens for the same seeds (near-ties aside).
    kwargs = dict(alpha=1.3, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01,
                  seed=torch.arange(batch) * 1000 + 17, step=5)
    ref, got = assert_close_to_reference(backend, inputs, dtype, **kwargs)
    assert (got[0].cpu() == ref[0].cpu()).float().mean() >= 0.99
    same = got[0].cpu() == ref[0].cpu()
    torch.testing.assert_close(got[1].cpu()[same], ref[1].cpu()[same], rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_same_tokens_as_reference_across_seeds(backend):
    """>= 99.5% of draws agree with the reference over many (row, seed, mode) draws."""
    batch, vocab = (64, 1000) if backend == "triton" else (256, 4099)
    inputs = random_logits(batch, vocab, torch.float32, seed=11, scale=2.0)
    matches = total = 0
    for step, (name, mode) in enumerate(SAMPLING_MODES.items()):
        kwargs = dict(mode, seed=torch.arange(batch) * 7919 + step, step=step)
        ref = run("torch", *inputs, **kwargs)[0]
        got = run(backend, *inputs, **kwargs)[0].cpu()
        matches += int((ref == got).sum())
        total += batch
    assert matches / total >= 0.995, f"{backend}: {matches}/{total} draws agree"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_batch_invariance(backend):
    """A row gives the same token, logprob and lse alone as inside any batch."""
    vocab = 3001
    base, expert, anti = random_logits(9, vocab, torch.bfloat16, seed=5)
    kwargs = dict(temperature=torch.linspace(0.0, 1.5, 9), top_p=0.95,
                  seed=torch.arange(9) + 100, step=3)
    full = run(backend, base, expert, anti, **kwargs)
    for row in (0, 4, 8):
        single = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        alone = run(backend, base[row:row + 1], expert[row:row + 1], anti[row:row + 1], **single)
        for a, b in zip(alone, full):
            assert torch.equal(a[0], b[row])


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_padded_widths_ignore_extra_columns(backend):
    """Models padded to different widths: only the first vocab_size columns count."""
    base, expert, anti = random_logits(3, 1000, torch.float32, seed=1, width=1024)
    expert = torch.cat([expert, torch.randn(3, 40)], dim=1)  # 1064 wide
    # Huge logits in the padding would win if they took part.
    base[:, 1000:] = 1e4
    anti[:, 1000:] = -1e4
    out = proxykern.proxy_sample(base, expert, anti, vocab_size=1000, backend=backend)
    assert (out.tokens < 1000).all()
    narrow = proxykern.proxy_sample(base[:, :1000].contiguous(), expert[:, :1000].contiguous(),
                                    anti[:, :1000].contiguous(), backend=backend)
    assert torch.equal(out.tokens, narrow.tokens)
    torch.testing.assert_close(out.lse, narrow.lse)
    # The default vocab_size is the narrowest width (1024 here).
    default = proxykern.proxy_sample(base, expert, anti, backend=backend)
    ref = proxykern.proxy_sample(base, expert, anti, vocab_size=1024, backend=backend)
    assert torch.equal(default.tokens, ref.tokens)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_non_contiguous_rows(backend):
    base, expert, anti = random_logits(4, 2000, torch.float16, seed=2)
    strided = [t[::2] for t in (base, expert, anti)]
    packed = [t.contiguous() for t in strided]
    a = proxykern.proxy_sample(*strided, temperature=0.5, seed=3, backend=backend)
    b = proxykern.proxy_sample(*packed, temperature=0.5, seed=3, backend=backend)
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_neg_inf_inputs_are_excluded(backend):
    vocab = 500
    base, expert, anti = random_logits(6, vocab, torch.float32, seed=3)
    allowed = torch.zeros(6, vocab, dtype=torch.bool)
    allowed[:, 17] = allowed[:, 250] = allowed[:, 499] = True
    # -inf in any of the three inputs excludes the token (even expert - anti = -inf - -inf).
    for i, t in enumerate((base, expert, anti)):
        t[(~allowed) & (torch.arange(vocab) % 3 == i)] = float("-inf")
    expert[~allowed & (torch.arange(vocab) % 3 == 0)] = float("-inf")
    anti[~allowed & (torch.arange(vocab) % 3 == 0)] = float("-inf")
    for kwargs in (dict(), dict(temperature=2.0), dict(temperature=1.0, top_p=0.5, top_k=2)):
        for seed in range(20):
            out = proxykern.proxy_sample(base, expert, anti, seed=seed, backend=backend, **kwargs)
            assert allowed.gather(1, out.tokens[:, None]).all()
            assert torch.isfinite(out.logprobs).all() and torch.isfinite(out.lse).all()
    ref = run("torch", base, expert, anti, temperature=1.0)
    got = run(backend, base, expert, anti, temperature=1.0)
    torch.testing.assert_close(got[2], ref[2])


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_mixed_per_row_parameters(backend):
    """Per-row tensors: greedy and sampled rows side by side, each as if alone."""
    batch, vocab = 6, 777
    inputs = random_logits(batch, vocab, torch.bfloat16, seed=9)
    kwargs = dict(alpha=torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, -1.0]),
                  temperature=torch.tensor([0.0, 0.7, 0.0, 1.0, 1.3, 0.5]),
                  top_k=torch.tensor([0, 5, 0, 0, 100, 1]),
                  top_p=torch.tensor([1.0, 1.0, 0.5, 0.9, 0.7, 1.0]),
                  min_p=torch.tensor([0.0, 0.0, 0.3, 0.0, 0.1, 0.0]),
                  seed=torch.tensor([1, 2, 3, -4, 2 ** 40, 2 ** 62]),
                  step=torch.tensor([0, 1, 2, 3, 2 ** 33, 5]))
    ref = run("torch", *inputs, **kwargs)
    got = run(backend, *inputs, **kwargs)
    assert torch.equal(got[0], ref[0])
    for row in range(batch):
        single = {k: v[row:row + 1] for k, v in kwargs.items()}  # per-row seeds are used as given
        alone = run(backend, *(t[row:row + 1] for t in inputs), **single)
        assert alone[0].item() == got[0][row].item()
    # top_k=1 is greedy whatever the temperature.
    greedy = run("torch", *inputs, alpha=kwargs["alpha"])[0]
    assert got[0][5] == greedy[5]


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_tiny_temperature_overflow_rule(backend):
    """One rule (reference.py): a row whose max z / T overflows fp32, or whose T is
    subnormal, samples as greedy; a z / T that rounds to -inf below a finite max is a
    token of probability 0. Every backend gives the reference's answer."""
    batch, vocab = 5, 3000
    base, expert, anti = random_logits(batch, vocab, torch.float32, seed=15)
    gen = torch.Generator().manual_seed(16)
    base[1] -= 60.0                                   # every z < 0: z / T is -inf everywhere
    base[3] = torch.linspace(-20.0, 5.0, vocab)[torch.randperm(vocab, generator=gen)]
    expert[3] = anti[3] = 0.0                         # z / T: max 2.5e38, the low end -inf
    temperature = torch.tensor([2e-38, 2e-38, 1e-40, 2e-38, 0.7])
    z = base + (expert - anti)
    for kwargs in (dict(), dict(top_p=0.9), dict(top_k=5, min_p=0.1)):
        kwargs = dict(kwargs, temperature=temperature, seed=torch.arange(batch) + 3, step=2)
        ref = run("torch", base, expert, anti, **kwargs)
        got = run(backend, base, expert, anti, **kwargs)
        assert torch.equal(got[3], ref[3]) and (ref[3] == 0).all()
        assert torch.equal(got[0], ref[0])
        torch.testing.assert_close(got[2], ref[2], rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=2e-4)
        # Overflowing and subnormal-T rows are greedy: argmax z, logprob and lse of z.
        assert torch.equal(ref[0][:3], z[:3].argmax(1))
        torch.testing.assert_close(ref[2][:3], torch.logsumexp(z[:3], 1))
        assert torch.isfinite(got[1]).all() and torch.isfinite(got[2]).all()
        # Row 3 keeps sampling; its draw is among the tokens whose z / T stays finite.
        assert z[3, got[0][3]] > 5.0 - 25.0 * 0.25


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_bad_rows_raise_naming_the_row(backend):
    base, expert, anti = random_logits(4, 300, torch.float32, seed=4)
    nan_base = base.clone()
    nan_base[2, 7] = float("nan")
    with pytest.raises(ValueError, match=r"row 2\b.*NaN"):
        proxykern.proxy_sample(nan_base, expert, anti, backend=backend)
    inf_expert = expert.clone()
    inf_expert[1, 3] = float("inf")
    with pytest.raises(ValueError, match=r"row 1\b"):
        proxykern.proxy_sample(base, inf_expert, anti, temperature=1.0, backend=backend)
    empty = base.clone()
    empty[3] = float("-inf")
    with pytest.raises(ValueError, match=r"row 3\b.*-inf"):
        proxykern.proxy_sample(empty, expert, anti, temperature=1.0, top_p=0.5, backend=backend)
    # Without raising, such rows are flagged and get an out-of-range token.
    out, status = ops.proxy_sample_with_status(nan_base, expert, anti, backend=backend)
    assert status.tolist() == [0, 0, reference.STATUS_NONFINITE, 0]
    assert out.tokens[2] == -1 and (out.tokens[[0, 1, 3]] >= 0).all()


@pytest.mark.parametrize("name,value,match", [
    ("temperature", torch.tensor([0.5, -1.0, 1.0]), r"row 1.*temperature"),
    ("temperature", torch.tensor([0.5, 1.0, float("inf")]), r"row 2.*temperature.*not finite"),
    ("temperature", torch.tensor([float("nan"), 1.0, 1.0]), r"row 0.*temperature"),
    ("top_p", torch.tensor([0.5, 1.0, 0.0]), r"row 2.*top_p"),
    ("min_p", torch.tensor([1.0, 0.0, 0.0]), r"row 0.*min_p"),
    ("top_k", torch.tensor([3, -1, 0]), r"row 1.*top_k"),
    ("alpha", torch.tensor([1.0, float("nan"), 0.0]), r"row 1.*alpha"),
])
def test_bad_per_row_tensor_values_raise(name, value, match):
    base, expert, anti = random_logits(3, 100, torch.float32, seed=6)
    with pytest.raises(ValueError, match=match):
        proxykern.proxy_sample(base, expert, anti, **{"temperature": 1.0, name: value})


def _good():
    return random_logits(2, 50, torch.float32, seed=8)


@pytest.mark.parametrize("mutate,exc,match", [
    (lambda b, e, a: ((b[0], e, a), {}), ValueError, "base_logits must be 2-D"),
    (lambda b, e, a: ((b, e[:1], a), {}), ValueError, "expert_logits has batch size 1"),
    (lambda b, e, a: ((b, e, a.to(torch.int64)), {}), TypeError, "anti_logits must be float32"),
    (lambda b, e, a: ((b, e, a.double()), {}), TypeError, "anti_logits"),
    (lambda b, e, a: ((b, e.numpy(), a), {}), TypeError, "expert_logits must be a torch.Tensor"),
    (lambda b, e, a: ((b, e, a), dict(temperature=-0.1)), ValueError, "temperature"),
    (lambda b, e, a: ((b, e, a), dict(temperature=float("inf"))), ValueError, "temperature must be .*finite"),
    (lambda b, e, a: ((b, e, a), dict(temperature=float("nan"))), ValueError, "temperature"),
    (lambda b, e, a: ((b, e, a), dict(top_p=0.0)), ValueError, "top_p"),
    (lambda b, e, a: ((b, e, a), dict(top_p=1.5)), ValueError, "top_p"),
    (lambda b, e, a: ((b, e, a), dict(min_p=1.0)), ValueError, "min_p"),
    (lambda b, e, a: ((b, e, a), dict(min_p=-0.1)), ValueError, "min_p"),
    (lambda b, e, a: ((b, e, a), dict(top_k=-1)), ValueError, "top_k"),
    (lambda b, e, a: ((b, e, a), dict(top_k=2.5)), TypeError, "top_k"),
    (lambda b, e, a: ((b, e, a), dict(alpha=float("inf"))), ValueError, "alpha"),
    (lambda b, e, a: ((b, e, a), dict(alpha=float("nan"))), ValueError, "alpha"),
    (lambda b, e, a: ((b, e, a), dict(alpha="1")), TypeError, "alpha"),
    (lambda b, e, a: ((b, e, a), dict(vocab_size=0)), ValueError, "vocab_size"),
    (lambda b, e, a: ((b, e, a), dict(vocab_size=51)), ValueError, "vocab_size"),
    (lambda b, e, a: ((b, e, a), dict(vocab_size=10.0)), TypeError, "vocab_size"),
    (lambda b, e, a: ((b, e, a), dict(backend="fast")), ValueError, "backend"),
    (lambda b, e, a: ((b, e, a), dict(backend="cuda")), ValueError, "backend 'cuda' is not available"),
    (lambda b, e, a: ((b, e, a), dict(seed=2 ** 64)), ValueError, "seed"),
    (lambda b, e, a: ((b, e, a), dict(seed=1.5)), TypeError, "seed"),
    (lambda b, e, a: ((b, e, a), dict(step=torch.zeros(3, dtype=torch.long))), ValueError, "step"),
    (lambda b, e, a: ((b, e, a), dict(temperature=torch.ones(2, 1))), ValueError, "temperature"),
    (lambda b, e, a: ((b, e, a), dict(top_k=torch.ones(2))), TypeError, "top_k"),
    (lambda b, e, a: ((b, e, a), dict(seed=torch.ones(2))), TypeError, "seed"),
])
def test_bad_inputs_name_the_argument(mutate, exc, match):
    args, kwargs = mutate(*_good())
    with pytest.raises(exc, match=match):
        proxykern.proxy_sample(*args, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs two devices")
def test_devices_differ():
    b, e, a = _good()
    with pytest.raises(ValueError, match="expert_logits is on"):
        proxykern.proxy_sample(b, e.cuda(), a)


def test_scalar_and_tensor_parameters_agree():
    inputs = random_logits(5, 999, torch.float32, seed=12)
    scalar = proxykern.proxy_sample(*inputs, alpha=0.5, temperature=0.9, top_k=30, top_p=0.8,
                                    min_p=0.01, seed=42, step=7)
    full = {k: torch.full((5,), v) for k, v in dict(alpha=0.5, temperature=0.9, top_p=0.8,
                                                    min_p=0.01).items()}
    # A number seed gives row r the seed reference.row_seeds(seed, r).
    tensor = proxykern.proxy_sample(*inputs, top_k=torch.full((5,), 30),
                                    seed=reference.row_seeds(42, torch.arange(5)),
                                    step=torch.full((5,), 7), **full)
    assert torch.equal(scalar.tokens, tensor.tokens)
    torch.testing.assert_close(scalar.logprobs, tensor.logprobs)


def test_fallback_warns_once(monkeypatch):
    monkeypatch.setattr(ops, "_warned_fallbacks", set())
    monkeypatch.setattr(ops, "backend_unavailable_reason",
                        lambda b, d: "pretend it is missing" if b == "cpu" else None)
    inputs = _good()
    with pytest.warns(RuntimeWarning, match="pretend it is missing.*using 'torch'"):
        proxykern.proxy_sample(*inputs)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        proxykern.proxy_sample(*inputs)


def test_auto_picks_the_cpu_kernel():
    assert ops.resolve_backend("auto", torch.device("cpu")) == "cpu"


def test_empty_batch():
    base, expert, anti = (torch.randn(0, 10) for _ in range(3))
    out = proxykern.proxy_sample(base, expert, anti, temperature=1.0)
    assert out.tokens.shape == (0,) and out.tokens.dtype == torch.int64


@pytest.mark.parametrize("backend", CPU_BACKENDS + ["torch"])
def test_opcheck(backend):
    base, expert, anti = random_logits(3, 257, torch.bfloat16, seed=13)
    B = 3
    args = (base, expert, anti, torch.full((B,), 0.8), torch.full((B,), 0.9),
            torch.full((B,), 20, dtype=torch.long), torch.full((B,), 0.9), torch.full((B,), 0.01),
            torch.arange(B, dtype=torch.long), torch.zeros(B, dtype=torch.long), 257)
    for may_filter in (True, False):  # the backend's own registered op (both Triton plans)
        torch.library.opcheck(ops.sample_kernel(backend, may_filter).default, args)


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["auto", "cpu", "torch", "triton"])
def test_traces_whole_under_torch_compile(compiler, backend):
    """fullgraph=True: no graph break anywhere in the public op (backend choice, parameter
    tensors, the status handling), and the eager tokens."""
    torch._dynamo.reset()
    inputs = random_logits(3, 300, torch.float32, seed=14)
    alpha = torch.tensor([0.5, 1.0, 2.0])

    def step(b, e, a):
        out = proxykern.proxy_sample(b, e, a, alpha=alpha, temperature=0.7, top_p=0.9, seed=1,
                                     step=4, backend=backend)
        return out.tokens, out.logprobs

    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    tokens, logprobs = compiled(*inputs)
    want_tokens, want_logprobs = step(*inputs)
    assert torch.equal(tokens, want_tokens)
    torch.testing.assert_close(logprobs, want_logprobs)


def test_a_bad_row_under_torch_compile_gets_token_minus_one():
    """Inside a trace the op cannot read the status on the host (as under graph capture)."""
    torch._dynamo.reset()
    b, e, a = random_logits(2, 100, torch.float32, seed=15)
    b[1, 7] = float("nan")
    step = torch.compile(lambda b, e, a: proxykern.proxy_sample(b, e, a).tokens,
                         backend="aot_eager", fullgraph=True)
    tokens = step(b, e, a)
    assert tokens[1].item() == -1 and tokens[0].item() >= 0
    with pytest.raises(ValueError, match="row 1"):
        proxykern.proxy_sample(b, e, a)


def test_auto_skips_a_cuda_kernel_built_for_another_architecture(monkeypatch):
    """backend="auto" never picks a CUDA kernel the device cannot run: Triton, one warning."""
    monkeypatch.setattr(ops, "_warned_fallbacks", set())
    monkeypatch.setattr(ops, "_has_native_kernel", lambda key: True)
    monkeypatch.setattr(ops, "_cuda_kernel_version", lambda index: -1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(ops, "_ext_state", dict(ops._ext_state))  # fresh per-device answers
    device = torch.device("cuda", 0)
    reason = ops.backend_unavailable_reason("cuda", device)
    assert reason is not None and "compute capability 8.0" in reason
    with pytest.raises(ValueError, match="compute capability 8.0"):
        ops.resolve_backend("cuda", device)
    if ops.backend_unavailable_reason("triton", device) is None:
        with pytest.warns(RuntimeWarning, match="compute capability 8.0.*using 'triton'"):
            assert ops.resolve_backend("auto", device) == "triton"
    # A build that holds an image for the device is chosen.
    monkeypatch.setattr(ops, "_cuda_kernel_version", lambda index: 90)
    ops._ext_state.pop(("cuda_image", 0))
    assert ops.backend_unavailable_reason("cuda", device) is None
    assert ops.resolve_backend("auto", device) == "cuda"


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not available")
@pytest.mark.parametrize("vocab,cfg", [
    (96, dict(BLOCK=64, SBLOCK=32)), (1000, dict(BLOCK=64, SBLOCK=8, SROWS=4, SEG_BLOCKS=3)),
    (1000, dict(BLOCK=256, SBLOCK=16, SROWS=2, P=8, C=16, STAGED_ROUNDS=1)),
    (4099, dict(BLOCK=1024, SBLOCK=128, SROWS=4))])
def test_triton_full_blocks_then_tail(vocab, cfg):
    """Small blocks: unmasked full blocks, a masked tail (or none), pivot passes folding
    several columns per slot, several segments. One program per row, pass 1 split across
    programs, and the search staged across programs (some rows still searching when the
    staged rounds end) give the same bits; the same tokens as the reference, lse and
    logprobs within tolerance."""
    from proxykern.kernels import proxy_sample_triton as pst
    batch = 4
    inputs = random_logits(batch, vocab, torch.float32, seed=vocab, width=vocab + 5)
    inputs = tuple(t[:, 2:vocab + 2] for t in inputs)  # rows 4 bytes past a 16-byte boundary
    modes = dict(greedy=dict(temperature=0.0), **SAMPLING_MODES,
                 slow=dict(temperature=4.0, top_p=0.99), big_k=dict(temperature=1.0, top_k=70, top_p=0.95))
    for name, mode in modes.items():
        full = dict(dict(alpha=1.2, top_k=0, top_p=1.0, min_p=0.0), **mode)
        params = (torch.full((batch,), full["alpha"]), torch.full((batch,), float(full["temperature"])),
                  torch.full((batch,), full["top_k"], dtype=torch.long), torch.full((batch,), full["top_p"]),
                  torch.full((batch,), full["min_p"]), torch.arange(batch, dtype=torch.long) * 31 + 5,
                  torch.full((batch,), 3, dtype=torch.long))
        ref = reference.proxy_sample_reference(*inputs, *params, vocab)
        got = pst.proxy_sample_triton(*inputs, *params, vocab, debug=True,
                                      config=dict(cfg, split=True, staged=True))
        for launch in (dict(split=False), dict(split=True, staged=False)):
            other = pst.proxy_sample_triton(*inputs, *params, vocab, debug=True,
                                            config=dict(cfg, **launch))
            for a, b in zip(got, other):
                assert torch.equal(a, b), (name, launch)
        assert torch.equal(got[3], ref[3]), name
        assert torch.equal(got[0], ref[0]), (name, got[0].tolist(), ref[0].tolist())
        torch.testing.assert_close(got[2], ref[2], rtol=2e-5, atol=2e-4)
        torch.testing.assert_close(got[1], ref[1], rtol=2e-5, atol=2e-4)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not available")
def test_triton_staged_search_resumes_in_the_row_program():
    """A search still open after the staged rounds (0, 1 or many rounds) is finished by
    the row's own program: the same bits as never staging, and the rows did need more
    pivot passes than the staged rounds gave them."""
    from proxykern.kernels import proxy_sample_triton as pst
    batch, vocab = 3, 2000
    inputs = random_logits(batch, vocab, torch.float32, seed=5)
    params = (torch.full((batch,), 1.0), torch.full((batch,), 1.0),
              torch.tensor([300, 0, 40]), torch.tensor([0.95, 0.9, 1.0]), torch.zeros(batch),
              torch.arange(batch, dtype=torch.long), torch.full((batch,), 7, dtype=torch.long))
    cfg = dict(BLOCK=128, SBLOCK=16, SROWS=2, P=8, C=16, SEG_BLOCKS=4)
    whole = pst.proxy_sample_triton(*inputs, *params, vocab, debug=True,
                                    config=dict(cfg, split=False))
    assert (whole[4][:, 0] > 3).all(), whole[4]  # more than one pivot pass: rounds matter
    for rounds in (0, 1, 6):
        staged = pst.proxy_sample_triton(*inputs, *params, vocab, debug=True,
                                         config=dict(cfg, split=True, staged=True,
                                                     STAGED_ROUNDS=rounds))
        for a, b in zip(staged, whole):
            assert torch.equal(a, b), rounds
    ref = reference.proxy_sample_reference(*inputs, *params, vocab)
    assert torch.equal(whole[0], ref[0])


def test_may_filter_rule():
    """The launch hint: False only when the numbers rule every filter out."""
    V = 100
    assert not ops.may_filter({}, V)                                  # defaults: greedy
    assert not ops.may_filter(dict(temperature=0.0, top_p=0.5), V)    # greedy ignores filters
    assert not ops.may_filter(dict(temperature=0.7), V)
    assert not ops.may_filter(dict(temperature=0.7, top_k=V, top_p=1.0, min_p=0.0), V)
    assert ops.may_filter(dict(temperature=0.7, top_k=50), V)
    assert ops.may_filter(dict(temperature=0.7, top_p=0.9), V)
    assert ops.may_filter(dict(temperature=0.7, min_p=0.1), V)
    assert ops.may_filter(dict(temperature=torch.zeros(2)), V) is False  # no filter either way
    assert ops.may_filter(dict(temperature=torch.ones(2), top_p=torch.ones(2)), V)  # unknown
    assert ops.may_filter(dict(temperature=0.7, top_k=torch.zeros(2, dtype=torch.long)), V)


@pytest.mark.skipif("triton" not in CPU_BACKENDS, reason="Triton is not available")
def test_one_registered_op_per_kernel():
    """The backend picks a kernel's own op; no op takes a backend name or a launch hint."""
    assert ops.sample_kernel("cpu") is torch.ops.proxykern.fused_sample
    assert ops.sample_kernel("cuda") is torch.ops.proxykern.fused_sample
    assert ops.sample_kernel("triton", True) is torch.ops.proxykern.triton_sample
    assert ops.sample_kernel("triton", False) is torch.ops.proxykern.triton_sample_unfiltered
    assert ops.sample_kernel("torch") is torch.ops.proxykern.reference_sample
    for name in ("fused_sample", "triton_sample", "triton_sample_unfiltered", "reference_sample"):
        schema = str(getattr(torch.ops.proxykern, name).default._schema)
        assert "backend" not in schema and "may_filter" not in schema, schema
    assert not hasattr(torch.ops.proxykern, "proxy_sample")


def test_triton_gets_the_filter_hint(monkeypatch):
    """proxy_sample tells the Triton launcher whether a row may filter."""
    from proxykern.kernels import proxy_sample_triton as pst
    seen = []
    real = pst.proxy_sample_triton

    def spy(*args, may_filter, **kwargs):
        seen.append(may_filter)
        return real(*args, may_filter=may_filter, **kwargs)

    monkeypatch.setattr(pst, "proxy_sample_triton", spy)
    inputs = random_logits(2, 64, torch.float32, seed=2)
    for kwargs in (dict(), dict(temperature=0.8), dict(temperature=0.8, top_p=0.9),
                   dict(temperature=0.8, top_k=torch.tensor([0, 0]))):
        proxykern.proxy_sample(*inputs, backend="triton", **kwargs)
    assert seen == [False, False, True, True]
