"""Limits checked once at the Python API's edge: numbers the op's dtypes cannot hold, and
positions the models cannot read. Each raises ``ValueError`` naming the argument (or the
model) before any forward, in the op, generation (fused and naive) and scoring alike."""
from __future__ import annotations

import pytest
import torch

import proxykern
from proxykern import generation_args, ops

from gen_fixtures import pad_left, trio

GENERATORS = {"fused": proxykern.fused_proxy_generate, "naive": proxykern.naive_proxy_generate}

# (argument, value): each outside what float32 / int64 hold, or not a number at all.
OVERFLOWING = [("alpha", 1e39), ("alpha", -1e39), ("alpha", 10 ** 400), ("alpha", float("nan")),
               ("temperature", 1e39), ("temperature", float("inf")), ("top_k", 2 ** 63),
               ("top_k", 2 ** 64), ("seed", 2 ** 64), ("seed", -(2 ** 63) - 1)]


@pytest.mark.parametrize("name,value", OVERFLOWING)
def test_the_op_refuses_numbers_its_dtypes_cannot_hold(name, value):
    logits = torch.randn(2, 50)
    with pytest.raises(ValueError, match=name):
        proxykern.proxy_sample(logits, logits, logits, **{name: value}, backend="torch")


@pytest.mark.parametrize("name,value", [("alpha", 3.4e38), ("temperature", 3.4e38),
                                        ("top_k", 2 ** 63 - 1), ("seed", 2 ** 64 - 1)])
def test_the_largest_numbers_that_fit_are_taken(name, value):
    logits = torch.randn(2, 50)
    out = proxykern.proxy_sample(logits, logits, logits, **{name: value}, temperature=1.0,
                                 backend="torch") if name != "temperature" else \
        proxykern.proxy_sample(logits, logits, logits, temperature=value, backend="torch")
    assert out.tokens.shape == (2,)


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("name,value", [("alpha", 1e39), ("temperature", 1e39),
                                        ("top_k", 2 ** 64)])
def test_generation_refuses_overflowing_numbers_naming_them(kind, name, value):
    ids, mask = pad_left([[5, 6, 7]])
    with pytest.raises(ValueError, match=name):
        GENERATORS[kind](*trio(), ids, mask, max_new_tokens=2, **{name: value})


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generation_refuses_a_per_row_tensor_that_overflows_float32(kind):
    """A float64 tensor holding 1e39 is finite as given but inf once the op holds it."""
    ids, mask = pad_left([[5, 6, 7], [8, 9]])
    alpha = torch.tensor([1.0, 1e39], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"alpha\[1\]"):
        GENERATORS[kind](*trio(), ids, mask, max_new_tokens=2, alpha=alpha)


def test_scoring_refuses_overflowing_numbers_naming_them():
    for name, value in (("alpha", 1e39), ("temperature", 1e39)):
        with pytest.raises(ValueError, match=name):
            proxykern.proxy_logprobs(*trio(), [[5, 6]], [[7]], **{name: value})


def test_position_limit_reads_the_text_config():
    base, expert, anti = trio()   # llama / qwen2 / gpt2, all 256 positions (gpt2: n_positions)
    assert [generation_args.position_limit(m) for m in (base, expert, anti)] == [256] * 3


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_generation_positions_fit_exactly_and_one_more_is_refused(kind):
    """A model reads prompt + max_new_tokens - 1 positions (the last token is never fed)."""
    prompt = list(range(5, 5 + 250))
    ids, mask = pad_left([prompt, [5, 6]])       # the longest row counts, padding does not
    fits = 256 - 250 + 1
    out = GENERATORS[kind](*trio(), ids, mask, max_new_tokens=fits)
    assert out.tokens.shape[0] == 2
    with pytest.raises(ValueError, match=r"base reads at most 256 positions.*at most 7"):
        GENERATORS[kind](*trio(), ids, mask, max_new_tokens=fits + 1)


def test_a_huge_max_new_tokens_is_refused_before_any_allocation():
    ids, mask = pad_left([[5, 6, 7]])
    with pytest.raises(ValueError, match="max_new_tokens"):
        proxykern.fused_proxy_generate(*trio(), ids, mask, max_new_tokens=10 ** 9)


def test_the_expert_prompt_is_checked_against_the_expert():
    base, expert, anti = trio()
    ids, mask = pad_left([[5, 6]])
    e_ids, e_mask = pad_left([list(range(5, 5 + 256))])   # fits alone, not with 2 new tokens
    with pytest.raises(ValueError, match="expert reads at most 256 .*at most 1$"):
        proxykern.fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=2,
                                       expert_input_ids=e_ids, expert_attention_mask=e_mask)
    e_ids, e_mask = pad_left([list(range(5, 5 + 257))])
    with pytest.raises(ValueError, match="expert reads .* the prompt alone has 257 tokens"):
        proxykern.fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=0,
                                       expert_input_ids=e_ids, expert_attention_mask=e_mask)


def test_scoring_refuses_a_sequence_longer_than_the_positions():
    base, expert, anti = trio()
    context, continuation = [list(range(5, 5 + 250))], [list(range(5, 5 + 6))]
    out = proxykern.proxy_logprobs(base, expert, anti, context, continuation)
    assert out.logprobs.shape == (1, 6)
    with pytest.raises(ValueError, match=r"context\[1\] \+ continuation\[1\] hold 257 tokens"):
        proxykern.proxy_logprobs(base, expert, anti, context + [list(range(5, 5 + 251))],
                                 continuation * 2)


