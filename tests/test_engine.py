"""The decode engine: static runners, the capture-ready step run eagerly, graphs on CUDA."""
from __future__ import annotations

import ast
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from transformers import LlamaForCausalLM

from proxykern import fused_proxy_generate, naive_proxy_generate
from proxykern.engine import (ProxyStep, StaticRunner, graph_unsupported_reason,
                              static_cache_unsupported_reason)
from proxykern.generation_args import prepare_generation
from proxykern.engine.runner import ModelRunner

from gen_fixtures import (FAMILIES, pad_left, ragged_batch, replay_without_host_syncs,
                          tiny_model, trio)

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "proxykern")
SAMPLING = dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.02)


def _args(models, ids, mask, **kw):
    kw = {**dict(max_new_tokens=8, alpha=1.0, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0,
                 seed=0, eos_token_id=[], pad_token_id=None, expert_input_ids=None,
                 expert_attention_mask=None, return_logprobs=True, return_model_logprobs=True,
                 streamer=None, backend="auto", cuda_graphs=False), **kw}
    return prepare_generation(*models, ids, mask, **kw)


def _run_step(models, args, *, static):
    """Drive ProxyStep by hand (checking every step), as the decode loop does."""
    step = ProxyStep(*models, args, static=static)
    with torch.no_grad():
        step.prefill()
        for t in range(1, args.max_new_tokens):
            if step.flags()[0]:
                break
            step.advance()
    return step


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("sampling", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_static_step_equals_dynamic_step_and_naive(family, sampling):
    models = trio(family)
    ids, mask = ragged_batch()
    e_ids, e_mask = pad_left([[4, 5, 6, 7, 8, 9], [30, 31], [40, 41, 42]])
    kw = dict(expert_input_ids=e_ids, expert_attention_mask=e_mask, seed=torch.tensor([3, 4, 5]),
              **sampling)
    args = _args(models, ids, mask, **kw)
    static, dynamic = _run_step(models, args, static=True), _run_step(models, args, static=False)
    assert all(isinstance(r, StaticRunner) for r in static.runners)
    assert all(isinstance(r, ModelRunner) for r in dynamic.runners)
    naive = naive_proxy_generate(*models, ids, mask, max_new_tokens=8, eos_token_id=[],
                                 return_logprobs=True, return_model_logprobs=True, **kw)
    for step in (static, dynamic):
        out = step.output()
        assert torch.equal(out.tokens, naive.tokens)
        assert torch.equal(out.lengths, naive.lengths)
        torch.testing.assert_close(out.logprobs, naive.logprobs, atol=1e-4, rtol=1e-4)
        for name, lp in naive.model_logprobs.items():
            torch.testing.assert_close(out.model_logprobs[name], lp, atol=1e-4, rtol=1e-4)


def test_step_bookkeeping_stays_on_the_device_buffers():
    """advance() writes in place: the same buffers, the counter moves, EOS pads the row."""
    models = trio("llama")
    ids, mask = ragged_batch()
    free = fused_proxy_generate(*models, ids, mask, max_new_tokens=6, eos_token_id=[]).tokens
    eos = int(free[1, 2])
    args = _args(models, ids, mask, max_new_tokens=6, eos_token_id=[eos], pad_token_id=1)
    step = ProxyStep(*models, args)
    buffers = [step.tokens.data_ptr(), step.base.logits, step.status.data_ptr()]
    with torch.no_grad():
        step.prefill()
        logits_ptr = step.base.logits.data_ptr()
        for t in range(1, 6):
            step.advance()
            assert step.base.logits.data_ptr() == logits_ptr
            assert step.step_rows.tolist() == [t + 1] * 3 and step.column.item() == t + 1
    assert step.tokens.data_ptr() == buffers[0] and step.status.data_ptr() == buffers[2]
    assert step.lengths[1].item() == 3 and step.tokens[1, 3:].tolist() == [1, 1, 1]
    assert step.finished.tolist() == [eos in free[0].tolist(), True, eos in free[2].tolist()]


def test_generation_at_the_static_cache_limit():
    """prompt + max_new_tokens fills the static cache (and the models' 256 positions)."""
    models = trio("qwen2")
    ids, mask = ragged_batch()
    n = 256 - ids.shape[1]
    fused = fused_proxy_generate(*models, ids, mask, max_new_tokens=n, eos_token_id=[],
                                 return_logprobs=True)
    assert fused.tokens.shape == (3, n)
    args = _args(models, ids, mask, max_new_tokens=n)
    dynamic = _run_step(models, args, static=False).output()
    assert torch.equal(fused.tokens, dynamic.tokens)
    torch.testing.assert_close(fused.logprobs, dynamic.logprobs, atol=1e-4, rtol=1e-4)


class NoStaticLlama(LlamaForCausalLM):
    """A model family that (as far as proxykern can tell) has no static-cache support."""
    _can_compile_fullgraph = False


def test_family_without_static_cache_falls_back_to_dynamic():
    base, _, anti = trio("llama")
    expert = tiny_model("llama", 1)
    odd = NoStaticLlama(expert.config)
    odd.load_state_dict(expert.state_dict())
    odd.generation_config = copy.deepcopy(expert.generation_config)
    odd.eval()
    assert "NoStaticLlama" in static_cache_unsupported_reason(odd)
    assert static_cache_unsupported_reason(base) is None
    reason = graph_unsupported_reason((base, odd, anti), torch.device("cuda"))
    assert reason.startswith("expert: NoStaticLlama")
    assert "CUDA device" in graph_unsupported_reason((base, expert, anti), torch.device("cpu"))
    ids, mask = ragged_batch()
    args = _args((base, odd, anti), ids, mask)
    step = ProxyStep(base, odd, anti, args)
    assert isinstance(step.expert, ModelRunner) and isinstance(step.base, StaticRunner)
    mixed = fused_proxy_generate(base, odd, anti, ids, mask, max_new_tokens=8, eos_token_id=[])
    plain = fused_proxy_generate(base, expert, anti, ids, mask, max_new_tokens=8,
                                 eos_token_id=[])
    assert torch.equal(mixed.tokens, plain.tokens)
    with pytest.raises(ValueError, match="cuda_graphs=True cannot be honoured: .*CUDA device"):
        fused_proxy_generate(base, odd, anti, ids, mask, max_new_tokens=2, cuda_graphs=True)


# --------------------------------------------------------------------------- imports

def _package_imports(path):
    """Module names of ``proxykern`` imported at the top level of one file (relative or absolute)."""
    tree = ast.parse(open(path).read())
    module = os.path.relpath(path, os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
    module = module.removesuffix(".__init__")
    pkg = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in tree.body:  # top level only: imports inside functions are lazy on purpose
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.rsplit(".", node.level - 1)[0] if node.level > 1 else pkg
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names]
            else:
                target, names = node.module or "", []
            for name in [target, *names]:
                if name.startswith("proxykern"):
                    found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("proxykern")}
    return module, found


