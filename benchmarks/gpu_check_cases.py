"""Small CUDA cases for compute-sanitizer (memcheck, racecheck): ``make gpu-check`` stage a.

One launch per path of csrc/'s CUDA kernel: greedy, plain temperature, each filter alone
and together, the whole-row fallback (kept sets too large for the per-slice candidates),
the overflow rule, an odd vocabulary, misaligned and strided rows, mixed dtypes, a bad
row. Each result is also compared with the reference (tokens and status), so a run
under the sanitizer checks the answers too. Prints GPU-CHECK-CASES-OK at the end.
"""
from __future__ import annotations

import sys

import torch

from proxykern import ops


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
    if failures:
        print("failed cases: " + ", ".join(failures))
        return 1
    print("GPU-CHECK-CASES-OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
