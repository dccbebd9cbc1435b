"""``program_rows``: the fused N-input logit-program op (no pre-pass writing z).

Layers: :func:`program_rows` (the hot-path entry: no checks, no host sync) -> the
registered op of one kernel (:func:`program_kernel`; each traces under
``torch.compile(fullgraph=True)``):

* ``"cpu"``    -- ``csrc/program_sample_cpu.cpp`` (``torch.ops.proxykern.program_sample``):
  the fused op's CPU sampler fed block by block from the N inputs;
* ``"triton"`` / ``"cuda"`` -- ``kernels/program_sample_triton.py``
  (``torch.ops.proxykern.triton_program_sample`` / ``..._unfiltered``): the fused op's
  Triton passes reading the N inputs (there is no CUDA C++ program kernel);
* ``"torch"``  -- ``torch.ops.proxykern.reference_program_sample``:
  :func:`proxykern.reference.program_logits` and
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


def _ensure_native() -> None:
    """Load proxykern._C (which registers ``proxykern::program_sample``) and its fake, once."""
    if "native" not in _state:
        ops._extension()
        torch.library.register_fake("proxykern::program_sample")(_fake_rows)
        _state["native"] = True


def _triton_module():
    if "triton" not in _state:
        from .kernels import program_sample_triton
        _state["triton"] = program_sample_triton
    return _state["triton"]


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


_MODE_NAMES = {v: k for k, v in MODES.items()}
_PROGRAM_RESULT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


# One registered op per kernel, each with the kernel's own signature (as ops.py): the C++
# ``proxykern::program_sample`` (CPU, registered by the extension), the Triton kernels
# under two launch plans, and the reference.

def _register_triton_program(name: str, may_filter: bool, doc: str):
    """Register the Triton program kernels under one launch plan as ``proxykern::<name>``."""
    def triton_program_sample(inputs: list[torch.Tensor], coefficients: torch.Tensor, mode: int,
                              mask_input: int, mask_log_a: torch.Tensor,
                              temperature: torch.Tensor, top_k: torch.Tensor,
                              top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                              step: torch.Tensor, vocab_size: int) -> _PROGRAM_RESULT:
        return _triton_module().program_sample_triton(
            inputs, coefficients, _MODE_NAMES[mode], mask_input, mask_log_a, temperature, top_k,
            top_p, min_p, seed, step, vocab_size, may_filter=may_filter)

    triton_program_sample.__doc__ = doc
    op = torch.library.custom_op(f"proxykern::{name}", triton_program_sample, mutates_args=())
    op.register_fake(_fake_rows)
    return op


_register_triton_program("triton_program_sample", True,
                         "The Triton program kernels for rows that may filter.")
_register_triton_program("triton_program_sample_unfiltered", False,
                         "The Triton program kernels for rows known to keep every token.")


@torch.library.custom_op("proxykern::reference_program_sample", mutates_args=())
def _reference_program_sample(inputs: list[torch.Tensor], coefficients: torch.Tensor,
                              mode: int, mask_input: int, mask_log_a: torch.Tensor,
                              temperature: torch.Tensor, top_k: torch.Tensor,
                              top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                              step: torch.Tensor, vocab_size: int) -> _PROGRAM_RESULT:
    """The spec: :func:`reference_logits`, then the op's sampling on z."""
    z = reference_logits(inputs, coefficients, _MODE_NAMES[mode], mask_input, mask_log_a,
                         vocab_size)
    return tuple(t.clone() for t in reference.sample_logits_reference(
        z, temperature, top_k, top_p, min_p, seed, step))


_reference_program_sample.register_fake(_fake_rows)


def program_kernel(backend: str, may_filter: bool = True):
    """The registered op of a resolved ``backend`` ("cuda" runs the Triton kernels: there is
    no CUDA C++ program kernel); ``may_filter`` picks the Triton launch plan."""
    if backend == "cpu":
        _ensure_native()
        return torch.ops.proxykern.program_sample
    if backend in ("triton", "cuda"):
        return (torch.ops.proxykern.triton_program_sample if may_filter
                else torch.ops.proxykern.triton_program_sample_unfiltered)
    return torch.ops.proxykern.reference_program_sample


def program_rows(inputs, coefficients: torch.Tensor, mode: str, mask_input: int,
                 mask_log_a: torch.Tensor | None, params, step: torch.Tensor,
                 vocab_size: int, backend: str):
    """A decode step of a logit program: no checks, no host sync (the caller validated).

    ``inputs``: N = 2..8 tensors (B, >= vocab_size), fp32 / bf16 / fp16 (may differ),
    unit stride along the vocabulary, on one device; ``coefficients`` (B, N) fp32
    (``"linear"``) or (B, >= 1) with the scale in column 0 (``"difference"``, inputs
    (b, e, a)); ``mask_input`` -1 (none) or the index of the plausibility mask's input,
    ``mask_log_a`` (B,) fp32 = ``torch.log(a)`` (ignored, may be None, without a mask);
    ``params``: a :class:`proxykern.params.SamplingParams` (alpha is not read; its
    ``may_filter`` picks the Triton launch plan); ``step`` (B,) int64; ``backend`` resolved
    ("cpu", "triton", "torch" or "cuda" -- the Triton kernel on CUDA tensors). Returns
    (tokens, logprobs, lse, status), each (B,): a bad row has token -1 and status != 0.
    """
    if mask_log_a is None:
        mask_log_a = coefficients.new_empty((0,), dtype=torch.float32)
    kernel = program_kernel(backend, params.may_filter)
    return kernel(list(inputs), coefficients, MODES[mode], int(mask_input), mask_log_a,
                  params.temperature, params.top_k, params.top_p, params.min_p, params.seed,
                  step, int(vocab_size))
