"""The fused proxy-tuning sampler in Triton, no host sync: one program per row at large
batch; at small batch each pass runs as one program per (segment, row).

Semantics are :mod:`proxykern.reference`'s (the spec); this module only makes them fast.
Every pass below re-reads the row's three logit inputs and recomputes
``z = base + alpha * (expert - anti)`` (fp32; ``-inf`` in any input gives ``-inf``)
and ``z' = z / T`` bit-identically (``T = 1`` for greedy rows).

Segments: a row is cut into segments of ``SEG = SEG_BLOCKS * BLOCK`` columns (a function
of the vocabulary alone). Every pass is computed segment by segment, each segment's
result reduced to a few numbers, and the segments folded in column order -- by the
row's program, or by programs of their own whose results the row's fold reads. The same
arithmetic in the same order either way: a row's result is bitwise the same alone or in
any batch, split or not.

Pass 1 (every row)
    Online max and rescaled sum-exp of ``z'`` (-> ``lse``), running argmax (lowest
    index), the count of tokens tied at the max, the smallest finite ``z'``, the
    status flags and -- for a sampling row with no filter -- the running Gumbel-max
    ``argmax(z' + g)``. All of it is kept per lane of the ``(BLOCK/4, 4)`` block
    (each lane its own online max and sum) and reduced once per segment, so the loop
    body has no cross-thread reduction. One Philox call serves four neighbouring
    tokens: a block's row ``i`` holds tokens ``4i .. 4i+3`` and each takes its word of
    that group's call. Greedy rows and sampling rows without filters are done after
    this one pass (then the overflow rule, see reference.py, by the row's program).

Threshold search (rows with ``top_k`` and/or ``top_p`` active)
    Both thresholds are "the largest present value ``v`` with ``F(v) >= target``",
    ``F(v)`` the count (``top_k``, target ``k``) or the mass ``sum exp(z' - max)``
    (``top_p``, target ``top_p * F(tau_k)``) of the tokens with ``z' >= v``; the answer
    is bracketed by present values ``lo <= tau <= hi``. A *pivot pass* evaluates ``P``
    pivots at once (half spaced evenly in value over ``[lo, hi]``, half evenly over
    the monotone int32 image of the float bits, so the bracket shrinks by ``>= P/2``
    per pass even for wild value ranges) and, per pivot, also the smallest present
    value at or above it and the largest below it, to which the new bracket snaps.
    A pivot pass reads ``SROWS * SBLOCK`` columns a step into a ``(SROWS, SBLOCK, P)``
    tile whose first axis Triton keeps within a thread (threads go to the pivots,
    warps to the slots): each thread folds many columns against its pivot into
    ``(SBLOCK, P)`` accumulators with no shuffle, reduced once per segment.
    The search is a small state machine (``_search_settle`` / ``_search_step``):
    phase 1 searches ``top_k``, phase 2 ``top_p``; a phase runs pivot passes until the
    bracket holds at most ``C`` tokens (or is a single value), and the last pass then
    resolves its threshold exactly. When ``top_p`` is active too and at most ``C``
    tokens lie at or above the ``top_k`` bracket, both thresholds are resolved together
    in the last pass, otherwise ``tau_k`` is made exact and ``top_p`` is searched in
    ``[tau_k, max]``. Tokens tied at the max that already reach ``k`` or the ``top_p``
    mass end the search before it starts.

Last pass (rows with any filter)
    Gumbel-max over the kept tokens. Tokens strictly above the bracket are kept
    (their count, mass and best key are aggregated); the bracket's tokens are
    compacted into ``C`` register slots (block-local prefix sum plus a binary search
    with ``tl.gather``; a segment's slots go after the previous segments'), and then
    the exact thresholds are found among the slots (``C x C`` comparisons), the
    slots' keys below the threshold dropped and the two best keys merged (lowest index
    on ties). Blocks holding no token that could be kept are skipped (no Philox).

Launches (``launch_plan``). Large batch (``B > SPLIT_MAX_BATCH``, or one segment): one
kernel, one program per row, every pass in it. Small batch: ``_segment_kernel`` runs
pass 1 as (segment, row) programs; if no row may filter (the caller's ``may_filter``),
``_proxy_sample_kernel`` folds it and finishes. Otherwise the search is staged:
``_plan_kernel`` folds pass 1 and writes each row's plan and search state to a
workspace; ``STAGED_ROUNDS`` times ``_pivot_segment_kernel`` (one pivot pass, (segment,
row) programs) and ``_pivot_fold_kernel`` (the row's fold, one search step);
``_last_segment_kernel`` runs the last pass for rows whose search is over; and
``_proxy_sample_kernel`` folds it -- or, for a row still searching (a large ``top_k``
with ``top_p``, a flat row), finishes the search and the last pass in its own program.
Every launch has a fixed grid: CUDA-graph capturable; a kernel with nothing to do for a
row returns at once.

Passes over the inputs per row (``debug=True`` reports them): greedy or plain
temperature sampling 1; ``min_p`` alone 2; ``top_k`` and/or ``top_p``: 2 + the pivot
passes. With ``P = 32``, ``C = 64`` that is 3-4 passes in all for one filter on
random 1k-32k-vocab rows, 3-4 for a small ``top_k`` (up to ~50) with ``top_p``, 6-8
for a large ``top_k`` with ``top_p`` (``tau_k`` must be exact before the ``top_p``
search). The key-space pivots bound the worst case by ``ceil(32 / log2(P/2)) + 1``
pivot passes per threshold (9 for ``P = 32``; ``MAX_PASSES`` caps NaN rows).

Loads and compilations: every pass reads its blocks as 1-D column ranges (reshaped
where Philox groups or pivot tiles need it), full blocks without a mask and the tail
(if any) with one, so aligned rows get 16-byte vector loads whatever the vocabulary
(e.g. 50257). ``vocab`` is not specialized: one compilation per kernel, dtype triple
and row alignment. ``benchmarks/triton_sm90_check.py`` compiles every kernel for
sm_90 without a GPU and reports registers, spills and vector loads (the numbers are in
benchmarks/NOTES.md; tests/test_triton_sm90.py fails on a spill). Timed on an H200 in
benchmarks/NOTES.md (v0.4): eager calls at small batch are host-bound (8 Python launches
for a filtered row); replayed from a CUDA graph, 16-38 us plain and 54-146 us filtered at
B <= 8. Since issue 27 a call's plan is prepared once per shape and each launch calls
Triton's launcher directly (:mod:`triton_launch`); ``benchmarks/triton_host_path.py``
measures that host path on a CPU.

Exactness notes: the kernels are launched with ``enable_fp_fusion=False`` on GPU so
that ``b + alpha * (e - a)`` is not contracted into an FMA (the reference rounds
twice), and use ``tl.math.div_rn`` for ``z / T`` (Triton's ``/`` is approximate on
NVIDIA). ``exp``/``log`` are Triton's, so Gumbel keys and masses may differ from the
reference's in the last bit; only exact near-ties can then pick another token. The
masses are summed in fp32 (the reference's top-p cumsum is fp64).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from .triton_launch import KernelLaunch, launch_all

__all__ = ["proxy_sample_triton", "default_config", "launch_plan"]

_STATUS_NONFINITE = tl.constexpr(1)  # reference.STATUS_NONFINITE
_STATUS_EMPTY = tl.constexpr(2)      # reference.STATUS_EMPTY
_FP32_MIN_NORMAL = tl.constexpr(1.1754943508222875e-38)  # reference.FP32_MIN_NORMAL


# Reductions are written ``tl.reduce(x, axis, _SUM / _MAX / _MIN)`` with the combine
# functions behind ``tl.sum`` / ``tl.max`` / ``tl.min``: the same IR on a GPU, but the
# interpreter runs these as one numpy call, while every call of a @jit function (which
# ``tl.sum`` & co. are) re-patches triton.language first -- about a third of the
# interpreter's time per row. Should a Triton release rename them, plain @jit
# combine functions take over (same results; only the interpreter gets slower).
@triton.jit
def _sum_combine(a, b):
    return a + b


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min_combine(a, b):
    return tl.minimum(a, b)


_SUM = getattr(tl.standard, "_sum_combine", _sum_combine)
_MAX = getattr(tl.standard, "_elementwise_max", _max_combine)
_MIN = getattr(tl.standard, "_elementwise_min", _min_combine)


# --------------------------------------------------------------------------- helpers

@triton.jit
def _combine(b, e, a, alpha, t_eff):
    """(z, z') of loaded values (any float dtype): z = b + alpha * (e - a), z' = z / T."""
    ninf: tl.constexpr = float("-inf")
    b = b.to(tl.float32)
    e = e.to(tl.float32)
    a = a.to(tl.float32)
    excluded = (b == ninf) | (e == ninf) | (a == ninf)
    # (zeroing e and a of excluded tokens spares the interpreter -inf - -inf warnings)
    e = tl.where(excluded, 0.0, e)
    a = tl.where(excluded, 0.0, a)
    z = tl.where(excluded, ninf, b + alpha * (e - a))
    zp = tl.math.div_rn(z, tl.broadcast_to(t_eff, z.shape))
    return z, zp


@triton.jit
def _block_logits(b_ptr, e_ptr, a_ptr, start, stop, alpha, t_eff, N: tl.constexpr,
                  MASKED: tl.constexpr):
    """(z, z') of columns start .. start + N - 1 as 1-D ranges (16-byte vector loads when
    the rows are aligned). MASKED=False: a full block, no mask (start + N <= stop), so
    the loads stay vectorized whatever the vocabulary; True: the tail, columns from
    ``stop`` on (the end of the segment or row) padded with -inf."""
    ninf: tl.constexpr = float("-inf")
    offs = start + tl.arange(0, N)
    if MASKED:
        mask = offs < stop
        z, zp = _combine(tl.load(b_ptr + offs, mask=mask, other=ninf),
                         tl.load(e_ptr + offs, mask=mask, other=0.0),
                         tl.load(a_ptr + offs, mask=mask, other=0.0), alpha, t_eff)
        zp = tl.where(mask, zp, ninf)  # padding stays -inf even for a (bad) T < 0
    else:
        z, zp = _combine(tl.load(b_ptr + offs), tl.load(e_ptr + offs), tl.load(a_ptr + offs),
                         alpha, t_eff)
    return z, zp


@triton.jit
def _scaled_logits(b_ptr, e_ptr, a_ptr, offs, mask, alpha, t_eff):
    """(z, z') for the columns ``offs`` of one row; masked columns give -inf."""
    ninf: tl.constexpr = float("-inf")
    b = tl.load(b_ptr + offs, mask=mask, other=ninf).to(tl.float32)
    e = tl.load(e_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a = tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    excluded = (b == ninf) | (e == ninf) | (a == ninf)
    # (zeroing e and a of excluded tokens spares the interpreter -inf - -inf warnings)
    e = tl.where(excluded, 0.0, e)
    a = tl.where(excluded, 0.0, a)
    z = tl.where(excluded, ninf, b + alpha * (e - a))
    zp = tl.math.div_rn(z, tl.broadcast_to(t_eff, z.shape))
    zp = tl.where(mask, zp, ninf)  # padding stays -inf even for a (bad) T < 0 or T = inf
    return z, zp


@triton.jit
def _greedy_stats(b_ptr, e_ptr, a_ptr, alpha, vocab, BLOCK: tl.constexpr):
    """(max z, sum exp(z - max), lowest argmax) of a row, for the overflow rule."""
    ninf: tl.constexpr = float("-inf")
    pinf: tl.constexpr = float("inf")
    BIG: tl.constexpr = 2147483647
    G: tl.constexpr = BLOCK // 4
    offs0 = tl.arange(0, G)[:, None] * 4 + tl.arange(0, 4)[None, :]
    one = tl.full([], 1.0, tl.float32)
    l_max = tl.full([G, 4], ninf, tl.float32)
    l_sum = tl.zeros([G, 4], dtype=tl.float32)
    l_arg = tl.full([G, 4], BIG, tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + offs0
        _, zp = _scaled_logits(b_ptr, e_ptr, a_ptr, cols, cols < vocab, alpha, one)
        new_max = tl.maximum(l_max, zp)
        ref = tl.where(new_max > ninf, new_max, 0.0)
        scale = tl.where(new_max == l_max, 1.0, tl.exp(l_max - ref))
        l_sum = l_sum * scale + tl.where(zp > ninf, tl.exp(zp - ref), 0.0)
        l_arg = tl.where(zp > l_max, cols, l_arg)
        l_max = new_max
    m = tl.reduce(l_max, None, _MAX)
    m_ref = tl.where(tl.abs(m) == pinf, 0.0, m)
    s = tl.reduce(tl.where(l_max > ninf, l_sum * tl.exp(l_max - m_ref), 0.0), None, _SUM)
    arg = tl.reduce(tl.where(l_max == m, l_arg, BIG), None, _MIN)
    return m, s, tl.where(arg == BIG, 0, arg)


@triton.jit
def _gumbel(seed_lo, seed_hi, step_lo, step_hi, group, lane):
    """Gumbel noise of the tokens ``4 * group + lane``; group (G, 1) int32, lane (1, 4).

    Philox4x32-10 of counter (group, step lo, step hi, 0) and key (seed lo, seed hi),
    the rounds of ``tl.philox`` written out (one call instead of two nested ones);
    each token takes word ``lane`` of its group's call.
    """
    ROUND_A: tl.constexpr = 0xD2511F53
    ROUND_B: tl.constexpr = 0xCD9E8D57
    KEY_A: tl.constexpr = 0x9E3779B9
    KEY_B: tl.constexpr = 0xBB67AE85
    c0 = group.to(tl.uint32, bitcast=True)
    zero = c0 * 0
    c1 = zero + step_lo
    c2 = zero + step_hi
    c3 = zero
    k0 = seed_lo
    k1 = seed_hi
    for _ in tl.static_range(10):
        a0 = c0
        a2 = c2
        c0 = tl.umulhi(ROUND_B, a2) ^ c1 ^ k0
        c2 = tl.umulhi(ROUND_A, a0) ^ c3 ^ k1
        c1 = tl.mul(a2, ROUND_B, sanitize_overflow=False)
        c3 = tl.mul(a0, ROUND_A, sanitize_overflow=False)
        k0 = tl.add(k0, KEY_A, sanitize_overflow=False)
        k1 = tl.add(k1, KEY_B, sanitize_overflow=False)
    x = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    u = ((x >> 9).to(tl.float32) + 0.5) * 1.1920928955078125e-07  # 2**-23, exact
    return -tl.log(-tl.log(u))


@triton.jit
def _float_key(x):
    """Monotone int32 image of fp32 values (-0.0 maps just below +0.0)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _key_float(k):
    """Inverse of :func:`_float_key`."""
    bits = tl.where(k >= 0, k, k ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


# --------------------------------------------------------------------------- threshold search
#
# The search state of a row, carried in scalars (and, between the staged kernels, in the
# state workspace): phase (0 done, 1 top_k search, 2 top_p search), the bracket lo <= hi,
# cnt_lo = count(z' >= lo), cnt_gt = count(z' > hi), total (the top_p mass base F(lo on
# entry), -1 before the phase's first pass), n (passes of the phase), and what the last
# pass needs: tau_d (the threshold when no bracket is left open), collect (the last pass
# resolves [c_lo, c_hi] among its slots), res_k / res_p (which thresholds it resolves),
# total_p (the top_p mass base, -1: measured in the last pass).

@triton.jit
def _pivots(lo, hi, P: tl.constexpr):
    """P pivots in [lo, hi]: P/2 evenly in value (the first is lo), P/2 evenly over the
    monotone int32 image of the float bits (the last is hi)."""
    PV: tl.constexpr = P // 2
    PK: tl.constexpr = P - PV
    j = tl.arange(0, P)
    frac = j.to(tl.float32) * (1.0 / PV)
    kstep = (j - PV + 1).to(tl.int64)
    pv_val = lo + (hi - lo) * frac
    klo = _float_key(lo).to(tl.int64)
    khi = _float_key(hi).to(tl.int64)
    pv_key = _key_float((klo + ((khi - klo) * kstep) // PK).to(tl.int32))
    pv = tl.where(j < PV, pv_val, pv_key)
    pv = tl.where(pv == pv, pv, lo)
    return tl.minimum(tl.maximum(pv, lo), hi)


@triton.jit
def _pivot_step(zp, pv, row_max, cnt2, fm2, amin2, bmax2, MASS: tl.constexpr):
    """One (SROWS, SBLOCK) block of a pivot pass folded into the (SBLOCK, P) accumulators.

    The SROWS columns of an accumulator slot are folded along the first axis of the
    (SROWS, SBLOCK, P) tile, which Triton keeps within a thread (threads and warps go
    to the pivots and slots first): many columns per thread, no shuffle in the loop.
    """
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    zc = zp[:, :, None]
    ge = zc >= pv[None, None, :]
    cnt2 += tl.reduce(ge.to(tl.int32), 0, _SUM)
    if MASS:
        w = tl.exp(zp - row_max)
        fm2 += tl.reduce(tl.where(ge, w[:, :, None], 0.0), 0, _SUM)
    amin2 = tl.minimum(amin2, tl.reduce(tl.where(ge, zc, pinf), 0, _MIN))
    bmax2 = tl.maximum(bmax2, tl.reduce(tl.where(ge, ninf, zc), 0, _MAX))
    return cnt2, fm2, amin2, bmax2


@triton.jit
def _pivot_segment(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start, seg_stop, pv, row_max,
                   MASS: tl.constexpr, SBLOCK: tl.constexpr, SROWS: tl.constexpr,
                   P: tl.constexpr):
    """A pivot pass over the columns [seg_start, seg_stop): per pivot, the count and (MASS)
    the mass sum exp(z' - row_max) of z' >= pivot, the smallest z' >= pivot and the
    largest z' < pivot. Accumulators (SBLOCK, P), reduced once at the end."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    N: tl.constexpr = SROWS * SBLOCK
    cnt2 = tl.zeros([SBLOCK, P], dtype=tl.int32)
    fm2 = tl.zeros([SBLOCK, P], dtype=tl.float32)
    amin2 = tl.full([SBLOCK, P], pinf, tl.float32)   # smallest z' >= pivot
    bmax2 = tl.full([SBLOCK, P], ninf, tl.float32)   # largest z' < pivot
    full_end = seg_start + ((seg_stop - seg_start) // N) * N
    for start in range(seg_start, full_end, N):
        _, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, seg_stop, alpha, t_eff, N, False)
        cnt2, fm2, amin2, bmax2 = _pivot_step(tl.reshape(zp, [SROWS, SBLOCK]), pv, row_max,
                                              cnt2, fm2, amin2, bmax2, MASS)
    if full_end < seg_stop:
        _, zp = _block_logits(b_ptr, e_ptr, a_ptr, full_end, seg_stop, alpha, t_eff, N, True)
        cnt2, fm2, amin2, bmax2 = _pivot_step(tl.reshape(zp, [SROWS, SBLOCK]), pv, row_max,
                                              cnt2, fm2, amin2, bmax2, MASS)
    return (tl.reduce(cnt2, 0, _SUM), tl.reduce(fm2, 0, _SUM), tl.reduce(amin2, 0, _MIN),
            tl.reduce(bmax2, 0, _MAX))


@triton.jit
def _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti, row64):
    """The row's three logit pointers."""
    return (base_ptr + row64 * stride_base, expert_ptr + row64 * stride_expert,
            anti_ptr + row64 * stride_anti)


@triton.jit
def _segment_ws(sg_f_ptr, sg_i_ptr, row64, n_seg, seg, SG_F: tl.constexpr, SG_I: tl.constexpr):
    """The (float, int32) workspace regions of one (row, segment) result of the staged
    kernels. A pivot pass: floats [mass (P) | smallest >= pivot (P) | largest < pivot
    (P)], ints [count (P)]. A last pass: floats [mass, key, slot values (C), slot keys
    (C)], ints [count, key index, slots used, slot indices (C)]."""
    slot = row64 * n_seg + seg
    return sg_f_ptr + slot * SG_F, sg_i_ptr + slot * SG_I


@triton.jit
def _pivot_pass(b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64, alpha, t_eff, vocab, n_seg, pv,
                row_max, from_ws, MASS: tl.constexpr, SEG: tl.constexpr, SBLOCK: tl.constexpr,
                SROWS: tl.constexpr, P: tl.constexpr, SG_F: tl.constexpr, SG_I: tl.constexpr):
    """A pivot pass's per-pivot results for the whole row, segment by segment folded in
    order: each segment computed by this program, or (``from_ws``) read from
    _pivot_segment_kernel's results -- the same numbers either way."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    pj = tl.arange(0, P)
    cnt = tl.zeros([P], dtype=tl.int32)
    fm = tl.zeros([P], dtype=tl.float32)
    amin = tl.full([P], pinf, tl.float32)
    bmax = tl.full([P], ninf, tl.float32)
    for seg in range(0, n_seg):
        if from_ws:
            f, i = _segment_ws(sg_f_ptr, sg_i_ptr, row64, n_seg, seg, SG_F, SG_I)
            c_s = tl.load(i + pj)
            f_s = tl.load(f + pj)
            a_s = tl.load(f + P + pj)
            b_s = tl.load(f + 2 * P + pj)
        else:
            seg_start = seg * SEG
            c_s, f_s, a_s, b_s = _pivot_segment(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start,
                                                tl.minimum(seg_start + SEG, vocab), pv, row_max,
                                                MASS, SBLOCK, SROWS, P)
        cnt += c_s
        fm += f_s
        amin = tl.minimum(amin, a_s)
        bmax = tl.maximum(bmax, b_s)
    return cnt, fm, amin, bmax


@triton.jit
def _search_settle(phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi,
                   res_k, res_p, total_p, m_run, p_on, C: tl.constexpr,
                   MAX_PASSES: tl.constexpr):
    """Ends the phase whose passes are over: a phase runs while lo < hi and more than C
    tokens are in [lo, hi] (top_k with top_p: at or above lo) and n < MAX_PASSES.

    top_k ends with a bracket -> the last pass resolves top_k (and top_p among all tokens
    >= lo); with lo == hi -> tau_d = lo, then the top_p search in [tau_d, max].
    top_p ends with a bracket -> the last pass resolves it; else tau_d = lo."""
    pinf: tl.constexpr = float("inf")
    open_ = lo < hi
    stop = tl.where((phase == 1) & p_on, cnt_lo, cnt_lo - cnt_gt)
    going = open_ & (stop > C) & (n < MAX_PASSES)
    end_k = (phase == 1) & (~going)
    k_coll = end_k & open_
    collect = tl.where(k_coll, 1, collect)
    c_lo = tl.where(k_coll, lo, c_lo)
    c_hi = tl.where(k_coll, tl.where(p_on, pinf, hi), c_hi)
    res_k = tl.where(k_coll, 1, res_k)
    res_p = tl.where(k_coll, p_on.to(tl.int32), res_p)
    k_done = end_k & (~open_)
    tau_d = tl.where(k_done, lo, tau_d)
    to_p = k_done & p_on                      # the top_p search starts at [tau_k, max]
    phase = tl.where(end_k, tl.where(to_p, 2, 0), phase)
    hi = tl.where(to_p, m_run, hi)
    cnt_gt = tl.where(to_p, 0, cnt_gt)
    n = tl.where(to_p, 0, n)
    total = tl.where(to_p, -1.0, total)

    open_ = lo < hi
    going = open_ & (cnt_lo - cnt_gt > C) & (n < MAX_PASSES)
    end_p = (phase == 2) & (~going)
    p_coll = end_p & open_
    collect = tl.where(p_coll, 1, collect)
    c_lo = tl.where(p_coll, lo, c_lo)
    c_hi = tl.where(p_coll, hi, c_hi)
    res_p = tl.where(p_coll, 1, res_p)
    total_p = tl.where(p_coll, total, total_p)
    tau_d = tl.where(end_p & (~open_), lo, tau_d)
    phase = tl.where(end_p, 0, phase)
    return phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p


@triton.jit
def _search_step(phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k,
                 res_p, total_p, passes, pv, cnt, fm, amin, bmax, m_run, k32, p_frac, p_on,
                 P: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Narrows the bracket from one pivot pass's per-pivot results, then settles.

    The threshold is the largest present z' value v with F(v) >= target: F the count and
    target top_k (phase 1), or F the mass and target top_p * F(lo on the phase's entry,
    measured by its first pass: pivot 0 is lo) (phase 2). lo snaps up to the smallest
    present value at or above the highest satisfied pivot, hi down to the largest
    present value below the lowest unsatisfied one."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    j = tl.arange(0, P)
    mass = phase == 2
    f_lo = tl.reduce(tl.where(j == 0, fm, 0.0), None, _SUM)
    total = tl.where(mass & (n == 0), f_lo, total)
    sat = tl.where(mass, fm >= p_frac * total, cnt >= k32) | (pv == lo)
    lo_pivot = tl.reduce(tl.where(sat, pv, ninf), None, _MAX)
    sel = sat & (pv == lo_pivot)
    new_lo = tl.reduce(tl.where(sel, amin, ninf), None, _MAX)
    cnt_lo = tl.reduce(tl.where(sel, cnt, -1), None, _MAX)
    unsat = ~sat
    hi_pivot = tl.reduce(tl.where(unsat, pv, pinf), None, _MIN)
    sel = unsat & (pv == hi_pivot)
    any_unsat = tl.reduce(unsat.to(tl.int32), None, _MAX) > 0
    hi = tl.where(any_unsat, tl.reduce(tl.where(sel, bmax, ninf), None, _MAX), hi)
    cnt_gt = tl.where(any_unsat, tl.reduce(tl.where(sel, cnt, -1), None, _MAX), cnt_gt)
    lo = new_lo
    n += 1
    passes += 1
    phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p = (
        _search_settle(phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi,
                       res_k, res_p, total_p, m_run, p_on, C, MAX_PASSES))
    return (phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p,
            total_p, passes)
# --------------------------------------------------------------------------- block steps, last pass

@triton.jit
def _pass1_step(z, zp, cols, group, lane, l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag,
                l_key, l_kidx, draw, seed_lo, seed_hi, step_lo, step_hi):
    """One (G, 4) block of pass 1 folded into the per-lane accumulators (module doc)."""
    ninf: tl.constexpr = float("-inf")
    pinf: tl.constexpr = float("inf")
    fin = zp > ninf
    l_flag |= (tl.where((z != z) | (z == pinf), 1, 0) | tl.where(z > ninf, 2, 0)
               | tl.where(zp != zp, 4, 0))
    l_fin += fin.to(tl.int32)
    l_min = tl.minimum(l_min, tl.where(fin, zp, pinf))
    new_max = tl.maximum(l_max, zp)
    ref = tl.where(new_max > ninf, new_max, 0.0)     # no -inf - -inf (NaN) for empty lanes
    scale = tl.where(new_max == l_max, 1.0, tl.exp(l_max - ref))
    l_sum = l_sum * scale + tl.where(fin, tl.exp(zp - ref), 0.0)
    l_cnt = tl.where(zp > l_max, 1, tl.where(zp == l_max, l_cnt + 1, l_cnt))
    l_arg = tl.where(zp > l_max, cols, l_arg)
    l_max = new_max
    if draw:
        gum = _gumbel(seed_lo, seed_hi, step_lo, step_hi, group, lane)
        key = tl.where(fin, zp + gum, ninf)
        l_kidx = tl.where(key > l_key, cols, l_kidx)
        l_key = tl.maximum(l_key, key)
    return l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx


@triton.jit
def _last_step(zp, cols, group, lane, do_collect, c_lo, c_hi, tau_d, m_run, min_p, seed_lo,
               seed_hi, step_lo, step_hi, a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key,
               n_coll, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, C: tl.constexpr):
    """One (G, 4) block of the last pass (module doc): tokens above the bracket folded into
    the per-lane accumulators, the bracket's tokens compacted into the C slots."""
    ninf: tl.constexpr = float("-inf")
    slot = tl.arange(0, C)
    fin = zp > ninf
    above = fin & tl.where(do_collect, zp > c_hi, zp >= tau_d)
    inwin = fin & do_collect & (zp >= c_lo) & (zp <= c_hi)
    # Skip the block when nothing in it can be kept.
    if tl.reduce((above | inwin).to(tl.int32), None, _MAX) > 0:
        w = tl.exp(zp - m_run)
        keepable = (above | inwin) & (w >= min_p)
        gum = _gumbel(seed_lo, seed_hi, step_lo, step_hi, group, lane)
        key = tl.where(keepable, zp + gum, ninf)
        a_cnt += above.to(tl.int32)
        a_mass += tl.where(above, w, 0.0)
        akey = tl.where(above, key, ninf)
        a_kidx = tl.where(akey > a_key, cols, a_kidx)
        a_key = tl.maximum(a_key, akey)
        # Compact the bracket's tokens into the slots n_coll, n_coll + 1, ...
        flat_in = tl.reshape(inwin.to(tl.int32), [BLOCK])
        n_blk = tl.reduce(flat_in, None, _SUM)
        if n_blk > 0:
            incl = tl.cumsum(flat_in, axis=0)
            want = slot - n_coll + 1        # the want-th bracket token of the block
            pos = tl.zeros([C], dtype=tl.int32)
            for bit in tl.static_range(LOG2_BLOCK - 1, -1, -1):  # lower_bound(incl, want)
                probe = tl.gather(incl, pos + ((1 << bit) - 1), 0)
                pos = tl.where(probe < want, pos + (1 << bit), pos)
            fill = (want >= 1) & (want <= n_blk)
            s_val = tl.where(fill, tl.gather(tl.reshape(zp, [BLOCK]), pos, 0), s_val)
            s_idx = tl.where(fill, tl.gather(tl.reshape(cols, [BLOCK]), pos, 0), s_idx)
            s_key = tl.where(fill, tl.gather(tl.reshape(key, [BLOCK]), pos, 0), s_key)
            n_coll += n_blk
    return a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll




@triton.jit
def _last_segment(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start, seg_stop, do_collect, c_lo,
                  c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
                  BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, C: tl.constexpr):
    """The last pass over the columns [seg_start, seg_stop): (count, mass, best Gumbel key
    and its index) of the kept tokens above the bracket (or, with no bracket, of all kept
    tokens), and the segment's first C bracket tokens in slots (value, index, key) with
    their count."""
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    G: tl.constexpr = BLOCK // 4
    grp0 = tl.arange(0, G)[:, None]
    lane = tl.arange(0, 4)[None, :]
    offs0 = grp0 * 4 + lane
    s_val = tl.full([C], ninf, tl.float32)
    s_idx = tl.full([C], 0, tl.int32)
    s_key = tl.full([C], ninf, tl.float32)
    n_coll = tl.full([], 0, tl.int32)
    a_cnt = tl.zeros([G, 4], dtype=tl.int32)      # per lane: tokens above the bracket,
    a_mass = tl.zeros([G, 4], dtype=tl.float32)   # their mass,
    a_key = tl.full([G, 4], ninf, tl.float32)     # best key among them and its index
    a_kidx = tl.full([G, 4], BIG, tl.int32)
    full_end = seg_start + ((seg_stop - seg_start) // BLOCK) * BLOCK
    for start in range(seg_start, full_end, BLOCK):
        _, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, seg_stop, alpha, t_eff, BLOCK, False)
        a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll = _last_step(
            tl.reshape(zp, [G, 4]), start + offs0, (start // 4) + grp0, lane, do_collect,
            c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
            a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll, BLOCK, LOG2_BLOCK, C)
    if full_end < seg_stop:
        _, zp = _block_logits(b_ptr, e_ptr, a_ptr, full_end, seg_stop, alpha, t_eff, BLOCK, True)
        a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll = _last_step(
            tl.reshape(zp, [G, 4]), full_end + offs0, (full_end // 4) + grp0, lane, do_collect,
            c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
            a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll, BLOCK, LOG2_BLOCK, C)
    key = tl.reduce(a_key, None, _MAX)
    kidx = tl.reduce(tl.where(a_key == key, a_kidx, BIG), None, _MIN)
    return (tl.reduce(a_cnt, None, _SUM), tl.reduce(a_mass, None, _SUM), key, kidx, s_val, s_idx,
            s_key, n_coll)


@triton.jit
def _merge_last(cnt_a, mass_a, key_a, kidx_a, val_a, idx_a, skey_a, n_a,
                cnt_b, mass_b, key_b, kidx_b, val_b, idx_b, skey_b, n_b, C: tl.constexpr):
    """Folds segment b's last-pass results into a's (the columns before b's): b's slots
    go after a's (the first C bracket tokens of the row in column order), ties of the
    best key keep a's lower index."""
    slot = tl.arange(0, C)
    pos = slot - n_a
    fill = (pos >= 0) & (pos < n_b)
    src = tl.where(fill, pos, 0)
    val = tl.where(fill, tl.gather(val_b, src, 0), val_a)
    idx = tl.where(fill, tl.gather(idx_b, src, 0), idx_a)
    skey = tl.where(fill, tl.gather(skey_b, src, 0), skey_a)
    take = key_b > key_a
    return (cnt_a + cnt_b, mass_a + mass_b, tl.where(take, key_b, key_a),
            tl.where(take, kidx_b, kidx_a), val, idx, skey, n_a + n_b)


@triton.jit
def _last_pass(b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64, alpha, t_eff, vocab, n_seg,
               from_ws, do_collect, c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo,
               step_hi, SEG: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr,
               C: tl.constexpr, SG_F: tl.constexpr, SG_I: tl.constexpr):
    """The last pass's results for the whole row, segment by segment folded in column
    order: each segment computed by this program, or (``from_ws``) read from
    _last_segment_kernel's results -- the same numbers either way."""
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    cj = tl.arange(0, C)
    cnt = tl.full([], 0, tl.int32)
    mass = tl.full([], 0.0, tl.float32)
    key = tl.full([], ninf, tl.float32)
    kidx = tl.full([], BIG, tl.int32)
    s_val = tl.full([C], ninf, tl.float32)
    s_idx = tl.full([C], 0, tl.int32)
    s_key = tl.full([C], ninf, tl.float32)
    n_coll = tl.full([], 0, tl.int32)
    for seg in range(0, n_seg):
        if from_ws:
            f, i = _segment_ws(sg_f_ptr, sg_i_ptr, row64, n_seg, seg, SG_F, SG_I)
            mass_b = tl.load(f + 0)
            key_b = tl.load(f + 1)
            val_b = tl.load(f + 2 + cj)
            skey_b = tl.load(f + 2 + C + cj)
            cnt_b = tl.load(i + 0)
            kidx_b = tl.load(i + 1)
            n_b = tl.load(i + 2)
            idx_b = tl.load(i + 3 + cj)
        else:
            seg_start = seg * SEG
            cnt_b, mass_b, key_b, kidx_b, val_b, idx_b, skey_b, n_b = _last_segment(
                b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start, tl.minimum(seg_start + SEG, vocab),
                do_collect, c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
                BLOCK, LOG2_BLOCK, C)
        cnt, mass, key, kidx, s_val, s_idx, s_key, n_coll = _merge_last(
            cnt, mass, key, kidx, s_val, s_idx, s_key, n_coll,
            cnt_b, mass_b, key_b, kidx_b, val_b, idx_b, skey_b, n_b, C)
    return cnt, mass, key, kidx, s_val, s_idx, s_key, n_coll


@triton.jit
def _resolve(do_collect, c_lo, tau_d, res_k, res_p, k32, p_frac, total_p, m_run, cnt_gt,
             mass_gt, best_key, best_idx, s_val, s_idx, s_key, n_coll, C: tl.constexpr):
    """The exact thresholds among the <= C bracket tokens (C x C comparisons), then the
    best key among the kept slots merged with the best above the bracket (lowest index
    on ties). Returns (token, the final value threshold)."""
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    best_idx = tl.where(best_key > ninf, best_idx, 0)
    tau = tau_d
    if do_collect:
        slot = tl.arange(0, C)
        valid = slot < n_coll
        w_s = tl.where(valid, tl.exp(s_val - m_run), 0.0)
        ge = (s_val[None, :] >= s_val[:, None]) & valid[None, :]   # [i, j]: v_j >= v_i
        cnt_ge = cnt_gt + tl.reduce(ge.to(tl.int32), 1, _SUM)          # count(z' >= v_i)
        mass_ge = mass_gt + tl.reduce(tl.where(ge, w_s[None, :], 0.0), 1, _SUM)
        tau = c_lo
        if res_k != 0:
            reach_k = valid & (cnt_ge >= k32)
            tau = tl.maximum(c_lo, tl.reduce(tl.where(reach_k, s_val, ninf), None, _MAX))
        if res_p != 0:
            in_k = valid & (s_val >= tau)
            total = tl.where(total_p >= 0.0, total_p,
                             mass_gt + tl.reduce(tl.where(in_k, w_s, 0.0), None, _SUM))
            target = p_frac * total
            reach_p = in_k & (mass_ge >= target)
            tau = tl.maximum(tau, tl.reduce(tl.where(reach_p, s_val, ninf), None, _MAX))
        kept = valid & (s_val >= tau)
        ckey = tl.where(kept, s_key, ninf)
        cbest = tl.reduce(ckey, None, _MAX)
        cidx = tl.reduce(tl.where(kept & (ckey == cbest), s_idx, BIG), None, _MIN)
        take = (cbest > best_key) | ((cbest == best_key) & (cidx < best_idx))
        best_idx = tl.where(take, cidx, best_idx)
    return best_idx, tau
# --------------------------------------------------------------------------- row parameters, pass 1

@triton.jit
def _row_params(alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row,
                vocab):
    """A row's parameters and the flags derived from them (the same in both kernels)."""
    alpha = tl.load(alpha_ptr + row).to(tl.float32)
    temp = tl.load(temp_ptr + row).to(tl.float32)
    top_k = tl.load(top_k_ptr + row).to(tl.int64)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)
    seed = tl.load(seed_ptr + row).to(tl.int64)
    step = tl.load(step_ptr + row).to(tl.int64)
    seed_lo = seed.to(tl.uint32)                 # truncation: the low 32 bits
    seed_hi = (seed >> 32).to(tl.uint32)
    step_lo = step.to(tl.uint32)
    step_hi = (step >> 32).to(tl.uint32)
    # Greedy: T == 0 and, by the overflow rule (reference.py), subnormal T.
    greedy = tl.abs(temp) < _FP32_MIN_NORMAL
    sampling = ~greedy              # a NaN temperature samples (ops.py flags it)
    t_eff = tl.where(greedy, 1.0, temp)
    # Filters as the reference applies them (a NaN top_p / min_p counts as active).
    k_may = sampling & (top_k > 0) & (top_k < vocab)
    p_on = sampling & (~(top_p >= 1.0))
    p_frac = tl.where(top_p > 0.0, top_p, 0.0)   # NaN / <= 0: the max alone
    m_on = sampling & (~(min_p <= 0.0))
    draw = sampling & (~k_may) & (~p_on) & (~m_on)
    return (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
            sampling, t_eff, k_may, p_on, m_on, draw)


@triton.jit
def _segment_stats(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start, seg_stop, draw,
                   seed_lo, seed_hi, step_lo, step_hi, BLOCK: tl.constexpr):
    """Pass 1 over the columns [seg_start, seg_stop) of a row, its lanes reduced:
    (max z', sum exp(z' - max), lowest argmax, count at the max, smallest finite z',
    count of z' > -inf, flag counts (int64, 21-bit fields), best Gumbel key, its index)."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    G: tl.constexpr = BLOCK // 4
    grp0 = tl.arange(0, G)[:, None]
    lane = tl.arange(0, 4)[None, :]
    offs0 = grp0 * 4 + lane                                   # (G, 4), token order
    # Per-lane accumulators, reduced once after the loop (no reduction per block):
    # each lane keeps its own online max / rescaled sum-exp.
    l_max = tl.full([G, 4], ninf, tl.float32)              # lane max z'
    l_sum = tl.zeros([G, 4], dtype=tl.float32)             # sum exp(z' - l_max)
    l_arg = tl.full([G, 4], BIG, tl.int32)                 # lane's lowest index at its max
    l_cnt = tl.zeros([G, 4], dtype=tl.int32)               # lane's count at its max
    l_min = tl.full([G, 4], pinf, tl.float32)              # lane's smallest finite z'
    l_fin = tl.zeros([G, 4], dtype=tl.int32)               # lane's count of z' > -inf
    l_flag = tl.zeros([G, 4], dtype=tl.int32)              # 1: z NaN/+inf, 2: z > -inf, 4: z' NaN
    l_key = tl.full([G, 4], ninf, tl.float32)              # lane's best Gumbel key
    l_kidx = tl.full([G, 4], BIG, tl.int32)
    # Full blocks without a mask, then the tail (so any vocabulary keeps vector loads).
    full_end = seg_start + ((seg_stop - seg_start) // BLOCK) * BLOCK
    for start in range(seg_start, full_end, BLOCK):
        z, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, seg_stop, alpha, t_eff, BLOCK, False)
        l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx = _pass1_step(
            tl.reshape(z, [G, 4]), tl.reshape(zp, [G, 4]), start + offs0, (start // 4) + grp0,
            lane, l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx,
            draw, seed_lo, seed_hi, step_lo, step_hi)
    if full_end < seg_stop:
        z, zp = _block_logits(b_ptr, e_ptr, a_ptr, full_end, seg_stop, alpha, t_eff, BLOCK, True)
        l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx = _pass1_step(
            tl.reshape(z, [G, 4]), tl.reshape(zp, [G, 4]), full_end + offs0,
            (full_end // 4) + grp0, lane, l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag,
            l_key, l_kidx, draw, seed_lo, seed_hi, step_lo, step_hi)
    m = tl.reduce(l_max, None, _MAX)
    m_ref = tl.where(tl.abs(m) == pinf, 0.0, m)
    sm = tl.reduce(tl.where(l_max > ninf, l_sum * tl.exp(l_max - m_ref), 0.0), None, _SUM)
    at_max = l_max == m
    arg = tl.reduce(tl.where(at_max, l_arg, BIG), None, _MIN)
    cnt = tl.reduce(tl.where(at_max, l_cnt, 0), None, _SUM)
    mn = tl.reduce(l_min, None, _MIN)
    nfin = tl.reduce(l_fin, None, _SUM)
    # One reduction for the three flags: the count of lanes with each bit, in 21-bit fields.
    fl = l_flag.to(tl.int64)
    flag_cnt = tl.reduce((fl & 1) | ((fl & 2) << 20) | ((fl & 4) << 40), None, _SUM)
    key = tl.reduce(l_key, None, _MAX)
    kidx = tl.reduce(tl.where(l_key == key, l_kidx, BIG), None, _MIN)
    return m, sm, arg, cnt, mn, nfin, flag_cnt, key, kidx


@triton.jit
def _merge_stats(m_a, s_a, arg_a, cnt_a, mn_a, nfin_a, fl_a, key_a, kidx_a,
                 m_b, s_b, arg_b, cnt_b, mn_b, nfin_b, fl_b, key_b, kidx_b):
    """Folds segment b's stats into a's (the columns before b's): exact, except the sum
    (rescaled to the new max), whose rounding depends only on the segment order."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    m = tl.maximum(m_a, m_b)
    ref = tl.where(tl.abs(m) == pinf, 0.0, m)
    ref_a = tl.where(tl.abs(m_a) == pinf, 0.0, m_a)
    ref_b = tl.where(tl.abs(m_b) == pinf, 0.0, m_b)
    sm = (tl.where(m_a > ninf, s_a * tl.exp(ref_a - ref), 0.0)
          + tl.where(m_b > ninf, s_b * tl.exp(ref_b - ref), 0.0))
    arg = tl.where(m_b > m_a, arg_b, arg_a)
    cnt = tl.where(m_a == m, cnt_a, 0) + tl.where(m_b == m, cnt_b, 0)
    take = key_b > key_a
    return (m, sm, arg, cnt, tl.minimum(mn_a, mn_b), nfin_a + nfin_b, fl_a + fl_b,
            tl.where(take, key_b, key_a), tl.where(take, kidx_b, kidx_a))


@triton.jit
def _pass1(b_ptr, e_ptr, a_ptr, ws_f_ptr, ws_i_ptr, row64, alpha, t_eff, vocab, n_seg, draw,
           seed_lo, seed_hi, step_lo, step_hi, SPLIT: tl.constexpr, SEG: tl.constexpr,
           BLOCK: tl.constexpr):
    """Pass 1 of a row, its segments folded in column order: computed by this program, or
    (SPLIT) read from _segment_kernel's workspace -- the same numbers either way."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    m_run = tl.full([], ninf, tl.float32)
    s_run = tl.full([], 0.0, tl.float32)
    arg_max = tl.full([], BIG, tl.int32)
    n_at_max = tl.full([], 0, tl.int32)                       # tokens with z' == max
    min_fin = tl.full([], pinf, tl.float32)                   # smallest finite z'
    n_fin = tl.full([], 0, tl.int32)                          # tokens with z' > -inf
    flag_cnt = tl.full([], 0, tl.int64)
    best_key = tl.full([], ninf, tl.float32)
    best_idx = tl.full([], BIG, tl.int32)
    for seg in range(0, n_seg):
        if SPLIT:
            slot = row64 * n_seg + seg
            m_b = tl.load(ws_f_ptr + slot * 4 + 0)
            s_b = tl.load(ws_f_ptr + slot * 4 + 1)
            mn_b = tl.load(ws_f_ptr + slot * 4 + 2)
            key_b = tl.load(ws_f_ptr + slot * 4 + 3)
            arg_b = tl.load(ws_i_ptr + slot * 5 + 0).to(tl.int32)
            cnt_b = tl.load(ws_i_ptr + slot * 5 + 1).to(tl.int32)
            nfin_b = tl.load(ws_i_ptr + slot * 5 + 2).to(tl.int32)
            fl_b = tl.load(ws_i_ptr + slot * 5 + 3)
            kidx_b = tl.load(ws_i_ptr + slot * 5 + 4).to(tl.int32)
        else:
            seg_start = seg * SEG
            m_b, s_b, arg_b, cnt_b, mn_b, nfin_b, fl_b, key_b, kidx_b = _segment_stats(
                b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start, tl.minimum(seg_start + SEG, vocab),
                draw, seed_lo, seed_hi, step_lo, step_hi, BLOCK)
        m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx = (
            _merge_stats(m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key,
                         best_idx, m_b, s_b, arg_b, cnt_b, mn_b, nfin_b, fl_b, key_b, kidx_b))
    return m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx


@triton.jit
def _plan(b_ptr, e_ptr, a_ptr, alpha, temp, top_k, p_frac, greedy, sampling, k_may, p_on, draw,
          vocab, m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx,
          BLOCK: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr):
    """From pass 1 to the row's plan: status, the overflow rule, lse, the pass-1 token
    (greedy, or Gumbel-max without filters), and the threshold search's initial state."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    arg_max = tl.where(arg_max == BIG, 0, arg_max)
    nonfinite = flag_cnt & 0x1FFFFF
    any_z = (flag_cnt >> 21) & 0x1FFFFF
    nan_zp = flag_cnt >> 42
    best_idx = tl.where(best_key > ninf, best_idx, 0)  # Gumbel-max without filters
    status = tl.where(nonfinite > 0, _STATUS_NONFINITE, 0) | tl.where(any_z > 0, 0, _STATUS_EMPTY)
    ok = status == 0
    # The overflow rule: a good sampled row whose max z / T is +-inf is sampled as greedy
    # (one more pass, over z, by this program). Rare: T tiny against the logits.
    overflow = sampling & ok & (tl.abs(m_run) == pinf)
    if overflow:
        m_run, s_run, arg_max = _greedy_stats(b_ptr, e_ptr, a_ptr, alpha, vocab, BLOCK)
    greedy = greedy | overflow
    sampling = ~greedy
    t_eff = tl.where(greedy, 1.0, temp)
    lse = m_run + tl.log(s_run)
    lse = tl.where(m_run == pinf, pinf, tl.where(m_run == ninf, ninf, lse))
    lse = tl.where(nan_zp > 0, float("nan"), lse)
    token = tl.where(greedy, arg_max, best_idx)

    # The threshold search (rows with top_k and/or top_p), in phases (_search_settle).
    need_last = ok & sampling & (~draw)
    k_on = k_may & (top_k < n_fin)
    k32 = tl.where(k_on, top_k, 1).to(tl.int32)
    # The tokens tied at the max already reach k or the top_p mass: no search.
    quick = (p_on & (p_frac * s_run <= n_at_max.to(tl.float32))) | (k_on & (k32 <= n_at_max))
    searching = need_last & (~quick)
    phase = tl.where(searching & k_on, 1, tl.where(searching & p_on, 2, 0)).to(tl.int32)
    tau_d = tl.where(need_last & quick, m_run, ninf)
    zero = tl.full([], 0, tl.int32)
    phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p = (
        _search_settle(phase, min_fin, m_run, n_fin, zero, tl.full([], -1.0, tl.float32), zero,
                       tau_d, zero, tl.full([], ninf, tl.float32), tl.full([], pinf, tl.float32),
                       zero, zero, tl.full([], -1.0, tl.float32), m_run, p_on, C, MAX_PASSES))
    return (m_run, lse, t_eff, token, status, greedy, need_last, k32, phase, lo, hi,
            cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p)


# --------------------------------------------------------------------------- kernels

# The state workspace of the staged kernels: per row, _STATE_F floats and _STATE_I int32
# at these offsets (_store_state's order).
_STATE_F = tl.constexpr(10)
_SF_M_RUN, _SF_T_EFF, _SF_LO, _SF_HI, _SF_TAU_D, _SF_C_LO, _SF_C_HI = (
    tl.constexpr(0), tl.constexpr(2), tl.constexpr(3), tl.constexpr(4), tl.constexpr(6),
    tl.constexpr(7), tl.constexpr(8))
_STATE_I = tl.constexpr(13)
_SI_NEED_LAST, _SI_PHASE, _SI_COLLECT = tl.constexpr(3), tl.constexpr(5), tl.constexpr(9)


@triton.jit
def _store_state(st_f_ptr, st_i_ptr, row64, m_run, lse, t_eff, lo, hi, total, tau_d, c_lo, c_hi,
                 total_p, token, status, greedy, need_last, k32, phase, cnt_lo, cnt_gt, n,
                 collect, res_k, res_p, passes):
    f = st_f_ptr + row64 * _STATE_F
    tl.store(f + 0, m_run)
    tl.store(f + 1, lse)
    tl.store(f + 2, t_eff)
    tl.store(f + 3, lo)
    tl.store(f + 4, hi)
    tl.store(f + 5, total)
    tl.store(f + 6, tau_d)
    tl.store(f + 7, c_lo)
    tl.store(f + 8, c_hi)
    tl.store(f + 9, total_p)
    i = st_i_ptr + row64 * _STATE_I
    tl.store(i + 0, token.to(tl.int32))
    tl.store(i + 1, status.to(tl.int32))
    tl.store(i + 2, greedy.to(tl.int32))
    tl.store(i + 3, need_last.to(tl.int32))
    tl.store(i + 4, k32.to(tl.int32))
    tl.store(i + 5, phase.to(tl.int32))
    tl.store(i + 6, cnt_lo.to(tl.int32))
    tl.store(i + 7, cnt_gt.to(tl.int32))
    tl.store(i + 8, n.to(tl.int32))
    tl.store(i + 9, collect.to(tl.int32))
    tl.store(i + 10, res_k.to(tl.int32))
    tl.store(i + 11, res_p.to(tl.int32))
    tl.store(i + 12, passes.to(tl.int32))


@triton.jit
def _load_state(st_f_ptr, st_i_ptr, row64):
    """The row state _store_state wrote (flags as int32; test them with != 0)."""
    f = st_f_ptr + row64 * _STATE_F
    i = st_i_ptr + row64 * _STATE_I
    return (tl.load(f + 0), tl.load(f + 1), tl.load(f + 2), tl.load(f + 3), tl.load(f + 4),
            tl.load(f + 5), tl.load(f + 6), tl.load(f + 7), tl.load(f + 8), tl.load(f + 9),
            tl.load(i + 0), tl.load(i + 1), tl.load(i + 2), tl.load(i + 3), tl.load(i + 4),
            tl.load(i + 5), tl.load(i + 6), tl.load(i + 7), tl.load(i + 8), tl.load(i + 9),
            tl.load(i + 10), tl.load(i + 11), tl.load(i + 12))


# Every kernel takes the same arguments up to the sizes (unused ones are ignored):
# the row inputs and parameters, the pass-1 workspace (ws_*, per (row, segment)), the
# staged kernels' state (st_*, per row) and per-segment results (sg_*, per (row,
# segment): a pivot pass's counts, masses, bounds or a last pass's aggregates and slots).
# vocab and n_seg are not specialized (one compilation for every vocabulary: full blocks
# need no mask); the row strides are (16-byte aligned rows keep vector loads), as are
# the pointers' alignments.

@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _segment_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        BLOCK: tl.constexpr, SEG: tl.constexpr):
    """Split pass 1: program (segment, row) writes the segment's stats (small batches)."""
    seg = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
     sampling, t_eff, k_may, p_on, m_on, draw) = _row_params(
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)
    seg_start = seg * SEG
    b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert,
                                    stride_anti, row64)
    m, sm, arg, cnt, mn, nfin, fl, key, kidx = _segment_stats(
        b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start,
        tl.minimum(seg_start + SEG, vocab), draw, seed_lo, seed_hi, step_lo, step_hi, BLOCK)
    slot = row64 * n_seg + seg
    tl.store(ws_f_ptr + slot * 4 + 0, m)
    tl.store(ws_f_ptr + slot * 4 + 1, sm)
    tl.store(ws_f_ptr + slot * 4 + 2, mn)
    tl.store(ws_f_ptr + slot * 4 + 3, key)
    tl.store(ws_i_ptr + slot * 5 + 0, arg.to(tl.int64))
    tl.store(ws_i_ptr + slot * 5 + 1, cnt.to(tl.int64))
    tl.store(ws_i_ptr + slot * 5 + 2, nfin.to(tl.int64))
    tl.store(ws_i_ptr + slot * 5 + 3, fl)
    tl.store(ws_i_ptr + slot * 5 + 4, kidx.to(tl.int64))


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _plan_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        BLOCK: tl.constexpr, SEG: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Staged: a row's pass-1 segments folded, its plan written to the state workspace."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert,
                                    stride_anti, row64)
    (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
     sampling, t_eff, k_may, p_on, m_on, draw) = _row_params(
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)
    m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx = _pass1(
        b_ptr, e_ptr, a_ptr, ws_f_ptr, ws_i_ptr, row64, alpha, t_eff, vocab, n_seg, draw,
        seed_lo, seed_hi, step_lo, step_hi, True, SEG, BLOCK)
    (m_run, lse, t_eff, token, status, greedy, need_last, k32, phase, lo, hi, cnt_lo, cnt_gt,
     total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p) = _plan(
        b_ptr, e_ptr, a_ptr, alpha, temp, top_k, p_frac, greedy, sampling, k_may, p_on, draw,
        vocab, m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx,
        BLOCK, C, MAX_PASSES)
    _store_state(st_f_ptr, st_i_ptr, row64, m_run, lse, t_eff, lo, hi, total, tau_d, c_lo, c_hi,
                 total_p, token, status, greedy, need_last, k32, phase, cnt_lo, cnt_gt, n,
                 collect, res_k, res_p, tl.full([], 1, tl.int32))


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _pivot_segment_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        SEG: tl.constexpr, SBLOCK: tl.constexpr, SROWS: tl.constexpr, P: tl.constexpr,
        SG_F: tl.constexpr, SG_I: tl.constexpr):
    """Staged: program (segment, row) runs a searching row's pivot pass over its segment."""
    seg = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    phase = tl.load(st_i_ptr + row64 * _STATE_I + _SI_PHASE)
    if phase != 0:
        f = st_f_ptr + row64 * _STATE_F
        m_run = tl.load(f + _SF_M_RUN)
        t_eff = tl.load(f + _SF_T_EFF)
        pv = _pivots(tl.load(f + _SF_LO), tl.load(f + _SF_HI), P)
        alpha = tl.load(alpha_ptr + row).to(tl.float32)
        b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base,
                                        stride_expert, stride_anti, row64)
        seg_start = seg * SEG
        seg_stop = tl.minimum(seg_start + SEG, vocab)
        if phase == 2:
            cnt, fm, amin, bmax = _pivot_segment(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start,
                                                 seg_stop, pv, m_run, True, SBLOCK, SROWS, P)
        else:
            cnt, fm, amin, bmax = _pivot_segment(b_ptr, e_ptr, a_ptr, alpha, t_eff, seg_start,
                                                 seg_stop, pv, m_run, False, SBLOCK, SROWS, P)
        pj = tl.arange(0, P)
        out_f, out_i = _segment_ws(sg_f_ptr, sg_i_ptr, row64, n_seg, seg, SG_F, SG_I)
        tl.store(out_f + pj, fm)
        tl.store(out_f + P + pj, amin)
        tl.store(out_f + 2 * P + pj, bmax)
        tl.store(out_i + pj, cnt)


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _pivot_fold_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        SEG: tl.constexpr, SBLOCK: tl.constexpr, SROWS: tl.constexpr, P: tl.constexpr,
        C: tl.constexpr, MAX_PASSES: tl.constexpr, SG_F: tl.constexpr, SG_I: tl.constexpr):
    """Staged: a searching row's pivot-pass segments folded in order, its search advanced."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    (m_run, lse, t_eff, lo, hi, total, tau_d, c_lo, c_hi, total_p, token, status, greedy,
     need_last, k32, phase, cnt_lo, cnt_gt, n, collect, res_k, res_p, passes) = _load_state(
        st_f_ptr, st_i_ptr, row64)
    if phase != 0:
        (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy_p,
         sampling, t_p, k_may, p_on, m_on, draw) = _row_params(
            alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)
        pv = _pivots(lo, hi, P)
        b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base,
                                        stride_expert, stride_anti, row64)
        cnt, fm, amin, bmax = _pivot_pass(b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64, alpha,
                                          t_eff, vocab, n_seg, pv, m_run, True, False, SEG,
                                          SBLOCK, SROWS, P, SG_F, SG_I)
        (phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p,
         total_p, passes) = _search_step(
            phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p,
            total_p, passes, pv, cnt, fm, amin, bmax, m_run, k32, p_frac, p_on, P, C, MAX_PASSES)
        _store_state(st_f_ptr, st_i_ptr, row64, m_run, lse, t_eff, lo, hi, total, tau_d, c_lo,
                     c_hi, total_p, token, status, greedy, need_last, k32, phase, cnt_lo, cnt_gt,
                     n, collect, res_k, res_p, passes)


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _last_segment_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        SEG: tl.constexpr, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, C: tl.constexpr,
        SG_F: tl.constexpr, SG_I: tl.constexpr):
    """Staged: program (segment, row) runs the last pass over its segment for a row whose
    search is over (a row still searching finishes in _proxy_sample_kernel)."""
    seg = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    st_i = st_i_ptr + row64 * _STATE_I
    if (tl.load(st_i + _SI_NEED_LAST) != 0) & (tl.load(st_i + _SI_PHASE) == 0):
        (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
         sampling, t_p, k_may, p_on, m_on, draw) = _row_params(
            alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)
        f = st_f_ptr + row64 * _STATE_F
        seg_start = seg * SEG
        b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base,
                                        stride_expert, stride_anti, row64)
        cnt, mass, key, kidx, s_val, s_idx, s_key, n_coll = _last_segment(
            b_ptr, e_ptr, a_ptr, alpha, tl.load(f + _SF_T_EFF), seg_start,
            tl.minimum(seg_start + SEG, vocab), tl.load(st_i + _SI_COLLECT) != 0,
            tl.load(f + _SF_C_LO), tl.load(f + _SF_C_HI), tl.load(f + _SF_TAU_D),
            tl.load(f + _SF_M_RUN), min_p, seed_lo, seed_hi, step_lo, step_hi, BLOCK, LOG2_BLOCK, C)
        cj = tl.arange(0, C)
        out_f, out_i = _segment_ws(sg_f_ptr, sg_i_ptr, row64, n_seg, seg, SG_F, SG_I)
        tl.store(out_f + 0, mass)
        tl.store(out_f + 1, key)
        tl.store(out_f + 2 + cj, s_val)
        tl.store(out_f + 2 + C + cj, s_key)
        tl.store(out_i + 0, cnt)
        tl.store(out_i + 1, kidx)
        tl.store(out_i + 2, n_coll)
        tl.store(out_i + 3 + cj, s_idx)


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _proxy_sample_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, st_f_ptr, st_i_ptr, sg_f_ptr, sg_i_ptr, vocab, n_seg,
        tokens_ptr, logprobs_ptr, lse_ptr, status_ptr, debug_ptr,
        BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
        SROWS: tl.constexpr, P: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr,
        DEBUG: tl.constexpr, SEG: tl.constexpr, SPLIT: tl.constexpr, STAGED: tl.constexpr,
        SG_F: tl.constexpr, SG_I: tl.constexpr):
    """A row's result. Unstaged: pass 1 (SPLIT: folded from _segment_kernel's results),
    the plan, the search and the last pass, all by this program. STAGED: from the state
    the staged kernels left; a search still open is finished here, as is its last pass."""
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    b_ptr, e_ptr, a_ptr = _row_ptrs(base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert,
                                    stride_anti, row64)
    (alpha, temp, top_k, top_p, p_frac, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
     sampling, t_eff, k_may, p_on, m_on, draw) = _row_params(
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)
    if STAGED:
        (m_run, lse, t_eff, lo, hi, total, tau_d, c_lo, c_hi, total_p, token, status, greedy,
         need_last, k32, phase, cnt_lo, cnt_gt, n, collect, res_k, res_p, passes) = _load_state(
            st_f_ptr, st_i_ptr, row64)
        need_last = need_last != 0
        staged_last = phase == 0            # _last_segment_kernel ran for this row
    else:
        m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx = _pass1(
            b_ptr, e_ptr, a_ptr, ws_f_ptr, ws_i_ptr, row64, alpha, t_eff, vocab, n_seg, draw,
            seed_lo, seed_hi, step_lo, step_hi, SPLIT, SEG, BLOCK)
        (m_run, lse, t_eff, token, status, greedy, need_last, k32, phase, lo, hi, cnt_lo,
         cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p, total_p) = _plan(
            b_ptr, e_ptr, a_ptr, alpha, temp, top_k, p_frac, greedy, sampling, k_may, p_on, draw,
            vocab, m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx,
            BLOCK, C, MAX_PASSES)
        passes = tl.full([], 1, tl.int32)
        staged_last = phase < 0             # never: there were no staged kernels

    # ------------------------------------------------ the threshold search (what is left)
    while phase != 0:
        pv = _pivots(lo, hi, P)
        if phase == 2:
            cnt, fm, amin, bmax = _pivot_pass(b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64,
                                              alpha, t_eff, vocab, n_seg, pv, m_run, False, True,
                                              SEG, SBLOCK, SROWS, P, SG_F, SG_I)
        else:
            cnt, fm, amin, bmax = _pivot_pass(b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64,
                                              alpha, t_eff, vocab, n_seg, pv, m_run, False, False,
                                              SEG, SBLOCK, SROWS, P, SG_F, SG_I)
        (phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p,
         total_p, passes) = _search_step(
            phase, lo, hi, cnt_lo, cnt_gt, total, n, tau_d, collect, c_lo, c_hi, res_k, res_p,
            total_p, passes, pv, cnt, fm, amin, bmax, m_run, k32, p_frac, p_on, P, C, MAX_PASSES)

    # ---------------------------------------------------------------- the last pass
    tau = tl.full([], float("-inf"), tl.float32)
    if need_last:
        do_collect = collect != 0
        cnt_gt, mass_gt, best_key, best_idx, s_val, s_idx, s_key, n_coll = _last_pass(
            b_ptr, e_ptr, a_ptr, sg_f_ptr, sg_i_ptr, row64, alpha, t_eff, vocab, n_seg,
            staged_last, do_collect, c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo,
            step_hi, SEG, BLOCK, LOG2_BLOCK, C, SG_F, SG_I)
        token, tau = _resolve(do_collect, c_lo, tau_d, res_k, res_p, k32, p_frac, total_p, m_run,
                              cnt_gt, mass_gt, best_key, best_idx, s_val, s_idx, s_key, n_coll, C)
        passes += 1

    ok = status == 0
    token = tl.where(ok, token, -1)
    # logprob = z'[token] - lse (column 0 for a bad row, like the reference's gather).
    tok_col = tl.maximum(token, 0)
    _, zp_tok = _scaled_logits(b_ptr, e_ptr, a_ptr, tok_col, tok_col < vocab, alpha, t_eff)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    tl.store(logprobs_ptr + row, zp_tok - lse)
    tl.store(lse_ptr + row, lse)
    tl.store(status_ptr + row, status.to(tl.int32))
    if DEBUG:  # passes over the inputs, final value threshold (-inf: none)
        tl.store(debug_ptr + 2 * row, passes.to(tl.float32))
        tl.store(debug_ptr + 2 * row + 1, tau)


# --------------------------------------------------------------------------- launcher

_MAX_PASSES = 48  # pivot passes per threshold at most (a bound for NaN rows)


def _interpreting() -> bool:
    """Whether the kernel was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_proxy_sample_kernel).__name__ == "InterpretedFunction"


