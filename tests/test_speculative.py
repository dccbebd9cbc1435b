"""Speculative proxy decoding (num_draft_tokens=k) gives what plain decoding gives (CPU, fp32).

Random tiny models rarely agree with each other, so most cases also run with the
expert as the base (``z = expert + alpha * (expert - anti)``, alpha small): the
expert's drafts are then often, but not always, right, and rows accept different
amounts per round -- the ragged rollback path.
"""
from __future__ import annotations

import copy
import inspect
import os

import pytest
import torch

from proxykern import fused_proxy_generate, naive_proxy_generate
from proxykern.apps.demo import DEFAULT_TRIO, load_trio
from proxykern.engine.runner import ModelRunner
from proxykern.engine.speculative import SpeculativeStats

from gen_fixtures import (FAMILIES, assert_same_generation, nan_row_after_prefill, pad_left,
                          ragged_batch, trio)

SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=7)


def check_against_plain(models, ids, mask, ks, **kw):
    plain = fused_proxy_generate(*models, ids, mask, **kw)
    assert plain.stats is None
    stats = []
    for k in ks:
        spec = fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, **kw)
        assert_same_generation(spec, plain)
        assert isinstance(spec.stats, SpeculativeStats) and spec.stats.num_draft_tokens == k
        assert spec.stats.steps == spec.tokens.shape[1]
        stats.append(spec.stats)
    return plain, stats


# (k with the family's own base, k with the expert as the base): every k in {1, 2, 4, 8}
# meets every family and both modes at least once.
K_CASES = {("llama", "greedy"): (1, 8), ("llama", "sampled"): (4, 2),
           ("qwen2", "greedy"): (2, 4), ("qwen2", "sampled"): (8, 1),
           ("gpt2", "greedy"): (4, 1), ("gpt2", "sampled"): (1, 8)}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_equals_plain_decoding(family, mode):
    base, expert, anti = trio(family)
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=8, eos_token_id=[], return_logprobs=True,
              return_model_logprobs=True, **(SAMPLED if mode == "sampled" else {}))
    k_wrong, k_close = K_CASES[family, mode]
    check_against_plain((base, expert, anti), ids, mask, (k_wrong,), **kw)  # drafts mostly wrong
    _, stats = check_against_plain((expert, expert, anti), ids, mask, (k_close,), alpha=0.3, **kw)
    assert all(0 < s.accepted < s.drafted for s in stats), stats           # partly right


def test_eos_and_max_new_tokens_inside_a_draft():
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    models = (expert, expert, anti)
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=7, alpha=0.0, eos_token_id=[],
                                **SAMPLED)
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    plain, stats = check_against_plain(models, ids, mask, (4, 8), max_new_tokens=7, alpha=0.0,
                                       eos_token_id=eos, pad_token_id=0, return_logprobs=True,
                                       **SAMPLED)
    lengths = plain.lengths.tolist()
    assert lengths[0] <= 3 and lengths[1] <= 5 and max(lengths) == 7, lengths
    # alpha = 0 and base = expert: every draft is right until EOS or the budget.
    assert all(s.accepted == s.drafted for s in stats)
    assert stats[-1].rounds == 1 and stats[-1].base_forwards == 2


def test_expert_with_its_own_prompt_and_several_samples():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    e_ids, e_mask = pad_left([[2, 40, 41, 11, 57, 203, 9, 400], [2, 40, 77, 18], [5, 6, 999]])
    kw = dict(max_new_tokens=6, eos_token_id=[], expert_input_ids=e_ids,
              expert_attention_mask=e_mask, return_model_logprobs=True)
    check_against_plain((base, expert, anti), ids, mask, (3,), **kw)
    check_against_plain((expert, expert, anti), ids, mask, (2,), alpha=0.2,
                        num_return_sequences=2, **kw, **SAMPLED)


def test_per_row_tensor_parameters_and_shared_anti():
    base, expert, anti = trio("gpt2")
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=6, eos_token_id=[], alpha=torch.tensor([0.0, 0.3, 0.1]),
              temperature=torch.tensor([0.0, 0.8, 1.2]), top_p=torch.tensor([1.0, 0.9, 0.8]),
              seed=torch.tensor([1, 2, 3]))
    check_against_plain((expert, expert, anti), ids, mask, (3,), **kw)
    check_against_plain((base, expert, expert), ids, mask, (2,), **kw)  # expert is anti


def test_streamer_gets_tokens_as_accepted():
    from test_generate import RecordingStreamer
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    models = (expert, expert, anti)
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=9, alpha=0.2, eos_token_id=[])
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 3]), int(free.tokens[2, 5])]
    for rows in (slice(0, 3), slice(0, 1)):
        recs = []
        for k in (0, 4):
            rec = RecordingStreamer()
            out = fused_proxy_generate(*models, ids[rows], mask[rows], max_new_tokens=9,
                                       alpha=0.2, eos_token_id=eos, streamer=rec,
                                       num_draft_tokens=k)
            assert rec.ended == 1 and torch.equal(rec.values[0], ids[rows])
            assert torch.equal(torch.stack(rec.values[1:], -1).reshape(out.tokens.shape),
                               out.tokens)
            recs.append([v.tolist() for v in rec.values[1:]])
        assert recs[0] == recs[1]


