"""proxykern.inflate: a larger Llama computing the same function as a small one (CPU, fp32).

Tolerance: max |logit diff| <= REL_TOL (4e-6) * max |logit| of the small model. Measured
when written: 5e-7 of the logit scale for the shipped trio (base 1.4e-5 on logits of 28,
expert 8.8e-6 on 17) and 6e-7 to 9e-7 for the random Llama/Qwen2/Mistral models (2e-6 to
4e-6 on ~4): fp32 rounding of longer dot products and of the rescaled norm weights. A
mistake in the layout (a head reading the wrong kv head, a missed norm rescale, RoPE pairs
split) changes logits by a good fraction of their scale.
"""
import json
import math
import os

import pytest
import torch

import proxykern
from proxykern.apps import bench_generate
from proxykern.inflate import _check_shape, _shape_of, head_slots, inflate_llama

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRIO = os.path.join(ROOT, "examples", "trio", "models")
REL_TOL = 4e-6

needs_trio = pytest.mark.skipif(not os.path.isdir(TRIO), reason="no shipped trio")


@pytest.fixture(scope="module")
def trio():
    from transformers import AutoModelForCausalLM
    return {n: AutoModelForCausalLM.from_pretrained(os.path.join(TRIO, n)).eval()
            for n in ("base", "expert", "anti_expert")}


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(TRIO, "tokenizer"))
    tok.padding_side = "left"
    return tok


def grown(config, *, hidden=2, inter=2, heads=2, kv=2, layers=2, head_dim=1):
    """Shape arguments: the model's dimensions times the factors (layers: plus ``layers``)."""
    d = config.head_dim if hasattr(config, "head_dim") and config.head_dim else \
        config.hidden_size // config.num_attention_heads
    return dict(hidden_size=config.hidden_size * hidden,
                intermediate_size=config.intermediate_size * inter + 8,
                num_attention_heads=config.num_attention_heads * heads,
                num_key_value_heads=config.num_key_value_heads * kv,
                num_hidden_layers=config.num_hidden_layers + layers, head_dim=d * head_dim)


def assert_same_logits(small, big, ids, mask=None):
    with torch.no_grad():
        want = small(ids, attention_mask=mask).logits
        got = big(ids, attention_mask=mask).logits
    diff = (want - got).abs().max().item()
    scale = want.abs().max().item()
    assert diff <= REL_TOL * scale, (diff, scale)
    return diff


def random_model(kind="llama", seed=0, **overrides):
    """A tiny random model (GQA 4 query heads on 2 kv heads) with logits of a few units."""
    import transformers
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    kwargs = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  initializer_range=0.2, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**kwargs)).eval()
    with torch.no_grad():  # norm weights away from 1 so a missed rescale shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    return model


def prompts(vocab, batch=3, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen)


# --------------------------------------------------------------------------- exactness

@needs_trio
@pytest.mark.parametrize("name", ["base", "expert"])
@pytest.mark.parametrize("head_dim", [1, 4], ids=["same-head-dim", "head-dim-x4"])
def test_trio_logits_unchanged(trio, name, head_dim):
    small = trio[name]
    big = inflate_llama(small, **grown(small.config, hidden=3, heads=3, kv=3,
                                       head_dim=head_dim))
    ids = prompts(small.config.vocab_size)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # a left-padded row
    assert_same_logits(small, big, ids, mask)


