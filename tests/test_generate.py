"""fused_proxy_generate and naive_proxy_generate on tiny random models (CPU, fp32)."""
from __future__ import annotations

import copy
import inspect
import threading

import pytest
import torch
from transformers import TextIteratorStreamer, TextStreamer
from transformers.generation.streamers import BaseStreamer

import proxykern
from proxykern.engine import decode as decode_module
from proxykern import fused_proxy_generate, naive_proxy_generate

from gen_fixtures import (FAMILIES, PAD_ID, VOCAB, pad_left, ragged_batch, recompute_greedy,
                          tiny_model, tiny_tokenizer, trio)

GENERATORS = [fused_proxy_generate, naive_proxy_generate]
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02)


def trimmed(tokens, length):
    return tokens[:length].tolist()


# --------------------------------------------------------------------------- greedy equality

@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_fused_equals_naive_equals_recompute(family):
    base, expert, anti = trio(family)
    ids, mask = ragged_batch()
    n = 10
    ref_tokens, ref_lp, ref_own = recompute_greedy(base, expert, anti, ids, mask, n)
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, mask, max_new_tokens=n, eos_token_id=[],
                 return_logprobs=True, return_model_logprobs=True)
        assert isinstance(out, proxykern.ProxyGenerateOutput)
        assert torch.equal(out.tokens, ref_tokens), fn.__name__
        assert torch.equal(out.sequences, torch.cat([ids, ref_tokens], 1))
        assert out.lengths.tolist() == [n] * 3
        assert out.logprobs.dtype == torch.float32
        torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-4, rtol=1e-4)
        assert set(out.model_logprobs) == {"base", "expert", "anti_expert"}
        for name, lp in out.model_logprobs.items():
            assert lp.dtype == torch.float32 and lp.shape == (3, n)
            torch.testing.assert_close(lp, ref_own[name], atol=1e-4, rtol=1e-4)


def test_left_padded_row_gets_what_it_gets_alone():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    batch = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, eos_token_id=[])
    for i in range(ids.shape[0]):
        row = ids[i][mask[i].bool()][None]
        alone = fused_proxy_generate(base, expert, anti, row, max_new_tokens=8, eos_token_id=[])
        assert torch.equal(alone.tokens[0], batch.tokens[i])


def test_alpha_zero_and_shared_expert_reproduce_base_generate():
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    hf = base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                       eos_token_id=None, pad_token_id=PAD_ID)
    a0 = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, alpha=0.0,
                              eos_token_id=[])
    same = fused_proxy_generate(base, expert, expert, ids, mask, max_new_tokens=8, eos_token_id=[])
    naive_same = naive_proxy_generate(base, expert, expert, ids, mask, max_new_tokens=8,
                                      eos_token_id=[])
    assert torch.equal(a0.sequences, hf)
    assert torch.equal(same.sequences, hf)
    assert torch.equal(naive_same.sequences, hf)


def test_expert_reads_its_own_prompt():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    # The expert's prompt: a "chat" prefix of different length per row, left-padded.
    e_ids, e_mask = pad_left([[2, 20, 21, 14] + ids[i][mask[i].bool()].tolist() + [22]
                              for i in range(3)])
    ref, _, _ = recompute_greedy(base, expert, anti, ids, mask, 8, expert_ids=e_ids,
                                 expert_mask=e_mask)
    plain, _, _ = recompute_greedy(base, expert, anti, ids, mask, 8)
    assert not torch.equal(ref, plain)  # the expert's prompt matters
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, mask, max_new_tokens=8, eos_token_id=[],
                 expert_input_ids=e_ids, expert_attention_mask=e_mask)
        assert torch.equal(out.tokens, ref)
    # The expert's mask defaults to all ones: an unpadded expert prompt per row.
    one = fused_proxy_generate(base, expert, anti, ids[2:], mask[2:], max_new_tokens=8,
                               eos_token_id=[], expert_input_ids=e_ids[2:])
    assert torch.equal(one.tokens[0], ref[2])


# --------------------------------------------------------------------------- stopping

def _expected_with_eos(free_tokens, eos):
    rows, lengths = [], []
    for row in free_tokens.tolist():
        n = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:n])
        lengths.append(n)
    width = max(lengths)
    return [r + [PAD_ID] * (width - len(r)) for r in rows], lengths


