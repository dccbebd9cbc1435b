"""``proxykern demo``: the interleaved timing helpers, and the demo's sections on the shipped
trio at a small size (CPU, seconds). Nothing here asserts a timing."""
import os

import pytest
import torch

from proxykern.apps import demo
from proxykern.apps.demo import (DEFAULT_TRIO, fmt_spread, generation_speed, interleaved_times,
                            kernel_speed, load_trio, ratios, spread)

needs_trio = pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")


@pytest.fixture(autouse=True)
def one_thread():
    """The demo's own CPU setting: on a shared 2-core machine more threads only slow the
    trio's tiny forwards down."""
    with demo._demo_settings(torch.device("cpu"), 1):
        yield


class FakeClock:
    """A clock that only the fake callables move: each call lasts a known time."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_interleaved_times_calls_in_turn_and_times_each_call():
    clock, order, syncs = FakeClock(), [], []

    def fake(name, seconds_per_round):
        def fn():
            order.append(name)
            clock.now += seconds_per_round[order.count(name) - 1]
        return fn

    fns = {"a": fake("a", [1.0, 2.0, 3.0]), "b": fake("b", [10.0, 20.0, 30.0]),
           "c": fake("c", [0.5, 0.25, 0.125])}
    times = interleaved_times(fns, 3, clock=clock, sync=lambda: syncs.append(clock.now))
    assert order == ["a", "b", "c"] * 3
    assert times == {"a": [1.0, 2.0, 3.0], "b": [10.0, 20.0, 30.0], "c": [0.5, 0.25, 0.125]}
    assert len(syncs) == 2 * 9  # before and after every timed call


def test_interleaved_times_zero_rounds_calls_nothing():
    calls = []
    assert interleaved_times({"a": lambda: calls.append(1)}, 0) == {"a": []}
    assert calls == []


def test_spread_ratios_and_format():
    # median and inclusive quartiles: one outlier (10.0) does not set the range
    assert spread([3.0, 1.0, 10.0, 2.0]) == (2.5, 1.75, 4.75)
    assert spread([7.0, 1.0, 2.0, 6.0, 3.0, 5.0, 4.0]) == (4.0, 2.5, 5.5)
    assert spread([4.0]) == (4.0, 4.0, 4.0)
    # round by round: the i-th numerator over the i-th denominator
    assert ratios([2.0, 9.0, 4.0], [1.0, 3.0, 8.0]) == [2.0, 3.0, 0.5]
    assert fmt_spread([2.0, 3.0, 0.5]) == "2.00x [1.25-2.50]"
    assert fmt_spread([1200.4, 1000.0, 1510.0], "{:.0f}", " tokens/s") == \
        "1200 tokens/s [1100-1355]"


@pytest.fixture(scope="module")
def trio():
    return load_trio(DEFAULT_TRIO, torch.device("cpu"))


@needs_trio
def test_generation_speed_reports_every_variant_and_equal_tokens(trio):
    tok, base, expert, anti, heldout = trio
    prompts = [it["prompt"] for it in heldout["items"][:4]]
    lines, per_step = generation_speed(tok, base, expert, anti, prompts, alpha=1.0,
                                       new_tokens=3, rounds=2, draft_tokens=2)
    text = "\n".join(lines)
    for name in ("base alone", "fused_proxy_generate", "naive_proxy_generate",
                 "num_draft_tokens=2", "vs base alone", "fused vs naive",
                 "speculative vs plain fused"):
        assert name in text, text
    # greedy, no EOS: naive, fused and speculative decoding must make the same tokens
    assert text.count("same tokens: yes") == 2 and "NO" not in text, text
    assert sum("tokens/s [" in line for line in lines) == 4, text
    assert per_step > 0


@needs_trio
def test_generation_speed_without_speculative(trio):
    tok, base, expert, anti, heldout = trio
    prompts = [it["prompt"] for it in heldout["items"][:2]]
    lines, _ = generation_speed(tok, base, expert, anti, prompts, alpha=1.0, new_tokens=2,
                                rounds=1, draft_tokens=0)
    text = "\n".join(lines)
    assert "num_draft_tokens" not in text and "speculative" not in text, text
    assert sum("tokens/s [" in line for line in lines) == 3, text


def test_kernel_speed_lines_per_vocab_and_the_trio_line():
    lines = kernel_speed(torch.device("cpu"), batch=2, vocabs=[700, 1500], rounds=2,
                         min_time=0.001, trio_vocab=161, trio_batch=4, trio_step_seconds=0.005)
    assert len(lines) == 4, lines  # header, one line per vocabulary, the trio's line
    assert "vocab    700, batch 2" in lines[1] and "vocab   1500, batch 2" in lines[2]
    assert all(line.count(" us [") == 2 for line in lines[1:3]), lines
    assert "vocab 161, batch 4" in lines[3] and "of 5.0 ms per decode step" in lines[3]


@needs_trio
def test_main_prints_the_quality_table_then_the_speed_section(capsys):
    threads = torch.get_num_threads()
    assert demo.main(["--device", "cpu", "--questions", "1", "--scored", "2", "--batch", "3",
                      "--new-tokens", "2", "--rounds", "1", "--draft-tokens", "0",
                      "--kernel-vocab", "500", "--kernel-batch", "2", "--kernel-rounds", "1",
                      "--kernel-min-time", "0.001"]) == 0
    out = capsys.readouterr().out
    order = ["loading the trio", "Q: ", "right answers over the first 2 held-out questions",
             "speed (cpu, 1 thread(s), CPU time", "greedy decoding, batch 3, 2 new tokens",
             "sampling step alone", "vocab    500, batch 2", "why the trio"]
    positions = [out.find(s) for s in order]
    assert -1 not in positions and positions == sorted(positions), out
    assert torch.get_num_threads() == threads  # main restores the thread count
