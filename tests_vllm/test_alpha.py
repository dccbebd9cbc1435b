"""The per-request alpha: checked at admission, a bad one fails its request only."""
from __future__ import annotations

import math

import pytest

from proxykern.integrations.vllm_plugin import ProxyAlphaLogitsProcessor, check_alpha

BAD = ["1.0", True, None, [1.0], float("nan"), float("inf"), -math.inf]


@pytest.mark.parametrize("alpha", BAD)
def test_check_alpha_refuses(alpha):
    with pytest.raises(ValueError, match="proxy_alpha must be"):
        check_alpha(alpha)


def test_check_alpha_accepts_numbers():
    assert check_alpha(2) == 2.0 and check_alpha(-0.5) == -0.5 and check_alpha(0) == 0.0


def test_bad_alpha_fails_its_request_and_the_engine_goes_on(llm):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    prompt = "question : where does gus wren live ? answer :"
    for alpha in BAD:
        with pytest.raises((ValueError, VLLMValidationError), match="proxy_alpha must be"):
            llm.generate([prompt], SamplingParams(max_tokens=4, extra_args={"proxy_alpha": alpha}),
                         use_tqdm=False)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6,
                                                extra_args={"proxy_alpha": 1.0}), use_tqdm=False)
    assert out[0].outputs[0].text == " gus wren lives in emberly."


def test_processor_is_inactive_for_other_models():
    from types import SimpleNamespace as NS

    from vllm import SamplingParams
    proc = ProxyAlphaLogitsProcessor(NS(model_config=NS(architectures=["LlamaForCausalLM"])),
                                     None, False)
    assert proc.add_request(0, SamplingParams(extra_args={"proxy_alpha": 2.0})) is False
    assert not proc.alphas
