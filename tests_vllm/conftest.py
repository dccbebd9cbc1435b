"""Shared fixtures of the vLLM plugin tests (run in .venv-vllm by `make test-vllm`).

vLLM runs in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: an engine starts in seconds), on
a 1 GiB KV cache, with its caches in a temporary folder. The shipped trio's expert and
anti-expert have 16-wide heads, below what vLLM's CPU attention takes, so they are
re-exported exactly with 64-wide heads (trio_export.py) into a temporary folder; the
committed weights are only read.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

_CACHE = tempfile.mkdtemp(prefix="proxykern-vllm-cache-")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CACHE_ROOT", _CACHE)

import pytest  # noqa: E402
import torch  # noqa: E402

import proxykern  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "trio" / "models"
ALPHAS = (0.5, 1.0, 2.0)
MAX_NEW_TOKENS = 16
N_PROMPTS = 32

if Path(proxykern.__file__).resolve().parent == ROOT / "proxykern":
    # The source tree's proxykern/_C*.so is the main venv's build (another torch).
    raise RuntimeError("tests_vllm must import the proxykern installed in .venv-vllm, not "
                       "the source tree: run `make test-vllm` (or .venv-vllm/bin/pytest "
                       "tests_vllm, not `python -m pytest`)")


def overrides(expert, anti_expert, alpha=1.0):
    return {"architectures": ["ProxyTuningForCausalLM"],
            "proxy_tuning": {"expert": str(expert), "anti_expert": str(anti_expert),
                             "alpha": alpha}}


def make_llm(base, expert, anti_expert, alpha=1.0, **kwargs):
    from vllm import LLM
    kwargs = {"max_model_len": 128, "enforce_eager": True, "dtype": "float32",
              "seed": 0, **kwargs}
    return LLM(model=str(base), hf_overrides=overrides(expert, anti_expert, alpha), **kwargs)


@pytest.fixture(scope="session")
def trio(tmp_path_factory):
    """Folders of the served trio: the shipped base, the re-exported expert and anti-expert."""
    from trio_export import widen_heads
    out = tmp_path_factory.mktemp("trio")
    return {"base": MODELS / "base",
            "expert": widen_heads(MODELS / "expert", out / "expert"),
            "anti_expert": widen_heads(MODELS / "anti_expert", out / "anti_expert")}


@pytest.fixture(scope="session")
def prompts():
    items = json.loads((MODELS / "heldout.json").read_text())["items"]
    return [item["prompt"] for item in items[:N_PROMPTS]]


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODELS / "tokenizer")


def hf_models(*folders):
    from transformers import AutoModelForCausalLM
    return [AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in folders]


def fused_reference(models, prompt_ids, alphas, tokenizer, max_new_tokens=MAX_NEW_TOKENS):
    """Greedy tokens of ``fused_proxy_generate`` (fp32), one list per (prompt, alpha)."""
    rows = [(ids, a) for ids in prompt_ids for a in alphas]
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids)) + ids
                              for ids, _ in rows])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in rows])
    out = proxykern.fused_proxy_generate(
        *models, input_ids, mask, max_new_tokens=max_new_tokens,
        alpha=torch.tensor([a for _, a in rows], dtype=torch.float32),
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return [out.tokens[i, :int(out.lengths[i])].tolist() for i in range(len(rows))]


@pytest.fixture(scope="session")
def prompt_ids(prompts, tokenizer):
    return [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]


@pytest.fixture(scope="session")
def reference(prompt_ids, tokenizer):
    """fused_proxy_generate on the shipped (unmodified) trio: 32 prompts x ALPHAS."""
    models = hf_models(MODELS / "base", MODELS / "expert", MODELS / "anti_expert")
    with torch.inference_mode():
        return fused_reference(models, prompt_ids, ALPHAS, tokenizer)


@pytest.fixture(scope="session")
def llm(trio):
    """One engine on the served trio (prefix caching on), shared by the tests that only
    send requests."""
    engine = make_llm(trio["base"], trio["expert"], trio["anti_expert"],
                      enable_prefix_caching=True)
    yield engine
    del engine
