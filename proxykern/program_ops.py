"""``program_rows``: the fused N-input logit-program op (no pre-pass writing z).

Layers: :func:`program_rows` (the hot-path entry: no checks, no host sync) -> the
registered op ``torch.ops.proxykern.program_rows`` (a ``torch.library.custom_op``, so it
traces under ``torch.compile(fullgraph=True)``) -> one backend:

* ``"cpu"``    -- ``csrc/program_sample_cpu.cpp`` (``torch.ops.proxykern.program_sample``):
  the fused op's CPU sampler fed block by block from the N inputs;
* ``"triton"`` / ``"cuda"`` -- ``kernels/program_sample_triton.py``: the fused op's Triton
  passes reading the N inputs (there is no CUDA C++ program kernel);
* ``"torch"``  -- :func:`proxykern.reference.program_logits` and
  :func:`proxykern.reference.sample_logits_reference`, the spec.

The program (proxykern.reference.program_logits, bitwise in fp32):

* ``mode="linear"``: ``z = c_0 L_0 + c_1 L_1 + ...`` left to right, ``coefficients`` (B, N);
* ``mode="difference"``: inputs ``(b, e, a)`` (the same tensor may appear twice, e.g.
  ``(e, e, a)``), ``z = L_b + s (L_e - L_a)`` with ``s = coefficients[:, 0]`` (shape (B, 1)
  or wider): exactly the fused op's combination;
* a token ``-inf`` in any input is ``-inf``; then, with ``mask_input = r >= 0``, the
  plausibility mask drops ``v`` iff ``L_r[v] - max_u L_r[u] < log_a`` in fp32, where
  ``mask_log_a`` (B,) fp32 is ``torch.log(a)`` (a row whose ``L_r`` holds NaN / +inf is
  not masked: reference.program_mask);
* then the op's sampling, status codes, logprobs and lse on the masked z.
"""
from __future__ import annotations

import types

import torch

from . import ops, reference

MODES = {"linear": 0, "difference": 1}
BACKENDS = ops.BACKENDS

_state: dict = {}


def _fake_rows(inputs, *_args):
    """Shapes of (tokens, logprobs, lse, status) for tracing: each (B,)."""
    first = inputs[0]
    B = first.shape[0]
    return (first.new_empty((B,), dtype=torch.int64), first.new_empty((B,), dtype=torch.float32),
            first.new_empty((B,), dtype=torch.float32), first.new_empty((B,), dtype=torch.int32))


def _native_op():
    """``torch.ops.proxykern.program_sample`` (the C++ CPU kernel), its fake registered once."""
    if "native" not in _state:
        ops._extension()  # loads proxykern._C (raises below if it is missing)
        torch.library.register_fake("proxykern::program_sample")(_fake_rows)
        _state["native"] = torch.ops.proxykern.program_sample
    return _state["native"]


def _triton_module():
    if "triton" not in _state:
        from .kernels import program_sample_triton
        _state["triton"] = program_sample_triton
    return _state["triton"]


# --------------------------------------------------------------------------- backends

def _run_native(inputs, coefficients, mode, mask_input, mask_log_a, temperature, top_k, top_p,
                min_p, seed, step, vocab_size, may_filter):
    return _native_op()(list(inputs), coefficients, MODES[mode], mask_input, mask_log_a,
                        temperature, top_k, top_p, min_p, seed, step, vocab_size)


def _run_triton(inputs, coefficients, mode, mask_input, mask_log_a, temperature, top_k, top_p,
                min_p, seed, step, vocab_size, may_filter):
    return _triton_module().program_sample_triton(
        inputs, coefficients, mode, mask_input, mask_log_a, temperature, top_k, top_p, min_p,
        seed, step, vocab_size, may_filter=may_filter)


