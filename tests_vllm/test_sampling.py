"""Sampled: the first token's distribution over 4,000 requests is softmax of the proxy logits."""
from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chisquare

from conftest import MODELS, hf_models

N_REQUESTS = 4000
ALPHA = 1.5     # a per-request alpha, not the engine's default (1.0)


def test_first_token_distribution(llm, prompt_ids):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    # A prompt whose proxy distribution is spread over several tokens.
    ids = prompt_ids[0][:-2]
    base, expert, anti = hf_models(MODELS / "base", MODELS / "expert", MODELS / "anti_expert")
    with torch.inference_mode():
        x = torch.tensor([ids])
        b, e, a = (m(x).logits[0, -1] for m in (base, expert, anti))
    p = torch.softmax((b + ALPHA * (e - a)).double(), -1).numpy()
    p_default = torch.softmax((b + (e - a)).double(), -1).numpy()
    assert (p > 0.02).sum() >= 3

    params = [SamplingParams(temperature=1.0, max_tokens=1, seed=i,
                             extra_args={"proxy_alpha": ALPHA}) for i in range(N_REQUESTS)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids)] * N_REQUESTS, params,
                        use_tqdm=False)
    counts = np.bincount([o.outputs[0].token_ids[0] for o in outs], minlength=len(p))
    # Bins with at least 5 expected draws; the rest pooled into one.
    big = p * N_REQUESTS >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(p[big], p[~big].sum()) * N_REQUESTS
    stat, pvalue = chisquare(obs, exp)
    assert pvalue > 1e-3, (stat, pvalue, obs, exp)
    # ... and not the engine's default alpha: that distribution is rejected.
    exp1 = np.append(p_default[big], p_default[~big].sum()) * N_REQUESTS
    assert chisquare(obs, exp1 * obs.sum() / exp1.sum()).pvalue < 1e-6
