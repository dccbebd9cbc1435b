"""``make gpu-check``: everything a lent GPU should check, as one timed script.

On a machine with a GPU and a preinstalled torch / triton / transformers / pytest (no
network), from the repository root:

    python3 benchmarks/gpu_check.py [--keep-going] [--dry-run] [--out DIR]

Stages, each timed, all logged into gpu-check.log in the output folder (``$GPU_CHECK_OUT``, else
``$OUT`` -- the device tool returns what is written there --, else ``gpu-check-out/``):

  device      the GPU, torch / triton / nvcc / compute-sanitizer versions
  build       ``pip install -e . --no-build-isolation --no-deps --no-index`` against the
              machine's own torch (setup.py builds for the visible GPU's architecture
              unless TORCH_CUDA_ARCH_LIST is set; MAX_JOBS defaults to the core count),
              then checks that the cuda backend loads for this device
  sanitizer   compute-sanitizer memcheck and racecheck over benchmarks/gpu_check_cases.py
              (a handful of small CUDA cases, not the test suite)
  tests       ``pytest -m cuda`` over GPU_CHECK_TESTS (default tests/test_cuda.py, the
              CUDA backend with both kernel variants, tests/test_triton_cuda.py, Triton
              on the GPU against the reference, and tests/test_static_speculative.py, the
              speculative rounds captured as CUDA graphs; GPU_CHECK_TESTS=tests adds the engine's
              GPU tests, ~100 s more), less the sanitizer test (the stage above covers it)
  kernels     the kernel table, bf16, five modes, two input families: ``randn3``
              (randn * 3, vocab {32000, 128256, 151936} x batch {1, 8, 64, 256}) and
              ``lm`` (gpu_check_cases.lm_like_logits: shuffled Zipf-like rows with
              entropies of 1-4 nats; batch {1, 8, 256}); plus the device-to-device copy
              bandwidth. kernel_table.json and kernel_table.md. The A/B of the CUDA
              kernel: cuda_v04@graph (the v0.4 kernel), cuda@graph (v0.5),
              cuda_v06@graph (v0.5 with K2 fused into K1 where the grid is small) and
              cuda_v07@graph (v0.5 with K1's noise pruned after Philox and K2's
              whole-row fallback spread over G blocks a row), all CUDA-graph replays in this one process (the cuda_kernel_variant op
              picks the variant a capture records), with the ratios v04 / v05, v05 / v06
              and v05 / v07, cuda@graph's share of the copy bandwidth, the token agreement
              of v0.5 with v0.4 and with triton per cell, whether v06's and v07's four
              outputs equal v05's bit for bit (a cell where either does not fails the
              stage), how many launches v06 made there and v07's G (cuda_v07_spread with
              the device's SM count; 1: not spread). Also naive, triton and cuda eager
              and naive@graph, triton@graph on randn3 (GPU_CHECK_KERNEL_EXTRA=
              "torch.compile,triton_rowwise" adds those). GPU_CHECK_SLICE_PROBE=1 then
              times K1's three slice widths (PROXYKERN_CUDA_SLICE_EPT), one process each
  generate    benchmarks/bench_generate.py --out DIR $GPU_CHECK_GENERATE_ARGS (default
              "--configs small --new-tokens 64 --naive-tokens 16": naive vs the
              engine eager vs CUDA graphs vs the base's captured step vs the weight-read
              floor), then benchmarks/bench_speculative.py on the shipped trio (bf16),
              a small grid with its own reserved share of the stage

It stops at the first failing stage unless --keep-going (or GPU_CHECK_KEEP_GOING=1), and
prints a summary last (also in summary.json). Budget: a whole run within 7 minutes
(GPU_CHECK_BUDGET_S, default 420): each stage has its own limit (build 110 s, sanitizer
45, tests 70, kernels 130, generate 100: 455 s, more than the budget because stages
rarely use their whole limit), cut to what is left of the budget; a stage that finds
none left is skipped; GPU_CHECK_LIMITS="sanitizer=90,..." overrides single limits.
Measured on an H200 (benchmarks/NOTES.md, v0.4): build 25 s (one kernel variant then;
four now: on the 2-core CPU VM the bf16 unit alone compiled in 16 s before v06, 29 s
before v07 and 35 s with it, the last two one after the other on an idle VM), sanitizer 20 s, tests/test_cuda.py 15 s (all GPU tests 160 s),
kernel table ~140 s for 600 timings, generate (small trio) < 60 s. --dry-run (or
GPU_CHECK_DRY=1) needs no GPU: the GPU stages skip with a reason and the kernel stage
runs a tiny CPU table through the same code, so the plumbing is known to work.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Seconds each stage may take before it is stopped, and the whole run's budget (7 minutes
# on an H200; GPU_CHECK_BUDGET_S overrides): no stage runs past what is left of it.
# GPU_CHECK_LIMITS="sanitizer=90,tests=150" overrides single stages' limits.
STAGE_LIMITS = {"build": 110, "sanitizer": 45, "tests": 70, "kernels": 130, "generate": 100}
for _item in filter(None, os.environ.get("GPU_CHECK_LIMITS", "").split(",")):
    _name, _, _seconds = _item.partition("=")
    if _name.strip() not in STAGE_LIMITS:
        raise SystemExit(f"GPU_CHECK_LIMITS: unknown stage {_name!r} (one of {sorted(STAGE_LIMITS)})")
    try:
        STAGE_LIMITS[_name.strip()] = float(_seconds)
    except ValueError:
        raise SystemExit(f"GPU_CHECK_LIMITS: {_item!r} is not stage=seconds") from None
TOTAL_BUDGET_S = float(os.environ.get("GPU_CHECK_BUDGET_S", "420"))
_T0 = time.monotonic()


def _limit(stage: str) -> float:
    """A stage's time limit: its own, cut to what is left of the whole run's budget."""
    return max(1.0, min(STAGE_LIMITS[stage], TOTAL_BUDGET_S - (time.monotonic() - _T0)))
KERNEL_VOCABS = (32000, 128256, 151936)
KERNEL_BATCHES = (1, 8, 64, 256)
# Input families of the kernel table: name -> (batches, impls beyond the A/B pair).
# "randn3" is v0.4's table; "lm" the LM-like rows (gpu_check_cases.lm_like_logits).
KERNEL_FAMILIES = {
    "randn3": (KERNEL_BATCHES, ("naive", "triton", "cuda", "naive@graph", "triton@graph")),
    "lm": ((1, 8, 256), ("naive@graph",)),
}
# The v0.4 kernel, v0.5, v0.6 (v0.5 with the second launch fused at small grids) and v0.7
# (v0.5 with K1's noise pruned and the whole-row fallback spread over G blocks a row), replayed.
AB_IMPLS = ("cuda_v04@graph", "cuda@graph", "cuda_v06@graph", "cuda_v07@graph")
# The variants that must return v05's four outputs bit for bit (v0.5's arithmetic).
SAME_AS_V05 = ("v06", "v07")
KERNEL_MODES = {
    "plain": dict(temperature=1.0),
    "top_k=50": dict(temperature=1.0, top_k=50),
    "top_p=0.9": dict(temperature=1.0, top_p=0.9),
    "top_k+top_p": dict(temperature=1.0, top_k=50, top_p=0.9),
    "top_p=0.99,T=4": dict(temperature=4.0, top_p=0.99),  # the slow path
}


class Stage:
    def __init__(self, name):
        self.name = name
        self.status = "not run"
        self.detail = ""
        self.seconds = 0.0


def _log_path(out_dir, name):
    """Every stage logs into one file: the device tool returns at most 8 files from $OUT
    (gpu-check.log, summary.json, kernel_table.json/.md, generate.json/.md/.png)."""
    return os.path.join(out_dir, "gpu-check.log")


def run_logged(cmd, log_path, *, timeout, env=None, cwd=ROOT):
    """Runs cmd, its output streamed to stdout and to log_path; returns (rc, tail).

    A timer kills cmd at its deadline, also while it prints nothing (a hang)."""
    tail = []
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env=env, cwd=cwd, bufsize=1, start_new_session=True)
        timed_out = threading.Event()

        def stop():  # the whole group: a grandchild must not keep the pipe open
            timed_out.set()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, stop)
        timer.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:  # ends when the process exits or is killed
                sys.stdout.write(line)
                log.write(line)
                tail = (tail + [line.rstrip()])[-5:]
            rc = proc.wait()
        finally:
            timer.cancel()
        if timed_out.is_set():
            log.write(f"[stopped after {timeout:.0f} s]\n")
            return 124, "; ".join([t for t in tail if t][-2:] + [f"stopped after {timeout:.0f} s"])[-300:]
    return rc, "; ".join(t for t in tail if t)[-300:]


def child_env(**extra):
    # The stages check and time the new kernel (v0.5): the build's default stays v0.4 for
    # users until such a run has checked v0.5 (csrc/cuda_launcher.cpp).
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.setdefault("PROXYKERN_CUDA_KERNEL", "v05")
    env.update(extra)
    return env


# ------------------------------------------------------------------------------ stages

def stage_device(args, out_dir, info):
    import torch
    info["python"] = sys.executable
    info["torch"] = torch.__version__
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError as exc:
        info["triton"] = f"not importable ({exc})"
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    nvcc = nvcc if os.path.exists(nvcc) else shutil.which("nvcc")
    info["nvcc"] = (subprocess.run([nvcc, "--version"], capture_output=True, text=True)
                    .stdout.strip().splitlines()[-1] if nvcc else "not found")
    info["compute_sanitizer"] = shutil.which("compute-sanitizer") or "not found"
    if args.dry_run:
        info["device"] = "none (dry run)"
        return "ok", "dry run: no GPU needed"
    if not torch.cuda.is_available():
        return "failed", "no CUDA device visible to torch (use --dry-run to check the plumbing)"
    props = torch.cuda.get_device_properties(0)
    info["device"] = props.name
    info["capability"] = f"{props.major}.{props.minor}"
    info["sms"] = props.multi_processor_count
    info["l2_bytes"] = getattr(props, "L2_cache_size", None)
    return "ok", f"{props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs"


def stage_build(args, out_dir, info):
    if args.dry_run:
        return "skipped", "dry run (would run: pip install -e . --no-build-isolation --no-deps)"
    # No TORCH_CUDA_ARCH_LIST unless given: setup.py builds for the visible GPU (+PTX).
    env = child_env(MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
    log = _log_path(out_dir, "build")
    rc, tail = run_logged([sys.executable, "-m", "pip", "install", "-e", ".", "--no-build-isolation",
                           "--no-deps", "--no-index", "-v"], log, timeout=_limit("build"), env=env)
    if rc != 0:
        return "failed", f"pip install exited {rc}: {tail}"
    check = ("import torch; from proxykern import ops; "
             "r = ops.backend_unavailable_reason('cuda', torch.device('cuda')); "
             "print('cuda backend:', r or 'available'); raise SystemExit(0 if r is None else 1)")
    rc, tail = run_logged([sys.executable, "-c", check], log, timeout=60, env=env)
    return ("ok", tail) if rc == 0 else ("failed", tail)


def stage_sanitizer(args, out_dir, info):
    script = os.path.join(ROOT, "benchmarks", "gpu_check_cases.py")
    if args.dry_run:  # the cases through the CPU kernel, without the sanitizer
        rc, tail = run_logged([sys.executable, script, "--device", "cpu"], _log_path(out_dir, "sanitizer"),
                              timeout=120, env=child_env())
        if rc != 0:
            return "failed", f"dry run: the cases failed on CPU: {tail}"
        return "skipped", "dry run (needs a GPU and compute-sanitizer); the cases ran on the CPU kernel"
    exe = shutil.which("compute-sanitizer")
    if exe is None:
        return "failed", "compute-sanitizer is not on PATH"
    log = _log_path(out_dir, "sanitizer")
    # Without the caching allocator memcheck sees every allocation's true bounds.
    env = child_env(PYTORCH_NO_CUDA_MEMORY_CACHING="1")
    deadline = time.monotonic() + _limit("sanitizer")
    for tool in ("memcheck", "racecheck"):
        cmd = [exe, "--tool", tool, "--error-exitcode", "1"]
        if tool == "racecheck":  # shared-memory races: only our kernels need the slow checks
            cmd += ["--kernel-name", "kns=proxykern"]
        rc, tail = run_logged(cmd + [sys.executable, script], log,
                              timeout=max(1.0, (deadline - time.monotonic()) / (2 if tool == "memcheck" else 1)),
                              env=env)
        if rc != 0:
            return "failed", f"{tool} exited {rc}: {tail}"
    return "ok", "memcheck and racecheck clean"


#: the tests stage's default: both kernel backends on the GPU, and the captured speculative
#: rounds (tests/test_static_speculative.py's cuda test, a few seconds)
DEFAULT_GPU_TESTS = "tests/test_cuda.py tests/test_triton_cuda.py tests/test_static_speculative.py"


def stage_tests(args, out_dir, info):
    if args.dry_run:
        return "skipped", "dry run (needs a GPU)"
    log = _log_path(out_dir, "tests")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "--durations=12", "-k", "not compute_sanitizer"]
    cmd += (os.environ.get("GPU_CHECK_TESTS", DEFAULT_GPU_TESTS).split()
            + ([] if args.keep_going else ["-x"]))
    rc, tail = run_logged(cmd, log, timeout=_limit("tests"), env=child_env())
    return ("ok" if rc == 0 else "failed"), tail


def stage_generate(args, out_dir, info):
    """The engine's generation table (bench_generate.py), then speculative decoding on the
    shipped trio (bench_speculative.py), within the stage's one time limit."""
    if args.dry_run:
        return "skipped", "dry run (needs a GPU)"
    started = time.monotonic()
    limit = _limit("generate")
    # bench_speculative gets its own share, reserved before bench_generate starts (runs
    # 1-2 of v0.4 gave it what bench_generate left, 26-54 s, and it never finished).
    spec_s = min(SPECULATIVE_RESERVE_S, 0.5 * limit)
    extra = os.environ.get("GPU_CHECK_GENERATE_ARGS",
                           "--configs small --new-tokens 64 --naive-tokens 16").split()
    script = os.path.join(ROOT, "benchmarks", "bench_generate.py")
    rc, tail = run_logged([sys.executable, script, "--out", out_dir] + extra,
                          _log_path(out_dir, "generate"), timeout=max(1.0, limit - spec_s),
                          env=child_env(GPU_CHECK_OUT=out_dir))
    if rc != 0:
        return "failed", tail
    left = limit - (time.monotonic() - started)
    if left < 10:
        return "ok", tail + "\n(speculative benchmark skipped: out of time)"
    spec = os.path.join(ROOT, "benchmarks", "bench_speculative.py")
    # Issue 30's grid where drafting should pay: the trained trio inflated exactly to a
    # 13B-shaped base with 135M-shaped experts, k in {0, 2, 4} (k > 0: the captured static
    # rounds), batch 1 and 8, greedy, 8 prompts of 32 new tokens once after one untimed
    # call per k, and the base alone's captured step (a guess at what fits the share:
    # unmeasured; bench_speculative.py alone runs the whole grid).
    rc, spec_tail = run_logged([sys.executable, spec, "--device", "cuda", "--dtype", "bf16",
                                "--inflate", "trio-13b-small", "--ks", "0", "2", "4",
                                "--batch-sizes", "1", "8", "--modes", "greedy",
                                "--prompts", "8", "--max-new-tokens", "32", "--repeats", "1",
                                "--warmup", "1",
                                "--json", os.path.join(out_dir, "speculative.json")],
                               _log_path(out_dir, "generate"), timeout=int(left),
                               env=child_env(GPU_CHECK_OUT=out_dir))
    return ("ok" if rc == 0 else "failed"), tail + "\n" + spec_tail


