"""Tiny random-weight models, prompts, a tiny tokenizer and oracles for the generation tests.

Nothing is downloaded: models come from configs (Llama, Qwen2, GPT-2 families,
hidden 32, 2 layers, vocabulary 1000) with seeded weights; the tokenizer is a
``tokenizers`` WordLevel model whose 1000 entries match the models' vocabulary.
"""
from __future__ import annotations

import functools
import os

import torch

VOCAB = 1000
EOS_ID, PAD_ID = 3, 1
FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_model(family: str, seed: int, vocab: int = VOCAB):
    """A seeded tiny causal LM in fp32, eval mode, on CPU."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              Qwen2Config, Qwen2ForCausalLM)
    common = dict(vocab_size=vocab, bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(seed)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, initializer_range=0.1, **common)
        model = LlamaForCausalLM(config)
    elif family == "qwen2":
        config = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=256, initializer_range=0.1, **common)
        model = Qwen2ForCausalLM(config)
    elif family == "gpt2":
        config = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256,
                            initializer_range=0.1, **common)
        model = GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    return model.eval()


@functools.lru_cache(maxsize=None)
def trio(base_family: str = "llama"):
    """(base, expert, anti_expert): the three families, ``base_family`` as the base."""
    others = [f for f in FAMILIES if f != base_family]
    return (tiny_model(base_family, 0), tiny_model(others[0], 1), tiny_model(others[1], 2))


def random_models(family: str):
    """Three random models of one family (seeds 20, 21, 22): a base, an expert and an
    anti-expert that share a tokenizer and, for llama / qwen2, a static cache."""
    return tuple(tiny_model(family, seed) for seed in (20, 21, 22))


def ragged_batch():
    """A left-padded batch of 3 prompts of lengths 5, 2 and 7 (row 2 unpadded)."""
    rows = [[11, 57, 203, 9, 400], [77, 18], [5, 6, 7, 8, 9, 10, 999]]
    return pad_left(rows)


def pad_left(rows, pad=PAD_ID):
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r):] = torch.tensor(r)
        mask[i, T - len(r):] = 1
    return ids, mask


def full_logits(model, ids, mask):
    """No-cache forward over the whole sequence; last-position logits (B, V), fp32."""
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -1, :].float()


def recompute_greedy(base, expert, anti, ids, mask, n, alpha=1.0, expert_ids=None,
                     expert_mask=None, vocab_size=VOCAB):
    """Oracle: greedy proxy tuning by full no-cache forwards over the growing sequences.

    Returns (tokens (B, n), op logprobs (B, n), {name: own logprobs (B, n)}), no EOS.
    """
    e_ids, e_mask = (ids, mask) if expert_ids is None else (expert_ids, expert_mask)
    toks, lps, own = [], [], {"base": [], "expert": [], "anti_expert": []}
    for _ in range(n):
        lb = full_logits(base, ids, mask)[:, :vocab_size]
        le = full_logits(expert, e_ids, e_mask)[:, :vocab_size]
        la = full_logits(anti, ids, mask)[:, :vocab_size]
        z = lb + alpha * (le - la)
        tok = z.argmax(-1)
        toks.append(tok)
        lps.append(torch.log_softmax(z, -1).gather(1, tok[:, None]).squeeze(1))
        for name, lg in (("base", lb), ("expert", le), ("anti_expert", la)):
            own[name].append(torch.log_softmax(lg, -1).gather(1, tok[:, None]).squeeze(1))
        one = torch.ones_like(mask[:, :1])
        ids, mask = torch.cat([ids, tok[:, None]], 1), torch.cat([mask, one], 1)
        e_ids, e_mask = torch.cat([e_ids, tok[:, None]], 1), torch.cat([e_mask, one], 1)
    return (torch.stack(toks, 1), torch.stack(lps, 1),
            {k: torch.stack(v, 1) for k, v in own.items()})


# --------------------------------------------------------------------------- tokenizer

WORDS = ("the a cat dog sat on mat and ran to house user assistant system : . , ? ! "
         "hello world proxy tuning is fast").split()
CHAT_TEMPLATE = ("{% for m in messages %}<s> {{ m['role'] }} : {{ m['content'] }} </s> "
                 "{% endfor %}{% if add_generation_prompt %}<s> assistant : {% endif %}")


def assert_same_generation(spec, plain):
    """``spec`` is ``plain``'s output: tokens, lengths and sequences exactly; logprobs and
    model_logprobs up to the float rounding of multi-token forwards."""
    assert torch.equal(spec.tokens, plain.tokens), (spec.tokens, plain.tokens)
    assert torch.equal(spec.lengths, plain.lengths)
    assert torch.equal(spec.sequences, plain.sequences)
    if plain.logprobs is not None:
        torch.testing.assert_close(spec.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    if plain.model_logprobs is not None:
        for name, lp in plain.model_logprobs.items():
            torch.testing.assert_close(spec.model_logprobs[name], lp, atol=1e-5, rtol=1e-5)


def replay_without_host_syncs(advance, n: int) -> None:
    """CUDA: ``advance()`` once eagerly (warm-up) and once captured (+ its first replay), then
    ``n`` replays with any host sync an error (torch's sync debug mode)."""
    advance()
    advance()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(n):
            advance()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def nan_row_after_prefill(model, row: int = 1):
    """Make ``model`` return NaN logits for ``row`` from its second forward on (the prefill
    stays clean): the bad-row path of a decode loop."""
    calls = []

    def hook(module, inputs, output):
        calls.append(1)
        if len(calls) >= 2:
            output.logits[row] = float("nan")
        return output

    model.register_forward_hook(hook)
    return model


def tiny_tokenizer():
    """A WordLevel tokenizer with exactly VOCAB entries and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, "[PAD]": PAD_ID, "<s>": 2, "</s>": EOS_ID}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < VOCAB:
        vocab[f"w{i}"] = len(vocab)
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


@functools.lru_cache(maxsize=None)
def llama_trio():
    """(base, expert, anti_expert), all Llama: one family, so each folder's tokenizer loads alike.

    (transformers 5.2x picks a tokenizer class from config.json's model type when
    tokenizer_config.json names the generic backend, so a Qwen2 folder would load
    the WordLevel tokenizer as a Qwen2 BPE one.)
    """
    return tuple(tiny_model("llama", seed) for seed in (10, 11, 12))


def save_tiny_checkpoints(root) -> dict:
    """Save :func:`llama_trio` (+ the tokenizer) as folders under ``root``; returns their paths."""
    paths = {}
    for name, model in zip(("base", "expert", "anti"), llama_trio()):
        path = os.path.join(root, name)
        model.save_pretrained(path)
        tiny_tokenizer().save_pretrained(path)
        paths[name] = path
    return paths