@pytest.mark.parametrize("fn", GENERATORS)
def test_eos_stops_rows_and_pads(fn):
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    free = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                eos_token_id=[]).tokens
    # EOS = row 0's 3rd token and row 1's 5th: both rows stop early, row 2 maybe not.
    eos = [int(free[0, 2]), int(free[1, 4])]
    expected, lengths = _expected_with_eos(free, eos)
    out = fn(base, expert, anti, ids, mask, max_new_tokens=12, eos_token_id=eos,
             pad_token_id=PAD_ID, return_logprobs=True, return_model_logprobs=True)
    assert out.tokens.tolist() == expected
    assert out.lengths.tolist() == lengths
    assert out.sequences.shape == (3, ids.shape[1] + max(lengths))
    for i, n in enumerate(lengths):  # logprobs are 0 after a row's end
        assert torch.all(out.logprobs[i, n:] == 0) and torch.all(out.logprobs[i, :n] < 0)
        assert torch.all(out.model_logprobs["expert"][i, n:] == 0)
    # An int EOS that every row meets at once ends the call after one token.
    first = fn(base, expert, anti, ids[:1], mask[:1], max_new_tokens=12,
               eos_token_id=int(free[0, 0]))
    assert first.tokens.tolist() == [[int(free[0, 0])]] and first.lengths.tolist() == [1]


def test_eos_and_pad_default_from_generation_config():
    base, expert, anti = (copy.deepcopy(m) for m in trio("llama"))
    ids, mask = ragged_batch()
    free = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10,
                                eos_token_id=[]).tokens
    base.generation_config.eos_token_id = int(free[1, 3])
    base.generation_config.pad_token_id = 0
    out = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10)
    n = out.lengths[1].item()
    assert n <= 4 and out.tokens[1, n - 1] == free[1, 3]
    assert torch.all(out.tokens[1, n:] == 0)
    # No pad id anywhere: padding falls back to the first EOS.
    base.generation_config.pad_token_id = None
    out = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10)
    assert torch.all(out.tokens[1, n:] == int(free[1, 3]))


@pytest.mark.parametrize("interval", [3, 8])
def test_deferred_finished_check_trims_to_true_length(monkeypatch, interval):
    """Checking the finished flags every few steps (as on a GPU) gives the same output."""
    base, expert, anti = trio("gpt2")
    ids, mask = ragged_batch()
    free = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                eos_token_id=[]).tokens
    eos = sorted({int(free[0, 1]), int(free[1, 1]), int(free[2, 4])})
    every_step = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                      eos_token_id=eos, return_logprobs=True)
    monkeypatch.setattr(decode_module, "_check_interval", lambda device: interval)
    deferred = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=12,
                                    eos_token_id=eos, return_logprobs=True)
    for a, b in zip(every_step, deferred):
        if a is not None:
            assert torch.equal(a, b)
    assert deferred.tokens.shape[1] == int(deferred.lengths.max()) <= 5


def test_max_new_tokens_zero_returns_empty():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    for fn in GENERATORS:
        out = fn(base, expert, anti, ids, mask, max_new_tokens=0, return_logprobs=True,
                 return_model_logprobs=True)
        assert out.tokens.shape == (3, 0) and out.tokens.dtype == torch.long
        assert torch.equal(out.sequences, ids) and out.lengths.tolist() == [0, 0, 0]
        assert out.logprobs.shape == (3, 0) and out.model_logprobs["base"].shape == (3, 0)
        assert fn(base, expert, anti, ids, mask, max_new_tokens=0).logprobs is None


# --------------------------------------------------------------------------- logprobs