# ------------------------------------------------------------------------------ kernel table

def _param_tensors(batch, device, mode, seed):
    import torch
    full = dict(alpha=1.0, temperature=0.0, top_k=0, top_p=1.0, min_p=0.0)
    full.update(mode)
    f32 = dict(dtype=torch.float32, device=device)
    i64 = dict(dtype=torch.int64, device=device)
    return (torch.full((batch,), full["alpha"], **f32), torch.full((batch,), full["temperature"], **f32),
            torch.full((batch,), full["top_k"], **i64), torch.full((batch,), full["top_p"], **f32),
            torch.full((batch,), full["min_p"], **f32), torch.arange(batch, **i64) + seed,
            torch.zeros(batch, **i64))


SPECULATIVE_RESERVE_S = 50.0


def _cases():
    """benchmarks/gpu_check_cases, imported on first use: it imports torch and proxykern,
    which only exist once the build stage has run."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import gpu_check_cases
    return gpu_check_cases


def step_inputs(batch, vocab, device, gen, family="randn3"):
    """One (base, expert, anti) set as the tables time, bf16: ``randn * 3`` logits, or
    (family "lm") LM-like rows (gpu_check_cases.lm_like_logits)."""
    import torch
    if family == "lm":
        return _cases().lm_like_logits(batch, vocab, generator=gen, device=device)
    return tuple((torch.randn(batch, vocab, generator=gen, device=device) * 3).to(torch.bfloat16)
                 for _ in range(3))


def with_variant(variant, fn):
    """fn with the CUDA kernel variant `variant` selected for its calls (and restored):
    a capture inside records that variant's kernels (cuda_kernel_variant op)."""
    import torch

    def call():
        previous = torch.ops.proxykern.cuda_kernel_variant(variant)
        try:
            return fn()
        finally:
            torch.ops.proxykern.cuda_kernel_variant(previous)
    return call


