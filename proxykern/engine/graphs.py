"""Capture once, replay after: the one CUDA-graph rule of the decode step and the static
speculative round.

``CapturedCall(fn, device, enabled)`` wraps ``fn``, a step that reads and writes only
buffers made before it (fixed shapes and addresses), reads no host value and keeps no
Python state between calls. Calling the wrapper:

* disabled (any CPU run, or graphs off): runs ``fn`` eagerly, every call;
* enabled (CUDA): the first call runs ``fn`` for real on a side stream, so that lazy
  initialisation (cuBLAS handles, Triton compilation, a cache's first allocation) happens
  outside capture; the second call is captured (:func:`capture`) and replayed; every later
  call replays the graph.

Every call advances the state by exactly one step, whichever way it runs. Side streams
that ``fn`` forks off the current stream and joins back (``wait_stream`` both ways) become
branches of the graph.
"""
from __future__ import annotations

import torch


def warm_up(fn, device: torch.device) -> None:
    """Run ``fn`` once for real on a fresh side stream, ordered after the current stream."""
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream(device).wait_stream(stream)


def capture(fn, device: torch.device):
    """Record ``fn`` as a CUDA graph, replay it once (recording runs nothing) and return it."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the host program (a streamer's consumer, a server)
    # may use CUDA meanwhile.
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        fn()
    graph.replay()
    return graph


class CapturedCall:
    """``fn`` run eagerly, or warmed up, captured and replayed (module doc)."""

    def __init__(self, fn, device: torch.device, enabled: bool):
        self.fn, self.device, self.enabled = fn, device, enabled
        self.graph = None
        self._warm = False

    def __call__(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        elif not self.enabled:
            self.fn()
        elif not self._warm:
            self._warm = True
            warm_up(self.fn, self.device)
        else:
            # module lookups at call time: tests put a CPU emulation of the graph here
            self.graph = capture(self.fn, self.device)