def test_logprobs_with_alpha_and_base_alone():
    base, expert, anti = trio("qwen2")
    ids, mask = ragged_batch()
    _, ref_lp, ref_own = recompute_greedy(base, expert, anti, ids, mask, 6, alpha=0.5)
    out = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=6, alpha=0.5,
                               eos_token_id=[], return_logprobs=True, return_model_logprobs=True)
    torch.testing.assert_close(out.logprobs, ref_lp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.model_logprobs["anti_expert"], ref_own["anti_expert"],
                               atol=1e-4, rtol=1e-4)
    # alpha = 0 at T = 1: the op's logprob is the base's own.
    a0 = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=6, alpha=0.0,
                              temperature=1.0, seed=3, eos_token_id=[], return_logprobs=True,
                              return_model_logprobs=True)
    torch.testing.assert_close(a0.logprobs, a0.model_logprobs["base"], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- sampling

def test_seeded_sampling_reproducible_batch_invariant_and_equal_to_naive():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    seeds = torch.tensor([1234, -5, 2 ** 40])  # per-row seeds: each row's draw is its own
    kw = dict(max_new_tokens=10, eos_token_id=[], seed=seeds, return_logprobs=True, **SAMPLING)
    one = fused_proxy_generate(base, expert, anti, ids, mask, **kw)
    two = fused_proxy_generate(base, expert, anti, ids, mask, **kw)
    naive = naive_proxy_generate(base, expert, anti, ids, mask, **kw)
    assert torch.equal(one.tokens, two.tokens)
    assert torch.equal(one.tokens, naive.tokens)
    torch.testing.assert_close(one.logprobs, naive.logprobs)
    greedy = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=10,
                                  eos_token_id=[])
    assert not torch.equal(one.tokens, greedy.tokens)
    other = fused_proxy_generate(base, expert, anti, ids, mask, **{**kw, "seed": seeds + 1})
    assert not torch.equal(one.tokens, other.tokens)
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = fused_proxy_generate(base, expert, anti, row, **{**kw, "seed": seeds[i:i + 1]})
        assert torch.equal(alone.tokens[0], one.tokens[i])


def test_per_row_parameters():
    """Tensors of length B for seed, alpha and temperature act row by row."""
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    seeds, alphas = torch.tensor([5, 6, 7]), torch.tensor([1.0, 0.0, 2.0])
    temps = torch.tensor([0.8, 0.0, 1.0])
    kw = dict(max_new_tokens=8, eos_token_id=[], top_k=40)
    batch = fused_proxy_generate(base, expert, anti, ids, mask, seed=seeds, alpha=alphas,
                                 temperature=temps, **kw)
    naive = naive_proxy_generate(base, expert, anti, ids, mask, seed=seeds, alpha=alphas,
                                 temperature=temps, **kw)
    assert torch.equal(batch.tokens, naive.tokens)
    for i in range(3):
        row = ids[i][mask[i].bool()][None]
        alone = fused_proxy_generate(base, expert, anti, row, seed=seeds[i:i + 1],
                                     alpha=float(alphas[i]), temperature=float(temps[i]), **kw)
        assert torch.equal(alone.tokens[0], batch.tokens[i])


# --------------------------------------------------------------------------- streaming

class RecordingStreamer(BaseStreamer):
    def __init__(self):
        self.values, self.ended = [], 0

    def put(self, value):
        assert self.ended == 0
        self.values.append(value.clone())

    def end(self):
        self.ended += 1


@pytest.mark.parametrize("fn", GENERATORS)
def test_streamer_receives_prompt_then_tokens_then_end(fn):
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    free = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=9,
                                eos_token_id=[]).tokens
    eos = [int(free[0, 2]), int(free[1, 3]), int(free[2, 5])]
    rec = RecordingStreamer()
    out = fn(base, expert, anti, ids, mask, max_new_tokens=9, eos_token_id=eos, streamer=rec)
    assert rec.ended == 1
    assert torch.equal(rec.values[0], ids) and rec.values[0].device.type == "cpu"
    assert all(v.shape == (3,) for v in rec.values[1:])
    assert torch.equal(torch.stack(rec.values[1:], 1), out.tokens)
    # B = 1: the stream stops at the row's EOS, like generate.
    rec1 = RecordingStreamer()
    out1 = fn(base, expert, anti, ids[:1], mask[:1], max_new_tokens=9, eos_token_id=eos[0],
              streamer=rec1)
    assert [int(v) for v in rec1.values[1:]] == out1.tokens[0].tolist() == free[0, :3].tolist()


def test_text_streamers_like_generate(capsys):
    base, expert, anti = trio("llama")
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("the cat sat on the mat")["input_ids"]])
    out = fused_proxy_generate(base, expert, anti, ids, max_new_tokens=12, eos_token_id=[])
    text = tok.decode(out.tokens[0], skip_special_tokens=True)

    streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    worker = threading.Thread(target=fused_proxy_generate, args=(base, expert, anti, ids),
                              kwargs=dict(max_new_tokens=12, eos_token_id=[], streamer=streamer))
    worker.start()
    streamed = "".join(streamer)
    worker.join()
    assert streamed.strip() == text.strip() and text

    fused_proxy_generate(base, expert, anti, ids, max_new_tokens=12, eos_token_id=[],
                         streamer=TextStreamer(tok, skip_prompt=True, skip_special_tokens=True))
    assert capsys.readouterr().out.strip() == text.strip()


