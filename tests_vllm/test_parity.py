"""Greedy parity: vLLM + ProxyTuningForCausalLM gives fused_proxy_generate's tokens (fp32)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import ALPHAS, MAX_NEW_TOKENS, MODELS, fused_reference, hf_models, make_llm


def _requests(prompt_ids, alphas):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids for _ in alphas]
    params = [SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS,
                             extra_args={"proxy_alpha": a}) for _ in prompt_ids for a in alphas]
    return prompts, params


def _tokens(llm, prompt_ids, alphas):
    outs = llm.generate(*_requests(prompt_ids, alphas), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def _mismatches(got, want):
    return [(i, g, w) for i, (g, w) in enumerate(zip(got, want)) if g != w]


def test_widened_trio_is_the_same_model(trio, prompt_ids):
    """The re-exported expert computes the shipped expert's logits (HF, fp32)."""
    orig, wide = hf_models(MODELS / "expert", trio["expert"])
    ids = torch.tensor([prompt_ids[0]])
    with torch.inference_mode():
        a, b = orig(ids).logits, wide(ids).logits
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


def test_trio_per_request_alphas_prefix_caching(llm, prompt_ids, reference):
    """32 held-out prompts x alpha 0.5, 1, 2 in one batch; then again, from the prefix cache."""
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
    first = _tokens(llm, prompt_ids, ALPHAS)
    assert not _mismatches(first, reference)
    assert len({tuple(t) for t in first}) > len(first) // 3  # the alphas do differ
    again = _tokens(llm, prompt_ids, ALPHAS)
    assert not _mismatches(again, reference)


def test_default_alpha_from_hf_overrides(trio, prompt_ids, reference):
    """No extra_args: the alpha of hf_overrides applies; chunked prefill in small chunks."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    llm = make_llm(trio["base"], trio["expert"], trio["anti_expert"], alpha=2.0,
                   enable_chunked_prefill=True, max_num_batched_tokens=16, max_num_seqs=8,
                   enable_prefix_caching=False)
    assert llm.llm_engine.vllm_config.scheduler_config.enable_chunked_prefill
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids],
                        SamplingParams(temperature=0.0, max_tokens=MAX_NEW_TOKENS),
                        use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    want = reference[ALPHAS.index(2.0)::len(ALPHAS)]
    assert not _mismatches(got, want)
    # per-request alphas through the chunked path too
    assert not _mismatches(_tokens(llm, prompt_ids[:8], ALPHAS), reference[:8 * len(ALPHAS)])


# ------------------------------------------------------------------ random models, other shapes

def _random_llama(folder, *, vocab, layers, heads, kv_heads, hidden, seed, tokenizer_from,
                  prefer_from=None, prefer_scale=1.0):
    """A random Llama; ``prefer_from``: lm_head rows from there on scaled by ``prefer_scale``
    (larger logits, so greedy decoding picks those tokens more often)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv_heads, head_dim=32,
                         max_position_embeddings=128, initializer_range=0.2,
                         tie_word_embeddings=False, bos_token_id=2, eos_token_id=2,
                         pad_token_id=0)
    model = LlamaForCausalLM(config).float()
    if prefer_from is not None:
        with torch.no_grad():
            model.lm_head.weight[prefer_from:] *= prefer_scale
    model.save_pretrained(folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_from / f, folder / f)
    return folder


@pytest.fixture(scope="module")
def random_trio(tmp_path_factory):
    """Mixed shapes: a GQA base (4 query / 2 KV heads, 3 layers), a 2-layer expert and a
    1-layer anti-expert with 2 / 1 heads, the experts' vocabularies padded to 176."""
    out = tmp_path_factory.mktemp("random")
    tok = MODELS / "tokenizer"
    return {
        "base": _random_llama(out / "base", vocab=161, layers=3, heads=4, kv_heads=2,
                              hidden=128, seed=1, tokenizer_from=tok),
        "expert": _random_llama(out / "expert", vocab=176, layers=2, heads=2, kv_heads=1,
                                hidden=64, seed=2, tokenizer_from=tok),
        "anti_expert": _random_llama(out / "anti_expert", vocab=176, layers=1, heads=2,
                                     kv_heads=2, hidden=64, seed=3, tokenizer_from=tok)}


