"""Repeatable Triton launches with little host work per call (issue 27).

``kernel[grid](*args, **constexprs, **options)`` does, on every call, Triton's binding of
~25 arguments, their specialization (dtype, 16-byte alignment, integer classes), the
cache key, a dictionary look-up, a check of the kernel's global values and
``launch_metadata`` -- tens of microseconds per launch, and a staged sampling call makes
eight launches. :class:`KernelLaunch` does Triton's full path once per argument
*specialization* and afterwards calls the compiled kernel's launcher (``CompiledKernel.run``,
Triton's C launcher) directly with the same positional arguments Triton would pass. The
launched kernel binary is the one Triton itself picked for these arguments, so results are
the same bits; only the host work differs.

When the fast path applies (all of it checked, else Triton's own ``kernel[grid](...)`` runs):

* the kernel is a compiled ``JITFunction`` (never under ``TRITON_INTERPRET=1``), its
  runtime parameters come first and the constexprs (``constexprs``' keys exactly) after
  them, and it has no pre-run hooks;
* this Triton launches as ``kernel.run(grid_0, grid_1, grid_2, stream, kernel.function,
  kernel.packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args)`` (read
  from ``JITFunction.run``'s source once: Triton 3.6 - 3.9 do);
* no launch hook is installed (a profiler's hooks get Triton's own path, with its
  ``launch_metadata``);
* ``PROXYKERN_TRITON_FAST_LAUNCH`` is not ``0`` (read at import: the switch back to
  Triton's own path, until a GPU run has checked this one and for A/B timing).

The cache key of a compiled kernel is at least as fine as Triton's: the device, every
knob ``JITFunction.run`` reads (a knob holding a hook disables the fast path), and per
argument what Triton specializes on (:func:`arg_spec`). Grid, constexprs and options are
fixed per :class:`KernelLaunch`. Skipped on a hit: Triton's check that the kernel's
globals have not changed since compiling (the kernels' globals are module constants).
"""
from __future__ import annotations

import inspect
import itertools
import os
import re

import torch

try:
    from triton import knobs as _knobs
    from triton.runtime.driver import driver as _driver
    from triton.runtime.jit import JITFunction as _JITFunction
except ImportError:  # a Triton without these: every launch takes Triton's own path
    _knobs = _driver = _JITFunction = None

__all__ = ["KernelLaunch", "launch_all", "arg_spec", "fast_path_available"]

# What JITFunction.run must call for the fast path to mirror it.
_TRITON_LAUNCH = ("kernel.run(grid_0, grid_1, grid_2, stream, kernel.function, "
                  "kernel.packed_metadata, launch_metadata,")
_MAX_SPECS = 64  # compiled kernels remembered per launch (a bound; a miss only costs time)
_HOOK_KNOBS = {("runtime", "launch_enter_hook"), ("runtime", "launch_exit_hook")}


def _run_source() -> str:
    try:
        return inspect.getsource(_JITFunction.run)
    except (OSError, TypeError, AttributeError):
        return ""


def _knobs_read_by_run(source: str) -> tuple:
    """The (section, name) of every ``knobs.<section>.<name>`` JITFunction.run reads, but
    the launch hooks: what its options -- and so its cache key -- may depend on."""
    found = sorted(set(re.findall(r"knobs\.(\w+)\.(\w+)", source)) - _HOOK_KNOBS)
    return tuple(pair for pair in found if hasattr(getattr(_knobs, pair[0], None), pair[1]))


_SOURCE = _run_source() if _JITFunction is not None else ""
_FAST = (_TRITON_LAUNCH in " ".join(_SOURCE.split())
         and os.environ.get("PROXYKERN_TRITON_FAST_LAUNCH", "1") != "0")
_KNOBS = _knobs_read_by_run(_SOURCE) if _FAST else ()


def fast_path_available() -> bool:
    """Whether this Triton's launch convention is the one the fast path mirrors."""
    return _FAST


def _hook_idle(hook) -> bool:
    """A launch hook that does nothing: None, or an empty HookChain (Triton >= 3.4)."""
    return hook is None or (isinstance(getattr(hook, "calls", None), list) and not hook.calls)


def _context():
    """(the current device's stream, the key prefix: device and the knobs Triton's options
    read) for the fast launches of one call, or None: Triton's own path (no fast path in
    this Triton, a launch hook installed, or a knob holding a hook)."""
    if not _FAST:
        return None
    runtime = _knobs.runtime
    if not (_hook_idle(runtime.launch_enter_hook) and _hook_idle(runtime.launch_exit_hook)):
        return None
    snapshot = tuple(getattr(getattr(_knobs, section), name) for section, name in _KNOBS)
    if any(callable(value) for value in snapshot):
        return None  # a hook Triton calls per launch (e.g. a stages inspection hook)
    active = _driver.active
    device = active.get_current_device()
    return active.get_current_stream(device), (device, snapshot)


_Tensor = torch.Tensor


def _scalar_spec(a):
    if isinstance(a, tuple):
        return arg_spec(a)
    if isinstance(a, int) and not isinstance(a, bool):
        return (a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31, a < 2 ** 63)
    return (type(a), a)


