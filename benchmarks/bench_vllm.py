"""Tokens/s on CPU: vLLM + the proxykern plugin vs vLLM serving the base alone vs
``fused_proxy_generate``, on the shipped trio (fp32, greedy, fixed length).

Run in the vLLM venv (`make test-vllm` builds it), from outside the repository root or
through the installed package, e.g.:

    VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
        .venv-vllm/bin/python benchmarks/bench_vllm.py --prompts 32 256

The expert and anti-expert are served as their exact 64-wide-head re-export
(tests_vllm/trio_export.py), since vLLM's CPU attention takes heads of 32 and up;
``fused_proxy_generate`` runs the shipped models. Every request generates exactly
``--max-new-tokens`` tokens (EOS ignored). Each engine runs once untimed first.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "trio" / "models"
sys.path.insert(0, str(ROOT / "tests_vllm"))
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", tempfile.mkdtemp(prefix="bench-vllm-cache-"))


def _timed(fn):
    fn()  # warm-up: first-call allocations, thread pools
    t = time.perf_counter()
    n = fn()
    return n / (time.perf_counter() - t)


def bench_vllm(prompt_ids, max_new, overrides=None):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=str(MODELS / "base"), max_model_len=128, enforce_eager=True,
              dtype="float32", hf_overrides=overrides, max_num_seqs=256)
    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]

    def run():
        outs = llm.generate(prompts, params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)
    rate = _timed(run)
    del llm
    return rate


def bench_fused(prompt_ids, max_new):
    import torch
    from transformers import AutoModelForCausalLM

    import proxykern
    models = [AutoModelForCausalLM.from_pretrained(MODELS / n, dtype=torch.float32).eval()
              for n in ("base", "expert", "anti_expert")]
    width = max(map(len, prompt_ids))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompt_ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_ids])

    def run():
        out = proxykern.fused_proxy_generate(*models, ids, mask, max_new_tokens=max_new,
                                             eos_token_id=[], pad_token_id=0)
        return int(out.lengths.sum())
    with torch.inference_mode():
        return _timed(run)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer
    from trio_export import widen_heads
    tok = AutoTokenizer.from_pretrained(MODELS / "tokenizer")
    items = json.loads((MODELS / "heldout.json").read_text())["items"]
    tmp = Path(tempfile.mkdtemp(prefix="bench-vllm-trio-"))
    overrides = {"architectures": ["ProxyTuningForCausalLM"], "proxy_tuning": {
        "expert": str(widen_heads(MODELS / "expert", tmp / "expert")),
        "anti_expert": str(widen_heads(MODELS / "anti_expert", tmp / "anti_expert")),
        "alpha": 1.0}}
    rows = []
    for n in args.prompts:
        ids = [tok(items[i % len(items)]["prompt"], add_special_tokens=False).input_ids
               for i in range(n)]
        rows.append((n, bench_vllm(ids, args.max_new_tokens, overrides),
                     bench_vllm(ids, args.max_new_tokens), bench_fused(ids, args.max_new_tokens)))
    print(f"\n{args.max_new_tokens} new tokens per prompt, fp32, greedy; generated tokens/s")
    print("| prompts | vLLM + plugin (trio) | vLLM, base alone | fused_proxy_generate (trio) |")
    print("|---|---|---|---|")
    for n, plugin, base, fused in rows:
        print(f"| {n} | {plugin:.0f} | {base:.0f} | {fused:.0f} |")


if __name__ == "__main__":
    main()
