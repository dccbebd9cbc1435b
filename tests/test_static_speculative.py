"""Speculative rounds on static KV caches (proxykern.engine.static_speculative), CPU, fp32.

Every case runs ``fused_proxy_generate(num_draft_tokens=k)`` with the static rounds
forced (``STATIC_ROUNDS = True``: an unsupported model raises instead of falling back)
and compares it with plain decoding (``num_draft_tokens=0``): same tokens, lengths and
sequences, logprobs up to float rounding. As in test_speculative.py, most cases also run
with the expert as the base so drafts are partly right and rows keep different numbers
of columns per round (holes in the static cache).
"""
from __future__ import annotations

import os

import pytest
import torch

import proxykern.engine.speculative as speculative
from proxykern import fused_proxy_generate
from proxykern.apps.demo import DEFAULT_TRIO, load_trio
from proxykern.engine.speculative import SpeculativeStats
from proxykern.engine.static_speculative import _Model, capacity_for
from proxykern.models import static_rounds_unsupported_reason
from proxykern.engine.static_runner import StaticRunner

from gen_fixtures import (assert_same_generation, nan_row_after_prefill, pad_left, ragged_batch,
                          random_models, replay_without_host_syncs, tiny_model, trio)

SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=7)


@pytest.fixture
def static_rounds(monkeypatch):
    monkeypatch.setattr(speculative, "STATIC_ROUNDS", True)


def against_plain(models, ids, mask, ks, **kw):
    plain = fused_proxy_generate(*models, ids, mask, **kw)
    stats = []
    for k in ks:
        spec = fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, **kw)
        assert_same_generation(spec, plain)
        s = spec.stats
        assert isinstance(s, SpeculativeStats) and s.num_draft_tokens == k
        assert s.steps == spec.tokens.shape[1] and s.base_forwards == s.rounds + 1
        assert 0 <= s.accepted <= s.drafted
        stats.append(s)
    return plain, stats


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_random_models_equal_plain(static_rounds, family, mode):
    base, expert, anti = random_models(family)
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=9, eos_token_id=[], return_logprobs=True,
              return_model_logprobs=True, **(SAMPLED if mode == "sampled" else {}))
    against_plain((base, expert, anti), ids, mask, (1, 4), **kw)               # drafts wrong
    _, stats = against_plain((expert, expert, anti), ids, mask, (2, 8), alpha=0.3, **kw)
    assert all(0 < s.accepted < s.drafted for s in stats), stats              # partly right


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_mixed_families_and_shared_anti(static_rounds, mode):
    base, expert, anti = trio("gpt2")  # a GPT-2 base (learned positions), Llama/Qwen2 beside it
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=8, eos_token_id=[], return_logprobs=True,
              **(SAMPLED if mode == "sampled" else {}))
    against_plain((expert, expert, anti), ids, mask, (3,), alpha=0.3, **kw)
    against_plain((base, expert, expert), ids, mask, (2,), **kw)               # expert is anti


def test_eos_and_max_new_tokens_inside_a_draft(static_rounds):
    _, expert, anti = random_models("qwen2")
    ids, mask = ragged_batch()
    models = (expert, expert, anti)
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=7, alpha=0.0,
                                eos_token_id=[], **SAMPLED)
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 4])]
    plain, stats = against_plain(models, ids, mask, (4, 8), max_new_tokens=7, alpha=0.0,
                                 eos_token_id=eos, pad_token_id=0, return_logprobs=True,
                                 **SAMPLED)
    lengths = plain.lengths.tolist()
    assert lengths[0] <= 3 and lengths[1] <= 5 and max(lengths) == 7, lengths
    # alpha = 0 and base = expert: every draft is right until EOS or the budget
    assert all(s.accepted == s.drafted for s in stats)
    assert stats[-1].rounds == 1 and stats[-1].base_forwards == 2
    # EOS as token 0 (drawn from the prefill) and a budget of one token
    tok0 = int(free.tokens[2, 0])
    against_plain(models, ids, mask, (3,), max_new_tokens=5, alpha=0.0, eos_token_id=[tok0],
                  pad_token_id=0, **SAMPLED)
    against_plain(models, ids, mask, (3,), max_new_tokens=1, eos_token_id=[], **SAMPLED)