def test_random_models_mixed_shapes(random_trio, prompt_ids, tokenizer):
    folders = [random_trio[n] for n in ("base", "expert", "anti_expert")]
    with torch.inference_mode():
        want = fused_reference(hf_models(*folders), prompt_ids[:12], ALPHAS, tokenizer)
    llm = make_llm(*folders, enable_prefix_caching=True)
    assert not _mismatches(_tokens(llm, prompt_ids[:12], ALPHAS), want)


# ------------------------------------------------------------------ a base wider than the experts

NARROW = 150  # the experts' width; the base has the tokenizer's 161 (gap 11 <= 150 // 8)
WIDE_ALPHAS = (0.0, 0.5, 1.0, 2.0)


@pytest.fixture(scope="module")
def wide_base_trio(tmp_path_factory):
    """The base reads and writes all 161 tokens and prefers ids 150..160 (lm_head rows
    scaled); the expert and the anti-expert have 150, so those ids are the zero-delta tail
    and reach the experts as the stand-in pad id (0, the base's generation config's)."""
    out = tmp_path_factory.mktemp("wide_base")
    tok = MODELS / "tokenizer"
    return {
        "base": _random_llama(out / "base", vocab=161, layers=2, heads=4, kv_heads=2,
                              hidden=128, seed=5, tokenizer_from=tok, prefer_from=NARROW,
                              prefer_scale=2.0),
        "expert": _random_llama(out / "expert", vocab=NARROW, layers=2, heads=2, kv_heads=1,
                                hidden=64, seed=6, tokenizer_from=tok),
        "anti_expert": _random_llama(out / "anti_expert", vocab=NARROW, layers=1, heads=2,
                                     kv_heads=2, hidden=64, seed=7, tokenizer_from=tok)}


@pytest.fixture(scope="module")
def narrow_prompt_ids(tokenizer):
    """Held-out prompts every model can read (fused_proxy_generate refuses prompt ids past
    a model's embedding; generated ids past it are the stand-in's business)."""
    items = json.loads((MODELS / "heldout.json").read_text())["items"]
    ids = [tokenizer(item["prompt"], add_special_tokens=False).input_ids for item in items]
    return [x for x in ids if max(x) < NARROW][:12]


def _base_alone(model, prompt_ids, eos):
    """Greedy tokens of the base by itself (Hugging Face, fp32)."""
    outs = []
    for ids in prompt_ids:
        seq, new = list(ids), []
        for _ in range(MAX_NEW_TOKENS):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            new.append(token)
            seq.append(token)
            if token == eos:
                break
        outs.append(new)
    return outs


def test_base_wider_than_experts(wide_base_trio, narrow_prompt_ids, tokenizer):
    """vLLM follows fused_proxy_generate's vocabulary rule: the base's 161 columns, z = base
    on 150..160, the experts fed the pad id for the tail tokens; alpha 0 is the base alone."""
    from proxykern.integrations.vllm_plugin import _STEP
    assert len(narrow_prompt_ids) == 12
    folders = [wide_base_trio[n] for n in ("base", "expert", "anti_expert")]
    models = hf_models(*folders)
    with torch.inference_mode():
        want = fused_reference(models, narrow_prompt_ids, WIDE_ALPHAS, tokenizer)
        alone = _base_alone(models[0], narrow_prompt_ids, tokenizer.eos_token_id)
    llm = make_llm(*folders, enable_prefix_caching=True)
    [(plan, stand_ins)] = llm.apply_model(lambda m: (m.plan, list(m.stand_ins)))
    assert plan.vocab_size == 161 and plan.delta_width == NARROW
    assert stand_ins == [("expert", (NARROW, 0)), ("anti_expert", (NARROW, 0))]
    got = _tokens(llm, narrow_prompt_ids, WIDE_ALPHAS)
    assert not _mismatches(got, want)
    assert _STEP.base.shape[1] == 161 and bool((_STEP.diff[:, NARROW:] == 0).all())
    n = len(WIDE_ALPHAS)
    assert got[0::n] == alone  # alpha 0: the base alone, tail tokens included
    # Not vacuous: tail tokens are chosen, at alpha 0 and with a delta, and generation
    # goes on after them (the experts then read the stand-in).
    for k, alpha in enumerate(WIDE_ALPHAS):
        rows = got[k::n]
        assert any(t >= NARROW for row in rows for t in row[:-1]), alpha
    assert any(t < NARROW for row in got for t in row)
    assert len({tuple(t) for t in got}) > len(got) // 3  # the alphas do differ


