"""The shipped trio (examples/trio/models) shows the proxy-tuning effect on held-out items.

Measured when it was made (first 90 held-out items, greedy, CPU fp32): the base alone is
right on 30, the proxy-tuned base (alpha 1) on 57, through both generation paths. The test
asks for a margin of at least 15 items and equal answers from the two paths.
"""
import os

import pytest
import torch

import proxykern
from proxykern.apps.demo import DEFAULT_TRIO, answers, load_trio, right_answers

ITEMS = 90
MARGIN = 15

pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")


@pytest.fixture(scope="module")
def trio():
    return load_trio(DEFAULT_TRIO, torch.device("cpu"))


def _right_answers(trio, generate, proxy: bool):
    tok, base, expert, anti, heldout = trio
    items = heldout["items"][:ITEMS]
    models = (base, expert, anti) if proxy else (base, base, base)
    texts = answers(tok, *models, [it["prompt"] for it in items], 1.0 if proxy else 0.0,
                    generate=generate)
    return right_answers(texts, items, heldout["values"])


@pytest.mark.parametrize("generate", [proxykern.fused_proxy_generate,
                                      proxykern.naive_proxy_generate], ids=["fused", "naive"])
def test_proxy_tuned_base_beats_the_base(trio, generate):
    base_right = _right_answers(trio, generate, proxy=False)
    proxy_right = _right_answers(trio, generate, proxy=True)
    assert sum(proxy_right) >= sum(base_right) + MARGIN, (sum(base_right), sum(proxy_right))


def test_fused_and_naive_agree(trio):
    assert (_right_answers(trio, proxykern.fused_proxy_generate, proxy=True)
            == _right_answers(trio, proxykern.naive_proxy_generate, proxy=True))
