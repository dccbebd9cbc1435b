"""``proxy_sample``: the fused proxy-tuning sampling op, its validation and backend choice.

Layers: :func:`proxy_sample` (validates, documents; the backend resolved once) ->
:func:`sample_rows` (the hot entry) -> the registered op of one kernel
(:func:`sample_kernel`). Only this module knows which backends exist:

* ``"cuda"``   -- ``csrc/`` C++/CUDA kernel (``torch.ops.proxykern.fused_sample`` on CUDA)
* ``"triton"`` -- ``kernels/`` Triton kernel (GPU; on CPU only under ``TRITON_INTERPRET=1``):
  ``torch.ops.proxykern.triton_sample`` / ``triton_sample_unfiltered`` (two launch plans)
* ``"cpu"``    -- ``csrc/`` C++ kernel (``torch.ops.proxykern.fused_sample`` on CPU)
* ``"torch"``  -- :mod:`proxykern.reference`, the spec in plain PyTorch
  (``torch.ops.proxykern.reference_sample``)
"""
from __future__ import annotations

import numbers
import os
import warnings
from typing import NamedTuple

import torch

from . import reference
from .params import PARAM_DTYPES, SamplingParams, may_filter, row_tensor  # noqa: F401  (PARAM_DTYPES re-exported)
from .reference import STATUS_EMPTY, STATUS_NONFINITE

BACKENDS = ("cuda", "triton", "cpu", "torch")
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# Status bits beyond the kernels' own (reference.STATUS_*): a per-row parameter
# tensor held a bad value. Found on the device, reported by the eager check.
STATUS_BAD_ALPHA = 4
STATUS_BAD_TEMPERATURE = 8
STATUS_BAD_TOP_K = 16
STATUS_BAD_TOP_P = 32
STATUS_BAD_MIN_P = 64

_STATUS_MESSAGES = {
    STATUS_NONFINITE: "its combined logits hold NaN or +inf",
    STATUS_EMPTY: "no token can be kept (every logit is -inf)",
    STATUS_BAD_ALPHA: "alpha is not finite in float32",
    STATUS_BAD_TEMPERATURE: "temperature is negative, NaN or not finite in float32",
    STATUS_BAD_TOP_K: "top_k is negative",
    STATUS_BAD_TOP_P: "top_p is outside (0, 1]",
    STATUS_BAD_MIN_P: "min_p is outside [0, 1)",
}


class SampleOutput(NamedTuple):
    """Result of :func:`proxy_sample`; each field has shape (B,)."""

    tokens: torch.Tensor    # int64
    logprobs: torch.Tensor  # float32, log_softmax(z')[token] before filtering
    lse: torch.Tensor       # float32, logsumexp(z')


# --------------------------------------------------------------------------- backends

_ext_state: dict = {}


def _extension():
    """The compiled ``proxykern._C`` (which registers ``torch.ops.proxykern.fused_sample``), or None."""
    if "module" not in _ext_state:
        try:
            from . import _C  # noqa: F401  (registers the ops on import)
            _ext_state["module"] = _C
            torch.library.register_fake("proxykern::fused_sample")(_fake_sample)
        except ImportError as exc:  # not built: the torch backend still works
            _ext_state["module"] = None
            _ext_state["error"] = str(exc)
    return _ext_state["module"]


def _fake_sample(base, *_args):
    """Shapes of (tokens, logprobs, lse, status) for tracing: each (B,)."""
    B = base.shape[0]
    return (base.new_empty((B,), dtype=torch.int64), base.new_empty((B,), dtype=torch.float32),
            base.new_empty((B,), dtype=torch.float32), base.new_empty((B,), dtype=torch.int32))


def _has_native_kernel(dispatch_key: str) -> bool:
    return _extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "proxykern::fused_sample", dispatch_key)