def arg_spec(args) -> tuple:
    """Per argument, what Triton specializes a launch on: a tensor's dtype and whether its
    address is a multiple of 16; an integer's type (i32 / i64 / u64 by range), whether it
    is 1 and whether a multiple of 16 (for a ``do_not_specialize`` one only the type
    counts: finer is safe); a tuple's elements (the program kernels' inputs and strides);
    anything else its type and value. Two argument lists with equal specs launch the same
    binary (tests/test_triton_launch.py checks this against Triton's own specializer)."""
    return tuple([(a.dtype, a.data_ptr() % 16 == 0) if isinstance(a, _Tensor) else _scalar_spec(a)
                  for a in args])


# A spec key (device, knobs, arg specs) -> a small int, so that each launch of a call looks
# its kernel up by an int instead of re-hashing the nested spec. Ids are never reused
# (a cleared table only costs misses).
_SPEC_IDS: dict = {}
_MAX_SPEC_IDS = 4096


def _spec_id(key) -> int:
    found = _SPEC_IDS.get(key)
    if found is None:
        if len(_SPEC_IDS) >= _MAX_SPEC_IDS:
            _SPEC_IDS.clear()
        found = _SPEC_IDS[key] = next(_NEXT_ID)
    return found


_NEXT_ID = itertools.count()


def _constexpr_tail(kernel, consts: dict):
    """The constexpr values in the kernel's parameter order when its parameters are the
    runtime ones followed by exactly ``consts``' names (the arguments Triton's launcher
    gets end with them); None otherwise (no fast path for this kernel)."""
    if _JITFunction is None or not isinstance(kernel, _JITFunction):
        return None
    params = getattr(kernel, "params", None)
    names = getattr(kernel, "arg_names", None)
    if not params or names is None or len(params) != len(names):
        return None
    flags = [bool(getattr(p, "is_constexpr", False)) for p in params]
    first = len(flags) - sum(flags)
    if any(flags[:first]) or set(names[first:]) != set(consts):
        return None
    return tuple(consts[name] for name in names[first:])


class KernelLaunch:
    """One launch of a plan: ``kernel[grid](*args, **consts, **options)`` on the current
    stream, ``args`` the runtime arguments in order. Grid, constexprs and options are
    fixed; the arguments change per call. Same binary and bits as Triton's own call;
    after the first call per argument specialization (see the module doc) the launch
    costs one call of Triton's launcher."""

    __slots__ = ("kernel", "grid", "consts", "options", "with_outputs", "fast", "_grid3",
                 "_tail", "_compiled")

    def __init__(self, kernel, grid, consts: dict, options: dict, with_outputs: bool = False):
        self.kernel = kernel
        self.grid = tuple(grid)
        self.consts = dict(consts)
        self.options = dict(options)
        self.with_outputs = with_outputs  # the plan passes its outputs after the common args
        self._grid3 = (self.grid + (1, 1))[:3]
        self._tail = _constexpr_tail(kernel, self.consts) if _FAST else None
        self.fast = self._tail is not None  # whether the fast path may launch this kernel
        self._compiled = {}  # spec id -> Triton's CompiledKernel for those arguments

    def __call__(self, args: tuple, stream=None, spec_id=None) -> None:
        """Launch with ``args``. ``stream`` and ``spec_id`` (from :func:`launch_all`: the
        current stream, the id of ``args``' spec) enable the fast path; without them this
        is Triton's own call."""
        if spec_id is None or not self.fast or getattr(self.kernel, "pre_run_hooks", None):
            self.kernel[self.grid](*args, **self.consts, **self.options)
            return
        compiled = self._compiled.get(spec_id)
        if compiled is None:
            compiled = self.kernel[self.grid](*args, **self.consts, **self.options)
            if (getattr(compiled, "function", None) is not None
                    and hasattr(compiled, "packed_metadata") and hasattr(compiled, "run")):
                if len(self._compiled) >= _MAX_SPECS:
                    self._compiled.clear()
                self._compiled[spec_id] = compiled  # (holding it keeps its module loaded)
            return
        g0, g1, g2 = self._grid3
        # As JITFunction.run launches it, minus launch_metadata and hooks (none installed).
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata,
                     None, None, None, *args, *self._tail)


def launch_all(launches, common: tuple, outputs: tuple = ()) -> None:
    """Run ``launches`` (:class:`KernelLaunch`) in order on the current device and stream:
    each gets ``common`` and, if it takes them, ``outputs`` after. The context and the
    arguments' specs are worked out once for all of them."""
    # (no context at all for launches that cannot take the fast path: an interpreted
    # kernel's process may have no GPU driver to ask for a stream)
    context = _context() if all(launch.fast for launch in launches) else None
    if context is None:
        for launch in launches:
            launch(common + outputs if launch.with_outputs else common)
        return
    stream, prefix = context
    spec = arg_spec(common)
    spec_id = _spec_id((prefix, spec))
    out_id = _spec_id((prefix, spec, arg_spec(outputs))) if outputs else spec_id
    for launch in launches:
        if launch.with_outputs:
            launch(common + outputs, stream, out_id)
        else:
            launch(common, stream, spec_id)