def default_config(device: torch.device | None = None, vocab_size: int | None = None) -> dict:
    """Launch parameters.

    BLOCK: columns per step of pass 1 and the last pass; SBLOCK x SROWS: columns per step
    of a pivot pass (SBLOCK accumulator slots, each folding SROWS columns within a
    thread); P: pivots per pivot pass; C: bracket slots of the last pass; num_warps;
    SEG_BLOCKS: blocks per segment, the unit every pass is computed and folded in;
    SPLIT_MAX_BATCH: up to this batch (and with more than one segment) pass 1 runs as
    one program per (segment, row), and when a row may filter the search is staged too:
    STAGED_ROUNDS pivot passes and the last pass as (segment, row) programs, each
    followed by the row's fold (a search still open after them finishes in the row's
    program). Under the interpreter every block costs Python overhead, so it takes the
    row in a few large blocks; on a GPU the (SBLOCK, P) pivot accumulators must fit in
    registers. Every value may depend on the vocabulary, never on the batch (invariance).
    """
    if _interpreting():
        whole = triton.next_power_of_2(max(int(vocab_size or 1), 16))
        return dict(BLOCK=min(whole, 32768), SBLOCK=min(whole, 32768), SROWS=1, P=32, C=64,
                    num_warps=4, SEG_BLOCKS=1, SPLIT_MAX_BATCH=16, STAGED_ROUNDS=2)
    return dict(BLOCK=2048, SBLOCK=32, SROWS=16, P=32, C=64, num_warps=8, SEG_BLOCKS=2,
                SPLIT_MAX_BATCH=16, STAGED_ROUNDS=2)