def reference_logits(inputs, coefficients, mode: str, mask_input: int, mask_log_a,
                     vocab_size: int) -> torch.Tensor:
    """The program's masked z (fp32, (B, vocab_size)) by reference.program_logits."""
    roles = tuple(str(i) for i in range(len(inputs)))
    logits = dict(zip(roles, inputs))
    coefficients = coefficients.float()
    if mode == "difference":
        program = types.SimpleNamespace(roles=roles, mask=None, coefficients=None,
                                        difference=("0", "1", "2", coefficients[:, 0]))
    else:
        program = types.SimpleNamespace(roles=roles, mask=None, difference=None,
                                        coefficients=tuple(coefficients[:, i]
                                                           for i in range(len(roles))))
    z = reference.program_logits(program, logits, vocab_size)
    if mask_input >= 0:
        L = inputs[mask_input][:, :vocab_size].float()
        z = z.masked_fill(reference.plausibility_drop(L, mask_log_a), float("-inf"))
    return z


def _run_reference(inputs, coefficients, mode, mask_input, mask_log_a, temperature, top_k, top_p,
                   min_p, seed, step, vocab_size, may_filter):
    z = reference_logits(inputs, coefficients, mode, mask_input, mask_log_a, vocab_size)
    return reference.sample_logits_reference(z, temperature, top_k, top_p, min_p, seed, step)


_BACKEND_IMPLS = {"cpu": _run_native, "triton": _run_triton, "cuda": _run_triton,
                  "torch": _run_reference}


@torch.library.custom_op("proxykern::program_rows", mutates_args=())
def _program_rows_op(inputs: list[torch.Tensor], coefficients: torch.Tensor, mode: str,
                     mask_input: int, mask_log_a: torch.Tensor, temperature: torch.Tensor,
                     top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor,
                     seed: torch.Tensor, step: torch.Tensor, vocab_size: int, backend: str,
                     may_filter: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The registered op on validated inputs: (tokens, logprobs, lse, status)."""
    return _BACKEND_IMPLS[backend](inputs, coefficients, mode, mask_input, mask_log_a,
                                   temperature, top_k, top_p, min_p, seed, step, vocab_size,
                                   may_filter)


_program_rows_op.register_fake(_fake_rows)


def program_rows(inputs, coefficients: torch.Tensor, mode: str, mask_input: int,
                 mask_log_a: torch.Tensor | None, params, step: torch.Tensor,
                 vocab_size: int, backend: str, may_filter: bool | None = None):
    """A decode step of a logit program: no checks, no host sync (the caller validated).

    ``inputs``: N = 2..8 tensors (B, >= vocab_size), fp32 / bf16 / fp16 (may differ),
    unit stride along the vocabulary, on one device; ``coefficients`` (B, N) fp32
    (``"linear"``) or (B, >= 1) with the scale in column 0 (``"difference"``, inputs
    (b, e, a)); ``mask_input`` -1 (none) or the index of the plausibility mask's input,
    ``mask_log_a`` (B,) fp32 = ``torch.log(a)`` (ignored, may be None, without a mask);
    ``params``: a :class:`proxykern.params.SamplingParams` or a dict of (B,) tensors
    (temperature, top_k, top_p, min_p, seed; alpha is not read); ``step`` (B,) int64;
    ``backend`` resolved ("cpu", "triton", "torch" or "cuda" -- the Triton kernel on
    CUDA tensors); ``may_filter`` (a Triton launch hint, never a result): default
    ``params.may_filter`` for a SamplingParams, else True. Returns (tokens, logprobs, lse, status), each (B,):
    a bad row has token -1 and status != 0.
    """
    if mask_log_a is None:
        mask_log_a = coefficients.new_empty((0,), dtype=torch.float32)
    if isinstance(params, dict):
        tensors = [params[n] for n in ("temperature", "top_k", "top_p", "min_p", "seed")]
    else:  # a proxykern.params.SamplingParams
        tensors = [params.temperature, params.top_k, params.top_p, params.min_p, params.seed]
        if may_filter is None:
            may_filter = params.may_filter
    return torch.ops.proxykern.program_rows(
        list(inputs), coefficients, mode, int(mask_input), mask_log_a, *tensors, step,
        int(vocab_size), backend, True if may_filter is None else bool(may_filter))