def _triton_kernels():
    """The Triton backend module, or None when Triton cannot be imported."""
    if "triton" not in _ext_state:
        try:
            from .kernels import proxy_sample_triton
            _ext_state["triton"] = proxy_sample_triton
        except ImportError as exc:
            _ext_state["triton"] = None
            _ext_state["triton_error"] = str(exc)
    return _ext_state["triton"]


def backend_unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` (None when it can)."""
    if backend == "torch":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"it runs on CPU tensors, the logits are on {device}"
        if not _has_native_kernel("CPU"):
            return "the C++ extension proxykern._C is not built (" + _ext_state.get("error", "no CPU kernel") + ")"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"it runs on CUDA tensors, the logits are on {device}"
        if not _has_native_kernel("CUDA"):
            return "proxykern._C was built without its CUDA kernel"
        return _cuda_image_reason(device)
    if backend == "triton":
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
        if device.type not in ("cpu", "cuda"):
            return f"Triton does not run on {device}"
        if _triton_kernels() is None:
            return "Triton cannot be imported (" + _ext_state.get("triton_error", "") + ")"
        return None
    raise AssertionError(backend)


def _cuda_kernel_version(index: int) -> int:
    """The architecture of the CUDA kernel image device ``index`` runs (e.g. 90), -1: none."""
    return int(torch.ops.proxykern.cuda_kernel_version(index))


def _cuda_image_reason(device: torch.device) -> str | None:
    """Why the built CUDA kernel cannot run on ``device`` (built for another architecture,
    without PTX it could JIT), or None. Asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = ("cuda_image", index)
    if key not in _ext_state:
        try:
            version = _cuda_kernel_version(index)
        except (AttributeError, RuntimeError) as exc:  # an older build without the query
            version, detail = -1, f"({exc})"
        else:
            detail = ""
        reason = None
        if version < 0:
            major, minor = torch.cuda.get_device_capability(index)
            try:
                archs = str(torch.ops.proxykern.cuda_build_archs())
            except (AttributeError, RuntimeError):
                archs = "unknown architectures"
            reason = (f"proxykern._C holds no CUDA kernel this GPU can run (compute capability "
                      f"{major}.{minor}; built for {archs}){detail}; rebuild with "
                      f"TORCH_CUDA_ARCH_LIST={major}.{minor}")
        _ext_state[key] = reason
    return _ext_state[key]


_AUTO_PREFERENCE = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_warned_fallbacks: set = set()


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: ``backend`` itself, or for ``"auto"`` the fastest available.

    Under ``torch.compile`` the answer is a constant of the trace (it depends only on what
    is installed and on the device), so a compiled caller traces with ``fullgraph=True``.
    """
    return _resolve_backend(backend, device.type, device.index)


def _resolve_backend(backend: str, device_type: str, device_index) -> str:
    device = torch.device(device_type, device_index) if device_index is not None \
        else torch.device(device_type)
    if not isinstance(backend, str) or (backend != "auto" and backend not in BACKENDS):
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        reason = backend_unavailable_reason(backend, device)
        if reason is not None:
            raise ValueError(f"backend {backend!r} is not available: {reason}")
        return backend
    preferred = _AUTO_PREFERENCE.get(device.type, ("torch",))
    for candidate in preferred:
        if backend_unavailable_reason(candidate, device) is None:
            if candidate != preferred[0] and (device.type, candidate) not in _warned_fallbacks:
                _warned_fallbacks.add((device.type, candidate))
                warnings.warn(
                    f"proxykern: backend {preferred[0]!r} is unavailable on {device.type} "
                    f"({backend_unavailable_reason(preferred[0], device)}); using {candidate!r}",
                    RuntimeWarning, stacklevel=5)
            return candidate
    raise AssertionError("the torch backend is always available")


# torch.compiler.assume_constant_result(_resolve_backend), without its import of
# torch._dynamo (seconds at `import proxykern`): the decorator only sets this flag.
# tests/test_ops.py traces the op with fullgraph=True, so a torch that reads another flag
# fails there by name.
_resolve_backend._dynamo_marked_constant = True


# One registered op per kernel, each with the kernel's own signature (no backend string,
# no launch hint): the C++ ``proxykern::fused_sample`` (csrc/, CPU and CUDA dispatch keys,
# registered by the extension), the Triton kernels under two launch plans, and the
# reference. :func:`sample_kernel` picks one from the resolved backend and the
# parameters' ``may_filter`` once; the hot path calls it directly.

_SAMPLE_RESULT = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _register_triton_sample(name: str, may_filter: bool, doc: str):
    """Register the Triton kernels under one launch plan as the op ``proxykern::<name>``."""
    def triton_sample(base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor,
                      alpha: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                      step: torch.Tensor, vocab_size: int) -> _SAMPLE_RESULT:
        return _triton_kernels().proxy_sample_triton(base, expert, anti, alpha, temperature,
                                                     top_k, top_p, min_p, seed, step, vocab_size,
                                                     may_filter=may_filter)

    triton_sample.__doc__ = doc
    op = torch.library.custom_op(f"proxykern::{name}", triton_sample, mutates_args=())
    op.register_fake(_fake_sample)
    return op


_register_triton_sample("triton_sample", True, "The Triton kernels for rows that may filter "
                        "(top-k / top-p / min-p staged across programs at small batch).")
_register_triton_sample("triton_sample_unfiltered", False, "The Triton kernels for rows known "
                        "to keep every token (greedy, or no filter).")


@torch.library.custom_op("proxykern::reference_sample", mutates_args=())
def _reference_sample(base: torch.Tensor, expert: torch.Tensor, anti: torch.Tensor,
                      alpha: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                      top_p: torch.Tensor, min_p: torch.Tensor, seed: torch.Tensor,
                      step: torch.Tensor, vocab_size: int) -> _SAMPLE_RESULT:
    """The spec (:func:`proxykern.reference.proxy_sample_reference`) as an op."""
    return tuple(t.clone() for t in reference.proxy_sample_reference(
        base, expert, anti, alpha, temperature, top_k, top_p, min_p, seed, step, vocab_size))


_reference_sample.register_fake(_fake_sample)


def sample_kernel(backend: str, may_filter: bool = True):
    """The registered op of a resolved ``backend``: ``(base, expert, anti, alpha,
    temperature, top_k, top_p, min_p, seed, step, vocab_size) -> (tokens, logprobs, lse,
    status)``. ``may_filter`` (:func:`proxykern.params.may_filter`) picks the Triton
    launch plan, never a result."""
    if backend in ("cpu", "cuda"):
        return torch.ops.proxykern.fused_sample  # the dispatcher picks CPU or CUDA
    if backend == "triton":
        return (torch.ops.proxykern.triton_sample if may_filter
                else torch.ops.proxykern.triton_sample_unfiltered)
    return torch.ops.proxykern.reference_sample


# --------------------------------------------------------------------------- validation

def _check_logits(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in LOGIT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, vocab), got shape {tuple(t.shape)}")


#: The largest finite float32: the op holds alpha, temperature, top_p and min_p in float32,
#: so a larger number would become inf (or fail to convert) past the checks.
FLOAT32_MAX = float(torch.finfo(torch.float32).max)
INT64_MAX = 2 ** 63 - 1


def _fits_int64(v) -> bool:
    """A Python int the op's int64 parameters can hold; an integer tensor always fits."""
    return True if isinstance(v, torch.Tensor) else v <= INT64_MAX


# name -> (integral, valid(value), rule): the one set of rules for every entry point.
# Each valid() works on a Python number and, elementwise, on a tensor (NaN is invalid in
# both), so the same rule checks scalars on the host and per-row tensors on the device.
# Ranges are those of the dtype the op holds the value in (PARAM_DTYPES): a number that
# would overflow float32 or int64 is refused here, naming the argument, never deep inside.
SAMPLING_RULES = {
    "alpha": (False, lambda v: abs(v) <= FLOAT32_MAX,
              "must be finite and within float32's range (|alpha| <= 3.4e38)"),
    "temperature": (False, lambda v: (v >= 0) & (v <= FLOAT32_MAX),
                    "must be >= 0, finite and within float32's range (<= 3.4e38)"),
    "top_k": (True, lambda v: (v >= 0) & _fits_int64(v),
              f"must be >= 0 (0 keeps all tokens) and at most {INT64_MAX} (int64)"),
    "top_p": (False, lambda v: (0 < v) & (v <= 1), "must be in (0, 1]"),
    "min_p": (False, lambda v: (0 <= v) & (v < 1), "must be in [0, 1)"),
    "seed": (True, lambda v: -(2 ** 63) <= v < 2 ** 64, "must fit in 64 bits"),
    "step": (True, lambda v: -(2 ** 63) <= v < 2 ** 64, "must fit in 64 bits"),
}

# The status bit of each parameter checked on the device (see _bad_param_flags).
_PARAM_STATUS_BITS = {"alpha": STATUS_BAD_ALPHA, "temperature": STATUS_BAD_TEMPERATURE,
                      "top_k": STATUS_BAD_TOP_K, "top_p": STATUS_BAD_TOP_P,
                      "min_p": STATUS_BAD_MIN_P}


def check_sampling_arg(name: str, value, B: int):
    """Check a sampling parameter's form; return it (a 0-d tensor expanded to (B,)).

    A Python number must satisfy its rule in :data:`SAMPLING_RULES`; a tensor must be
    1-D of length B (or 0-d) and of a real (integer for top_k/seed/step) dtype. Its
    values are not read here: that would cost a host sync.
    """
    integral, valid, rule = SAMPLING_RULES[name]
    if isinstance(value, torch.Tensor):
        if value.dim() == 0:
            value = value.reshape(1).expand(B)
        if value.dim() != 1 or value.shape[0] != B:
            raise ValueError(f"{name} must be a Python number or a 1-D tensor of length {B} "
                             f"(the batch size), got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex() or (integral and value.is_floating_point()):
            raise TypeError(f"{name} must be {'an integer' if integral else 'a real'} tensor, "
                            f"got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
            integral and not isinstance(value, numbers.Integral)):
        raise TypeError(f"{name} must be {'an int' if integral else 'a real number'} or a 1-D "
                        f"tensor, got {type(value).__name__}")
    if not valid(value):
        raise ValueError(f"{name} {rule}, got {value!r}")
    # A plain int or float from here on (numpy scalars, Fraction: torch.full takes neither
    # reliably).
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _row_param(name, value, B, device):
    """A (B,) tensor on ``device`` from a Python number or a 1-D tensor.

    Python numbers are checked here; tensors are checked on the device (see
    :func:`_bad_param_flags`), so passing them costs no host sync.
    """
    checked = check_sampling_arg(name, value, B)
    if name == "seed" and isinstance(value, torch.Tensor) and value.dim() == 0:
        return row_tensor(name, value, B, device)  # a number held in a tensor: a seed per row
    if isinstance(checked, torch.Tensor) and checked.device != device:
        raise ValueError(f"{name} is on {checked.device} but the logits are on {device}")
    return row_tensor(name, checked, B, device)


def _bad_param_flags(params: dict) -> torch.Tensor | None:
    """Device-side check of the parameters given as tensors: a status-bit tensor, or None."""
    flags = None
    for name, tensor in params.items():
        _integral, valid, _rule = SAMPLING_RULES[name]
        term = (~valid(tensor)).to(torch.int32) * _PARAM_STATUS_BITS[name]
        flags = term if flags is None else flags | term
    return flags


def raise_on_bad_rows(status: torch.Tensor, params: dict | None = None) -> None:
    """Raise ``ValueError`` naming the first row whose status is not 0 (syncs once)."""
    bad = torch.nonzero(status).flatten().tolist()
    if not bad:
        return
    row = bad[0]
    code = int(status[row])
    names = [n for n, bit in _PARAM_STATUS_BITS.items() if code & bit]
    # A bad parameter is the cause; the logits it spoils (NaN, nothing kept) are its effect.
    causes = sum(_PARAM_STATUS_BITS[n] for n in names) if names else code
    reasons = [msg for bit, msg in _STATUS_MESSAGES.items() if causes & bit]
    detail = ""
    if names and params:
        detail = " (" + ", ".join(f"{n}[{row}] = {params[n][row].item()!r}" for n in names) + ")"
    more = f"; {len(bad) - 1} more bad row(s)" if len(bad) > 1 else ""
    raise ValueError(f"row {row}: {'; '.join(reasons)}{detail}{more}")


def sample_rows(base, expert, anti, params: SamplingParams, step: torch.Tensor, vocab_size: int,
                backend: str):
    """The decode step's entry to the op: no checks, no host sync, no parameter tensors built.

    ``params`` a :class:`proxykern.params.SamplingParams` of B rows, ``step`` a (B,) int64
    tensor, ``backend`` resolved, logits with unit stride along the vocabulary. Returns
    (tokens, logprobs, lse, status); a bad row has token -1 and status != 0.
    """
    return sample_kernel(backend, params.may_filter)(base, expert, anti, *params.tensors(), step,
                                                     vocab_size)


def _no_host_sync(device: torch.device) -> bool:
    """Inside a CUDA-graph capture or a torch.compile trace the eager op cannot read the
    status on the host: a bad row then keeps its token -1 (out of range, never silent)."""
    return torch.compiler.is_compiling() or (
        device.type == "cuda" and torch.cuda.is_current_stream_capturing())


# --------------------------------------------------------------------------- public op

def proxy_sample_with_status(base_logits, expert_logits, anti_logits, **kwargs):
    """Like :func:`proxy_sample` but never syncs: returns (SampleOutput, status).

    ``status`` (B,) int32 is 0 for a good row, else bit flags (``reference.STATUS_*``,
    ``ops.STATUS_BAD_*``); such a row's token is -1. Made for captured decode steps.
    """
    out, status, _ = _sample(base_logits, expert_logits, anti_logits, **kwargs)
    return out, status


def checked_params(B: int, device, vocab_size: int, *, alpha, temperature, top_k, top_p, min_p,
                   seed, step):
    """The op's entry checks of the sampling arguments: (SamplingParams, steps (B,) int64,
    {name: (B,) tensor} of the values given as tensors, checked later on the device by
    :func:`_bad_param_flags`)."""
    given = dict(alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                 seed=seed)
    rows = {name: _row_param(name, value, B, device) for name, value in given.items()}
    greedy = not isinstance(temperature, torch.Tensor) and temperature == 0
    params = SamplingParams(**rows, greedy=greedy, may_filter=may_filter(given, vocab_size))
    steps = _row_param("step", step, B, device)
    tensor_params = {n: rows[n] for n in ("alpha", "temperature", "top_k", "top_p", "min_p")
                     if isinstance(given[n], torch.Tensor)}
    return params, steps, tensor_params


def bad_param_rows(status: torch.Tensor, tokens: torch.Tensor, tensor_params: dict):
    """``status`` and ``tokens`` with the rows of bad per-row parameters flagged (token -1)."""
    flags = _bad_param_flags(tensor_params)
    if flags is None:
        return status, tokens
    return status | flags, torch.where(flags != 0, torch.full_like(tokens, -1), tokens)


def _sample(base_logits, expert_logits, anti_logits, *, alpha=1.0, temperature=0.0, top_k=0,
            top_p=1.0, min_p=0.0, seed=0, step=0, vocab_size=None, backend="auto"):
    """Validate, run the registered op: (SampleOutput, status, the params given as tensors)."""
    for name, t in (("base_logits", base_logits), ("expert_logits", expert_logits),
                    ("anti_logits", anti_logits)):
        _check_logits(name, t)
    B = base_logits.shape[0]
    device = base_logits.device
    for name, t in (("expert_logits", expert_logits), ("anti_logits", anti_logits)):
        if t.shape[0] != B:
            raise ValueError(f"{name} has batch size {t.shape[0]} but base_logits has {B}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but base_logits is on {device}")
    widest_common = min(base_logits.shape[1], expert_logits.shape[1], anti_logits.shape[1])
    if vocab_size is None:
        vocab_size = widest_common
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= widest_common:
        raise ValueError(f"vocab_size must be in [1, {widest_common}] (the narrowest logits width), "
                         f"got {vocab_size}")
    resolved = resolve_backend(backend, device)
    params, steps, tensor_params = checked_params(
        B, device, int(vocab_size), alpha=alpha, temperature=temperature, top_k=top_k,
        top_p=top_p, min_p=min_p, seed=seed, step=step)

    def unit_stride(t):
        return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()

    tokens, logprobs, lse, status = sample_rows(
        unit_stride(base_logits), unit_stride(expert_logits), unit_stride(anti_logits),
        params, steps, int(vocab_size), resolved)
    status, tokens = bad_param_rows(status, tokens, tensor_params)
    return SampleOutput(tokens, logprobs, lse), status, tensor_params


def proxy_sample(base_logits, expert_logits, anti_logits, *, alpha=1.0, temperature=0.0,
                 top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0, vocab_size=None,
                 backend="auto") -> SampleOutput:
    """Combine three models' logits, normalise, filter and draw one token per row.

    ``z = base + alpha * (expert - anti)`` in fp32 over columns ``[0, vocab_size)``
    (default: the narrowest of the three widths); a token that is ``-inf`` in any
    input is excluded. ``temperature == 0`` is greedy (argmax, lowest index on
    ties); otherwise ``z' = z / temperature`` and the kept set is the ``top_k``
    largest (ties at the threshold kept), then the smallest top-mass prefix reaching
    ``top_p`` (ties kept, at least one token), then ``p >= min_p * p_max``. The draw
    is Gumbel-max with counter-based Philox noise, a pure function of
    ``(seed[row], step[row], token)`` (mapping in :mod:`proxykern.reference`), so
    every backend gives the same token. ``temperature`` must be finite; a row whose
    ``z / T`` overflows fp32 (or whose ``T`` is subnormal) is sampled as greedy -- one
    rule in every backend, stated in :mod:`proxykern.reference`.

    ``seed``: a per-row int64 tensor is used exactly as given (a row's token then
    does not depend on the batch it sits in). A Python number (or 0-d tensor) gives row
    ``r`` its own seed ``reference.row_seeds(seed, r)`` (SplitMix64, documented there), so
    identical rows of one call are independent draws, as with ``torch.multinomial``.

    Every sampling parameter is a Python number or a 1-D tensor of length B on
    the logits' device. Returns ``SampleOutput(tokens, logprobs, lse)``:
    ``logprobs = log_softmax(z')[token]`` before filtering, ``lse = logsumexp(z')``.

    Raises ``TypeError``/``ValueError`` naming the argument for bad input, and
    ``ValueError`` naming the row for a row whose logits hold NaN/+inf, whose kept
    set is empty, or whose per-row parameter is invalid (one host sync; skipped
    under CUDA-graph capture and inside a ``torch.compile`` trace, where such rows get
    token -1). The op traces with ``torch.compile(fullgraph=True)``.

    ``backend``: ``"auto"`` (fastest available: cuda > triton > torch on GPU,
    cpu > torch on CPU, with one warning on fallback), ``"cuda"``, ``"triton"``,
    ``"cpu"`` or ``"torch"`` (the reference).
    """
    out, status, tensor_params = _sample(
        base_logits, expert_logits, anti_logits, alpha=alpha, temperature=temperature,
        top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step, vocab_size=vocab_size,
        backend=backend)
    if not _no_host_sync(base_logits.device):
        raise_on_bad_rows(status, tensor_params)
    return out