def _timer(device, warmup_ms, rep_ms):
    """median seconds of fn(): triton.testing.do_bench on a GPU (it flushes L2 before every
    call and times with CUDA events), a wall-clock median on CPU."""
    if device.type == "cuda":
        import triton.testing

        def gpu_time(fn):
            return triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median") / 1e3
        return gpu_time

    def cpu_time(fn):
        fn()
        samples = []
        start = time.perf_counter()
        while len(samples) < 3 or (time.perf_counter() - start < rep_ms / 1e3 and len(samples) < 50):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        samples.sort()
        return samples[len(samples) // 2]
    return cpu_time


GRAPH_SUFFIX = "@graph"  # an impl timed as a CUDA-graph replay: "naive@graph", "cuda@graph"


def copy_bandwidth(device, timer, nbytes):
    import torch
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * nbytes / seconds / 1e9  # bytes read + bytes written


def _agreement(a, b):
    return float((a.cpu() == b.cpu()).float().mean())


def kernel_table(device, *, vocabs, families, modes, budget_s, warmup_ms, rep_ms,
                 compile_budget_s=90.0, log=print):
    """Rows of {family, vocab, batch, mode, impl, us, gbps, speedup_vs_naive}; families maps
    an input family to (batches, impls). Stops measuring (rows marked 'skipped: time
    budget') once budget_s is spent, and torch.compile once its compilations (about two a
    mode: batch 1 is specialized) took compile_budget_s. The cuda@graph rows also hold the
    token agreement of the default kernel with v0.4 (agree_v04) and triton (agree_triton),
    v0.6's and v0.7's bitwise equality with it (v06_equal, v07_equal), v0.6's launch count
    (v06_launches) and v0.7's spread (v07_spread)."""
    import torch

    from proxykern import ops
    from proxykern.apps.bench import graph_replay, naive_sample_step

    timer = _timer(device, warmup_ms, rep_ms)
    t_start = time.monotonic()
    l2 = 0
    if device.type == "cuda":
        l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or (50 << 20)
    def compile_step(mode, dynamic):
        return torch.compile(lambda b, e, a: naive_sample_step(b, e, a, **mode), dynamic=dynamic)

    compiled = {}
    static_modes = set()  # modes whose dynamic-shape compilation failed
    compile_s = {}  # first-call seconds of each torch.compile case
    rows = []
    all_batches = sorted({b for batches, _ in families.values() for b in batches})
    for vocab in vocabs:
        any_rowwise = any("triton_rowwise" in impls for _, impls in families.values())
        tri_cfg = ops._triton_kernels().default_config(device, vocab) if any_rowwise else None
        # Families interleaved per shape: a run cut short by its budget loses the largest
        # shapes of both, not a whole family.
        for batch in all_batches:
            for family, (batches, impls) in families.items():
                if batch not in batches:
                    continue
                set_bytes = 3 * batch * vocab * 2
                # Rotate through copies whose total passes 2x the L2 (do_bench flushes L2 too).
                copies = max(1, min(8, math.ceil(2 * l2 / set_bytes))) if l2 else 1
                gen = torch.Generator(device=device).manual_seed(batch * 31 + vocab)
                sets = [step_inputs(batch, vocab, device, gen, family) for _ in range(copies)]
                for mode_name, mode in modes.items():
                    rows += _time_cell(
                        device, family, vocab, batch, mode_name, mode, impls, sets, set_bytes,
                        timer=timer, t_start=t_start, budget_s=budget_s, tri_cfg=tri_cfg,
                        compiled=compiled, static_modes=static_modes, compile_s=compile_s,
                        compile_step=compile_step, compile_budget_s=compile_budget_s, log=log,
                        ops=ops, graph_replay=graph_replay, naive_sample_step=naive_sample_step)
                sets = None
    return rows


def _time_cell(device, family, vocab, batch, mode_name, mode, impls, sets, set_bytes, *, timer,
               t_start, budget_s, tri_cfg, compiled, static_modes, compile_s, compile_step,
               compile_budget_s, log, ops, graph_replay, naive_sample_step):
    """The rows of one (family, vocab, batch, mode) cell, one per impl."""
    import torch
    copies = len(sets)
    params = _param_tensors(batch, device, mode, seed=7)
    counter = [0]

    def nxt():
        counter[0] = (counter[0] + 1) % copies
        return sets[counter[0]]

    def make(impl):
        """The eager call of impl (no @graph suffix), or None when it does not apply."""
        if impl == "naive":
            return lambda m=mode: naive_sample_step(*nxt(), **m)
        if impl == "torch.compile":
            # Dynamic shapes (one compilation a mode) unless Inductor failed on this mode
            # before: then static shapes, one compilation a shape.
            dynamic = mode_name not in static_modes
            key = mode_name if dynamic else (mode_name, vocab, batch)
            if key not in compiled:
                compiled[key] = compile_step(mode, dynamic)
            return lambda c=compiled[key]: c(*nxt())
        if impl == "triton":
            tri = ops._triton_kernels().proxy_sample_triton
            # (the op's launch hint, as proxy_sample gives it)
            return lambda p=params, t=tri, f=ops.may_filter(mode, vocab): t(*nxt(), *p, vocab, may_filter=f)
        if impl == "triton_rowwise":  # small batch: one program per row instead
            if batch > tri_cfg["SPLIT_MAX_BATCH"]:  # (there it is what "triton" runs)
                return None
            tri = ops._triton_kernels().proxy_sample_triton
            return lambda p=params, t=tri: t(*nxt(), *p, vocab, config=dict(split=False))
        if impl in ("cuda", "cpu"):  # the process's default kernel (v0.5 unless overridden)
            return lambda p=params: torch.ops.proxykern.fused_sample(*nxt(), *p, vocab)
        if impl in ("cuda_v04", "cuda_v05", "cuda_v06", "cuda_v07"):  # one variant, pinned
            return with_variant(impl[len("cuda_"):],
                                lambda p=params: torch.ops.proxykern.fused_sample(*nxt(), *p, vocab))
        if impl == "torch":
            return lambda p=params: ops.reference.proxy_sample_reference(*nxt(), *p, vocab)
        raise ValueError(f"unknown impl {impl!r}")

    fns = {}
    for impl in impls:
        if impl.endswith(GRAPH_SUFFIX):
            # "x@graph": x's call captured once, then replayed; "cuda@graph" is pinned to
            # v0.5 (its A/B partners cuda_v04@graph, cuda_v06@graph and cuda_v07@graph to
            # v0.4, v0.6 and v0.7) whatever the process default.
            base = impl[:-len(GRAPH_SUFFIX)]
            eager = make("cuda_v05" if base == "cuda" else base)
            if eager is not None:
                fns[impl] = lambda f=eager: graph_replay(f)
        else:
            eager = make(impl)
            if eager is not None:
                fns[impl] = eager
    rows = []
    naive_s = {}
    for impl, fn in fns.items():
        row = dict(family=family, vocab=vocab, batch=batch, mode=mode_name, impl=impl)
        if time.monotonic() - t_start > budget_s:
            row["error"] = "skipped: time budget"
            rows.append(row)
            continue
        if impl == "torch.compile" and sum(compile_s.values()) > compile_budget_s:
            row["error"] = "skipped: compile budget"
            rows.append(row)
            continue
        try:
            if impl == "torch.compile":  # the first call compiles (or recompiles)
                t0 = time.monotonic()
                try:
                    fn()
                except Exception as exc:  # an Inductor bug with dynamic shapes
                    if mode_name in static_modes:
                        raise
                    static_modes.add(mode_name)
                    row["note"] = (f"dynamic=True failed ({type(exc).__name__}: "
                                   f"{str(exc)[:120]}); static shapes")
                    log(f"  torch.compile {mode_name}: {row['note']}")
                    compiled[(mode_name, vocab, batch)] = static = compile_step(mode, dynamic=False)
                    fn = lambda c=static: c(*nxt())  # noqa: E731
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                compile_s[(mode_name, vocab, batch)] = time.monotonic() - t0
                row["first_call_s"] = round(compile_s[(mode_name, vocab, batch)], 2)
                row["dynamic"] = mode_name not in static_modes
            if impl.endswith(GRAPH_SUFFIX):
                fn = fn()  # capture (warm-up call first, inside graph_replay)
            seconds = timer(fn)
        except Exception as exc:  # one broken impl must not hide the others
            row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            log(f"  {family} {vocab}x{batch} {mode_name} {impl}: {row['error']}")
            continue
        # Eager impls against the eager naive step, replays against its replay.
        naive_key = "naive" + (GRAPH_SUFFIX if impl.endswith(GRAPH_SUFFIX) else "")
        if impl == naive_key:
            naive_s[impl] = seconds
        ref_s = naive_s.get(naive_key)
        row.update(us=seconds * 1e6, gbps=set_bytes / seconds / 1e9,
                   speedup_vs_naive=(ref_s / seconds) if ref_s else None)
        if impl == "cuda" + GRAPH_SUFFIX:
            row.update(_cell_agreement(sets[0], params, vocab, mode, ops, log))
        rows.append(row)
        log(f"  {family} {vocab}x{batch} {mode_name} {impl}: {row['us']:.1f} us"
            + (f" ({row['speedup_vs_naive']:.1f}x {naive_key})" if impl != naive_key and ref_s else ""))
    return rows


def _cell_agreement(inputs, params, vocab, mode, ops, log):
    """Token agreement of the v0.5 kernel with v0.4 and with triton on one input set;
    whether v0.6 and v0.7 return v0.5's four outputs bit for bit (v06_equal, v07_equal);
    in how many launches v0.6 ran (v06_launches: 1 where it fuses K2 into K1) and over how
    many blocks v0.7 spreads a row's fallback (v07_spread: 1, not spread). The table's
    inputs are contiguous bf16 rows (16-byte aligned at its vocabularies): the plans of
    the vector loaders."""
    import torch
    same_bits = _cases().same_bits  # torch.equal finds NaN != NaN
    out = {}
    try:
        call = lambda: torch.ops.proxykern.fused_sample(*inputs, *params, vocab)  # noqa: E731
        outputs = with_variant("v05", call)()
        new = outputs[0]
        out["agree_v04"] = _agreement(new, with_variant("v04", call)()[0])
        for variant in SAME_AS_V05:
            pairs = zip(outputs, with_variant(variant, call)())
            out[f"{variant}_equal"] = all(same_bits(a, b) for a, b in pairs)
        batch = inputs[0].shape[0]
        out["v06_launches"] = 1 if torch.ops.proxykern.cuda_v06_one_launch(batch, vocab) else 2
        sms = torch.cuda.get_device_properties(inputs[0].device).multi_processor_count
        out["v07_spread"] = torch.ops.proxykern.cuda_v07_spread(batch, vocab, sms)
        if ops.backend_unavailable_reason("triton", inputs[0].device) is None:
            tri = ops._triton_kernels().proxy_sample_triton(
                *inputs, *params, vocab, may_filter=ops.may_filter(mode, vocab))[0]
            out["agree_triton"] = _agreement(new, tri)
    except Exception as exc:  # reported, never fatal: the timings stand on their own
        out["agree_error"] = f"{type(exc).__name__}: {str(exc)[:120]}"
        log(f"  agreement: {out['agree_error']}")
    return out


def table_markdown(rows, impls, header_lines, copy_gbps=None):
    lines = list(header_lines)
    if any(r.get("dynamic") is False for r in rows):
        lines.append("* torch.compile with static shapes: Inductor failed on this mode with "
                     "dynamic shapes")
    ab = all(i in impls for i in AB_IMPLS)
    lines.append("")
    cols = " | ".join(f"{i} us" for i in impls)
    ratio_cols = [i for i in impls if i not in ("naive", "naive" + GRAPH_SUFFIX)]
    extra = (["v04 / v05 (A/B)", "v05 / v06 (A/B)", "v05 / v07 (A/B)", "cuda@graph % copy", "agree v04",
              "agree triton", "v06 == v05 (bits)", "v06 launches", "v07 == v05 (bits)", "v07 spread"]
             if ab else [])
    lines.append(f"| inputs | vocab | batch | mode | {cols} | "
                 + " | ".join([f"{i} vs naive" for i in ratio_cols] + extra) + " |")
    lines.append("|" + "---|" * (4 + len(impls) + len(ratio_cols) + len(extra)))
    keyed = {}
    for r in rows:
        keyed.setdefault((r.get("family", "randn3"), r["vocab"], r["batch"], r["mode"]), {})[r["impl"]] = r
    for (family, vocab, batch, mode), by_impl in keyed.items():
        def cell(i):
            r = by_impl.get(i)
            if r is None:
                return "-"
            if "us" not in r:
                return r.get("error", "-").split(":")[0]
            return f"{r['us']:.1f}" + ("*" if r.get("dynamic") is False else "")

        def ratio(i):
            r = by_impl.get(i)
            n = by_impl.get("naive" + (GRAPH_SUFFIX if i.endswith(GRAPH_SUFFIX) else ""))
            if not r or not n or "us" not in r or "us" not in n:
                return "-"
            return f"{n['us'] / r['us']:.1f}x"

        def ab_cells():
            old, new, fused, spread = (by_impl.get(i, {}) for i in AB_IMPLS)

            def speedup(a, b):  # a's time over b's: > 1 where b is faster
                return f"{a['us'] / b['us']:.2f}x" if "us" in a and "us" in b else "-"

            def bits(variant):
                key = f"{variant}_equal"
                return ("yes" if new[key] else "NO") if key in new else "-"
            out = [speedup(old, new), speedup(new, fused), speedup(new, spread),
                   f"{100 * new['gbps'] / copy_gbps:.0f}%" if "gbps" in new and copy_gbps else "-"]
            out += [f"{new[k]:.3f}" if k in new else "-" for k in ("agree_v04", "agree_triton")]
            out += [bits("v06"), str(new.get("v06_launches", "-")),
                    bits("v07"), str(new.get("v07_spread", "-"))]
            return out
        lines.append(f"| {family} | {vocab} | {batch} | {mode} | " + " | ".join(cell(i) for i in impls) + " | "
                     + " | ".join([ratio(i) for i in ratio_cols] + (ab_cells() if ab else [])) + " |")
    return "\n".join(lines) + "\n"


SLICE_PROBE_EPTS = (4, 8, 16)  # K1's elements per thread: slices of 1024 / 2048 / 4096 columns
SLICE_PROBE_SHAPES = [(v, b) for v in (32000, 128256) for b in (1, 8, 64, 256)]
SLICE_PROBE_MODES = ("plain", "top_p=0.9")


def slice_probe(args) -> int:
    """The cuda op's graph-replay time per shape at this process's slice width
    (PROXYKERN_CUDA_SLICE_EPT, read once by the op); one JSON line a shape."""
    import torch

    from proxykern import ops
    from proxykern.apps.bench import graph_replay
    reason = ops.backend_unavailable_reason("cuda", torch.device("cuda"))  # loads the extension
    if reason is not None:
        print(f"slice probe: the cuda backend is unavailable: {reason}", flush=True)
        return 1
    timer = _timer(torch.device("cuda"), 5, 25)
    for vocab, batch in SLICE_PROBE_SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(batch * 31 + vocab)
        inputs = step_inputs(batch, vocab, torch.device("cuda"), gen)
        for mode in SLICE_PROBE_MODES:
            params = _param_tensors(batch, torch.device("cuda"), KERNEL_MODES[mode], seed=7)
            row = dict(ept=int(os.environ.get("PROXYKERN_CUDA_SLICE_EPT", "0")), vocab=vocab,
                       batch=batch, mode=mode)
            try:
                replay = graph_replay(lambda: torch.ops.proxykern.fused_sample(*inputs, *params, vocab))
                row["us"] = timer(replay) * 1e6
            except Exception as exc:
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            print("SLICE-PROBE " + json.dumps(row), flush=True)
    return 0


def run_slice_probe(out_dir, seconds) -> list:
    """slice_probe in one process per width (the override is read once per process)."""
    rows = []
    deadline = time.monotonic() + seconds
    log = _log_path(out_dir, "kernels")
    start_at = os.path.getsize(log) if os.path.exists(log) else 0
    for ept in SLICE_PROBE_EPTS:
        left = deadline - time.monotonic()
        if left < 5:
            break
        cmd = [sys.executable, os.path.abspath(__file__), "--slice-probe"]
        run_logged(cmd, log, timeout=left, env=child_env(PROXYKERN_CUDA_SLICE_EPT=str(ept)))
    with open(log) as f:  # the probe's lines, written to the log since it started
        f.seek(start_at)
        for line in f:
            if line.startswith("SLICE-PROBE "):
                rows.append(json.loads(line[len("SLICE-PROBE "):]))
    return rows


def slice_probe_markdown(rows) -> str:
    lines = ["", "## CUDA slice width (graph replay, us; cuda_sample.h picks the width from the "
             "vocabulary: 1024 columns up to 260096)", "",
             "| vocab | batch | mode | " + " | ".join(f"{256 * e} cols" for e in SLICE_PROBE_EPTS) + " |",
             "|" + "---|" * (3 + len(SLICE_PROBE_EPTS))]
    keyed = {}
    for r in rows:
        keyed.setdefault((r["vocab"], r["batch"], r["mode"]), {})[r["ept"]] = r
    for (vocab, batch, mode), by_ept in keyed.items():
        cells = [f"{by_ept[e]['us']:.1f}" if "us" in by_ept.get(e, {}) else "-" for e in SLICE_PROBE_EPTS]
        lines.append(f"| {vocab} | {batch} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def stage_kernels(args, out_dir, info):
    # In a fresh interpreter: this one started before the build installed the package.
    limit = _limit("kernels")
    started = time.monotonic()
    # The slice probe (v0.4 measured it; rerun after K1 changes): GPU_CHECK_SLICE_PROBE=1.
    probe = not args.dry_run and os.environ.get("GPU_CHECK_SLICE_PROBE") == "1"
    probe_s = min(45.0, 0.2 * limit) if probe else 0.0
    cmd = [sys.executable, os.path.abspath(__file__), "--kernels-stage", "--out", out_dir,
           "--measure-s", str(max(10.0, limit - 25 - probe_s))]
    if args.dry_run:
        cmd.append("--dry-run")
    rc, tail = run_logged(cmd, _log_path(out_dir, "kernels"), timeout=max(1.0, limit - probe_s),
                          env=child_env())
    table_json = os.path.join(out_dir, "kernel_table.json")
    try:
        with open(table_json) as f:
            table = json.load(f)
        detail = table["detail"]
    except (OSError, ValueError, KeyError):
        table, detail = None, tail
    left = limit - (time.monotonic() - started)
    has_cuda = table is not None and any(r.get("impl") == "cuda" for r in table.get("rows", []))
    if has_cuda and probe_s and left > 10:
        probe = run_slice_probe(out_dir, left - 2)
        table["slice_probe"] = probe
        with open(table_json, "w") as f:
            json.dump(table, f, indent=1)
        with open(os.path.join(out_dir, "kernel_table.md"), "a") as f:
            f.write(slice_probe_markdown(probe))
        print(slice_probe_markdown(probe))
        detail += f"; slice probe {sum('us' in r for r in probe)} timings"
    return ("ok" if rc == 0 else "failed"), detail


def kernels_stage(args, out_dir) -> int:
    """The kernel table (run by stage_kernels in its own process); exit 1 on any error."""
    import torch
    from proxykern import ops
    info = dict(torch=torch.__version__)
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not importable"
    info["device"] = torch.cuda.get_device_name(0) if not args.dry_run else "cpu (dry run)"
    if args.dry_run:  # the same code on the CPU kernel: both families, tiny shapes
        device = torch.device("cpu")
        impls = ["naive"] + [b for b in ("cpu",) if ops.backend_unavailable_reason(b, device) is None]
        vocabs = (1000,)
        families = {"randn3": ((1, 2), impls), "lm": ((2,), impls)}
        modes = {k: KERNEL_MODES[k] for k in ("plain", "top_k+top_p")}
        budget, warmup, rep = 20.0, 1, 20
        bw_bytes = 16 << 20
    else:
        device = torch.device("cuda")
        extra = [i for i in os.environ.get("GPU_CHECK_KERNEL_EXTRA", "").split(",") if i]
        have = {b for b in ("triton", "cuda") if ops.backend_unavailable_reason(b, device) is None}

        def usable(impl):
            base = impl[:-len(GRAPH_SUFFIX)] if impl.endswith(GRAPH_SUFFIX) else impl
            return base.split("_")[0] not in ("triton", "cuda") or base.split("_")[0] in have
        families = {}
        for family, (batches, base_impls) in KERNEL_FAMILIES.items():
            impls = [i for i in list(base_impls) + (extra if family == "randn3" else []) + list(AB_IMPLS)
                     if usable(i)]
            families[family] = (batches, impls)
        vocabs, modes = KERNEL_VOCABS, KERNEL_MODES
        budget, warmup, rep = args.measure_s, 5, 20
        bw_bytes = 1 << 30
    def log(msg):
        print(msg, flush=True)

    timer = _timer(device, warmup, rep)
    bw = copy_bandwidth(device, timer, bw_bytes)
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write, {bw_bytes >> 20} MiB)")
    # torch.compile's compilations may take at most 40% of the stage's measuring time.
    rows = kernel_table(device, vocabs=vocabs, families=families, modes=modes,
                        budget_s=budget, warmup_ms=warmup, rep_ms=rep,
                        compile_budget_s=min(90.0, 0.4 * budget), log=log)
    name = info["device"]
    header = [f"# Kernel table: {name}",
              f"torch {info.get('torch')}, triton {info.get('triton')}; bf16 inputs; median of "
              f"{'triton.testing.do_bench (L2 flushed before each call)' if device.type == 'cuda' else 'wall-clock'}; "
              f"naive step measured in the same run; x{GRAPH_SUFFIX}: x captured in a CUDA graph "
              f"and replayed (no launch costs), its ratio against naive{GRAPH_SUFFIX}; "
              f"cuda_v04@graph: the v0.4 kernel, cuda@graph: v0.5, cuda_v06@graph: v0.5 with K2 fused "
              f"into K1 where v06 launches = 1, cuda_v07@graph: v0.5 with K1's noise pruned after "
              f"Philox (every sampled row) and K2's whole-row fallback spread over G = v07 spread "
              f"blocks a row (1: not spread; only rows that take the fallback, e.g. "
              f"top_p=0.99,T=4, use it) (same process); inputs randn3 = "
              f"randn * 3, lm = LM-like rows (entropy 1-4 nats)",
              f"device-to-device copy: {bw:.0f} GB/s (read + write)"]
    impls = []
    for _, family_impls in families.values():
        impls += [i for i in family_impls if i not in impls]
    measured = sum(1 for r in rows if "us" in r)
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped")]
    # A baseline that fails (an Inductor bug, say) is reported; only our backends fail the stage.
    errors = [r for r in failed if r["impl"] not in ("naive", "torch.compile", "naive" + GRAPH_SUFFIX)]
    # v06 and v07 must return v05's bits: a cell where one does not fails the stage.
    differs = differs_from_v05(rows)
    for line in differs:
        log(f"  {line}")
    skipped = sum(1 for r in rows if r.get("error", "").startswith("skipped"))
    detail = (f"{measured} timings, {skipped} skipped for time, {len(errors)} errors"
              f"{f', {len(failed) - len(errors)} baseline errors' if len(failed) > len(errors) else ''}"
              f"{f', v06 or v07 != v05 {len(differs)} times' if differs else ''}"
              f"; copy {bw:.0f} GB/s")
    with open(os.path.join(out_dir, "kernel_table.json"), "w") as f:
        json.dump(dict(device=name, copy_gbps=bw, info=info, detail=detail, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "kernel_table.md"), "w") as f:
        f.write(table_markdown(rows, impls, header, bw))
    print(table_markdown(rows, impls, header, bw))
    return 1 if errors or differs else 0


def differs_from_v05(rows) -> list:
    """One line per (cell, variant) whose four outputs were not v05's bits (the cuda@graph
    rows' v06_equal / v07_equal): each fails the kernels stage."""
    return [f"{v} != v05: {r.get('family')} {r['vocab']}x{r['batch']} {r['mode']}"
            for r in rows for v in SAME_AS_V05 if r.get(f"{v}_equal") is False]


STAGES = [("device", stage_device), ("build", stage_build), ("sanitizer", stage_sanitizer),
          ("tests", stage_tests), ("kernels", stage_kernels), ("generate", stage_generate)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                        help="no GPU: GPU stages skip, a tiny CPU table checks the plumbing")
    parser.add_argument("--keep-going", action="store_true",
                        default=os.environ.get("GPU_CHECK_KEEP_GOING") == "1",
                        help="run every stage even after one fails")
    parser.add_argument("--only", nargs="+", choices=[n for n, _ in STAGES],
                        help="run only these stages (device always runs)")
    parser.add_argument("--kernels-stage", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slice-probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--measure-s", type=float, default=170.0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT") or os.environ.get("OUT")
                        or os.path.join(ROOT, "gpu-check-out"))
    args = parser.parse_args(argv)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    os.chdir(ROOT)
    if args.kernels_stage:
        return kernels_stage(args, out_dir)
    if args.slice_probe:
        return slice_probe(args)
    info: dict = {}
    stages = [Stage(n) for n, _ in STAGES]
    t_all = time.monotonic()
    failed = False
    for stage, (name, fn) in zip(stages, STAGES):
        if args.only and name != "device" and name not in args.only:
            stage.status, stage.detail = "skipped", "not selected (--only)"
            continue
        if failed and not args.keep_going:
            stage.status, stage.detail = "not run", "an earlier stage failed"
            continue
        if name != "device" and time.monotonic() - _T0 > TOTAL_BUDGET_S - 5:
            stage.status, stage.detail = "skipped", f"out of time (budget {TOTAL_BUDGET_S:.0f} s)"
            continue
        print(f"\n=== gpu-check: {name} ===", flush=True)
        t0 = time.monotonic()
        try:
            stage.status, stage.detail = fn(args, out_dir, info)
        except Exception as exc:  # a crash in a stage is that stage's failure
            stage.status, stage.detail = "failed", f"{type(exc).__name__}: {exc}"
        stage.seconds = time.monotonic() - t0
        print(f"--- {name}: {stage.status} in {stage.seconds:.1f} s: {stage.detail}", flush=True)
        failed |= stage.status == "failed"
    total = time.monotonic() - t_all
    summary = dict(device=info.get("device"), info=info, dry_run=args.dry_run, total_s=round(total, 1),
                   stages=[dict(name=s.name, status=s.status, seconds=round(s.seconds, 1), detail=s.detail)
                           for s in stages])
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"\n=== gpu-check summary ({info.get('device')}; {'dry run; ' if args.dry_run else ''}"
          f"logs in {out_dir}) ===")
    for s in stages:
        print(f"  {s.name:<10} {s.status:<8} {s.seconds:6.1f} s  {s.detail}")
    print(f"  {'total':<10} {'FAILED' if failed else 'ok':<8} {total:6.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
