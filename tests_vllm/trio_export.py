"""Exact re-export of a Llama checkpoint with wider attention heads, for vLLM's CPU
attention (head sizes from 32 up; the shipped trio's expert and anti-expert have 16).

Head dim d -> 4d, per head: dims j and j + d/2 (a rotary pair, frequency
theta^(-2j/d)) move to 4j and 4j + 2d (a rotary pair of the wider head with the same
frequency, theta^(-8j/4d)); every other dim of q, k and v is zero, and o_proj reads
only the moved v dims. The softmax scale goes from d^-1/2 to (4d)^-1/2 = d^-1/2 / 2, so
q is doubled. Zeros and a doubling are exact in floating point: the new model computes
the same function (up to the summation order of the attention kernels).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _widen_rows(w: torch.Tensor, heads: int, d: int, scale: float = 1.0) -> torch.Tensor:
    """(heads * d, in) -> (heads * 4d, in): row j of a head to 4j (j < d/2) or 4(j - d/2) + 2d."""
    src = w.reshape(heads, d, -1)
    out = torch.zeros(heads, 4 * d, src.shape[-1], dtype=w.dtype)
    half = d // 2
    j = torch.arange(half)
    out[:, 4 * j] = src[:, j] * scale
    out[:, 4 * j + 2 * d] = src[:, j + half] * scale
    return out.reshape(heads * 4 * d, -1)


def widen_heads(src: Path, dst: Path) -> Path:
    """Write ``src``'s checkpoint with head_dim x 4 into ``dst`` (config, weights, tokenizer)."""
    src, dst = Path(src), Path(dst)
    config = json.loads((src / "config.json").read_text())
    d = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    nq, nkv = config["num_attention_heads"], config["num_key_value_heads"]
    state = load_file(src / "model.safetensors")
    out = {}
    for name, w in state.items():
        if name.endswith("self_attn.q_proj.weight"):
            w = _widen_rows(w, nq, d, scale=2.0)
        elif name.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):
            w = _widen_rows(w, nkv, d)
        elif name.endswith("self_attn.o_proj.weight"):
            w = _widen_rows(w.t().contiguous(), nq, d).t().contiguous()
        out[name] = w.contiguous()
    dst.mkdir(parents=True, exist_ok=True)
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config["head_dim"] = 4 * d
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors") and f.is_file():
            shutil.copy(f, dst / f.name)
    return dst


if __name__ == "__main__":  # python tests_vllm/trio_export.py SRC DST
    import sys
    print(widen_heads(*sys.argv[1:3]))
