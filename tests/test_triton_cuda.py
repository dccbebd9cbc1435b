"""The Triton backend compiled for the GPU (not the interpreter) against the reference.

Every test here is ``@pytest.mark.cuda`` (skipped without a GPU). On CPU the Triton
kernel runs through TRITON_INTERPRET=1 in tests/test_ops.py; here it runs as the PTX
the GPU executes (FMA contraction off, div_rn, libdevice exp/log), on device tensors.
Sizes are few: every new dtype / alignment is a new compilation of the kernel.
"""
from __future__ import annotations

import pytest
import torch

from proxykern import ops
from op_cases import TOLERANCES, required_backends, run

pytestmark = pytest.mark.cuda

SIZES = [(1, 111), (3, 1000), (99, 32000), (3, 50257), (8, 151936)]
MODES = {
    "greedy": dict(),
    "temperature": dict(temperature=0.9),
    "top_k": dict(temperature=1.0, top_k=50),
    "top_p": dict(temperature=1.1, top_p=0.9),
    "min_p": dict(temperature=1.0, min_p=0.05),
    "all": dict(temperature=0.8, top_k=200, top_p=0.8, min_p=0.02),
    "slow_path": dict(temperature=4.0, top_p=0.99),
}


@pytest.fixture(autouse=True)
def _needs_triton_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = ops.backend_unavailable_reason("triton", torch.device("cuda"))
    if reason is not None:
        if "triton" in required_backends("cuda"):  # required on a GPU: no skipping
            pytest.fail(f"the triton backend is required here but not available: {reason}")
        pytest.skip(f"the triton backend is not available: {reason}")


def gpu_logits(batch, vocab, dtype, *, seed, scale=3.0, width=None):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple((torch.randn(batch, width or vocab, generator=gen, device="cuda") * scale).to(dtype)
                 for _ in range(3))


def compare(inputs, dtype, min_agree=0.99, **kwargs):
    ref = run("torch", *inputs, **kwargs)
    got = run("triton", *inputs, **kwargs)
    assert torch.equal(got[3].cpu(), ref[3].cpu())
    rtol, atol = TOLERANCES[dtype]
    torch.testing.assert_close(got[2].cpu(), ref[2].cpu(), rtol=rtol, atol=atol)
    same = got[0].cpu() == ref[0].cpu()
    assert same.float().mean().item() >= min_agree, f"{int(same.sum())}/{same.numel()} tokens agree"
    torch.testing.assert_close(got[1].cpu()[same], ref[1].cpu()[same], rtol=rtol, atol=atol)
    return ref, got


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch,vocab", SIZES)
def test_against_reference_bf16(batch, vocab, mode):
    inputs = gpu_logits(batch, vocab, torch.bfloat16, seed=batch * 7 + vocab)
    kwargs = dict(MODES[mode], alpha=1.3, seed=torch.arange(batch, device="cuda") * 1000 + 17, step=5)
    compare(inputs, torch.bfloat16, min_agree=1.0 if mode == "greedy" else 0.99, **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_other_dtypes(dtype):
    inputs = gpu_logits(5, 32000, dtype, seed=3)
    compare(inputs, dtype, min_agree=1.0, alpha=0.7)
    compare(inputs, dtype, temperature=0.7, top_k=40, top_p=0.9, min_p=0.01, seed=4, step=1)


def test_misaligned_rows_and_mixed_dtypes():
    """A view starting at column 1 (no 16-byte alignment) and an odd width: the same
    answer as aligned copies; mixed dtypes agree with the reference."""
    vocab = 4099
    wide = gpu_logits(7, vocab + 14, torch.bfloat16, seed=41)
    views = [t[:, 1:] for t in wide]
    packed = [v[:, :vocab].contiguous() for v in views]
    for kwargs in (dict(), dict(temperature=0.9, top_k=30, seed=2), dict(temperature=1.2, top_p=0.8, seed=5)):
        a = run("triton", *views, vocab_size=vocab, **kwargs)
        b = run("triton", *packed, **kwargs)
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    b32, e32, a32 = gpu_logits(4, 32000, torch.float32, seed=31)
    compare((b32.to(torch.bfloat16), e32, a32.half()), torch.bfloat16, temperature=1.0, top_p=0.9, seed=6)


def test_batch_invariance():
    batch, vocab = 9, 50257
    base, expert, anti = gpu_logits(batch, vocab, torch.bfloat16, seed=5)
    d = "cuda"
    kwargs = dict(temperature=torch.linspace(0.0, 1.5, batch, device=d), top_p=0.95,
                  top_k=torch.tensor([0, 0, 50, 0, 7, 0, 0, 3000, 0], device=d),
                  seed=torch.arange(batch, device=d) + 100, step=3)
    full = run("triton", base, expert, anti, **kwargs)
    for row in (0, 4, 7):
        single = {k: (v[row:row + 1] if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        alone = run("triton", base[row:row + 1], expert[row:row + 1], anti[row:row + 1], **single)
        for a, b in zip(alone, full):
            assert torch.equal(a[0], b[row])


def test_overflow_rule():
    base, expert, anti = gpu_logits(3, 3000, torch.float32, seed=15)
    base[1] -= 60.0
    kwargs = dict(temperature=torch.tensor([2e-38, 2e-38, 1e-40], device="cuda"), top_p=0.9,
                  seed=torch.arange(3, device="cuda"))
    ref = run("torch", base, expert, anti, **kwargs)
    got = run("triton", base, expert, anti, **kwargs)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[3], ref[3])
    torch.testing.assert_close(got[2], ref[2])


@pytest.mark.parametrize("vocab", [32000, 151936])
def test_split_and_staged_give_the_same_bits(vocab):
    """Small batches split pass 1 across programs and stage the search (pivot passes and
    the last pass as (segment, row) programs); large batches do neither: the same bits.
    Rows: greedy, plain, top_k, top_p, both (top_p 0.99 at T 1.5 needs several passes)."""
    from proxykern.kernels import proxy_sample_triton as pst
    batch, d = 20, "cuda"
    inputs = gpu_logits(batch, vocab, torch.bfloat16, seed=77)
    params = (torch.full((batch,), 1.1, device=d), torch.linspace(0.0, 1.5, batch, device=d),
              torch.tensor([0, 50, 0, 400] * (batch // 4), device=d),
              torch.tensor([1.0, 1.0, 0.9, 0.99] * (batch // 4), device=d),
              torch.zeros(batch, device=d), torch.arange(batch, device=d) + 9,
              torch.full((batch,), 4, device=d))
    whole = pst.proxy_sample_triton(*inputs, *params, vocab, config=dict(split=False), debug=True)
    for launch in (dict(split=True, staged=False), dict(split=True, staged=True),
                   dict(split=True, staged=True, STAGED_ROUNDS=0),
                   dict(split=True, staged=True, STAGED_ROUNDS=8)):
        got = pst.proxy_sample_triton(*inputs, *params, vocab, config=launch, debug=True)
        for a, b in zip(got, whole):
            assert torch.equal(a, b), launch
    for row in (3, 6, 19):  # batch 1 splits and stages by default, batch 20 does neither
        alone = pst.proxy_sample_triton(*(t[row:row + 1] for t in inputs),
                                        *(p[row:row + 1] for p in params), vocab)
        for a, b in zip(alone, whole):
            assert torch.equal(a[0], b[row]), row