def test_a_model_without_a_stated_limit_is_not_limited():
    class NoLimit(torch.nn.Module):
        config = type("C", (), {})()
    assert generation_args.position_limit(NoLimit()) is None
    generation_args.check_positions([("base", NoLimit(), 10 ** 6)], 10 ** 6)


def test_rules_hold_for_tensors_and_numbers_alike():
    """The same rule object checks a number on the host and a tensor on the device."""
    _integral, valid, _rule = ops.SAMPLING_RULES["alpha"]
    assert not valid(1e39) and valid(1.0)
    assert valid(torch.tensor([1.0, 1e39], dtype=torch.float64)).tolist() == [True, False]
    _integral, valid, _rule = ops.SAMPLING_RULES["top_k"]
    assert valid(torch.tensor([0, 2 ** 62])).all() and not valid(2 ** 63)


# --------------------------------------------------------------------------- counts and ids

@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("name,value", [("num_return_sequences", 10 ** 30),
                                        ("num_draft_tokens", 10 ** 30),
                                        ("max_new_tokens", 2 ** 63)])
def test_counts_beyond_int64_are_refused_naming_them(kind, name, value):
    """Every count goes through one helper with int64's bound (an OverflowError before)."""
    if kind == "naive" and name == "num_draft_tokens":
        pytest.skip("naive_proxy_generate has no num_draft_tokens")
    ids, mask = pad_left([[5, 6, 7]])
    kwargs = {"max_new_tokens": 2, name: value}
    with pytest.raises(ValueError, match=name):
        GENERATORS[kind](*trio(), ids, mask, **kwargs)


@pytest.mark.parametrize("kind", list(GENERATORS))
def test_more_rows_than_one_call_returns_are_refused_before_any_allocation(kind):
    """num_return_sequences=10**12 tried to allocate 8 TB (a RuntimeError) before."""
    ids, mask = pad_left([[5, 6, 7], [8, 9]])
    n = generation_args.MAX_ROWS // 2 + 1
    with pytest.raises(ValueError, match="num_return_sequences"):
        GENERATORS[kind](*trio(), ids, mask, max_new_tokens=2, num_return_sequences=n)
    with pytest.raises(ValueError, match="num_return_sequences"):
        GENERATORS[kind](*trio(), ids, mask, max_new_tokens=2, num_return_sequences=10 ** 12)


def test_rows_that_do_not_fit_in_memory_are_refused_naming_the_count(monkeypatch):
    def no_memory(*args, **kwargs):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
    monkeypatch.setattr(generation_args, "generation_seeds", no_memory)
    ids, mask = pad_left([[5, 6, 7]])
    with pytest.raises(ValueError, match="num_return_sequences 1000 .* do not fit in memory"):
        proxykern.fused_proxy_generate(*trio(), ids, mask, max_new_tokens=2,
                                       num_return_sequences=1000)


@pytest.mark.parametrize("kind", list(GENERATORS))
@pytest.mark.parametrize("name", ["eos_token_id", "pad_token_id"])
def test_token_ids_beyond_int64_are_refused_naming_them(kind, name):
    """2**70 was an OverflowError (pad) or 'Overflow when unpacking long long' (eos)."""
    ids, mask = pad_left([[5, 6, 7]])
    for value in (2 ** 70, [3, 2 ** 63]):
        if name == "pad_token_id" and isinstance(value, list):
            continue
        with pytest.raises(ValueError, match=name):
            GENERATORS[kind](*trio(), ids, mask, max_new_tokens=2, **{name: value})


def test_numbers_of_other_real_types_are_taken_as_plain_numbers():
    """A Fraction passed the rule but torch.full refused it with a TypeError naming nothing."""
    from fractions import Fraction
    import numpy as np
    logits = torch.randn(2, 50)
    ref = proxykern.proxy_sample(logits, logits, logits, temperature=1.0, top_p=0.5,
                                 backend="torch")
    for top_p in (Fraction(1, 2), np.float32(0.5), np.float64(0.5)):
        out = proxykern.proxy_sample(logits, logits, logits, temperature=1.0, top_p=top_p,
                                     backend="torch")
        assert torch.equal(out.tokens, ref.tokens)
    assert type(ops.check_sampling_arg("top_k", np.int64(3), 1)) is int
    assert type(ops.check_sampling_arg("alpha", Fraction(1, 2), 1)) is float


def test_the_processor_checks_its_arguments_by_generation_rules():
    """alpha=10**400 was an OverflowError and 1e39 was taken; float or out-of-range
    expert_input_ids were taken and failed inside generate."""
    _, expert, anti = trio()
    for alpha in (10 ** 400, 1e39):
        with pytest.raises(ValueError, match="alpha"):
            proxykern.ProxyTuningLogitsProcessor(expert, anti, alpha=alpha)
    with pytest.raises(TypeError, match="expert_input_ids"):
        proxykern.ProxyTuningLogitsProcessor(expert, anti,
                                             expert_input_ids=torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="expert_input_ids"):
        proxykern.ProxyTuningLogitsProcessor(expert, anti,
                                             expert_input_ids=torch.tensor([[1, 10 ** 6]]))
    with pytest.raises(ValueError, match="attention_mask"):
        proxykern.ProxyTuningLogitsProcessor(expert, anti,
                                             attention_mask=torch.tensor([[1, 1, 0]]))