def test_expert_prompt_samples_and_per_row_tensors(static_rounds):
    base, expert, anti = random_models("llama")
    ids, mask = ragged_batch()
    e_ids, e_mask = pad_left([[2, 40, 41, 11, 57, 203, 9, 400], [2, 40, 77, 18], [5, 6, 999]])
    kw = dict(max_new_tokens=6, eos_token_id=[], expert_input_ids=e_ids,
              expert_attention_mask=e_mask, return_model_logprobs=True)
    against_plain((base, expert, anti), ids, mask, (3,), **kw)
    against_plain((expert, expert, anti), ids, mask, (2,), alpha=0.2, num_return_sequences=2,
                  **kw, **SAMPLED)
    against_plain((expert, expert, anti), ids, mask, (3,), max_new_tokens=6, eos_token_id=[],
                  alpha=torch.tensor([0.0, 0.3, 0.1]), temperature=torch.tensor([0.0, 0.8, 1.2]),
                  top_p=torch.tensor([1.0, 0.9, 0.8]), seed=torch.tensor([1, 2, 3]))


def test_streamer_and_bad_row(static_rounds):
    from test_generate import RecordingStreamer
    _, expert, anti = random_models("llama")
    ids, mask = ragged_batch()
    models = (expert, expert, anti)
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=9, alpha=0.2, eos_token_id=[])
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 3]), int(free.tokens[2, 5])]
    recs = []
    for k in (0, 4):
        rec = RecordingStreamer()
        out = fused_proxy_generate(*models, ids, mask, max_new_tokens=9, alpha=0.2,
                                   eos_token_id=eos, streamer=rec, num_draft_tokens=k)
        assert rec.ended == 1
        assert torch.equal(torch.stack(rec.values[1:], -1).reshape(out.tokens.shape), out.tokens)
        recs.append([v.tolist() for v in rec.values[1:]])
    assert recs[0] == recs[1]

    base = tiny_model("llama", 30)
    nan_row_after_prefill(base, row=1)
    with pytest.raises(ValueError, match=r"row 1: .*NaN"):
        fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=6, eos_token_id=[],
                             num_draft_tokens=2)


