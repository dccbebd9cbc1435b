"""The Triton launchers' host path (issue 27): cached launch plans, one-allocation
workspaces and the fast launch (kernels/triton_launch.py).

The fast path only exists for compiled kernels, so besides the interpreter runs here
(results against the reference across plan-cache hits) it is checked in a subprocess
without TRITON_INTERPRET, against a stand-in driver for an sm_90 GPU whose compiled
kernels only record their launches (benchmarks/triton_host_path.py): every fast launch
must go to the kernel Triton itself picks for those arguments, with the arguments
Triton's own path passes.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

from op_cases import random_logits, run

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Where the kernels run: the GPU (compiled, the fast path live) or the interpreter on CPU.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
    reason="the Triton kernels run on CPU only under TRITON_INTERPRET=1")


def _pst():
    from proxykern.kernels import proxy_sample_triton
    return proxy_sample_triton


def _expected(inputs, kwargs):
    """What a call must give: under the interpreter the reference's tokens and status; on a
    GPU (where exp/log may differ from the reference's in the last bit) the bits of the
    same call with no cached plan and Triton's own launches."""
    if DEVICE.type == "cpu":
        return run("torch", *inputs, **kwargs)
    from proxykern.kernels import triton_launch
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(triton_launch, "_context", lambda: None)
        _pst()._cached_plan.cache_clear()
        return run("triton", *inputs, **kwargs)


def test_arg_spec_is_at_least_as_fine_as_tritons():
    """Two arguments with the same spec get the same specialization from Triton's own
    specializer (tensors at every byte offset, integers across Triton's classes)."""
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import GPUTarget
        from triton.compiler import make_backend
        backend = make_backend(GPUTarget("cuda", 90, 32))
    except Exception as exc:  # noqa: BLE001  (an older or newer Triton: nothing to compare)
        pytest.skip(f"Triton's specializer is not reachable here: {exc}")
    from proxykern.kernels.triton_launch import arg_spec
    raw = torch.empty(256, dtype=torch.uint8)
    args = [raw[off:off + 64].view(dtype) for dtype in (torch.float32, torch.bfloat16)
            for off in range(0, 48, 4)]
    args += [torch.empty(8, dtype=torch.int64), torch.empty(8, dtype=torch.int32)]
    ints = [0, 1, 2, 15, 16, 17, 32, 48, 4096, 50257, 128256, -1, -16, 2 ** 31 - 16, 2 ** 31 - 1,
            2 ** 31, 2 ** 31 + 16, -2 ** 31, -2 ** 31 - 1, -2 ** 31 - 16, 2 ** 63 - 1, 2 ** 63,
            2 ** 63 + 16, 2 ** 64 - 1]
    args += ints + [(args[0], args[1]), (args[0], args[2]), (16, 3), (16, 19), (1, 16)]
    seen = {}
    for a in args:
        for specialize in (True, False):
            triton_spec = native_specialize_impl(backend, a, False, specialize, True)
            key = (arg_spec((a,)), specialize)
            assert seen.setdefault(key, triton_spec) == triton_spec, (a, key)


def test_plan_cache_key_holds_everything_the_plan_reads():
    """One prepared plan per (batch, vocabulary, device, config, may_filter, debug), each
    the plan launch_plan makes for exactly those."""
    pst = _pst()
    cpu = torch.device("cpu")
    base = dict(B=2, vocab_size=3000, device=cpu, config=None, may_filter=True, debug=False)
    variants = [dict(), dict(B=3), dict(B=64), dict(vocab_size=3001), dict(may_filter=False),
                dict(debug=True), dict(config=dict(split=False)),
                dict(config=dict(STAGED_ROUNDS=1)), dict(config=dict(split=True, staged=False))]
    plans = []
    for change in variants:
        args = {**base, **change}
        plan = pst.prepared_plan(**args)
        assert plan is pst.prepared_plan(**args)  # cached
        fresh, options = pst.launch_settings(args["B"], args["vocab_size"], cpu, args["config"],
                                             args["may_filter"], args["debug"])
        assert [(k.kernel, k.grid, k.consts) for k in plan.launches] == [
            (k, tuple(g), c) for k, g, c in fresh["kernels"]]
        assert plan.n_seg == fresh["n_seg"] and plan.options == options
        plans.append(plan)
    assert len({id(p) for p in plans}) == len(plans)
    unhashable = pst.prepared_plan(2, 3000, cpu, dict(split=[True]), True)  # built, not cached
    assert unhashable is not pst.prepared_plan(2, 3000, cpu, dict(split=[True]), True)


def test_workspace_layout():
    """Used buffers are disjoint, 16-byte aligned and as large as asked; unused ones are
    the shared stand-in of their dtype."""
    pst = _pst()
    sizes = [(7, torch.float32), (3, torch.int64), (0, torch.float32), (5, torch.int32),
             (9, torch.float32), (0, torch.int32), (0, torch.bfloat16)]
    got = pst.WorkspaceLayout(sizes).allocate(torch.device("cpu"))
    spans = []
    for t, (n, dtype) in zip(got, sizes):
        assert t.dtype == dtype and t.data_ptr() % 16 == 0
        if n:
            assert t.numel() >= n and t.is_contiguous()
            spans.append((t.data_ptr(), t.data_ptr() + n * t.element_size()))
        else:
            assert t is pst.unused_pointer(torch.device("cpu"), dtype)
    spans.sort()
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


@pytest.mark.triton
def test_calls_across_shapes_and_plans_match_the_reference():
    """Cached plans never leak between calls: shapes, plans and parameters alternate and
    every call gives what it must (:func:`_expected`), from the cache or not."""
    small = random_logits(2, 300, torch.float32, seed=3, device=DEVICE)
    wide = random_logits(3, 5000, torch.bfloat16, seed=4, device=DEVICE)
    calls = [
        (small, dict(temperature=0.8, top_p=0.9, seed=1)),
        (wide, dict(temperature=0.8, top_k=20, seed=2)),
        (small, dict()),
        (wide, dict(temperature=1.1, seed=3)),
        (tuple(t[:1] for t in wide), dict(temperature=0.9, top_k=5, top_p=0.8, seed=4)),
        (small, dict(temperature=0.8, top_p=0.9, seed=1)),
        (wide, dict(temperature=0.8, min_p=0.05, seed=5)),
    ]
    wants = [_expected(inputs, kwargs) for inputs, kwargs in calls]
    compared = (0, 3) if DEVICE.type == "cpu" else (0, 1, 2, 3)  # (on a GPU: every bit)
    for _ in range(3):  # the first round builds the plans, the others take them from the cache
        for (inputs, kwargs), want in zip(calls, wants):
            got = run("triton", *inputs, **kwargs)
            assert all(torch.equal(got[i], want[i]) for i in compared), kwargs


@pytest.mark.triton
def test_debug_and_config_calls_keep_their_bits():
    """The same rows through the debug plan, forced plans and the default plan: the same
    bits (a second round takes every plan from the cache)."""
    pst = _pst()
    inputs = random_logits(2, 3000, torch.float32, seed=8, device=DEVICE)
    params = tuple(t.to(DEVICE) for t in (
        torch.full((2,), 1.2), torch.tensor([0.0, 0.9]), torch.tensor([0, 30]),
        torch.tensor([1.0, 0.85]), torch.zeros(2), torch.tensor([5, 6]), torch.tensor([1, 1])))
    first = None
    for _ in range(2):
        for config in (None, dict(split=False), dict(split=True, staged=False)):
            for debug in (False, True):
                got = pst.proxy_sample_triton(*inputs, *params, 3000, config=config, debug=debug)
                first = first or got[:4]
                for a, b in zip(got[:4], first):
                    assert torch.equal(a, b), (config, debug)
                assert len(got) == (5 if debug else 4)


_FAST_PATH_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {bench!r})
    import triton_host_path as thp
    thp.install_stand_ins()
    import torch
    from proxykern import program_ops  # noqa: F401
    from proxykern.kernels import proxy_sample_triton as pst, triton_launch as tlm
    from proxykern.kernels import program_sample_triton as prog
    if not tlm.fast_path_available():
        print("no fast path")
        sys.exit(0)
    Kernel = thp._StandInKernel

    def describe(x):
        if isinstance(x, torch.Tensor):
            return ("tensor", x.dtype, tuple(x.shape), x.data_ptr() % 16)
        if isinstance(x, tuple):
            return tuple(describe(y) for y in x)
        return x

    fast_context = tlm._context

    def record(fn, fast):
        tlm._context = fast_context if fast else (lambda: None)  # None: Triton's own path
        Kernel.log = []
        fn()
        log, Kernel.log = Kernel.log, None
        # (kernel, grid, stream, function, packed metadata, took the fast path, arguments)
        return [(k, a[:3], a[3], a[4], a[5], a[7] is None and a[8] is None,
                 describe(a[9:])) for k, a in log]

    def check(name, fn):
        own = record(fn, False)
        record(fn, True)                  # (the first fast call may have to ask Triton)
        fast = record(fn, True)
        assert own and len(own) == len(fast), name
        for o, f in zip(own, fast):
            assert not o[5] and f[5], (name, "path")
            assert o[:5] == f[:5], (name, o[:5], f[:5])   # the kernel Triton picks
            assert o[6] == f[6], (name, o[6], f[6])       # the arguments Triton passes
        return [o[0] for o in own]

    def params(B, filtered):
        f32, i64 = torch.float32, torch.int64
        return (torch.full((B,), 1.3), torch.full((B,), 0.9 if filtered else 1.0),
                torch.full((B,), 40 if filtered else 0, dtype=i64),
                torch.full((B,), 0.9 if filtered else 1.0), torch.zeros(B),
                torch.arange(B, dtype=i64), torch.full((B,), 2, dtype=i64))

    V = 5000
    wide = [torch.randn(1, V + 1) for _ in range(3)]
    aligned = [t[:, :V].contiguous() for t in wide]
    misaligned = [t[:, 1:] for t in wide]
    bf16 = [t.to(torch.bfloat16) for t in aligned]
    batch = [torch.randn(64, V) for _ in range(3)]
    kernels = {{}}
    for name, inputs, B, kw in [("staged", aligned, 1, dict(may_filter=True)),
                                ("misaligned", misaligned, 1, dict(may_filter=True)),
                                ("bf16", bf16, 1, dict(may_filter=True)),
                                ("unfiltered", aligned, 1, dict(may_filter=False)),
                                ("debug", aligned, 1, dict(may_filter=True, debug=True)),
                                ("batch", batch, 64, dict(may_filter=True))]:
        p = params(B, kw["may_filter"])
        kernels[name] = check(name, lambda: pst.proxy_sample_triton(*inputs, *p, V, **kw))
    assert len(kernels["staged"]) == 8 and len(kernels["unfiltered"]) == 2
    assert len(kernels["batch"]) == 1
    # Triton specializes on alignment and dtype: other binaries, and the fast path follows.
    assert all(a is not b for a, b in zip(kernels["staged"], kernels["misaligned"]))
    assert all(a is not b for a, b in zip(kernels["staged"], kernels["bf16"]))
    coef = torch.tensor([[1.5, -0.5]])
    lin = check("linear", lambda: prog.program_sample_triton(
        aligned[:2], coef, "linear", 0, torch.tensor([-2.0]), *params(1, True)[1:], V))
    dif = check("difference", lambda: prog.program_sample_triton(
        aligned, coef[:, :1], "difference", -1, None, *params(1, False)[1:], V,
        may_filter=False))
    assert len(lin) == 9 and len(dif) == 2
    print("ok")
""")


def test_fast_launch_picks_tritons_kernel_and_arguments():
    """Compiled (stand-in) kernels: each fast launch goes to the kernel Triton's own path
    picks for the same arguments -- aligned, misaligned, another dtype, other plans, the
    program kernels -- with the same launcher arguments."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    script = _FAST_PATH_SCRIPT.format(bench=str(ROOT / "benchmarks"))
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    if result.stdout.startswith("no fast path"):
        pytest.skip("this Triton has no fast launch path (Triton's own path runs)")
    assert result.stdout.startswith("ok"), result.stdout[-3000:]
