"""Small CUDA cases for compute-sanitizer (memcheck, racecheck): ``make gpu-check`` stage a.

One launch per path of csrc/'s CUDA kernel: greedy, plain temperature, each filter alone
and together, the whole-row fallback (kept sets too large for the per-slice candidates),
the overflow rule, an odd vocabulary, misaligned and strided rows, mixed dtypes, a bad
row. Each result is also compared with the reference (tokens and status), so a run
under the sanitizer checks the answers too. Then v06's one-launch plan (K2 fused into
K1, csrc/cuda_kernels.cuh) on the paths its merge can take, each compared with v05 bit
for bit. Prints GPU-CHECK-CASES-OK at the end.
"""
from __future__ import annotations

import functools
import sys

import torch

from proxykern import ops

# ------------------------------------------------------------------------------ inputs

# LM-like rows: entropies of softmax(z) spread over this range (nats), as a decoding LM's
# next-token distributions mostly are; `randn * 3` rows have ~8-10 nats at 32k-152k
# columns, a flat softmax, which no LM step looks like and which hides the cost of work
# that real, heavy-tailed logits let a kernel skip (or force it to do).
LM_ENTROPY = (1.0, 4.0)
_ZIPF_JITTER = 0.5  # logit noise on top of the profile: no two rows share a shape exactly


@functools.lru_cache(maxsize=16)
def _zipf_exponents(vocab: int, levels: int = 16) -> tuple:
    """Exponents s whose profile logit(rank) = -s * log(rank) has entropy
    LM_ENTROPY[0] .. LM_ENTROPY[1] (levels values, evenly spaced): a bisection in float64,
    all levels at once (entropy falls as s grows: log(vocab) at 0, ~0 at 20)."""
    logr = torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    target = torch.linspace(LM_ENTROPY[0], LM_ENTROPY[1], levels, dtype=torch.float64)
    lo, hi = torch.zeros(levels, dtype=torch.float64), torch.full((levels,), 20.0, dtype=torch.float64)
    for _ in range(32):
        mid = (lo + hi) / 2
        logp = torch.log_softmax(-mid[:, None] * logr[None, :], dim=1)
        above = -(logp.exp() * logp).sum(dim=1) > target
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return tuple(((lo + hi) / 2).tolist())


def lm_like_logits(batch: int, vocab: int, *, generator: torch.Generator, device,
                   dtype=torch.bfloat16, scale: float = 1.0):
    """(base, expert, anti) whose combination z = base + (expert - anti) (alpha 1) looks
    like a decoding LM's logits: the sorted softmax follows a Zipf-like profile
    -s log(rank) plus a little noise, with entropies spread over LM_ENTROPY across the
    rows, the columns shuffled per row. expert and anti are a random shared logit matrix
    and that matrix plus a small edit, as a tuned and an untuned small model differ.
    Shared by gpu_check's kernel table and tests/test_cuda.py."""
    dev = torch.device(device)
    exps = torch.tensor(_zipf_exponents(vocab), dtype=torch.float32)
    s = exps[torch.arange(batch) % len(exps)].to(dev)
    logr = torch.log(torch.arange(1, vocab + 1, dtype=torch.float32, device=dev))
    profile = -s[:, None] * logr[None, :]
    profile = profile + _ZIPF_JITTER * torch.randn(batch, vocab, generator=generator, device=dev)
    order = torch.argsort(torch.rand(batch, vocab, generator=generator, device=dev), dim=1)
    base = torch.empty_like(profile).scatter_(1, order, profile) + 10.0  # LM-sized logits
    anti = 3.0 * torch.randn(batch, vocab, generator=generator, device=dev)
    expert = anti + 0.25 * torch.randn(batch, vocab, generator=generator, device=dev)
    return tuple((t * scale).to(dtype) for t in (base, expert, anti))


