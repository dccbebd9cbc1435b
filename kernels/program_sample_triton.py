"""The fused N-input logit-program sampler in Triton (``proxykern::program_sample``'s
``"triton"`` and ``"cuda"`` backends). Semantics: :func:`proxykern.reference.program_logits`
then :func:`proxykern.reference.sample_logits_reference`.

No second sampler: every pass of :mod:`proxy_sample_triton` (pass 1, the threshold
search, the last pass, the overflow rule, the launch plan and its workspaces) is reused
as it is. Those passes read their logits only through three helpers --
``_row_ptrs`` (a row's inputs), ``_block_logits`` (z and z' of a column block) and
``_scaled_logits`` (z and z' at given columns) -- and pass everything else through
unchanged. This module rebinds every ``@triton.jit`` function of that module into a
namespace of its own in which those three helpers read a *program* instead (one
namespace per combine mode and mask input, whose values are ``tl.constexpr`` globals),
so the kernels compile once per variant and the results are the same passes' bits:

* ``base_ptr`` is the tuple of the N input tensors and ``stride_base`` the tuple of their
  row strides (``len`` is the constexpr N); ``expert_ptr`` the (B, K) fp32 coefficients
  and ``stride_expert`` their row stride; ``anti_ptr`` the (B, 2) fp32 mask state
  ``[max L_r, log a]`` written by :func:`_mask_kernel` (``log a = -inf``: the row is not
  masked); ``alpha_ptr`` the difference scale ``s`` (B,) (loaded but not used in linear
  mode, where the launcher passes the temperatures).
* linear: ``z = c_0 L_0 + c_1 L_1 + ...`` left to right in fp32; difference:
  ``z = L_b + s (L_e - L_a)`` (``_combine``'s expression); ``-inf`` in any input
  excludes the token; then the plausibility mask drops ``(L_r - max L_r) < log a``.

On a GPU the launches use ``enable_fp_fusion=False`` (no FMA), as the fused op's.
"""
from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

from . import proxy_sample_triton as _pst
from .triton_launch import KernelLaunch, launch_all

__all__ = ["program_sample_triton", "MODES"]

MODES = {"linear": 0, "difference": 1}


# --------------------------------------------------------------------------- the program's
# helpers (rebound into each variant's namespace, which defines _PROGRAM_MODE (0 linear,
# 1 difference) and _PROGRAM_MASK (the mask input, -1: none) as tl.constexpr)

