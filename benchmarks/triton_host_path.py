"""Host time of one eager Triton call, measured on a machine without a GPU.

What is timed is the Python (and torch) work of one call of the Triton backend --
argument handling, the launch plan, the output and workspace allocations and Triton's
own launch path for every kernel -- with only the kernel launch itself replaced by a
no-op. Triton runs its real (non-interpreter) ``JITFunction`` path against a stand-in
driver for an sm_90 target: binding, specialization, cache key, global-value check and
``launch_metadata`` all run as on a GPU; the compiled kernel is a stand-in whose
``run`` (Triton's C launcher, i.e. ``cuLaunchKernel``) does nothing. Tensors live on
the CPU, so CUDA's allocator, device guard and the launch latency are not in these
numbers: they are CPU host-path numbers, not GPU timings.

Levels (``--level``):

* ``op``: ``torch.ops.proxykern.triton_sample[_unfiltered]`` (the registered op,
  through the dispatcher), what the decode step calls;
* ``kernel``: ``proxy_sample_triton`` itself;
* ``program``: ``torch.ops.proxykern.triton_program_sample[_unfiltered]`` with a linear
  program of the three inputs (no mask).

Per cell: the median and the minimum over ``--repeats`` batches of the mean time of
``--calls`` calls (a busy machine inflates the median; the minimum is the least
disturbed batch), and the launches of one warm call.

    python benchmarks/triton_host_path.py [--calls 1000] [--repeats 7] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # the real JITFunction launch path, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

SHAPES = [(B, V) for V in (32000, 128256) for B in (1, 8, 64)]


class _StandInDriver:
    """The calls JITFunction.run makes on the active driver, for device 0 of an sm_90 GPU."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _StandInKernel:
    """A compiled kernel whose launch does nothing (counts launches; with ``log`` a list,
    appends each launch's (kernel, launcher arguments) to it)."""

    launches = 0
    log = None
    made = 0

    def __init__(self, name):
        self.name = name
        _StandInKernel.made += 1
        self.function = 1000 + _StandInKernel.made  # (a distinct "handle" per compilation)
        self.packed_metadata = ("packed", name)
        self.run = self._run

    def _run(self, *args):
        _StandInKernel.launches += 1
        if _StandInKernel.log is not None:
            _StandInKernel.log.append((self, args))

    def launch_metadata(self, grid, stream, *args):
        return None


def _stand_in_compile(self, key, signature, device, constexprs, options, attrs, warmup):
    """JITFunction._do_compile without a compiler: a stand-in kernel, cached under Triton's
    own key (so later calls take Triton's cache-hit path, as on a warm GPU process)."""
    kernel_cache = self.device_caches[device][0]
    kernel = _StandInKernel(self.fn.__name__)
    kernel_cache[key] = kernel
    return kernel


def install_stand_ins() -> None:
    driver.set_active(_StandInDriver())
    JITFunction._do_compile = _stand_in_compile


def _params(B, filtered: bool):
    f32, i64 = torch.float32, torch.int64
    return (torch.full((B,), 1.0, dtype=f32), torch.full((B,), 0.9 if filtered else 1.0, dtype=f32),
            torch.full((B,), 50 if filtered else 0, dtype=i64),
            torch.full((B,), 0.9 if filtered else 1.0, dtype=f32), torch.zeros(B, dtype=f32),
            torch.arange(B, dtype=i64), torch.full((B,), 3, dtype=i64))


def time_calls(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(median, min) over ``repeats`` batches of the mean time per call (us) of ``calls``
    calls, after two warm-up calls (the first builds caches and "compiles")."""
    fn()
    fn()
    per_call = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(per_call), min(per_call)


def _call(level: str, B: int, V: int, filtered: bool):
    """One call of ``level`` on fresh random inputs, as a closure."""
    logits = [torch.randn(B, V) for _ in range(3)]
    params = _params(B, filtered)
    if level == "op":
        op = (torch.ops.proxykern.triton_sample if filtered
              else torch.ops.proxykern.triton_sample_unfiltered)
        return lambda: op(*logits, *params, V)
    if level == "kernel":
        from proxykern.kernels import proxy_sample_triton as pst
        return lambda: pst.proxy_sample_triton(*logits, *params, V, may_filter=filtered)
    # "program": the linear program of the three inputs through its registered op
    op = (torch.ops.proxykern.triton_program_sample if filtered
          else torch.ops.proxykern.triton_program_sample_unfiltered)
    coef = torch.tensor([[1.0, 1.0, -1.0]]).expand(B, 3).contiguous()
    return lambda: op(logits, coef, 0, -1, torch.zeros(0), *params[1:], V)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=1000, help="calls per timed batch")
    parser.add_argument("--repeats", type=int, default=7, help="timed batches per cell")
    parser.add_argument("--level", choices=("op", "kernel", "program"), nargs="+",
                        default=["op", "kernel"])
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    install_stand_ins()
    from proxykern import ops, program_ops  # noqa: F401  (register the ops)

    torch.set_num_threads(1)
    rows = []
    for level in args.level:
        for filtered in (True, False):
            for B, V in SHAPES:
                call = _call(level, B, V, filtered)
                median, best = time_calls(call, args.calls, args.repeats)
                _StandInKernel.launches = 0
                call()  # a warm call: its launches
                launches = _StandInKernel.launches
                rows.append(dict(level=level, plan="may_filter" if filtered else "unfiltered",
                                 B=B, V=V, launches=launches, median_us=round(median, 1),
                                 min_us=round(best, 1)))
                print(f"{level:7} {rows[-1]['plan']:10} B={B:3} V={V:6} launches={launches} "
                      f"median {median:7.1f} us/call, min {best:7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, torch=torch.__version__, rows=rows), f,
                      indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
