"""Capture-readiness on CPU: the decode step and the static speculative round, captured by
the CUDA-graph emulator (tests/graph_emulator.py) and replayed, give the eager tokens.

A real capture needs a GPU (tests marked cuda in test_engine.py and
test_static_speculative.py); the emulator replays the recorded ops on the same tensors
exactly as a graph replays its kernels, so a round that keeps Python state between calls,
rebinds a buffer, changes a shape or reads the device on the host fails here. The first
tests prove the emulator can fail in each of those ways.
"""
from __future__ import annotations

import pytest
import torch

import graph_emulator
import proxykern.engine.speculative as speculative
import proxykern.generation_args as generation_args
from proxykern import fused_proxy_generate
from proxykern.engine.graphs import CapturedCall
from proxykern.engine.speculative import proxy_static_rounds

from gen_fixtures import assert_same_generation, ragged_batch, random_models, trio

SAMPLED = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02, seed=7)


@pytest.fixture
def emulated(monkeypatch):
    """Graphs on for CPU calls (unless cuda_graphs=False), captured by the emulator."""
    made = graph_emulator.install(monkeypatch)
    monkeypatch.setattr(generation_args, "check_cuda_graphs",
                        lambda cuda_graphs, *a, **k: cuda_graphs is not False)
    monkeypatch.setattr(speculative, "STATIC_ROUNDS", True)
    return made


# ---------------------------------------------------------------- the emulator can fail


def _run(call, n):
    for _ in range(n):
        call()


def test_emulator_replays_in_place_state(emulated):
    count = torch.zeros(3)
    step = torch.tensor([1.0, 2.0, 3.0])

    def fn():
        count.add_(step * 2)   # a fresh intermediate, written again on each replay
    call = CapturedCall(fn, torch.device("cpu"), True)
    _run(call, 5)
    assert torch.equal(count, torch.tensor([10.0, 20.0, 30.0]))
    assert len(emulated) == 1 and emulated[0].replays == 3  # warm-up, capture, 3 replays


def test_emulator_freezes_python_state(emulated):
    """A rebound buffer and a Python counter are frozen at capture, as on a GPU."""
    state = {"x": torch.zeros(1), "n": 0}

    def rebinding():
        state["x"] = state["x"] + 1    # rebinds: a replay keeps adding to the captured input
    call = CapturedCall(rebinding, torch.device("cpu"), True)
    _run(call, 4)
    assert float(state["x"]) != 4.0

    total = torch.zeros(1)

    def python_counter():
        state["n"] += 1
        total.add_(state["n"])         # the int is a constant of the captured op
    call = CapturedCall(python_counter, torch.device("cpu"), True)
    _run(call, 4)
    assert float(total) == 1 + 2 + 2 + 2


def test_emulator_refuses_host_reads_and_shape_changes(emulated):
    x = torch.ones(4)
    call = CapturedCall(lambda: x.add_(1) if x.sum().item() > 0 else None,
                        torch.device("cpu"), True)
    call()
    with pytest.raises(graph_emulator.HostReadInCapture):
        call()
    call = CapturedCall(lambda: x[x > 2].sum(), torch.device("cpu"), True)
    call()
    with pytest.raises(graph_emulator.HostReadInCapture):
        call()


# ---------------------------------------------------------------- the decode step


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_captured_plain_step_equals_eager(emulated, mode):
    base, expert, anti = trio("llama")
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=7, eos_token_id=[], return_logprobs=True,
              return_model_logprobs=True, **(SAMPLED if mode == "sampled" else {}))
    eager = fused_proxy_generate(base, expert, anti, ids, mask, cuda_graphs=False, **kw)
    assert not emulated
    captured = fused_proxy_generate(base, expert, anti, ids, mask, **kw)
    assert len(emulated) == 1 and emulated[0].replays == 4  # steps 1, 2 eager/capture; 3..6
    assert_same_generation(captured, eager)


@pytest.mark.parametrize("preset", ["contrastive", "dexperts", "ensemble"])
def test_captured_program_step_equals_eager(emulated, preset):
    """The logit-program step (a runner per role, masks and a top-p pre-pass) captured and
    replayed gives the eager tokens."""
    from test_program_generate import PRESETS, _models
    from proxykern import program_generate
    _, make, _, roles = next(p for p in PRESETS if p[0] == preset)
    models = _models(roles)
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=6, eos_token_id=[], temperature=0.8, seed=4, return_logprobs=True)
    eager = program_generate(make(), models, ids, mask, cuda_graphs=False, **kw)
    captured = program_generate(make(), models, ids, mask, **kw)
    assert len(emulated) == 1 and emulated[0].replays == 3
    assert_same_generation(captured, eager)