def test_refuses_unreadable_pad(wide_base_trio, tmp_path):
    """The stand-in must be readable by every model: a base pad id past the experts' width
    is refused at start."""
    base = tmp_path / "base"
    shutil.copytree(wide_base_trio["base"], base)
    gen = json.loads((base / "generation_config.json").read_text())
    gen["pad_token_id"] = 155
    (base / "generation_config.json").write_text(json.dumps(gen))
    msg = _start_error(base, wide_base_trio["expert"], wide_base_trio["anti_expert"])
    assert "pad_token_id 155" in msg


# ------------------------------------------------------------------ refusals at start

def _start_error(*folders, **kwargs) -> str:
    with pytest.raises(Exception) as info:
        make_llm(*folders, **kwargs)
    text, exc = "", info.value
    while exc is not None:  # the engine wraps the model's ValueError
        text += f" {exc}"
        exc = exc.__cause__ or exc.__context__
    return text


def test_refuses_other_tokenizer(trio, tmp_path):
    """Same width, two tokens swapped: only the tokenizer check can see it."""
    other = tmp_path / "anti"
    shutil.copytree(trio["anti_expert"], other)
    spec = json.loads((other / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "emberly", "farmer"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(spec))
    msg = _start_error(trio["base"], trio["expert"], other)
    assert "anti_expert's tokenizer" in msg and "differs" in msg


def test_refuses_other_vocabulary(random_trio, tmp_path):
    wide = _random_llama(tmp_path / "wide", vocab=400, layers=1, heads=2, kv_heads=2,
                         hidden=64, seed=4, tokenizer_from=MODELS / "tokenizer")
    msg = _start_error(random_trio["base"], wide, random_trio["anti_expert"])
    assert "vocabulary of 400 tokens" in msg


def test_refuses_max_model_len_above_positions(trio, tmp_path):
    short = tmp_path / "expert"
    shutil.copytree(trio["expert"], short)
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 64
    (short / "config.json").write_text(json.dumps(config))
    msg = _start_error(trio["base"], short, trio["anti_expert"])
    assert "max_model_len=128 is above the expert's max_position_embeddings=64" in msg


def test_refuses_missing_settings(trio):
    from vllm import LLM
    with pytest.raises(Exception) as info:
        LLM(model=str(trio["base"]), max_model_len=128, enforce_eager=True,
            hf_overrides={"architectures": ["ProxyTuningForCausalLM"],
                          "proxy_tuning": {"expert": str(trio["expert"])}})
    assert "anti_expert" in str(info.value) or "anti_expert" in repr(info.value.__cause__)


def test_refuses_pipeline_parallel_and_speculative():
    from types import SimpleNamespace as NS

    from proxykern.integrations.vllm_plugin import _refuse_unsupported
    ok = dict(parallel_config=NS(pipeline_parallel_size=1), speculative_config=None,
              model_config=NS(enable_prompt_embeds=False))
    _refuse_unsupported(NS(**ok))
    with pytest.raises(ValueError, match="pipeline parallelism"):
        _refuse_unsupported(NS(**{**ok, "parallel_config": NS(pipeline_parallel_size=2)}))
    with pytest.raises(ValueError, match="speculative decoding"):
        _refuse_unsupported(NS(**{**ok, "speculative_config": object()}))