def launch_plan(batch: int, vocab_size: int, cfg: dict, *, may_filter: bool = True,
                debug: bool = False) -> dict:
    """What a call runs: ``kernels`` [(kernel, grid, constexprs)] in launch order, the
    segment count ``n_seg`` and the ``workspace`` buffers in the kernels' argument order,
    each (elements, dtype) (0 elements: unused).

    ``cfg`` is a full :func:`default_config` (plus ``split`` / ``staged`` overrides).
    Used by the launcher and by the offline compile check (benchmarks/triton_sm90_check.py).
    """
    for name in ("BLOCK", "SBLOCK", "P", "C"):
        if cfg[name] < 4 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 4, got {cfg[name]}")
    if cfg["SROWS"] < 1 or cfg["SROWS"] & (cfg["SROWS"] - 1):
        raise ValueError(f"SROWS must be a power of two, got {cfg['SROWS']}")
    B = batch
    seg = cfg["SEG_BLOCKS"] * cfg["BLOCK"]
    n_seg = -(-vocab_size // seg)
    split = cfg.get("split", "auto")
    if split == "auto":
        split = n_seg > 1 and B <= cfg["SPLIT_MAX_BATCH"]
    split = bool(split) and B <= 65535  # (the grid's second dimension)
    staged = cfg.get("staged", "auto")
    if staged == "auto":
        staged = may_filter and cfg["STAGED_ROUNDS"] > 0
    staged = bool(staged) and split
    P, C, block = cfg["P"], cfg["C"], cfg["BLOCK"]
    log2_block = block.bit_length() - 1
    sg_f, sg_i = max(3 * P, 2 + 2 * C), max(P, 3 + C)  # per (row, segment)
    sizes = dict(SG_F=sg_f, SG_I=sg_i)
    kernels = []
    if split:
        kernels.append((_segment_kernel, (n_seg, B), dict(BLOCK=block, SEG=seg)))
    if staged:
        kernels.append((_plan_kernel, (B,), dict(BLOCK=block, SEG=seg, C=C,
                                                 MAX_PASSES=_MAX_PASSES)))
        for _ in range(cfg["STAGED_ROUNDS"]):
            pivot_pass = dict(SEG=seg, SBLOCK=cfg["SBLOCK"], SROWS=cfg["SROWS"], P=P, **sizes)
            kernels.append((_pivot_segment_kernel, (n_seg, B), pivot_pass))
            kernels.append((_pivot_fold_kernel, (B,), dict(C=C, MAX_PASSES=_MAX_PASSES,
                                                           **pivot_pass)))
        kernels.append((_last_segment_kernel, (n_seg, B), dict(
            SEG=seg, BLOCK=block, LOG2_BLOCK=log2_block, C=C, **sizes)))
    kernels.append((_proxy_sample_kernel, (B,), dict(
        BLOCK=block, LOG2_BLOCK=log2_block, SBLOCK=cfg["SBLOCK"], SROWS=cfg["SROWS"], P=P, C=C,
        MAX_PASSES=_MAX_PASSES, DEBUG=debug, SEG=seg, SPLIT=split, STAGED=staged, **sizes)))
    # In the kernels' argument order: (elements, dtype).
    workspace = dict(ws_f=(B * n_seg * 4 if split else 0, torch.float32),
                     ws_i=(B * n_seg * 5 if split else 0, torch.int64),
                     st_f=(B * _STATE_F.value if staged else 0, torch.float32),
                     st_i=(B * _STATE_I.value if staged else 0, torch.int32),
                     sg_f=(B * n_seg * sg_f if staged else 0, torch.float32),
                     sg_i=(B * n_seg * sg_i if staged else 0, torch.int32))
    return dict(kernels=kernels, n_seg=n_seg, workspace=workspace)


def proxy_sample_triton(base, expert, anti, alpha, temperature, top_k, top_p, min_p, seed, step,
                        vocab_size: int, *, may_filter: bool = True, config: dict | None = None,
                        debug: bool = False):
    """Triton backend of ``proxykern.proxy_sample`` (semantics: :mod:`proxykern.reference`).

    ``base``/``expert``/``anti``: (B, >= vocab_size) fp32/bf16/fp16 with unit column
    stride (any row stride, dtypes may differ); the parameters are (B,) tensors
    (alpha, temperature, top_p, min_p float32; top_k, seed, step int64). Returns
    ``(tokens int64, logprobs float32, lse float32, status int32)``, each (B,). No host
    sync (CUDA-graph capturable): one launch on the current stream at large batch; at
    small batch pass 1 is split by segments (two launches) and, unless ``may_filter`` is
    False (the caller knows no row has top_k / top_p / min_p active), the search and
    last pass are staged (``4 + 2 * STAGED_ROUNDS`` launches). ``may_filter`` only picks
    the launches: a wrong False gives the same results, found by one program per row.
    ``config`` overrides :func:`default_config` (``split`` / ``staged`` = True / False
    force those; the results are the same bits either way). ``debug=True`` appends a
    (B, 2) float32 tensor: the passes over the inputs each row took and its final value
    threshold (kept: ``z' >= threshold``, with ``min_p`` on top; -inf: none).

    Host work per call (issue 27): the plan of a shape is prepared once
    (:func:`prepared_plan`), the workspaces take one allocation per dtype (none for the
    pointers a plan never follows), and each launch after the first of its argument
    specialization is one call of Triton's launcher (:mod:`triton_launch`).
    """
    B = base.shape[0]
    device = base.device
    vocab_size = int(vocab_size)
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
    for name, t in (("base", base), ("expert", expert), ("anti", anti)):
        if t.dim() != 2 or t.shape[0] != B or t.shape[1] < vocab_size:
            raise ValueError(f"{name} must be (B={B}, >= {vocab_size}), got {tuple(t.shape)}")
        if t.shape[1] > 1 and t.stride(1) != 1:
            raise ValueError(f"{name} must have unit column stride")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but base is on {device}")
    outs = sample_outputs(B, device)
    dbg = torch.empty((B, 2), dtype=torch.float32, device=device) if debug else None
    if B == 0:
        return outs + (dbg,) if debug else outs
    prepared = prepared_plan(B, vocab_size, device, config, may_filter, debug)
    workspaces = prepared.workspace.allocate(device)
    if not debug:  # the kernels' debug pointer, never written: the workspace's last slot
        dbg, workspaces = workspaces[-1], workspaces[:-1]
    f32, i64 = torch.float32, torch.int64
    common = (base, expert, anti, base.stride(0), expert.stride(0), anti.stride(0),
              row_param(alpha, f32, device), row_param(temperature, f32, device),
              row_param(top_k, i64, device), row_param(top_p, f32, device),
              row_param(min_p, f32, device), row_param(seed, i64, device),
              row_param(step, i64, device), *workspaces, vocab_size, prepared.n_seg)
    run_on(device, lambda: launch_all(prepared.launches, common, outs + (dbg,)))
    return outs + (dbg,) if debug else outs


# --------------------------------------------------------------------------- launch helpers
# (shared with the program kernels, program_sample_triton.py)

def sample_outputs(B: int, device) -> tuple:
    """Empty (tokens int64, logprobs float32, lse float32, status int32), each (B,).

    Four allocations, not views of one: the registered ops return them, and an op's
    outputs may not alias one another."""
    return (torch.empty(B, dtype=torch.int64, device=device),
            torch.empty(B, dtype=torch.float32, device=device),
            torch.empty(B, dtype=torch.float32, device=device),
            torch.empty(B, dtype=torch.int32, device=device))


def row_param(t, dtype, device):
    """A per-row parameter as the kernels read it: (B,) contiguous ``dtype`` on ``device``.

    A tensor that already is one (what :class:`proxykern.params.SamplingParams` holds) is
    returned as it is, with no torch call that would make a new view per call."""
    if t.dtype != dtype or t.device != device:
        t = t.to(device=device, dtype=dtype)
    if t.dim() != 1:
        t = t.reshape(-1)
    return t if t.is_contiguous() else t.contiguous()


def launch_settings(B: int, vocab_size: int, device, config, may_filter: bool,
                    debug: bool = False):
    """(the launch plan, the launch keywords) for B rows of ``vocab_size`` columns."""
    cfg = default_config(device, vocab_size)
    if config:
        cfg.update(config)
    plan = launch_plan(B, vocab_size, cfg, may_filter=may_filter, debug=debug)
    launch = dict(num_warps=cfg["num_warps"])
    if not _interpreting():
        launch["enable_fp_fusion"] = False  # keep every product and sum rounded on its own
    return plan, launch


_UNUSED: dict = {}


def unused_pointer(device, dtype) -> torch.Tensor:
    """A tensor for a pointer argument the launched kernels never follow (a workspace of 0
    elements in this plan, the debug output without ``debug``): 16 bytes of ``dtype`` on
    ``device``, one kept per (device, dtype) and shared by every call -- nothing reads or
    writes it, and a captured CUDA graph may keep its address. (Made during a capture it
    would live in the graph's memory pool: then it is made for that call alone.)"""
    key = (device, dtype)
    found = _UNUSED.get(key)
    if found is None:
        found = torch.empty(16 // dtype.itemsize, dtype=dtype, device=device)
        if not (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
            _UNUSED[key] = found
    return found


class WorkspaceLayout:
    """Buffers of a plan, allocated with as few ``torch.empty`` as their dtypes.

    ``sizes``: (elements, dtype) per buffer, in the kernels' argument order; 0 elements:
    the kernels get a pointer of that dtype they never follow (:func:`unused_pointer`).
    :meth:`allocate` makes one allocation per dtype of the used buffers and splits it
    (one call) into the buffers, each starting 16-byte aligned -- Triton specializes on
    that, so they compile as separate allocations did.
    """

    ALIGN = 16

    def __init__(self, sizes):
        groups: dict = {}  # dtype -> [padded elements of each used buffer]
        recipe = []        # per buffer: (dtype, index in its group) or (dtype, None): unused
        for n, dtype in sizes:
            if n <= 0:
                recipe.append((dtype, None))
                continue
            per_align = max(1, self.ALIGN // dtype.itemsize)
            part = groups.setdefault(dtype, [])
            recipe.append((dtype, len(part)))
            part.append(-(-n // per_align) * per_align)
        self.groups = {dtype: tuple(parts) for dtype, parts in groups.items()}
        self.recipe = tuple(recipe)

    def allocate(self, device) -> tuple:
        """One tensor per buffer (uninitialized: the kernels write every workspace entry
        they read first)."""
        parts = {}
        for dtype, sizes in self.groups.items():
            whole = torch.empty(sum(sizes), dtype=dtype, device=device)
            parts[dtype] = whole.split_with_sizes(sizes) if len(sizes) > 1 else (whole,)
        return tuple(parts[dtype][i] if i is not None else unused_pointer(device, dtype)
                     for dtype, i in self.recipe)


class PreparedPlan:
    """A launch plan (:func:`launch_plan`) made ready to run many times: its launches
    (:class:`triton_launch.KernelLaunch`: grid, constexprs and options fixed, compiled
    kernels remembered), its segment count and its workspace layout (the plan's
    workspaces, then, without ``debug``, an unused float32 slot for the debug pointer)."""

    def __init__(self, B: int, vocab_size: int, device, config, may_filter: bool,
                 debug: bool = False):
        plan, options = launch_settings(B, vocab_size, device, config, may_filter, debug)
        self.plan = plan
        self.options = options
        self.n_seg = plan["n_seg"]
        self.launches = tuple(KernelLaunch(kernel, grid, consts, options,
                                           with_outputs=kernel is _proxy_sample_kernel)
                              for kernel, grid, consts in plan["kernels"])
        sizes = list(plan["workspace"].values()) + ([] if debug else [(0, torch.float32)])
        self.workspace = WorkspaceLayout(sizes)


_PLAN_CACHE_SIZE = 256  # shapes x plans kept (a bound; an evicted plan is rebuilt)


@functools.lru_cache(maxsize=_PLAN_CACHE_SIZE)
def _cached_plan(B, vocab_size, device, config_items, may_filter, debug) -> PreparedPlan:
    return PreparedPlan(B, vocab_size, device, dict(config_items), may_filter, debug)


def config_key(config):
    """A launch ``config`` (dict or None) as a hashable cache key (its sorted items), or
    None when a value is unhashable (then a plan is built for its call alone)."""
    items = tuple(sorted(config.items())) if config else ()
    try:
        hash(items)
    except TypeError:
        return None
    return items


def prepared_plan(B: int, vocab_size: int, device, config, may_filter: bool,
                  debug: bool = False) -> PreparedPlan:
    """The :class:`PreparedPlan` of a call, built once per (batch, vocabulary, device,
    config, may_filter, debug) -- everything :func:`launch_settings` reads -- and reused."""
    key = config_key(config)
    if key is None:
        return PreparedPlan(B, vocab_size, device, config, may_filter, debug)
    return _cached_plan(B, vocab_size, device, key, bool(may_filter), bool(debug))


def run_on(device, run) -> None:
    """``run()`` with ``device`` current (Triton launches on the current CUDA device); no
    device switch when it already is."""
    if device.type == "cuda" and device.index is not None and (
            device.index != torch.cuda.current_device()):
        with torch.cuda.device(device):
            run()
    else:
        run()
