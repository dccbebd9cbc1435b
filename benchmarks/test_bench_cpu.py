"""CPU kernel benchmark (pytest-benchmark): the naive step as users write it against the
``cpu`` backend, batch {1, 8, 64} x vocab {32000, 128256}, bf16 inputs, with and without
top_p=0.9, in one run.

    make bench-cpu        # or: pytest benchmarks/test_bench_cpu.py --benchmark-group-by=param

The same measurement with the ratios computed is ``proxykern bench kernel --device cpu``.
"""
import pytest
import torch

from proxykern import ops
from proxykern.apps.bench import naive_sample_step

pytestmark = pytest.mark.skipif(ops.backend_unavailable_reason("cpu", torch.device("cpu")) is not None,
                                reason="the C++ extension is not built")


@pytest.fixture(scope="module")
def inputs_cache():
    return {}


def _inputs(cache, batch, vocab):
    if (batch, vocab) not in cache:
        cache.clear()
        gen = torch.Generator().manual_seed(batch + vocab)
        cache[(batch, vocab)] = tuple((torch.randn(batch, vocab, generator=gen) * 3).bfloat16()
                                      for _ in range(3))
    return cache[(batch, vocab)]


@pytest.mark.parametrize("top_p", [1.0, 0.9])
@pytest.mark.parametrize("batch", [1, 8, 64])
@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("impl", ["naive", "cpu"])
def test_sample_step(benchmark, inputs_cache, impl, vocab, batch, top_p):
    base, expert, anti = _inputs(inputs_cache, batch, vocab)
    if impl == "naive":
        tokens, _ = benchmark(naive_sample_step, base, expert, anti, temperature=1.0, top_p=top_p)
    else:
        out = benchmark(ops.proxy_sample, base, expert, anti, temperature=1.0, top_p=top_p,
                        backend="cpu")
        tokens = out.tokens
    assert tokens.shape == (batch,) and bool(((tokens >= 0) & (tokens < vocab)).all())