# --------------------------------------------------------------------------- vocabularies

def test_expert_padded_to_wider_vocabulary():
    base, expert, anti = trio("llama")
    wide = copy.deepcopy(expert)
    wide.resize_token_embeddings(1024, mean_resizing=False)
    with torch.no_grad():  # make the padding columns win if they were read
        wide.get_output_embeddings().weight[VOCAB:] = 5 * wide.get_output_embeddings().weight[:24]
    ids, mask = ragged_batch()
    ref = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8, eos_token_id=[],
                               return_model_logprobs=True)
    for fn in GENERATORS:
        out = fn(base, wide, anti, ids, mask, max_new_tokens=8, eos_token_id=[],
                 return_model_logprobs=True)
        assert torch.equal(out.tokens, ref.tokens)
        torch.testing.assert_close(out.model_logprobs["expert"], ref.model_logprobs["expert"])
    # The base padded instead: its extra columns are proxy tokens now (zero delta), but
    # these small random rows never win here, so the same tokens again. A base whose
    # extra columns do win: tests/test_vocab_widths.py.
    wide_base = copy.deepcopy(base)
    wide_base.resize_token_embeddings(1024, mean_resizing=False)
    out = fused_proxy_generate(wide_base, expert, anti, ids, mask, max_new_tokens=8,
                               eos_token_id=[])
    assert torch.equal(out.tokens, ref.tokens)


def test_vocabularies_beyond_padding_raise():
    base, expert, anti = trio("llama")
    other = tiny_model("qwen2", 5, vocab=4000)
    ids, _ = ragged_batch()
    for fn in GENERATORS:
        with pytest.raises(ValueError, match="expert has a vocabulary of 4000"):
            fn(base, other, anti, ids, max_new_tokens=2)
        with pytest.raises(ValueError, match="anti_expert has a vocabulary of 4000"):
            fn(base, expert, other, ids, max_new_tokens=2)


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    ok = dict(base=base, expert=expert, anti_expert=anti, input_ids=ids, attention_mask=mask,
              max_new_tokens=4)
    meta_expert = tiny_model("qwen2", 1).to("meta")
    right = mask.flip(1)
    return [
        ("input_ids", dict(input_ids=ids[:, :0], attention_mask=None), ValueError),
        ("input_ids", dict(input_ids=ids[0], attention_mask=None), ValueError),
        ("input_ids", dict(input_ids=ids.float()), TypeError),
        ("input_ids", dict(input_ids=ids + VOCAB, attention_mask=None), ValueError),
        ("max_new_tokens", dict(max_new_tokens=-1), ValueError),
        ("max_new_tokens", dict(max_new_tokens=2.0), TypeError),
        ("expert_input_ids", dict(expert_input_ids=ids[:2]), ValueError),
        ("expert_input_ids", dict(expert_input_ids=ids[:, :0]), ValueError),
        ("expert_attention_mask", dict(expert_attention_mask=mask), ValueError),
        ("expert_attention_mask", dict(expert_input_ids=ids, expert_attention_mask=mask[:, 1:]),
         ValueError),
        ("attention_mask", dict(attention_mask=mask[:, 1:]), ValueError),
        ("attention_mask", dict(attention_mask=mask * 2), ValueError),
        ("attention_mask", dict(attention_mask=right), ValueError),
        ("attention_mask", dict(attention_mask=torch.zeros_like(mask)), ValueError),
        ("expert", dict(expert=meta_expert), ValueError),
        ("anti_expert", dict(anti_expert="gpt2"), TypeError),
        ("temperature", dict(temperature=-1.0), ValueError),
        ("top_p", dict(top_p=0.0), ValueError),
        ("top_k", dict(top_k=-2), ValueError),
        ("min_p", dict(min_p=1.0), ValueError),
        ("alpha", dict(alpha=float("nan")), ValueError),
        ("alpha", dict(alpha=torch.tensor([1.0, 2.0])), ValueError),
        ("temperature", dict(temperature=torch.tensor([1.0, -1.0, 1.0])), ValueError),
        ("seed", dict(seed=1.5), TypeError),
        ("eos_token_id", dict(eos_token_id="</s>"), TypeError),
        ("pad_token_id", dict(pad_token_id=[1, 2]), TypeError),
        ("streamer", dict(streamer=object()), TypeError),
        ("return_logprobs", dict(return_logprobs="yes"), TypeError),
        ("backend", dict(backend="tpu"), ValueError),
        ("cuda_graphs", dict(cuda_graphs="always"), ValueError),
        ("cuda_graphs", dict(cuda_graphs=True), ValueError),
    ], ok


