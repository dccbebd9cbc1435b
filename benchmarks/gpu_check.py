"""``make gpu-check``: everything a lent GPU should check, as one timed script.

On a machine with a GPU and a preinstalled torch / triton / transformers / pytest (no
network), from the repository root:

    python3 benchmarks/gpu_check.py [--keep-going] [--dry-run] [--out DIR]

Stages, each timed, all logged into gpu-check.log in the output folder (``$GPU_CHECK_OUT``, else
``$OUT`` -- the device tool returns what is written there --, else ``gpu-check-out/``):

  device      the GPU, torch / triton / nvcc / compute-sanitizer versions
  build       ``pip install -e . --no-build-isolation --no-deps --no-index`` against the
              machine's own torch (TORCH_CUDA_ARCH_LIST defaults to 9.0, MAX_JOBS to the
              core count), then checks that the cuda backend loads for this device
  sanitizer   compute-sanitizer memcheck and racecheck over benchmarks/gpu_check_cases.py
              (a handful of small CUDA cases, not the test suite)
  tests       ``pytest -m cuda``: tests/test_cuda.py (the CUDA backend) and
              tests/test_triton_cuda.py (Triton on the GPU against the reference), the
              engine's GPU tests, less the sanitizer test (the stage above covers it);
              GPU_CHECK_TESTS="tests/test_cuda.py" narrows the paths
  kernels     the kernel table: naive step, torch.compile of it, triton, cuda over vocab
              {32000, 128256, 151936} x batch {1, 8, 64, 256}, bf16, five modes; plus the
              device-to-device copy bandwidth. kernel_table.json and kernel_table.md.
              At batch <= 16 also triton_rowwise (one program per row: no split, no
              staged search), to choose the Triton launches per shape; naive, triton and
              cuda also as CUDA-graph replays (x@graph: no launch costs). Then the slice
              probe: the cuda op at K1's three slice widths (PROXYKERN_CUDA_SLICE_EPT), one
              process each, appended to both files
  generate    benchmarks/bench_generate.py --out DIR $GPU_CHECK_GENERATE_ARGS (default
              "--configs small,paper --new-tokens 64 --naive-tokens 16": naive vs the
              engine eager vs CUDA graphs vs the base's captured step vs the weight-read
              floor), then benchmarks/bench_speculative.py on the shipped trio (bf16)

It stops at the first failing stage unless --keep-going (or GPU_CHECK_KEEP_GOING=1), and
prints a summary last (also in summary.json). Budget: a whole run within 7 minutes
(GPU_CHECK_BUDGET_S, default 420): each stage has its own limit (build 240 s, sanitizer
150, tests 240, kernels 210, generate 240), cut to what is left of the budget; a stage
that finds none left is skipped; GPU_CHECK_LIMITS="sanitizer=90,..." overrides single limits.
Measured on an H200 (benchmarks/NOTES.md, v0.4): build 25 s, sanitizer 20 s, tests 160 s
(tests/test_cuda.py alone 15 s), kernels 85 s plus the slice probe (K1's three slice
widths timed side by side, ~15 s), generate ~70 s (small + paper) before bench_speculative. --dry-run (or
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
STAGE_LIMITS = {"build": 240, "sanitizer": 150, "tests": 240, "kernels": 210, "generate": 240}
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
    env = dict(os.environ, PYTHONUNBUFFERED="1")
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
    env = child_env(TORCH_CUDA_ARCH_LIST=os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0"),
                    MAX_JOBS=os.environ.get("MAX_JOBS", str(os.cpu_count() or 4)))
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


def stage_tests(args, out_dir, info):
    if args.dry_run:
        return "skipped", "dry run (needs a GPU)"
    log = _log_path(out_dir, "tests")
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider",
           "--durations=12", "-k", "not compute_sanitizer"]
    cmd += os.environ.get("GPU_CHECK_TESTS", "tests").split() + ([] if args.keep_going else ["-x"])
    rc, tail = run_logged(cmd, log, timeout=_limit("tests"), env=child_env())
    return ("ok" if rc == 0 else "failed"), tail


def stage_generate(args, out_dir, info):
    """The engine's generation table (bench_generate.py), then speculative decoding on the
    shipped trio (bench_speculative.py), within the stage's one time limit."""
    if args.dry_run:
        return "skipped", "dry run (needs a GPU)"
    started = time.monotonic()
    extra = os.environ.get("GPU_CHECK_GENERATE_ARGS",
                           "--configs small,paper --new-tokens 64 --naive-tokens 16").split()
    script = os.path.join(ROOT, "benchmarks", "bench_generate.py")
    rc, tail = run_logged([sys.executable, script, "--out", out_dir] + extra,
                          _log_path(out_dir, "generate"), timeout=_limit("generate"),
                          env=child_env(GPU_CHECK_OUT=out_dir))
    if rc != 0:
        return "failed", tail
    left = _limit("generate") - (time.monotonic() - started)
    if left < 20:
        return "ok", tail + "\n(speculative benchmark skipped: out of time)"
    spec = os.path.join(ROOT, "benchmarks", "bench_speculative.py")
    # Sized to what is left of the stage (runs 1-2 on an H200 got 26-54 s: the full default
    # grid, 16 lines of 32 prompts x 3 repeats, never finished); bench_speculative.py alone
    # runs the whole grid.
    rc, spec_tail = run_logged([sys.executable, spec, "--device", "cuda", "--dtype", "bf16",
                                "--ks", "0", "2", "4", "--batch-sizes", "1", "16",
                                "--prompts", "16", "--repeats", "1", "--json",
                                os.path.join(out_dir, "speculative.json")],
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


def step_inputs(batch, vocab, device, gen):
    """One (base, expert, anti) set as every table times: bf16 ``randn * 3`` logits."""
    import torch
    return tuple((torch.randn(batch, vocab, generator=gen, device=device) * 3).to(torch.bfloat16)
                 for _ in range(3))


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


def kernel_table(device, *, vocabs, batches, modes, impls, budget_s, warmup_ms, rep_ms,
                 compile_budget_s=90.0, log=print):
    """Rows of {vocab, batch, mode, impl, us, gbps, speedup_vs_naive}; stops measuring
    (rows marked 'skipped: time budget') once budget_s is spent, and torch.compile once
    its compilations (about two a mode: batch 1 is specialized) took compile_budget_s."""
    import torch

    from proxykern import ops
    from proxykern.bench import graph_replay, naive_sample_step

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
    for vocab in vocabs:
        tri_cfg = (ops._triton_kernels().default_config(device, vocab)
                   if "triton_rowwise" in impls else None)
        for batch in batches:
            set_bytes = 3 * batch * vocab * 2
            # Rotate through copies whose total passes 2x the L2 (do_bench flushes L2 too).
            copies = max(1, min(8, math.ceil(2 * l2 / set_bytes))) if l2 else 1
            gen = torch.Generator(device=device).manual_seed(batch * 31 + vocab)
            sets = [step_inputs(batch, vocab, device, gen) for _ in range(copies)]
            for mode_name, mode in modes.items():
                params = _param_tensors(batch, device, mode, seed=7)
                counter = [0]

                def nxt():
                    counter[0] = (counter[0] + 1) % copies
                    return sets[counter[0]]

                fns = {}
                for impl in impls:
                    if impl == "naive":
                        fns[impl] = lambda m=mode: naive_sample_step(*nxt(), **m)
                    elif impl == "torch.compile":
                        # Dynamic shapes (one compilation a mode) unless Inductor failed on
                        # this mode before: then static shapes, one compilation a shape.
                        dynamic = mode_name not in static_modes
                        key = mode_name if dynamic else (mode_name, vocab, batch)
                        if key not in compiled:
                            compiled[key] = compile_step(mode, dynamic)
                        fns[impl] = lambda c=compiled[key]: c(*nxt())
                    elif impl == "triton":
                        tri = ops._triton_kernels().proxy_sample_triton
                        # (the op's launch hint, as proxy_sample gives it)
                        fns[impl] = lambda p=params, t=tri, f=ops.may_filter(mode, vocab): t(
                            *nxt(), *p, vocab, may_filter=f)
                    elif impl == "triton_rowwise":  # small batch: one program per row instead
                        if batch > tri_cfg["SPLIT_MAX_BATCH"]:  # (there it is what "triton" runs)
                            continue
                        tri = ops._triton_kernels().proxy_sample_triton
                        fns[impl] = lambda p=params, t=tri: t(*nxt(), *p, vocab,
                                                              config=dict(split=False))
                    elif impl in ("cuda", "cpu"):
                        fns[impl] = lambda p=params: torch.ops.proxykern.fused_sample(*nxt(), *p, vocab)
                    elif impl == "torch":
                        fns[impl] = lambda p=params: ops.reference.proxy_sample_reference(*nxt(), *p, vocab)
                for impl in impls:  # "x@graph": x's call captured once, then replayed
                    if impl.endswith(GRAPH_SUFFIX) and impl[:-len(GRAPH_SUFFIX)] in fns:
                        fns[impl] = lambda f=fns[impl[:-len(GRAPH_SUFFIX)]]: graph_replay(f)
                naive_s = {}
                for impl, fn in fns.items():
                    row = dict(vocab=vocab, batch=batch, mode=mode_name, impl=impl)
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
                                compiled[(mode_name, vocab, batch)] = static = compile_step(
                                    mode, dynamic=False)
                                fn = lambda c=static: c(*nxt())  # noqa: E731
                                fn()
                            if device.type == "cuda":
                                torch.cuda.synchronize()
                            compile_s[(mode_name, vocab, batch)] = time.monotonic() - t0
                            row["first_call_s"] = round(compile_s[(mode_name, vocab, batch)], 2)
                            row["dynamic"] = mode_name not in static_modes
                        if impl.endswith(GRAPH_SUFFIX):
                            fn = fn()  # capture (the eager impl ran above: compiled, warm)
                        seconds = timer(fn)
                    except Exception as exc:  # one broken impl must not hide the others
                        row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
                        rows.append(row)
                        log(f"  {vocab}x{batch} {mode_name} {impl}: {row['error']}")
                        continue
                    # Eager impls against the eager naive step, replays against its replay.
                    naive_key = "naive" + (GRAPH_SUFFIX if impl.endswith(GRAPH_SUFFIX) else "")
                    if impl == naive_key:
                        naive_s[impl] = seconds
                    ref_s = naive_s.get(naive_key)
                    row.update(us=seconds * 1e6, gbps=set_bytes / seconds / 1e9,
                               speedup_vs_naive=(ref_s / seconds) if ref_s else None)
                    rows.append(row)
                    log(f"  {vocab}x{batch} {mode_name} {impl}: {row['us']:.1f} us"
                        + (f" ({row['speedup_vs_naive']:.1f}x {naive_key})"
                           if impl != naive_key and ref_s else ""))
            sets = None
    return rows


def table_markdown(rows, impls, header_lines):
    lines = list(header_lines)
    if any(r.get("dynamic") is False for r in rows):
        lines.append("* torch.compile with static shapes: Inductor failed on this mode with "
                     "dynamic shapes")
    lines.append("")
    cols = " | ".join(f"{i} us" for i in impls)
    ratio_cols = [i for i in impls if i not in ("naive", "naive" + GRAPH_SUFFIX)]
    lines.append(f"| vocab | batch | mode | {cols} | " + " | ".join(f"{i} vs naive" for i in ratio_cols) + " |")
    lines.append("|" + "---|" * (3 + len(impls) + len(ratio_cols)))
    keyed = {}
    for r in rows:
        keyed.setdefault((r["vocab"], r["batch"], r["mode"]), {})[r["impl"]] = r
    for (vocab, batch, mode), by_impl in keyed.items():
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
        lines.append(f"| {vocab} | {batch} | {mode} | " + " | ".join(cell(i) for i in impls) + " | "
                     + " | ".join(ratio(i) for i in ratio_cols) + " |")
    return "\n".join(lines) + "\n"


SLICE_PROBE_EPTS = (4, 8, 16)  # K1's elements per thread: slices of 1024 / 2048 / 4096 columns
SLICE_PROBE_SHAPES = [(v, b) for v in (32000, 128256) for b in (1, 8, 64, 256)]
SLICE_PROBE_MODES = ("plain", "top_p=0.9")


def slice_probe(args) -> int:
    """The cuda op's graph-replay time per shape at this process's slice width
    (PROXYKERN_CUDA_SLICE_EPT, read once by the op); one JSON line a shape."""
    import torch

    from proxykern import ops
    from proxykern.bench import graph_replay
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
    probe_s = 0.0 if args.dry_run else min(45.0, 0.2 * limit)  # the slice probe's share
    cmd = [sys.executable, os.path.abspath(__file__), "--kernels-stage", "--out", out_dir,
           "--measure-s", str(max(10.0, limit - 40 - probe_s))]
    if args.dry_run:
        cmd.append("--dry-run")
    rc, tail = run_logged(cmd, _log_path(out_dir, "kernels"), timeout=limit - probe_s, env=child_env())
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
    if args.dry_run:
        device = torch.device("cpu")
        impls = ["naive"] + [b for b in ("cpu",) if ops.backend_unavailable_reason(b, device) is None]
        vocabs, batches = (1000,), (1, 2)
        modes = {k: KERNEL_MODES[k] for k in ("plain", "top_k+top_p")}
        budget, warmup, rep = 20.0, 1, 20
        bw_bytes = 16 << 20
    else:
        device = torch.device("cuda")
        impls = ["naive", "torch.compile"] + [
            b for b in ("triton", "cuda") if ops.backend_unavailable_reason(b, device) is None]
        if "triton" in impls:  # split / staged at small batch vs one program per row
            impls.insert(impls.index("triton") + 1, "triton_rowwise")
        # The same steps replayed from CUDA graphs (as the engine runs them): no launch costs.
        impls += [i + GRAPH_SUFFIX for i in ("naive", "triton", "cuda") if i in impls]
        vocabs, batches, modes = KERNEL_VOCABS, KERNEL_BATCHES, KERNEL_MODES
        budget, warmup, rep = args.measure_s, 5, 25
        bw_bytes = 1 << 30
    def log(msg):
        print(msg, flush=True)

    timer = _timer(device, warmup, rep)
    bw = copy_bandwidth(device, timer, bw_bytes)
    log(f"device-to-device copy: {bw:.0f} GB/s (read + write, {bw_bytes >> 20} MiB)")
    # torch.compile's compilations may take at most 40% of the stage's measuring time.
    rows = kernel_table(device, vocabs=vocabs, batches=batches, modes=modes, impls=impls,
                        budget_s=budget, warmup_ms=warmup, rep_ms=rep,
                        compile_budget_s=min(90.0, 0.4 * budget), log=log)
    name = info["device"]
    header = [f"# Kernel table: {name}",
              f"torch {info.get('torch')}, triton {info.get('triton')}; bf16 inputs; median of "
              f"{'triton.testing.do_bench (L2 flushed before each call)' if device.type == 'cuda' else 'wall-clock'}; "
              f"naive step measured in the same run; x{GRAPH_SUFFIX}: x captured in a CUDA graph "
              f"and replayed (no launch costs), its ratio against naive{GRAPH_SUFFIX}",
              f"device-to-device copy: {bw:.0f} GB/s (read + write)"]
    measured = sum(1 for r in rows if "us" in r)
    failed = [r for r in rows if "error" in r and not r["error"].startswith("skipped")]
    # A baseline that fails (an Inductor bug, say) is reported; only our backends fail the stage.
    errors = [r for r in failed if r["impl"] not in ("naive", "torch.compile", "naive" + GRAPH_SUFFIX)]
    skipped = sum(1 for r in rows if r.get("error", "").startswith("skipped"))
    detail = (f"{measured} timings, {skipped} skipped for time, {len(errors)} errors"
              f"{f', {len(failed) - len(errors)} baseline errors' if len(failed) > len(errors) else ''}"
              f"; copy {bw:.0f} GB/s")
    with open(os.path.join(out_dir, "kernel_table.json"), "w") as f:
        json.dump(dict(device=name, copy_gbps=bw, info=info, detail=detail, rows=rows), f, indent=1)
    with open(os.path.join(out_dir, "kernel_table.md"), "w") as f:
        f.write(table_markdown(rows, impls, header))
    print(table_markdown(rows, impls, header))
    return 1 if errors else 0


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