def test_static_rollback_matches_plain_steps():
    """Columns rejected in a round become masked holes; the next round overwrites the slots
    past the most any row kept, and every row's logits are plain decoding's."""
    base = tiny_model("llama", 20)
    ids, mask = ragged_batch()
    t = [torch.tensor(v) for v in ([5, 6, 7], [8, 9, 10], [11, 12, 13], [14, 15, 16])]
    with torch.no_grad():
        plain = StaticRunner(base, ids, mask, 8)
        plain.prefill()
        want = [plain.step(x).clone() for x in t]

        m = _Model(base, ids, mask, capacity_for(3, 2, 8), 8, None)
        m.prefill()
        cols = torch.arange(3)
        # round 1: [t0, t1 or junk, junk]; rows keep 1, 2, 1 columns -> one hole in rows 0, 2
        fed = torch.stack([t[0], torch.tensor([1, 9, 4]), torch.tensor([2, 3, 4])], 1)
        got = m.forward(fed, 0, cols)
        c = torch.tensor([1, 2, 1])
        m.commit(cols[None] < c[:, None], c, c.max().reshape(1), cols)
        assert int(m.run.cache_position) == ids.shape[1] + 2
        torch.testing.assert_close(got[:, 0], want[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got[1, 1], want[1][1], atol=1e-5, rtol=1e-5)
        # round 2: each row feeds its next plain token
        fed = torch.stack([torch.tensor([8, 12, 10]), torch.tensor([11, 15, 13]),
                           torch.tensor([14, 0, 16])], 1)
        got = m.forward(fed, 0, cols)
    torch.testing.assert_close(got[[0, 2], 0], want[1][[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[[0, 2], 1], want[2][[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[[0, 2], 2], want[3][[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, :2], torch.stack([want[2][1], want[3][1]]),
                               atol=1e-5, rtol=1e-5)


def test_dispatch():
    assert static_rounds_unsupported_reason(trio("llama")) is None
    assert static_rounds_unsupported_reason(trio("gpt2")) is None
    assert capacity_for(1, 4, 10) == 14 and capacity_for(8, 4, 10) == 50
    # the eager rounds stay reachable and agree
    base, expert, anti = random_models("llama")
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=6, eos_token_id=[], alpha=0.3, **SAMPLED)
    static = fused_proxy_generate(expert, expert, anti, ids, mask, num_draft_tokens=3, **kw)
    old = speculative.STATIC_ROUNDS
    speculative.STATIC_ROUNDS = False
    try:
        eager = fused_proxy_generate(expert, expert, anti, ids, mask, num_draft_tokens=3, **kw)
    finally:
        speculative.STATIC_ROUNDS = old
    assert torch.equal(static.tokens, eager.tokens)


@pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_shipped_trio(static_rounds, mode):
    tok, base, expert, anti, heldout = load_trio(DEFAULT_TRIO, torch.device("cpu"))
    prompts = [it["prompt"] for it in heldout["items"][6:14]]  # held-out, left-padded ragged
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    assert bool((enc.attention_mask == 0).any())
    kw = dict(max_new_tokens=16, alpha=1.0, eos_token_id=tok.eos_token_id,
              pad_token_id=tok.pad_token_id, return_logprobs=True,
              **(dict(temperature=0.8, top_p=0.9, seed=3) if mode == "sampled" else {}))
    _, stats = against_plain((base, expert, anti), enc.input_ids, enc.attention_mask, (2, 4),
                             **kw)
    assert stats[0].acceptance_rate > 0.3, stats
    assert stats[0].base_forwards_per_token < 0.9, stats


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_captured_rounds_on_cuda(static_rounds, mode):
    """The rounds replayed as CUDA graphs (anti-expert and the expert's last forward on side
    streams) give plain decoding's tokens, and the captured rounds read nothing on the host."""
    from proxykern.engine.speculative import proxy_static_rounds
    from proxykern.generation_args import prepare_generation
    models = [m.to("cuda") for m in random_models("llama")]
    ids, mask = (t.cuda() for t in ragged_batch())
    kw = dict(max_new_tokens=16, eos_token_id=[3, 7], return_logprobs=True,
              **(dict(SAMPLED, seed=torch.tensor([1, 2, 3], device="cuda"))
                 if mode == "sampled" else {}))
    plain = fused_proxy_generate(*models, ids, mask, cuda_graphs=False, **kw)
    for k in (2, 4):
        for share in (False, True):
            trio_ = (models[1], models[1], models[1] if share else models[2])
            ref = fused_proxy_generate(*trio_, ids, mask, cuda_graphs=False, alpha=0.3, **kw)
            out = fused_proxy_generate(*trio_, ids, mask, num_draft_tokens=k, cuda_graphs=True,
                                       alpha=0.3, **kw)
            assert_same_generation(out, ref)
        out = fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, cuda_graphs=True,
                                   **kw)
        assert_same_generation(out, plain)
    args = prepare_generation(
        *models, ids, mask, max_new_tokens=40, alpha=1.0, temperature=0.9, top_k=0, top_p=0.9,
        min_p=0.0, seed=1, eos_token_id=[], pad_token_id=None, expert_input_ids=None,
        expert_attention_mask=None, return_logprobs=False, return_model_logprobs=False,
        streamer=None, backend="auto", cuda_graphs=True, num_draft_tokens=3)
    rounds = proxy_static_rounds(*models, args)
    with torch.no_grad():
        rounds.prefill()
        replay_without_host_syncs(rounds.advance, 4)
    assert rounds.advance.graph is not None
    assert rounds.flags()[1] is False