def test_rollback_leaves_the_cache_as_plain_decoding():
    """Tentative columns kept per row, the rest rolled back: the next step's logits are plain's."""
    base, _, _ = trio("llama")
    ids, mask = ragged_batch()
    t0, t1 = torch.tensor([5, 6, 7]), torch.tensor([8, 9, 10])
    with torch.no_grad():
        plain = ModelRunner(base, ids, mask, 8)
        plain.prefill()
        plain.step(t0)
        want = plain.step(t1)

        spec = ModelRunner(base, ids, mask, 8)
        spec.prefill()
        drafts = torch.stack([t0, torch.tensor([1, 9, 4]), torch.tensor([2, 3, 4])], 1)
        spec.extend(drafts)                               # 3 tentative columns per row
        spec.keep(torch.tensor([1, 2, 1]))                # row 1 also keeps its 2nd column
        assert spec.length == ids.shape[1] + 2            # the column no row kept is cropped
        assert spec.cache.get_seq_length() == spec.length
        # Row 1 kept [t0, 9]: give it the same context as plain by rolling that back too,
        # through a second round: rows 0 and 2 feed t1, row 1 re-feeds its 9 = t1[1].
        got = spec.extend(t1[:, None])[:, -1]
        spec.keep(torch.tensor([1, 1, 1]))
    torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-5)
    # Row 1 saw [t0, 9, 9] instead of [t0, 9]; compare it with plain decoding of that.
    with torch.no_grad():
        again = ModelRunner(base, ids[1:2], mask[1:2], 8)
        again.prefill()
        again.step(t0[1:2])
        again.step(torch.tensor([9]))
        want1 = again.step(torch.tensor([9]))
    torch.testing.assert_close(got[1:2], want1, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_shipped_trio(mode):
    tok, base, expert, anti, heldout = load_trio(DEFAULT_TRIO, torch.device("cpu"))
    prompts = [it["prompt"] for it in heldout["items"][:6]]
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    kw = dict(max_new_tokens=12, alpha=1.0, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, return_logprobs=True,
              **(dict(temperature=0.8, top_p=0.9, seed=3) if mode == "sampled" else {}))
    _, stats = check_against_plain((base, expert, anti), enc.input_ids, enc.attention_mask,
                                   (2, 4), **kw)
    assert stats[0].acceptance_rate > 0.3, stats
    assert stats[0].base_forwards_per_token < 0.9, stats


def test_num_draft_tokens_is_checked():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    for bad, exc in ((-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(exc, match="num_draft_tokens"):
            fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=2,
                                 num_draft_tokens=bad)
    assert "num_draft_tokens" in inspect.signature(fused_proxy_generate).parameters
    assert "num_draft_tokens" not in inspect.signature(naive_proxy_generate).parameters
    out = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=0,
                               num_draft_tokens=2)
    assert out.tokens.shape == (3, 0)
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be honoured: CUDA graphs "
                                         "need models on a CUDA device"):
        fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=2,
                             num_draft_tokens=2, cuda_graphs=True)


def test_captured_rounds_need_static_full_attention_models():
    """cuda_graphs with drafts (decided before any model runs, so checkable without a GPU):
    every model needs a static cache and full attention; True names the one that has not,
    "auto" decodes eagerly."""
    from proxykern.generation_args import decode_graphs
    base, expert, anti = trio("llama")
    cuda = torch.device("cuda")
    assert decode_graphs(True, 2, cuda, (base, expert, anti))
    sliding = copy.deepcopy(expert)
    sliding.config.sliding_window, sliding.config.use_sliding_window = 4, True
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be honoured: expert: "
                                         "sliding-window attention"):
        decode_graphs(True, 2, cuda, (base, sliding, anti))
    with pytest.warns(RuntimeWarning, match="sliding-window"):
        assert not decode_graphs("auto", 3, cuda, (base, sliding, anti))
    assert decode_graphs(True, 0, cuda, (base, sliding, anti))  # plain steps need no rollback


def test_padded_vocabulary_and_bad_row():
    base, expert, anti = (copy.deepcopy(m) for m in trio("llama"))
    ids, mask = ragged_batch()
    wide = copy.deepcopy(expert)
    wide.resize_token_embeddings(1024, mean_resizing=False)
    with torch.no_grad():  # the base's and the expert's extra columns win where they count
        wide.get_output_embeddings().weight[1000:] = 5 * wide.get_output_embeddings().weight[:24]
    # The anti-expert is narrower: columns >= 1000 take a zero delta (z = base there) and
    # the anti-expert reads pad for such tokens (docs/api.md, the vocabulary rule); drafts
    # and verification follow the same rule as plain decoding.
    ref = fused_proxy_generate(wide, wide, anti, ids, mask, max_new_tokens=6, alpha=0.3,
                               eos_token_id=[], **SAMPLED)
    out = fused_proxy_generate(wide, wide, anti, ids, mask, max_new_tokens=6, alpha=0.3,
                               eos_token_id=[], num_draft_tokens=3, **SAMPLED)
    assert torch.equal(out.tokens, ref.tokens)
    assert bool((ref.tokens >= 1000).any())  # the widened columns were really drawn

    nan_row_after_prefill(base, row=1)
    with pytest.raises(ValueError, match=r"row 1: .*NaN"):
        fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=6, eos_token_id=[],
                             num_draft_tokens=2)