def row_entropy(base, expert, anti, alpha: float = 1.0, temperature: float = 1.0):
    """Entropy (nats) of each row's softmax(z / T), z combined in fp32."""
    z = (base.float() + alpha * (expert.float() - anti.float())) / temperature
    logp = torch.log_softmax(z, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ------------------------------------------------------------------------------ cases


def main() -> int:
    # --device cpu: the same cases through the C++ CPU kernel (gpu-check's dry run).
    dev = "cpu" if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu" else "cuda"
    backend = "cpu" if dev == "cpu" else "cuda"
    reason = ops.backend_unavailable_reason(backend, torch.device(dev))
    if reason is not None:
        print(f"the {backend} backend is not available: {reason}")
        return 1
    gen = torch.Generator(device=dev).manual_seed(0)
    failures = []

    def logits(batch, width, dtype, scale=3.0):
        return [(torch.randn(batch, width, generator=gen, device=dev) * scale).to(dtype)
                for _ in range(3)]

    def case(name, inputs, **kw):
        out, status = ops.proxy_sample_with_status(*inputs, backend=backend, **kw)
        if dev == "cuda":
            torch.cuda.synchronize()
        # The reference on CPU copies: under the sanitizer only our kernels run on the GPU.
        ref, ref_status = ops.proxy_sample_with_status(*(t.cpu() for t in inputs), backend="torch", **kw)
        agree = (out.tokens.cpu() == ref.tokens).float().mean().item()
        ok = torch.equal(status.cpu(), ref_status) and agree >= 0.99
        print(f"{'ok  ' if ok else 'FAIL'} {name}: tokens agree {agree:.3f}", flush=True)
        if not ok:
            failures.append(name)

    vocab = 5003  # odd: a masked tail in the last slice
    for dtype in (torch.float32, torch.bfloat16):
        tag = str(dtype).replace("torch.", "")
        x = logits(3, vocab, dtype)
        case(f"{tag} greedy", x)
        case(f"{tag} temperature", x, temperature=0.9, seed=1)
        case(f"{tag} top_k", x, temperature=1.0, top_k=40, seed=2)
        case(f"{tag} top_p", x, temperature=1.0, top_p=0.9, seed=3)
        case(f"{tag} min_p", x, temperature=1.0, min_p=0.05, seed=4)
        case(f"{tag} all filters", x, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=5)
        flat = [t * 0.01 for t in x]
        case(f"{tag} fallback top_p", flat, temperature=5.0, top_p=0.99, min_p=1e-5, seed=6)
        case(f"{tag} fallback top_k", x, temperature=1.0, top_k=3000, seed=7)
        case(f"{tag} overflow rule", x, temperature=2e-38, top_p=0.9, seed=8)
        wide = logits(3, vocab + 7, dtype)
        case(f"{tag} misaligned rows", [t[:, 1:] for t in wide], vocab_size=vocab,
             temperature=1.0, top_p=0.5, seed=9)
        case(f"{tag} strided rows", [t[::2] for t in logits(6, vocab, dtype)],
             temperature=1.0, top_k=20, seed=10)
    x = logits(2, 32000, torch.bfloat16)
    case("bf16 32000 top_k+top_p", x, temperature=1.0, top_k=50, top_p=0.9, seed=11)
    b, e, a = logits(3, vocab, torch.float32)
    case("mixed dtypes", [b, e.half(), a.to(torch.bfloat16)], temperature=1.0, top_p=0.9, seed=12)
    b[1, 3] = float("nan")
    case("bad row", [b, e, a], temperature=1.0, top_p=0.9, seed=13)

    def same_as_v05(name, inputs, **kw):
        """v06 against v05: all four outputs bit for bit (v06 = v05's arithmetic)."""
        outs = []
        for variant in ("v05", "v06"):
            previous = torch.ops.proxykern.cuda_kernel_variant(variant)
            try:
                out, status = ops.proxy_sample_with_status(*inputs, backend="cuda", **kw)
                torch.cuda.synchronize()
            finally:
                torch.ops.proxykern.cuda_kernel_variant(previous)
            outs.append((out.tokens, out.logprobs, out.lse, status))
        ok = all(torch.equal(x, y) for x, y in zip(*outs))
        aligned = all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0 for t in inputs)
        launches = (1 if aligned and torch.ops.proxykern.cuda_v06_one_launch(inputs[0].shape[0],
                                                                             inputs[0].shape[1]) else 2)
        print(f"{'ok  ' if ok else 'FAIL'} v06 {name} ({launches} launch{'es' if launches > 1 else ''}): "
              f"{'bitwise v05' if ok else 'differs from v05'}", flush=True)
        if not ok:
            failures.append("v06 " + name)

    if dev == "cuda":
        # Rows 16-byte aligned (the fused kernel is built for the vector loads), vocab 5003.
        wide = logits(3, vocab + 5, torch.bfloat16)
        x = [t[:, :vocab] for t in wide]
        same_as_v05("greedy", x)
        same_as_v05("temperature", x, temperature=0.9, seed=21)
        same_as_v05("all filters", x, temperature=0.9, top_k=40, top_p=0.9, min_p=0.01, seed=22)
        same_as_v05("fallback top_p", [(t * 0.01)[:, :vocab] for t in wide], temperature=5.0,
                    top_p=0.99, min_p=1e-5, seed=23)
        same_as_v05("fallback top_k", x, temperature=1.0, top_k=3000, seed=24)
        same_as_v05("overflow rule", x, temperature=2e-38, top_p=0.9, seed=25)
        nan = [t.clone()[:, :vocab] for t in wide]
        nan[0][1, 3] = float("nan")
        same_as_v05("bad row", nan, temperature=1.0, top_p=0.9, seed=26)
        same_as_v05("unaligned rows (two launches)", [t.contiguous() for t in x], temperature=1.0,
                    top_p=0.9, seed=29)
        big = logits(1, 128256, torch.bfloat16)  # 126 slices: one launch
        same_as_v05("128256 top_p", big, temperature=1.0, top_p=0.9, seed=27)
        same_as_v05("128256 overflow rule", big, temperature=2e-38, seed=28)
    if failures:
        print("failed cases: " + ", ".join(failures))
        return 1
    print("GPU-CHECK-CASES-OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