# ---------------------------------------------------------------- static speculative rounds


def _against_eager(models, ids, mask, k, made, **kw):
    eager = fused_proxy_generate(*models, ids, mask, cuda_graphs=False, **kw)
    plain = fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, cuda_graphs=False,
                                 **kw)
    n_graphs = len(made)
    captured = fused_proxy_generate(*models, ids, mask, num_draft_tokens=k, **kw)
    assert len(made) == n_graphs + 1 or captured.stats.rounds < 3
    assert_same_generation(captured, eager)
    assert_same_generation(captured, plain)
    assert captured.stats == plain.stats
    return captured


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_captured_rounds_equal_plain_decoding(emulated, family, mode):
    base, expert, anti = random_models(family)
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=10, eos_token_id=[], return_logprobs=True,
              return_model_logprobs=True, **(SAMPLED if mode == "sampled" else {}))
    _against_eager((base, expert, anti), ids, mask, 2, emulated, **kw)       # drafts wrong
    out = _against_eager((expert, expert, anti), ids, mask, 3, emulated, alpha=0.3, **kw)
    assert 0 < out.stats.accepted < out.stats.drafted                       # ragged rounds
    assert emulated[-1].replays >= 1


def test_captured_rounds_eos_budget_shared_anti_and_samples(emulated):
    _, expert, anti = random_models("llama")
    ids, mask = ragged_batch()
    models = (expert, expert, anti)
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=9, alpha=0.0,
                                eos_token_id=[], cuda_graphs=False, **SAMPLED)
    eos = [int(free.tokens[0, 2]), int(free.tokens[1, 5])]
    out = _against_eager(models, ids, mask, 4, emulated, max_new_tokens=9, alpha=0.0,
                         eos_token_id=eos, pad_token_id=0, return_logprobs=True, **SAMPLED)
    assert out.lengths.tolist()[0] <= 3 and max(out.lengths.tolist()) == 9
    base, _, _ = trio("gpt2")  # learned positions; the expert doubles as the anti-expert
    _against_eager((base, expert, expert), ids, mask, 2, emulated, max_new_tokens=8,
                   eos_token_id=[], num_return_sequences=2, **SAMPLED)


@pytest.mark.parametrize("preset", ["contrastive", "dexperts"])
def test_captured_program_rounds_equal_plain_decoding(emulated, preset):
    """Logit programs' static rounds captured and replayed: plain decoding's tokens, with
    the default drafter and with another role drafting."""
    from test_program_generate import PRESETS, _models
    from proxykern import program_generate
    _, make, _, roles = next(p for p in PRESETS if p[0] == preset)
    models = _models(roles)
    ids, mask = ragged_batch()
    kw = dict(max_new_tokens=9, eos_token_id=[], temperature=0.8, seed=4, return_logprobs=True,
              return_model_logprobs=True)
    plain = program_generate(make(), models, ids, mask, cuda_graphs=False, **kw)
    for drafter in (None, roles[-1]):
        made = len(emulated)
        spec = program_generate(make(), models, ids, mask, num_draft_tokens=3,
                                draft_role=drafter, **kw)
        assert len(emulated) == made + 1 and emulated[-1].replays >= 1
        assert_same_generation(spec, plain)


def test_round_state_keeps_its_addresses():
    """What capture relies on, checked directly: a round rebinds no buffer of the state."""
    base, expert, anti = random_models("llama")
    ids, mask = ragged_batch()
    args = generation_args.prepare_generation(
        base, expert, anti, ids, mask, max_new_tokens=6, alpha=1.0, temperature=0.0, top_k=0,
        top_p=1.0, min_p=0.0, seed=0, eos_token_id=[], pad_token_id=None,
        expert_input_ids=None, expert_attention_mask=None, return_logprobs=True,
        return_model_logprobs=False, streamer=None, backend="auto", cuda_graphs=False,
        num_draft_tokens=2)
    rounds = proxy_static_rounds(base, expert, anti, args)
    rounds.prefill()

    def addresses():
        tensors = {k: v for k, v in vars(rounds).items() if isinstance(v, torch.Tensor)}
        for i, m in enumerate(rounds.unique):
            r = m.run
            tensors.update({f"{i}.mask": r.mask, f"{i}.pos": r.position_ids,
                            f"{i}.slot": r.cache_position})
            tensors.update({f"{i}.len{j}": t for j, t in enumerate(m.lengths)})
        return {k: (id(v), v.data_ptr()) for k, v in tensors.items()}
    before = addresses()
    with torch.no_grad():
        for _ in range(3):
            rounds.advance()
    assert addresses() == before
