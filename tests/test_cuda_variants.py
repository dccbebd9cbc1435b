"""The CUDA backend's kernel variants as the host sees them: PROXYKERN_CUDA_KERNEL and the
cuda_kernel_variant op (csrc/cuda_launcher.cpp), v06's launch rule (csrc/cuda_sample.h,
merge_in_slice_kernel) and v07's spread rule (cuda_v07_spread: how many blocks share a
row's whole-row fallback). All of it is decided on the host, so these run without a GPU
wherever the extension was built with its CUDA sources (tests/test_cuda.py runs the
kernels themselves on a GPU)."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

from proxykern import ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cuda_ops() -> bool:
    if ops._extension() is None:
        return False
    try:
        torch.ops.proxykern.cuda_kernel_variant
        torch.ops.proxykern.cuda_v06_one_launch
        torch.ops.proxykern.cuda_v07_spread
    except (AttributeError, RuntimeError):
        return False
    return True


pytestmark = pytest.mark.skipif(not _cuda_ops(), reason="proxykern._C was built without its CUDA "
                                "sources, or before v07 (no cuda_v07_spread)")

NAMES = ("v04", "v05", "v06", "v07")
MESSAGE = "must be 'v04', 'v05', 'v06' or 'v07', got 'v08'"


def test_switch_accepts_each_variant_and_returns_the_previous():
    start = torch.ops.proxykern.cuda_kernel_variant("")
    try:
        previous = start
        for name in NAMES + NAMES[::-1]:
            assert torch.ops.proxykern.cuda_kernel_variant(name) == previous
            assert torch.ops.proxykern.cuda_kernel_variant("") == name
            previous = name
    finally:
        torch.ops.proxykern.cuda_kernel_variant(start)


@pytest.mark.parametrize("bad", ["v08", "V07", "v7", "07", " v07"])
def test_switch_rejects_other_names_naming_all_four(bad):
    start = torch.ops.proxykern.cuda_kernel_variant("")
    with pytest.raises(RuntimeError, match=MESSAGE.replace("v08", bad)):
        torch.ops.proxykern.cuda_kernel_variant(bad)
    assert torch.ops.proxykern.cuda_kernel_variant("") == start  # unchanged


def _variant_in_fresh_process(value):
    """cuda_kernel_variant("") in a new interpreter with PROXYKERN_CUDA_KERNEL=value (None:
    unset): (returncode, stdout, stderr). The variable is read once, at the first use."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("PROXYKERN_CUDA_KERNEL", None)
    if value is not None:
        env["PROXYKERN_CUDA_KERNEL"] = value
    code = ("import torch; from proxykern import ops; ops._extension(); "
            "print(torch.ops.proxykern.cuda_kernel_variant(''))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    return proc.returncode, proc.stdout.strip(), proc.stderr


@pytest.mark.parametrize("value,expected", [(None, "v04"), ("", "v04"), ("v04", "v04"),
                                            ("v05", "v05"), ("v06", "v06"), ("v07", "v07")])
def test_environment_variable_picks_the_variant(value, expected):
    rc, out, err = _variant_in_fresh_process(value)
    assert rc == 0, err[-2000:]
    assert out.splitlines()[-1] == expected


def test_environment_variable_rejects_other_names_naming_all_four():
    rc, _, err = _variant_in_fresh_process("v08")
    assert rc != 0
    assert "PROXYKERN_CUDA_KERNEL " + MESSAGE in err


@pytest.mark.skipif(bool(os.environ.get("PROXYKERN_CUDA_SLICE_EPT")),
                    reason="PROXYKERN_CUDA_SLICE_EPT changes the slices, hence the plan")
@pytest.mark.parametrize("batch,vocab,one_launch", [
    (1, 111, True), (256, 111, True), (257, 111, False),   # one slice a row
    (8, 32000, True), (9, 32000, False),                   # 32 slices
    (1, 128256, True), (2, 128256, True), (3, 128256, False),  # 126
    (1, 151936, True), (2, 151936, False),                 # 149
    (1, 1_000_000, True), (2, 1_000_000, False),           # 245 slices of 4096 columns
    (0, 32000, True),
])
def test_v06_one_launch_rule(batch, vocab, one_launch):
    """One launch iff batch * num_slices <= 256 (cuda_sample.h: kFusedMaxBlocks)."""
    assert torch.ops.proxykern.cuda_v06_one_launch(batch, vocab) is one_launch


def test_v06_one_launch_checks_its_arguments():
    with pytest.raises(RuntimeError, match="vocab_size > 0"):
        torch.ops.proxykern.cuda_v06_one_launch(1, 0)
    with pytest.raises(RuntimeError, match="batch >= 0"):
        torch.ops.proxykern.cuda_v06_one_launch(-1, 100)


@pytest.mark.parametrize("batch,vocab,sms,spread", [
    (1, 128256, 132, 16), (8, 128256, 132, 16),    # 16 rounds of 8 x 1024 columns
    (9, 128256, 132, 14), (64, 128256, 132, 2),    # SMs // batch
    (67, 128256, 132, 1),                          # 132 // 67 = 1: not spread
    (1, 32000, 132, 4), (1, 151936, 132, 19),
    (1, 5003, 132, 1),                             # one round: nothing to spread
    (1, 1_000_000, 132, 32),                       # capped at 32 blocks a row
    (0, 32000, 132, 1), (1, 128256, 1, 1),
])
def test_v07_spread_rule(batch, vocab, sms, spread):
    """G = min(32, sms // batch, ceil(ceil(vocab / 8) / 1024)), 1 below 2 (v05's K2)."""
    assert torch.ops.proxykern.cuda_v07_spread(batch, vocab, sms) == spread


def _spread_rule(batch, vocab, sms):
    """cuda_v07_spread's rule, written out: the blocks a row's fallback is spread over."""
    if batch == 0:
        return 1
    rounds = -(-(-(-vocab // 8)) // 1024)  # ceil(ceil(vocab / 8) / 1024): rounds of 8192 columns
    g = min(32, sms // batch, rounds)
    return g if g >= 2 else 1


def test_v07_spread_rule_at_its_edges():
    """Each term's edges: a round's 8192 columns, SMs // batch at 2, the cap of 32."""
    for batch in (1, 2, 3, 33, 65, 66, 67, 132, 133):
        for vocab in (1, 8, 8192, 8193, 16384, 16385, 32000, 128256, 262144, 262145, 10 ** 6):
            for sms in (1, 2, 3, 64, 108, 132, 144):
                got = torch.ops.proxykern.cuda_v07_spread(batch, vocab, sms)
                assert got == _spread_rule(batch, vocab, sms), (batch, vocab, sms)


@pytest.mark.parametrize("args", [(-1, 100, 132), (1, 0, 132), (1, -5, 132), (1, 100, 0), (4, 100, -1)])
def test_v07_spread_checks_its_arguments(args):
    message = ("cuda_v07_spread: batch >= 0, vocab_size > 0 and sm_count > 0, "
               "got {}, {} and {}".format(*args))
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.proxykern.cuda_v07_spread(*args)