@triton.jit
def _program_z(src, coef, mstate, alpha, offs, valid, MASKED: tl.constexpr):
    """z (fp32) of a row's columns ``offs`` (a tensor or a scalar); ``valid`` (MASKED)
    marks real columns, the others are -inf."""
    ninf: tl.constexpr = float("-inf")
    X, S, row64 = src
    m_max, m_log_a = mstate
    if _PROGRAM_MODE == 0:  # noqa: F821  (a global of the variant's namespace)
        if MASKED:
            x = tl.load(X[0] + row64 * S[0] + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            x = tl.load(X[0] + row64 * S[0] + offs).to(tl.float32)
        drop = x == ninf
        if _PROGRAM_MASK == 0:  # noqa: F821
            drop = drop | ((x - m_max) < m_log_a)
        # (zeroing -inf inputs -- excluded anyway -- spares the interpreter 0 * inf warnings)
        z = tl.load(coef) * tl.where(x == ninf, 0.0, x)
        for i in tl.static_range(1, len(X)):
            if MASKED:
                x = tl.load(X[i] + row64 * S[i] + offs, mask=valid, other=0.0).to(tl.float32)
            else:
                x = tl.load(X[i] + row64 * S[i] + offs).to(tl.float32)
            drop = drop | (x == ninf)
            if _PROGRAM_MASK == i:  # noqa: F821
                drop = drop | ((x - m_max) < m_log_a)
            z = z + tl.load(coef + i) * tl.where(x == ninf, 0.0, x)
    else:
        if MASKED:
            b = tl.load(X[0] + row64 * S[0] + offs, mask=valid, other=0.0).to(tl.float32)
            e = tl.load(X[1] + row64 * S[1] + offs, mask=valid, other=0.0).to(tl.float32)
            a = tl.load(X[2] + row64 * S[2] + offs, mask=valid, other=0.0).to(tl.float32)
        else:
            b = tl.load(X[0] + row64 * S[0] + offs).to(tl.float32)
            e = tl.load(X[1] + row64 * S[1] + offs).to(tl.float32)
            a = tl.load(X[2] + row64 * S[2] + offs).to(tl.float32)
        drop = (b == ninf) | (e == ninf) | (a == ninf)
        if _PROGRAM_MASK == 0:  # noqa: F821
            drop = drop | ((b - m_max) < m_log_a)
        if _PROGRAM_MASK == 1:  # noqa: F821
            drop = drop | ((e - m_max) < m_log_a)
        if _PROGRAM_MASK == 2:  # noqa: F821
            drop = drop | ((a - m_max) < m_log_a)
        excluded = (b == ninf) | (e == ninf) | (a == ninf)
        e = tl.where(excluded, 0.0, e)
        a = tl.where(excluded, 0.0, a)
        z = b + alpha * (e - a)
    if MASKED:
        drop = drop | (~valid)
    return tl.where(drop, ninf, z)


@triton.jit
def _program_block_logits(b_ptr, e_ptr, a_ptr, start, stop, alpha, t_eff, N: tl.constexpr,
                          MASKED: tl.constexpr):
    """_block_logits of a program: (z, z') of columns start .. start + N - 1."""
    ninf: tl.constexpr = float("-inf")
    offs = start + tl.arange(0, N)
    if MASKED:
        valid = offs < stop
        z = _program_z(b_ptr, e_ptr, a_ptr, alpha, offs, valid, True)
        zp = tl.math.div_rn(z, tl.broadcast_to(t_eff, z.shape))
        zp = tl.where(valid, zp, ninf)
    else:
        z = _program_z(b_ptr, e_ptr, a_ptr, alpha, offs, offs < stop, False)
        zp = tl.math.div_rn(z, tl.broadcast_to(t_eff, z.shape))
    return z, zp


@triton.jit
def _program_scaled_logits(b_ptr, e_ptr, a_ptr, offs, mask, alpha, t_eff):
    """_scaled_logits of a program: (z, z') at the columns ``offs``; masked ones -inf."""
    ninf: tl.constexpr = float("-inf")
    z = _program_z(b_ptr, e_ptr, a_ptr, alpha, offs, mask, True)
    zp = tl.math.div_rn(z, tl.broadcast_to(t_eff, z.shape))
    zp = tl.where(mask, zp, ninf)
    return z, zp


@triton.jit
def _program_row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
                      row64):
    """_row_ptrs of a program: (inputs, strides, row), the row's coefficients, the row's
    mask state (max L_r, log a)."""
    if _PROGRAM_MASK >= 0:  # noqa: F821
        mstate = (tl.load(anti_ptr + row64 * stride_anti),
                  tl.load(anti_ptr + row64 * stride_anti + 1))
    else:
        mstate = (tl.full([], 0.0, tl.float32), tl.full([], float("-inf"), tl.float32))
    return (base_ptr, stride_base, row64), expert_ptr + row64 * stride_expert, mstate