@pytest.mark.parametrize("fn", GENERATORS)
def test_bad_inputs_raise_naming_the_argument(fn):
    cases, ok = _bad_cases()
    for name, change, error in cases:
        if fn is naive_proxy_generate and name == "cuda_graphs":
            error = TypeError  # the baseline has no cuda_graphs argument (nothing is captured)
        kw = {**ok, **change}
        args = [kw.pop(k) for k in ("base", "expert", "anti_expert", "input_ids")]
        with pytest.raises(error, match=name):
            fn(*args, **kw)


def test_bad_row_raises_naming_the_row():
    base, expert, anti = (copy.deepcopy(m) for m in trio("llama"))
    calls = []

    def nan_row_1_from_step_2(module, inputs, output):
        calls.append(1)
        if len(calls) >= 3:  # prefill, step 1, then NaN logits for row 1
            output.logits[1] = float("nan")
        return output

    expert.register_forward_hook(nan_row_1_from_step_2)
    ids, mask = ragged_batch()
    for fn in GENERATORS:
        calls.clear()
        with pytest.raises(ValueError, match=r"row 1: .*NaN.*step 2"):
            fn(base, expert, anti, ids, mask, max_new_tokens=6, eos_token_id=[])


def test_cuda_graph_options_and_signatures():
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    a = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=3, cuda_graphs=False)
    b = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=3, cuda_graphs="auto",
                             backend="torch")
    assert torch.equal(a.tokens, b.tokens)
    fused_params = dict(inspect.signature(fused_proxy_generate).parameters)
    assert fused_params.pop("num_draft_tokens").default == 0  # fused only (speculative)
    assert fused_params.pop("cuda_graphs").default == "auto"  # fused only (nothing to capture)
    assert fused_params == dict(inspect.signature(naive_proxy_generate).parameters)
    assert proxykern.ProxyGenerateOutput._fields == ("sequences", "tokens", "lengths", "logprobs",
                                                     "model_logprobs", "stats")
    assert a.stats is None  # set by speculative decoding only


# --------------------------------------------------------------------------- CUDA (streams)

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")
def test_cuda_streams_match_naive_and_cpu():
    """On CUDA: side streams, deferred finished checks and the async streamer feed."""
    models = [copy.deepcopy(m).cuda() for m in trio("llama")]
    ids, mask = ragged_batch()
    cpu = fused_proxy_generate(*trio("llama"), ids, mask, max_new_tokens=20, eos_token_id=[])
    ids, mask = ids.cuda(), mask.cuda()
    greedy = fused_proxy_generate(*models, ids, mask, max_new_tokens=20, eos_token_id=[],
                                  return_model_logprobs=True)
    assert torch.equal(greedy.tokens.cpu(), cpu.tokens)
    eos = [int(greedy.tokens[0, 2]), int(greedy.tokens[1, 9])]
    for kw in (dict(), dict(seed=5, **SAMPLING)):
        rec = RecordingStreamer()
        fused = fused_proxy_generate(*models, ids, mask, max_new_tokens=20, eos_token_id=eos,
                                     return_logprobs=True, return_model_logprobs=True,
                                     streamer=rec, **kw)
        naive = naive_proxy_generate(*models, ids, mask, max_new_tokens=20, eos_token_id=eos,
                                     return_logprobs=True, return_model_logprobs=True, **kw)
        assert torch.equal(fused.tokens, naive.tokens) and torch.equal(fused.lengths, naive.lengths)
        torch.testing.assert_close(fused.logprobs, naive.logprobs, atol=1e-4, rtol=1e-4)
        for name in naive.model_logprobs:
            torch.testing.assert_close(fused.model_logprobs[name], naive.model_logprobs[name],
                                       atol=1e-4, rtol=1e-4)
        assert torch.equal(torch.stack(rec.values[1:], 1), fused.tokens.cpu())