@pytest.mark.parametrize("shape", [
    dict(hidden=3, heads=2, kv=1),              # larger groups: 8 query heads on 2 kv heads
    dict(hidden=3, heads=3, kv=6),              # MHA: each original kv head in 2 slots
    dict(hidden=3, heads=2, kv=2, head_dim=2),  # wider heads, RoPE pairs moved
], ids=["gqa-groups-4", "mha-copies", "head-dim-x2"])
def test_random_gqa_logits_and_greedy_decode(shape):
    small = random_model()
    big = inflate_llama(small, **grown(small.config, **shape))
    ids = prompts(small.config.vocab_size)
    assert_same_logits(small, big, ids)
    kw = dict(max_new_tokens=8, do_sample=False, return_dict_in_generate=True,
              output_logits=True, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        want, got = small.generate(ids, **kw), big.generate(ids, **kw)
    assert torch.equal(want.sequences, got.sequences)
    # the decode steps (read through the KV cache) keep the logits too
    for a, b in zip(want.logits, got.logits):
        assert (a - b).abs().max() <= REL_TOL * a.abs().max()


@pytest.mark.parametrize("kind", ["qwen2", "mistral"])
def test_other_llama_family_models(kind):
    extra = {"sliding_window": None} if kind == "mistral" else {}
    small = random_model(kind, **extra)
    big = inflate_llama(small, **grown(small.config, heads=2, kv=1, head_dim=2))
    assert type(big).__name__ == "LlamaForCausalLM"
    assert_same_logits(small, big, prompts(small.config.vocab_size))


def test_untied_embeddings_and_biases():
    small = random_model(tie_word_embeddings=False, attention_bias=True, mlp_bias=True)
    big = inflate_llama(small, **grown(small.config))
    assert big.lm_head.weight is not big.model.embed_tokens.weight
    assert_same_logits(small, big, prompts(small.config.vocab_size))


def test_the_small_model_is_not_modified():
    small = random_model()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    big = inflate_llama(small, **grown(small.config))
    assert all(torch.equal(before[k], v) for k, v in small.state_dict().items())
    small_ptrs = {p.data_ptr() for p in small.parameters()}
    assert not small_ptrs & {p.data_ptr() for p in big.parameters()}


# --------------------------------------------------------------------------- the cost is real

def llama_parameter_count(c) -> int:
    d, h = c.head_dim, c.hidden_size
    attn = h * d * (2 * c.num_attention_heads + 2 * c.num_key_value_heads)
    layer = attn + 3 * h * c.intermediate_size + 2 * h
    head = 0 if c.tie_word_embeddings else c.vocab_size * h
    return c.vocab_size * h + head + c.num_hidden_layers * layer + h


def test_inflated_shape_and_parameter_count():
    small = random_model()
    shape = dict(hidden_size=96, intermediate_size=200, num_attention_heads=6,
                 num_key_value_heads=3, num_hidden_layers=5, head_dim=16)
    big = inflate_llama(small, **shape, dtype=torch.bfloat16)
    assert {k: getattr(big.config, k) for k in shape} == shape
    assert big.config.rms_norm_eps == pytest.approx(1e-5 * 32 / 96)
    assert len(big.model.layers) == 5
    attn, mlp = big.model.layers[-1].self_attn, big.model.layers[-1].mlp
    assert attn.q_proj.weight.shape == (6 * 16, 96)
    assert attn.k_proj.weight.shape == (3 * 16, 96)
    assert mlp.down_proj.weight.shape == (96, 200)
    assert all(p.dtype == torch.bfloat16 for p in big.parameters())
    n = sum(p.numel() for p in big.parameters())
    assert n == llama_parameter_count(big.config) > 10 * sum(p.numel() for p in small.parameters())


def test_head_slots_keep_each_query_head_on_its_kv_head():
    for heads, kv, big_heads, big_kv in [(4, 2, 8, 2), (4, 2, 12, 12), (8, 2, 9, 9),
                                         (4, 4, 32, 8), (2, 2, 9, 3), (6, 3, 6, 3)]:
        q_slot, kv_slots = head_slots(heads, kv, big_heads, big_kv)
        used_kv = [s for slots in kv_slots for s in slots]
        assert len(set(q_slot)) == heads and max(q_slot) < big_heads
        assert len(set(used_kv)) == len(used_kv) and max(used_kv) < big_kv
        for i, slot in enumerate(q_slot):
            assert slot // (big_heads // big_kv) in kv_slots[i // (heads // kv)]


# --------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("change, argument", [
    (dict(hidden_size=16), "hidden_size"),
    (dict(intermediate_size=47), "intermediate_size"),
    (dict(num_hidden_layers=1), "num_hidden_layers"),
    (dict(hidden_size=96, num_attention_heads=6), "num_attention_heads"),
    (dict(num_key_value_heads=1, num_attention_heads=4), "num_key_value_heads"),
    (dict(head_dim=4), "head_dim"),
    (dict(head_dim=9), "head_dim"),  # odd: RoPE pairs need an even head
    (dict(hidden_size=100, num_attention_heads=8), "hidden_size"),
    (dict(num_hidden_layers=2.0), "num_hidden_layers"),
], ids=lambda x: str(x))
def test_bad_shape_names_the_argument(change, argument):
    small = random_model()
    shape = dict(hidden_size=64, intermediate_size=64, num_attention_heads=8,
                 num_key_value_heads=4, num_hidden_layers=3, head_dim=8)
    shape.update(change)
    with pytest.raises(ValueError, match=f"^{argument}"):
        inflate_llama(small, **shape)


def test_too_few_kv_heads_for_the_groups():
    small = random_model(num_attention_heads=8, num_key_value_heads=2)  # groups of 4
    # groups of 3: each original kv head needs 2 slots, 4 > 3 kv heads
    with pytest.raises(ValueError, match="num_key_value_heads=3 is too few"):
        inflate_llama(small, hidden_size=36, intermediate_size=48, num_attention_heads=9,
                      num_key_value_heads=3, num_hidden_layers=2)