def test_imports_run_one_way():
    files = [os.path.join(d, f) for d, _, fs in os.walk(PACKAGE) for f in fs if f.endswith(".py")]
    graph = dict(_package_imports(f) for f in files)
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}
    assert edges["proxykern.reference"] == set(), "the spec imports nothing else of the package"
    # No cycle among modules, ignoring a package's own __init__ re-exports.
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in edges[m]:
            if d == "proxykern" or (d + ".").startswith(m + ".") and m != "proxykern":
                continue
            if state.get(d) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"
    for m in sorted(edges):
        if m not in state and m != "proxykern":
            visit(m, [])


def test_import_proxykern_does_not_import_transformers():
    code = ("import sys, proxykern, proxykern.engine, proxykern.generate; "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_bench_generate_runs_on_cpu(tmp_path):
    """The generation benchmark's plumbing (tiny config on CPU; the real run is on a GPU)."""
    out = subprocess.run([sys.executable, "-m", "proxykern.apps.cli", "bench", "generate",
                          "--configs", "tiny", "--batches", "2",
                          "--prompt-len", "8", "--new-tokens", "6", "--naive-tokens", "3",
                          "--device", "cpu", "--dtype", "float32", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "| tiny | 2 |" in out.stdout
    import json
    rows = json.load(open(tmp_path / "generate.json"))["rows"]
    # Timings on a shared 2-core machine are noise; the run and its fields are what is checked.
    assert all(isinstance(rows[0][c], float) for c in ("naive", "eager", "graphs", "floor"))
    assert rows[0]["eager"] > 0


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")


def _cuda_trio(dtype=torch.float32):
    return [copy.deepcopy(m).to("cuda", dtype) for m in trio("llama")]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("sampling", [{}, SAMPLING], ids=["greedy", "sampled"])
def test_graph_replay_equals_eager(sampling):
    models = _cuda_trio()
    ids, mask = (t.cuda() for t in ragged_batch())
    kw = dict(max_new_tokens=24, eos_token_id=[3, 7], return_logprobs=True,
              return_model_logprobs=True, seed=torch.tensor([1, 2, 3], device="cuda"), **sampling)
    graphed = fused_proxy_generate(*models, ids, mask, cuda_graphs=True, **kw)
    eager = fused_proxy_generate(*models, ids, mask, cuda_graphs=False, **kw)
    naive = naive_proxy_generate(*models, ids, mask, **kw)
    for out in (graphed, eager):
        assert torch.equal(out.tokens, naive.tokens) and torch.equal(out.lengths, naive.lengths)
        torch.testing.assert_close(out.logprobs, naive.logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.cuda
@cuda
def test_replayed_steps_do_not_sync():
    models = _cuda_trio()
    ids, mask = (t.cuda() for t in ragged_batch())
    args = _args(models, ids, mask, max_new_tokens=20, cuda_graphs=True, **SAMPLING)
    assert args.cuda_graphs
    step = ProxyStep(*models, args, graphs=True)
    with torch.no_grad():
        step.prefill()
        replay_without_host_syncs(step.advance, 8)  # the steps between two finished checks
    assert step.graph is not None
    assert step.flags() == (False, False)


@pytest.mark.cuda
@cuda
def test_auto_warns_once_and_decodes_eagerly_without_static_support():
    base, _, anti = _cuda_trio()
    expert = tiny_model("llama", 1)
    odd = NoStaticLlama(expert.config)
    odd.load_state_dict(expert.state_dict())
    odd = odd.to("cuda").eval()
    ids, mask = (t.cuda() for t in ragged_batch())
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fused_proxy_generate(base, odd, anti, ids, mask, max_new_tokens=4)
    assert any("NoStaticLlama" in str(w.message) for w in seen)
