"""The OpenAI server (vLLM's api_server module) serving the trio through the plugin.

Started by the test on 127.0.0.1, stopped by the test; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import overrides

START_TIMEOUT_S = 300
N_CONCURRENT = 64
MAX_TOKENS = 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(trio, tmp_path_factory):
    import httpx
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
           "--model", str(trio["base"]), "--served-model-name", "trio",
           "--hf-overrides", json.dumps(overrides(trio["expert"], trio["anti_expert"])),
           "--max-model-len", "128", "--dtype", "float32", "--enforce-eager",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "w") as out:
        # cwd away from the repository: `-m` puts the cwd first on sys.path, and the
        # source tree's proxykern/_C is the main venv's build.
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                cwd=log.parent, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not start in {START_TIMEOUT_S} s:\n"
                            f"{log.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and the engine process it started
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _offline(llm, prompts, alphas):
    from vllm import SamplingParams
    outs = llm.generate(prompts, [SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                                 extra_args={"proxy_alpha": a})
                                  for a in alphas], use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def test_concurrent_completions_match_offline(server, llm, prompts):
    from openai import OpenAI
    client = OpenAI(base_url=f"{server}/v1", api_key="unused", timeout=120, max_retries=0)
    n = len(prompts)  # each prompt twice, with two different alphas
    jobs = [(prompts[i % n], (0.5, 1.0, 2.0, 0.0)[(i + i // n) % 4]) for i in range(N_CONCURRENT)]

    def complete(job):
        prompt, alpha = job
        r = client.completions.create(model="trio", prompt=prompt, max_tokens=MAX_TOKENS,
                                      temperature=0.0, extra_body={"vllm_xargs": {"proxy_alpha": alpha}})
        return r.choices[0].text

    with ThreadPoolExecutor(N_CONCURRENT) as pool:
        texts = list(pool.map(complete, jobs, timeout=300))
    assert texts == _offline(llm, [p for p, _ in jobs], [a for _, a in jobs])
    assert sum(texts[i] != texts[i + n] for i in range(n)) >= n // 4  # alphas matter


@pytest.mark.parametrize("raw_alpha", ['"abc"', "[1.0]", "NaN", "Infinity", "1e999", "null"])
def test_bad_alpha_is_400_and_server_stays_up(server, raw_alpha):
    import httpx
    body = ('{"model": "trio", "prompt": "question : where does gus wren live ? answer :", '
            '"max_tokens": 4, "temperature": 0, "vllm_xargs": {"proxy_alpha": %s}}' % raw_alpha)
    r = httpx.post(f"{server}/v1/completions", content=body,
                   headers={"Content-Type": "application/json"}, timeout=60)
    assert r.status_code == 400, r.text
    assert "proxy_alpha" in r.text or "vllm_xargs" in r.text
    good = httpx.post(f"{server}/v1/completions", timeout=60, json={
        "model": "trio", "prompt": "question : where does gus wren live ? answer :",
        "max_tokens": 4, "temperature": 0, "vllm_xargs": {"proxy_alpha": 1.0}})
    assert good.status_code == 200, good.text
    assert good.json()["choices"][0]["text"]