def test_refuses_what_it_cannot_inflate_exactly():
    shape = dict(hidden_size=64, intermediate_size=64, num_attention_heads=8,
                 num_key_value_heads=4, num_hidden_layers=3)
    with pytest.raises(ValueError, match="sliding_window"):
        inflate_llama(random_model("mistral", sliding_window=16), **shape)
    scaled = random_model(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 10000.0})
    inflate_llama(scaled, **shape)  # same head_dim: any RoPE is kept as is
    with pytest.raises(ValueError, match="head_dim=16 differs"):
        inflate_llama(scaled, **shape, head_dim=16)
    import transformers
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match="model_type 'gpt2'"):
        inflate_llama(gpt2, **shape)


# --------------------------------------------------------------------------- proxy tuning

@needs_trio
def test_inflated_trio_generates_the_same_tokens(trio, tok):
    heldout = json.load(open(os.path.join(TRIO, "heldout.json")))["items"]
    texts = [heldout[0]["prompt"], heldout[7]["prompt"]]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    big = {"base": inflate_llama(trio["base"], **grown(trio["base"].config, head_dim=2))}
    for n in ("expert", "anti_expert"):
        big[n] = inflate_llama(trio[n], **grown(trio[n].config, hidden=4, heads=2, kv=2))
    kw = dict(max_new_tokens=8, alpha=1.0, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id)
    order = ("base", "expert", "anti_expert")
    want = proxykern.fused_proxy_generate(*(trio[n] for n in order), enc.input_ids,
                                          enc.attention_mask, **kw)
    got = proxykern.fused_proxy_generate(*(big[n] for n in order), enc.input_ids,
                                         enc.attention_mask, **kw)
    assert torch.equal(want.tokens, got.tokens)


@needs_trio
def test_bench_generate_trio_configs(trio):
    models = bench_generate.build_models("trio-tiny", torch.device("cpu"), torch.float32)
    hidden, inter, layers, heads, kv, _ = bench_generate.SHAPES["tiny-trio-base"]
    assert (models[0].config.hidden_size, models[0].config.num_hidden_layers) == (hidden, layers)
    assert models[1].config.hidden_size == bench_generate.SHAPES["tiny-trio-expert"][0]
    ids = prompts(161)
    for small, big in zip((trio[n] for n in ("base", "expert", "anti_expert")), models):
        assert_same_logits(small, big, ids)
    # every paper-like shape takes the trio exactly (validated without building it)
    for config in ("trio-paper", "trio-small"):
        for name, shape in zip(("base", "expert"), bench_generate.TRIO_CONFIGS[config]):
            h, i, n_layers, n_heads, n_kv, _ = bench_generate.SHAPES[shape]
            cfg = trio[name].config
            _check_shape(cfg, _shape_of(cfg), dict(
                hidden_size=h, intermediate_size=i, num_attention_heads=n_heads,
                num_key_value_heads=n_kv, num_hidden_layers=n_layers, head_dim=h // n_heads))


@needs_trio
def test_bench_generate_runs_trio_tiny(tmp_path):
    assert bench_generate.main(["--configs", "trio-tiny", "--batches", "1", "--prompt-len", "6",
                                "--new-tokens", "5", "--naive-tokens", "2", "--device", "cpu",
                                "--dtype", "float32", "--out", str(tmp_path)]) == 0
    rows = json.load(open(tmp_path / "generate.json"))["rows"]
    assert rows[0]["config"] == "trio-tiny" and rows[0]["eager"] > 0
    assert "errors" not in rows[0]
    assert math.isfinite(rows[0]["naive"])


def test_more_positions_keep_the_function_and_lift_the_position_check():
    small = random_model()
    big = inflate_llama(small, **grown(small.config), max_position_embeddings=256)
    assert big.config.max_position_embeddings == 256
    ids = torch.randint(3, small.config.vocab_size, (2, 60))
    assert_same_logits(small, big, ids)      # positions the small model states (64)
    ids = torch.randint(3, small.config.vocab_size, (1, 100))
    proxykern.fused_proxy_generate(big, big, big, ids, max_new_tokens=4)  # 103 > 64 positions
    with pytest.raises(ValueError, match="base reads at most 64 positions"):
        proxykern.fused_proxy_generate(small, small, small, ids, max_new_tokens=4)
    for bad in (32, 100.0, True):
        with pytest.raises(ValueError, match="max_position_embeddings"):
            inflate_llama(small, **grown(small.config), max_position_embeddings=bad)


def test_bench_speculative_runs_the_inflated_trio():
    """bench_speculative --inflate: the inflated trio's speculative rows equal plain decoding
    (the script exits 1 when an fp32 row differs)."""
    import subprocess
    import sys
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench_speculative.py"), "--device",
         "cpu", "--inflate", "trio-tiny", "--ks", "0", "2", "--batch-sizes", "2", "--prompts",
         "2", "--max-new-tokens", "4", "--repeats", "1", "--modes", "greedy"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "inflated as trio-tiny" in out.stdout
    assert out.stdout.count(" yes ") == 2