@triton.jit
def _mask_kernel(x_ptr, stride_x, log_a_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    """Per row of the mask input L_r: out = [max L_r (0 when -inf: every token is
    excluded then), log a (-inf when L_r holds NaN or +inf: such a row is not masked)]."""
    ninf: tl.constexpr = float("-inf")
    pinf: tl.constexpr = float("inf")
    row64 = tl.program_id(0).to(tl.int64)
    best = tl.full([BLOCK], ninf, tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row64 * stride_x + offs, mask=offs < vocab, other=ninf)
        x = x.to(tl.float32)
        isnan = x != x
        bad = bad | (isnan | (x == pinf)).to(tl.int32)
        best = tl.maximum(best, tl.where(isnan, ninf, x))
    m = tl.max(best, 0)
    any_bad = tl.max(bad, 0)
    tl.store(out_ptr + row64 * 2, tl.where(m == ninf, 0.0, m))
    tl.store(out_ptr + row64 * 2 + 1,
             tl.where(any_bad != 0, ninf, tl.load(log_a_ptr + row64).to(tl.float32)))


# --------------------------------------------------------------------------- variants

_OVERRIDES = {"_block_logits": _program_block_logits, "_scaled_logits": _program_scaled_logits,
              "_row_ptrs": _program_row_ptrs}
_HELPERS = ("_program_z",) + tuple(f.fn.__name__ for f in _OVERRIDES.values())


def _is_jit(obj) -> bool:
    return hasattr(obj, "fn") and isinstance(getattr(obj, "fn"), types.FunctionType) and (
        type(obj).__name__ in ("JITFunction", "InterpretedFunction"))


def _rebind(jitfn, namespace: dict):
    """``jitfn`` (a @triton.jit function) compiled against ``namespace``'s globals."""
    f = jitfn.fn
    g = types.FunctionType(f.__code__, namespace, f.__name__, f.__defaults__, f.__closure__)
    g.__module__, g.__qualname__, g.__doc__ = f.__module__, f.__qualname__, f.__doc__
    # FunctionType copies no annotations, and Triton reads ``tl.constexpr`` parameters from
    # them: without them BLOCK & co. would be runtime integers (which compile only under
    # the interpreter).
    g.__annotations__ = dict(f.__annotations__)
    g.__kwdefaults__ = f.__kwdefaults__
    dns = getattr(jitfn, "do_not_specialize", None) or getattr(jitfn, "kwargs", {}).get(
        "do_not_specialize")
    return triton.jit(g, do_not_specialize=dns) if dns else triton.jit(g)


_variants: dict = {}


def _variant(mode: int, mask_input: int) -> dict:
    """The namespace of one (mode, mask input): every jit function of proxy_sample_triton
    rebound to it, the three logit helpers replaced by the program's."""
    key = (mode, mask_input)
    if key not in _variants:
        ns = dict(vars(_pst))
        ns["_PROGRAM_MODE"] = tl.constexpr(mode)
        ns["_PROGRAM_MASK"] = tl.constexpr(mask_input)
        for name, obj in vars(_pst).items():
            if _is_jit(obj) and obj.fn.__module__ == _pst.__name__:
                ns[name] = _rebind(obj, ns)
        for name in _HELPERS:
            ns[name] = _rebind(globals()[name], ns)
        for name, impl in _OVERRIDES.items():
            ns[name] = ns[impl.fn.__name__]
        ns["_mask_kernel"] = _mask_kernel
        _variants[key] = ns
    return _variants[key]


# --------------------------------------------------------------------------- launcher

class _ProgramPlan:
    """The launches of one (shape, plan, variant), made once (issue 27): the mask kernel's
    (if any), the proxy plan's kernels taken from the variant's namespace, and the
    workspace layout -- the plan's workspaces, the mask state ((B, 2) float32, unused
    without a mask) and the (unused) debug pointer."""

    def __init__(self, B: int, vocab_size: int, device, config, may_filter: bool, mode_id: int,
                 mask_input: int):
        ns = _variant(mode_id, mask_input)
        prepared = _pst.prepared_plan(B, vocab_size, device, config, may_filter)
        options = prepared.options
        self.n_seg = prepared.n_seg
        self.launches = tuple(
            KernelLaunch(ns[kernel.fn.__name__], grid, consts, options,
                         with_outputs=kernel.fn.__name__ == "_proxy_sample_kernel")
            for kernel, grid, consts in prepared.plan["kernels"])
        self.mask_launch = None
        if mask_input >= 0:
            block = min(triton.next_power_of_2(max(vocab_size, 16)),
                        32768 if _pst._interpreting() else 4096)
            self.mask_launch = KernelLaunch(ns["_mask_kernel"], (B,), dict(BLOCK=block), options)
        mask_rows = B if mask_input >= 0 else 0
        self.workspace = _pst.WorkspaceLayout(list(prepared.plan["workspace"].values())
                                              + [(mask_rows * 2, torch.float32),
                                                 (0, torch.float32)])


@functools.lru_cache(maxsize=_pst._PLAN_CACHE_SIZE)
def _cached_plan(B, vocab_size, device, config_items, may_filter, mode_id, mask_input):
    return _ProgramPlan(B, vocab_size, device, dict(config_items), may_filter, mode_id, mask_input)


def _program_plan(B, vocab_size, device, config, may_filter, mode_id, mask_input) -> _ProgramPlan:
    """The :class:`_ProgramPlan` of a call, cached on everything it is built from."""
    key = _pst.config_key(config)
    if key is None:
        return _ProgramPlan(B, vocab_size, device, config, may_filter, mode_id, mask_input)
    return _cached_plan(B, vocab_size, device, key, bool(may_filter), mode_id, mask_input)


def program_sample_triton(inputs, coefficients, mode: str, mask_input: int, mask_log_a,
                          temperature, top_k, top_p, min_p, seed, step, vocab_size: int, *,
                          may_filter: bool = True, config: dict | None = None):
    """Triton backend of ``proxykern::program_sample``: (tokens, logprobs, lse, status).

    ``inputs``: 2..8 tensors (B, >= vocab_size), fp32/bf16/fp16 (may differ), unit column
    stride; ``coefficients`` (B, N) fp32 (linear) or (B, >= 1) with ``s`` in column 0
    (difference, inputs (b, e, a)); ``mask_input`` -1 or an input index with
    ``mask_log_a`` (B,) fp32 = log(a); the sampling parameters as for
    :func:`proxy_sample_triton.proxy_sample_triton`. No host sync; ``may_filter`` and
    ``config`` as there. Arguments are not validated (proxykern.program_ops' caller did).
    """
    inputs = tuple(inputs)
    first = inputs[0]
    B, device = first.shape[0], first.device
    vocab_size = int(vocab_size)
    mode_id = MODES[mode] if isinstance(mode, str) else int(mode)
    mask_input = int(mask_input)
    outs = _pst.sample_outputs(B, device)
    if B == 0:
        return outs
    plan = _program_plan(B, vocab_size, device, config, may_filter, mode_id, mask_input)
    coef = coefficients.to(device=device, dtype=torch.float32)
    if coef.dim() != 2 or (coef.shape[1] > 1 and coef.stride(1) != 1):
        coef = coef.reshape(B, -1).contiguous()
    f32, i64 = torch.float32, torch.int64
    temperature = _pst.row_param(temperature, f32, device)
    # The difference scale s. A linear program loads alpha but never uses it (its z has no
    # difference term), so any initialized (B,) float32 will do: the temperatures stand in,
    # instead of a zero-filled tensor (one fill kernel less per call).
    alpha = coef[:, 0].contiguous() if mode_id == 1 else temperature
    *workspaces, mstate, dbg = plan.workspace.allocate(device)
    common = (inputs, coef, mstate, tuple(t.stride(0) for t in inputs), coef.stride(0), 2,
              alpha, temperature, _pst.row_param(top_k, i64, device),
              _pst.row_param(top_p, f32, device), _pst.row_param(min_p, f32, device),
              _pst.row_param(seed, i64, device), _pst.row_param(step, i64, device), *workspaces,
              vocab_size, plan.n_seg)

    def run():
        if plan.mask_launch is not None:
            x = inputs[mask_input]
            log_a = _pst.row_param(mask_log_a, f32, device)
            launch_all((plan.mask_launch,), (x, x.stride(0), log_a, mstate, vocab_size))
        launch_all(plan.launches, common, outs + (dbg,))

    _pst.run_on(device, run)
    return outs
