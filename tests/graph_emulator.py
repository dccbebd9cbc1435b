"""A CPU stand-in for CUDA-graph capture, faithful where it matters for capture-ready code.

A CUDA graph records the kernels a step launches with their pointer arguments and
replays exactly those: Python runs once, at capture; every value Python computed then
(a rebound variable, an int read from a tensor, a shape) is frozen; every tensor the step
made is written again at the same address on each replay. :func:`emulated_capture`
reproduces that on CPU with a ``TorchDispatchMode``: the captured call runs for real
while every aten op (and every custom op, such as the fused sampler) is recorded with
its arguments; :meth:`EmulatedGraph.replay` runs the recorded ops again on the same
tensor objects and copies each op's fresh result into the tensor it produced at capture
(views and in-place ops alias tensors that already hold the data). So a step that
rebinds a Python name, keeps Python state between calls, or changes shapes gives wrong
tokens or an error here, as it would on a GPU. A host read inside the captured call
(``.item()``, ``.tolist()``, ``bool(tensor)``, ``nonzero``, boolean indexing: what a
real capture refuses) raises :class:`HostReadInCapture`. While capturing,
``torch.cuda.is_current_stream_capturing()`` answers True, so libraries take the paths
they take under a real capture (transformers skips its host-side mask checks).

Not emulated: streams (CPU has none) and the graph's memory pool.
"""
from __future__ import annotations

import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

#: ops that read device data on the host or whose output shape depends on data
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2",
               "item", "equal", "is_nonzero"}


class HostReadInCapture(RuntimeError):
    """The captured call read a device value on the host (a real capture would fail)."""


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []
        self.keep = []  # every tensor seen, so no id or address is reused during capture

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__ if hasattr(func, "overloadpacket") else str(func)
        flat_in = [a for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)]
        if name in _HOST_READS or (name in ("index", "index_put", "index_put_") and any(
                t.dtype == torch.bool for t in tree_flatten(args[1])[0]
                if isinstance(t, torch.Tensor))):
            raise HostReadInCapture(f"{func} reads the device on the host inside the capture")
        out = func(*args, **kwargs)
        flat_out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        inputs = {_storage(t) for t in flat_in}
        # A fresh result gets the replay's values copied in; an alias (view, in-place op,
        # out= op) of an input needs nothing: it shares the storage the replay writes.
        fresh = [o for o in flat_out if _storage(o) not in inputs]
        self.ops.append((func, args, kwargs, out, fresh))
        self.keep.extend(flat_in + flat_out)
        return out


class EmulatedGraph:
    """The ops of one captured call; :meth:`replay` runs them again in place."""

    def __init__(self, ops, keep):
        self.ops, self.keep = ops, keep
        self.replays = 0

    def replay(self) -> None:
        for func, args, kwargs, out, fresh in self.ops:
            new = func(*args, **kwargs)
            if not fresh:
                continue
            by_id = {id(o): o for o in fresh}
            captured = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
            produced = [o for o in tree_flatten(new)[0] if isinstance(o, torch.Tensor)]
            for old, value in zip(captured, produced):
                if id(old) in by_id:
                    if old.shape != value.shape:
                        raise RuntimeError(f"{func}: shape {tuple(value.shape)} on replay, "
                                           f"{tuple(old.shape)} at capture (not static)")
                    old.copy_(value)
        self.replays += 1


@contextlib.contextmanager
def _capturing():
    real = torch.cuda.is_current_stream_capturing
    torch.cuda.is_current_stream_capturing = lambda: True
    try:
        yield
    finally:
        torch.cuda.is_current_stream_capturing = real


def emulated_capture(fn, device) -> EmulatedGraph:
    """Same contract as :func:`proxykern.engine.graphs.capture`: after it returns, ``fn`` has
    run once (here: for real, while recorded) and the graph replays it."""
    recorder = _Recorder()
    with _capturing(), recorder:
        fn()
    graph = EmulatedGraph(recorder.ops, recorder.keep)
    graphs_made.append(graph)
    return graph


#: every graph made by :func:`emulated_capture` (tests read their replay counts)
graphs_made: list = []


def install(monkeypatch) -> list:
    """Make :class:`proxykern.engine.graphs.CapturedCall` capture with the emulator on CPU
    (its warm-up runs the call inline); returns the list the graphs made are appended to."""
    from proxykern.engine import graphs
    graphs_made.clear()
    monkeypatch.setattr(graphs, "capture", emulated_capture)
    monkeypatch.setattr(graphs, "warm_up", lambda fn, device: fn())
    return graphs_made
