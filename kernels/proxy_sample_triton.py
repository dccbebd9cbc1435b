"""The fused proxy-tuning sampler in Triton: one program per row (pass 1 split across
programs at small batch), no host sync.

Semantics are :mod:`proxykern.reference`'s (the spec); this module only makes them fast.
Every pass below re-reads the row's three logit inputs and recomputes
``z = base + alpha * (expert - anti)`` (fp32; ``-inf`` in any input gives ``-inf``)
and ``z' = z / T`` bit-identically (``T = 1`` for greedy rows).

Pass 1 (every row)
    Online max and rescaled sum-exp of ``z'`` (-> ``lse``), running argmax (lowest
    index), the count of tokens tied at the max, the smallest finite ``z'``, the
    status flags and -- for a sampling row with no filter -- the running Gumbel-max
    ``argmax(z' + g)``. All of it is kept per lane of the ``(BLOCK/4, 4)`` block
    (each lane its own online max and sum) and reduced once after the loop, so the
    loop body has no cross-thread reduction. One Philox call serves four
    neighbouring tokens: a block's row ``i`` holds tokens ``4i .. 4i+3`` and each
    takes its word of that group's call. Greedy rows and sampling rows without
    filters are done after this one pass. The row is cut into segments of
    ``SEG_BLOCKS * BLOCK`` columns (a function of the vocabulary alone); each segment's
    lanes are reduced to a few scalars and the segments folded in column order. At
    small batch (``B <= SPLIT_MAX_BATCH``) a first kernel runs one program per
    (segment, row) and the row's program folds their results; otherwise the row's
    program runs the segments itself. The same arithmetic in the same order either
    way: a row's result is bitwise the same alone or in any batch.

Threshold search (rows with ``top_k`` and/or ``top_p`` active)
    Both thresholds are "the largest present value ``v`` with ``F(v) >= target``",
    ``F(v)`` the count (``top_k``, target ``k``) or the mass ``sum exp(z' - max)``
    (``top_p``, target ``top_p * F(tau_k)``) of the tokens with ``z' >= v``; the answer
    is bracketed by present values ``lo <= tau <= hi``. A *pivot pass* evaluates ``P``
    pivots at once (half spaced evenly in value over ``[lo, hi]``, half evenly over
    the monotone int32 image of the float bits, so the bracket shrinks by ``>= P/2``
    per pass even for wild value ranges) and, per pivot, also the smallest present
    value at or above it and the largest below it, to which the new bracket snaps.
    Pivot passes run until the bracket holds at most ``C`` tokens (or is a single
    value); the last pass then resolves the threshold exactly. ``top_k`` is searched
    first; when ``top_p`` is active too and at most ``C`` tokens lie at or above the
    ``top_k`` bracket, both thresholds are resolved together in the last pass,
    otherwise ``tau_k`` is made exact and ``top_p`` is searched in ``[tau_k, max]``.
    Tokens tied at the max that already reach ``k`` or the ``top_p`` mass end the
    search before it starts.

Last pass (rows with any filter)
    Gumbel-max over the kept tokens. Tokens strictly above the bracket are kept
    (their count, mass and best key are aggregated); the <= ``C`` tokens inside the
    bracket are compacted into ``C`` register slots (block-local prefix sum plus a
    binary search with ``tl.gather``), and after the pass the exact thresholds are
    found among the slots (``C x C`` comparisons), the slots' keys below the
    threshold dropped and the two best keys merged (lowest index on ties). Blocks
    holding no token that could be kept are skipped (no Philox for them).

Passes over the inputs per row (``debug=True`` reports them): greedy or plain
temperature sampling 1; ``min_p`` alone 2; ``top_k`` and/or ``top_p``: 2 + the pivot
passes. With ``P = 32``, ``C = 64`` that is 3-4 passes in all for one filter on
random 1k-32k-vocab rows, 3-4 for a small ``top_k`` (up to ~50) with ``top_p``, 6-8
for a large ``top_k`` with ``top_p`` (``tau_k`` must be exact before the ``top_p``
search). The key-space pivots bound the worst case by ``ceil(32 / log2(P/2)) + 1``
pivot passes per threshold (9 for ``P = 32``; ``MAX_PASSES`` caps NaN rows).

Loads and compilations: every pass reads its blocks as 1-D column ranges (reshaped to
``(BLOCK/4, 4)`` where Philox groups matter), full blocks without a mask and the tail
(if any) with one, so aligned rows get 16-byte vector loads whatever the vocabulary
(e.g. 50257). ``vocab`` is not specialized: one compilation per dtype triple and row
alignment (times two: split or not; plus the segment kernel). A pivot pass keeps
``(SBLOCK, P)`` accumulators and reduces them once after its loop; pivot passes and the
last pass still run in the row's one program. Compiled offline for sm_90 (triton 3.8,
bf16, no GPU): main kernel 221 registers (176 when split), segment kernel 188, no
spills, 16-byte loads in pass 1 and the last pass (the previous 4-wide tiles: 181
registers, scalar loads only). Not yet timed on a GPU.

Exactness notes: the kernel is launched with ``enable_fp_fusion=False`` on GPU so
that ``b + alpha * (e - a)`` is not contracted into an FMA (the reference rounds
twice), and uses ``tl.math.div_rn`` for ``z / T`` (Triton's ``/`` is approximate on
NVIDIA). ``exp``/``log`` are Triton's, so Gumbel keys and masses may differ from the
reference's in the last bit; only exact near-ties can then pick another token. The
masses are summed in fp32 (the reference's top-p cumsum is fp64).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["proxy_sample_triton", "default_config"]

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
def _block_logits(b_ptr, e_ptr, a_ptr, start, vocab, alpha, t_eff, N: tl.constexpr,
                  MASKED: tl.constexpr):
    """(z, z') of columns start .. start + N - 1 as 1-D ranges (16-byte vector loads when
    the rows are aligned). MASKED=False: a full block, no mask (start + N <= vocab), so
    the loads stay vectorized whatever the vocabulary; True: the tail, padding -inf."""
    ninf: tl.constexpr = float("-inf")
    offs = start + tl.arange(0, N)
    if MASKED:
        mask = offs < vocab
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


@triton.jit
def _pivot_step(zp, pv, row_max, cnt2, fm2, amin2, bmax2, MASS: tl.constexpr):
    """One block of a pivot pass folded into the (SBLOCK, P) accumulators."""
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    zc = zp[:, None]
    ge = zc >= pv[None, :]
    cnt2 += ge.to(tl.int32)
    if MASS:
        w = tl.exp(zp - row_max)
        fm2 += tl.where(ge, w[:, None], 0.0)
    amin2 = tl.minimum(amin2, tl.where(ge, zc, pinf))
    bmax2 = tl.maximum(bmax2, tl.where(ge, ninf, zc))
    return cnt2, fm2, amin2, bmax2


@triton.jit
def _pivot_search(b_ptr, e_ptr, a_ptr, alpha, t_eff, vocab, row_max, lo, hi, cnt_lo, target,
                  p_frac, chain, MASS: tl.constexpr, SBLOCK: tl.constexpr, P: tl.constexpr,
                  C: tl.constexpr, MAX_PASSES: tl.constexpr):
    """Pivot passes narrowing the bracket [lo, hi] of the threshold (see module doc).

    The threshold is the largest present z' value v with F(v) >= target; on entry
    lo <= it <= hi (both present values, hi the row max), cnt_lo = count(z' >= lo)
    and F(lo) >= target (lo is taken to satisfy it). MASS: F is the mass
    sum exp(z' - row_max) of z' >= v and the target is p_frac * F(lo on entry),
    measured by the first pass; else F is the count and the target ``target``.
    Runs while lo < hi and more than C tokens are in [lo, hi] (``chain``: at or
    above lo). Returns (lo, hi, cnt_lo, cnt_gt = count(z' > hi), F(lo on entry)
    or -1 when no pass ran, passes).
    """
    PV: tl.constexpr = P // 2
    PK: tl.constexpr = P - PV
    j = tl.arange(0, P)
    frac = j.to(tl.float32) * (1.0 / PV)
    kstep = (j - PV + 1).to(tl.int64)
    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    n = tl.full([], 0, tl.int32)
    cnt_gt = tl.full([], 0, tl.int32)
    total = tl.full([], -1.0, tl.float32)
    stop = cnt_lo
    while (lo < hi) & (stop > C) & (n < MAX_PASSES):
        # P pivots in [lo, hi]: PV evenly in value (the first is lo), PK evenly in key
        # space (the last is hi).
        pv_val = lo + (hi - lo) * frac
        klo = _float_key(lo).to(tl.int64)
        khi = _float_key(hi).to(tl.int64)
        pv_key = _key_float((klo + ((khi - klo) * kstep) // PK).to(tl.int32))
        pv = tl.where(j < PV, pv_val, pv_key)
        pv = tl.where(pv == pv, pv, lo)
        pv = tl.minimum(tl.maximum(pv, lo), hi)

        # Per-(column slot, pivot) accumulators, reduced once after the loop: the loop
        # body has no cross-thread reduction.
        cnt2 = tl.zeros([SBLOCK, P], dtype=tl.int32)
        fm2 = tl.zeros([SBLOCK, P], dtype=tl.float32)
        amin2 = tl.full([SBLOCK, P], pinf, dtype=tl.float32)   # smallest z' >= pivot
        bmax2 = tl.full([SBLOCK, P], ninf, dtype=tl.float32)   # largest z' < pivot
        n_full = vocab - vocab % SBLOCK
        for start in range(0, n_full, SBLOCK):
            _, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, vocab, alpha, t_eff, SBLOCK, False)
            cnt2, fm2, amin2, bmax2 = _pivot_step(zp, pv, row_max, cnt2, fm2, amin2, bmax2, MASS)
        if n_full < vocab:
            _, zp = _block_logits(b_ptr, e_ptr, a_ptr, n_full, vocab, alpha, t_eff, SBLOCK, True)
            cnt2, fm2, amin2, bmax2 = _pivot_step(zp, pv, row_max, cnt2, fm2, amin2, bmax2, MASS)
        cnt = tl.reduce(cnt2, 0, _SUM)
        if MASS:
            fm = tl.reduce(fm2, 0, _SUM)
        above_min = tl.reduce(amin2, 0, _MIN)
        below_max = tl.reduce(bmax2, 0, _MAX)

        if MASS:
            f_lo = tl.reduce(tl.where(j == 0, fm, 0.0), None, _SUM)   # pivot 0 is lo
            total = tl.where(n == 0, f_lo, total)
            target = p_frac * total
            sat = (fm >= target) | (pv == lo)
        else:
            sat = (cnt >= target) | (pv == lo)
        lo_pivot = tl.reduce(tl.where(sat, pv, ninf), None, _MAX)
        sel = sat & (pv == lo_pivot)
        new_lo = tl.reduce(tl.where(sel, above_min, ninf), None, _MAX)
        cnt_lo = tl.reduce(tl.where(sel, cnt, -1), None, _MAX)
        unsat = ~sat
        hi_pivot = tl.reduce(tl.where(unsat, pv, pinf), None, _MIN)
        sel = unsat & (pv == hi_pivot)
        any_unsat = tl.reduce(unsat.to(tl.int32), None, _MAX) > 0
        hi = tl.where(any_unsat, tl.reduce(tl.where(sel, below_max, ninf), None, _MAX), hi)
        cnt_gt = tl.where(any_unsat, tl.reduce(tl.where(sel, cnt, -1), None, _MAX), cnt_gt)
        lo = new_lo
        stop = tl.where(chain, cnt_lo, cnt_lo - cnt_gt)
        n += 1
    return lo, hi, cnt_lo, cnt_gt, total, n


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


# --------------------------------------------------------------------------- kernel

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
    m_on = sampling & (~(min_p <= 0.0))
    draw = sampling & (~k_may) & (~p_on) & (~m_on)
    return (alpha, temp, top_k, top_p, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy,
            sampling, t_eff, k_may, p_on, m_on, draw)


@triton.jit
def _segment_stats(b_ptr, e_ptr, a_ptr, alpha, t_eff, vocab, seg_start, seg_stop, draw,
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
        z, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, vocab, alpha, t_eff, BLOCK, False)
        l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx = _pass1_step(
            tl.reshape(z, [G, 4]), tl.reshape(zp, [G, 4]), start + offs0, (start // 4) + grp0,
            lane, l_max, l_sum, l_arg, l_cnt, l_min, l_fin, l_flag, l_key, l_kidx,
            draw, seed_lo, seed_hi, step_lo, step_hi)
    if full_end < seg_stop:
        z, zp = _block_logits(b_ptr, e_ptr, a_ptr, full_end, vocab, alpha, t_eff, BLOCK, True)
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


@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _segment_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        ws_f_ptr, ws_i_ptr, vocab, n_seg, BLOCK: tl.constexpr, SEG: tl.constexpr):
    """Split pass 1: program (segment, row) writes the segment's stats (small batches)."""
    seg = tl.program_id(0)
    row = tl.program_id(1)
    row64 = row.to(tl.int64)
    (alpha, temp, top_k, top_p, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy, sampling,
     t_eff, k_may, p_on, m_on, draw) = _row_params(alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr,
                                                   min_p_ptr, seed_ptr, step_ptr, row, vocab)
    seg_start = seg * SEG
    m, sm, arg, cnt, mn, nfin, fl, key, kidx = _segment_stats(
        base_ptr + row64 * stride_base, expert_ptr + row64 * stride_expert,
        anti_ptr + row64 * stride_anti, alpha, t_eff, vocab, seg_start,
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


# vocab is not specialized (one compilation for every vocabulary: full blocks need no
# mask, so its divisibility does not matter); the row strides are (16-byte aligned rows
# keep vector loads), as are the pointers' alignments.
@triton.jit(do_not_specialize=["vocab", "n_seg"])
def _proxy_sample_kernel(
        base_ptr, expert_ptr, anti_ptr, stride_base, stride_expert, stride_anti,
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr,
        tokens_ptr, logprobs_ptr, lse_ptr, status_ptr, debug_ptr, ws_f_ptr, ws_i_ptr, vocab,
        n_seg, BLOCK: tl.constexpr, LOG2_BLOCK: tl.constexpr, SBLOCK: tl.constexpr,
        P: tl.constexpr, C: tl.constexpr, MAX_PASSES: tl.constexpr, DEBUG: tl.constexpr,
        SEG: tl.constexpr, SPLIT: tl.constexpr):
    row = tl.program_id(0)
    row64 = row.to(tl.int64)
    b_ptr = base_ptr + row64 * stride_base
    e_ptr = expert_ptr + row64 * stride_expert
    a_ptr = anti_ptr + row64 * stride_anti

    (alpha, temp, top_k, top_p, min_p, seed_lo, seed_hi, step_lo, step_hi, greedy, sampling,
     t_eff, k_may, p_on, m_on, draw_in_pass1) = _row_params(
        alpha_ptr, temp_ptr, top_k_ptr, top_p_ptr, min_p_ptr, seed_ptr, step_ptr, row, vocab)

    pinf: tl.constexpr = float("inf")
    ninf: tl.constexpr = float("-inf")
    BIG: tl.constexpr = 2147483647
    G: tl.constexpr = BLOCK // 4
    grp0 = tl.arange(0, G)[:, None]
    lane = tl.arange(0, 4)[None, :]
    offs0 = grp0 * 4 + lane                                   # (G, 4), token order
    n_full = vocab - vocab % BLOCK                            # columns in full blocks

    # ---------------------------------------------------------------- pass 1
    # Segment by segment (SEG columns, from the vocabulary alone), folded in order: by
    # this program, or (SPLIT, small batches) read from _segment_kernel's workspace --
    # the same numbers either way, so a row's result never depends on its batch.
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
                b_ptr, e_ptr, a_ptr, alpha, t_eff, vocab, seg_start,
                tl.minimum(seg_start + SEG, vocab), draw_in_pass1, seed_lo, seed_hi, step_lo,
                step_hi, BLOCK)
        m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key, best_idx = (
            _merge_stats(m_run, s_run, arg_max, n_at_max, min_fin, n_fin, flag_cnt, best_key,
                         best_idx, m_b, s_b, arg_b, cnt_b, mn_b, nfin_b, fl_b, key_b, kidx_b))
    arg_max = tl.where(arg_max == BIG, 0, arg_max)
    nonfinite = flag_cnt & 0x1FFFFF
    any_z = (flag_cnt >> 21) & 0x1FFFFF
    nan_zp = flag_cnt >> 42
    best_idx = tl.where(best_key > ninf, best_idx, 0)  # Gumbel-max without filters
    status = tl.where(nonfinite > 0, _STATUS_NONFINITE, 0) | tl.where(any_z > 0, 0, _STATUS_EMPTY)
    ok = status == 0
    # The overflow rule: a good sampled row whose max z / T is +-inf is sampled as greedy
    # (one more pass, over z). Rare: T tiny against the logits.
    overflow = sampling & ok & (tl.abs(m_run) == pinf)
    if overflow:
        m_run, s_run, arg_max = _greedy_stats(b_ptr, e_ptr, a_ptr, alpha, vocab, BLOCK)
    greedy = greedy | overflow
    sampling = ~greedy
    t_eff = tl.where(greedy, 1.0, temp)
    lse = m_run + tl.log(s_run)
    lse = tl.where(m_run == pinf, pinf, tl.where(m_run == ninf, ninf, lse))
    lse = tl.where(nan_zp > 0, float("nan"), lse)

    passes = tl.full([], 1, tl.int32)
    tau = tl.full([], ninf, tl.float32)
    if ok & sampling & (~draw_in_pass1):
        # ------------------------------------------------------ threshold search
        k_on = k_may & (top_k < n_fin)
        k32 = tl.where(k_on, top_k, 1).to(tl.int32)
        p_frac = tl.where(top_p > 0.0, top_p, 0.0)   # NaN / <= 0: the max alone
        tau_d = tl.full([], ninf, tl.float32)        # threshold when nothing is left open
        collect = tl.full([], 0, tl.int32)           # last pass resolves [c_lo, c_hi]
        c_lo = tl.full([], ninf, tl.float32)
        c_hi = tl.full([], pinf, tl.float32)
        res_k = tl.full([], 0, tl.int32)
        res_p = tl.full([], 0, tl.int32)
        total_p = tl.full([], -1.0, tl.float32)      # top_p mass base, -1: in the last pass
        if (p_on & (p_frac * s_run <= n_at_max.to(tl.float32))) | (k_on & (k32 <= n_at_max)):
            tau_d = m_run                            # the tokens at the max suffice
        else:
            cnt_lo = n_fin
            if k_on:
                lo_k, hi_k, cnt_lo, _gt, _t, n_k = _pivot_search(
                    b_ptr, e_ptr, a_ptr, alpha, t_eff, vocab, m_run, min_fin, m_run, n_fin, k32,
                    p_frac, p_on, False, SBLOCK, P, C, MAX_PASSES)
                passes += n_k
                if lo_k < hi_k:
                    collect = 1
                    c_lo = lo_k
                    c_hi = tl.where(p_on, pinf, hi_k)  # with top_p: all tokens >= lo_k
                    res_k = 1
                    res_p = p_on.to(tl.int32)
                else:
                    tau_d = lo_k
            if p_on & (collect == 0):
                lo_p0 = tl.where(k_on, tau_d, min_fin)
                lo_p, hi_p, _cl, _gt, total_p, n_p = _pivot_search(
                    b_ptr, e_ptr, a_ptr, alpha, t_eff, vocab, m_run, lo_p0, m_run, cnt_lo,
                    total_p, p_frac, False, True, SBLOCK, P, C, MAX_PASSES)
                passes += n_p
                if lo_p < hi_p:
                    collect = 1
                    c_lo = lo_p
                    c_hi = hi_p
                    res_p = 1
                else:
                    tau_d = lo_p

        # ---------------------------------------------------------- last pass
        passes += 1
        do_collect = collect != 0
        slot = tl.arange(0, C)
        s_val = tl.full([C], ninf, tl.float32)
        s_idx = tl.full([C], 0, tl.int32)
        s_key = tl.full([C], ninf, tl.float32)
        n_coll = tl.full([], 0, tl.int32)
        a_cnt = tl.zeros([G, 4], dtype=tl.int32)      # per lane: tokens above the bracket,
        a_mass = tl.zeros([G, 4], dtype=tl.float32)   # their mass,
        a_key = tl.full([G, 4], ninf, tl.float32)     # best key among them and its index
        a_kidx = tl.full([G, 4], BIG, tl.int32)
        for start in range(0, n_full, BLOCK):
            _, zp = _block_logits(b_ptr, e_ptr, a_ptr, start, vocab, alpha, t_eff, BLOCK, False)
            a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll = _last_step(
                tl.reshape(zp, [G, 4]), start + offs0, (start // 4) + grp0, lane, do_collect,
                c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
                a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll, BLOCK, LOG2_BLOCK, C)
        if n_full < vocab:
            _, zp = _block_logits(b_ptr, e_ptr, a_ptr, n_full, vocab, alpha, t_eff, BLOCK, True)
            a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll = _last_step(
                tl.reshape(zp, [G, 4]), n_full + offs0, (n_full // 4) + grp0, lane, do_collect,
                c_lo, c_hi, tau_d, m_run, min_p, seed_lo, seed_hi, step_lo, step_hi,
                a_cnt, a_mass, a_key, a_kidx, s_val, s_idx, s_key, n_coll, BLOCK, LOG2_BLOCK, C)
        cnt_gt = tl.reduce(a_cnt, None, _SUM)
        mass_gt = tl.reduce(a_mass, None, _SUM)
        best_key = tl.reduce(a_key, None, _MAX)
        best_idx = tl.reduce(tl.where(a_key == best_key, a_kidx, BIG), None, _MIN)
        best_idx = tl.where(best_key > ninf, best_idx, 0)

        tau = tau_d
        if do_collect:
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
            best_key = tl.maximum(best_key, cbest)

    token = tl.where(greedy, arg_max, best_idx)
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

def _interpreting() -> bool:
    """Whether the kernel was built for Triton's interpreter (TRITON_INTERPRET=1 at import)."""
    return type(_proxy_sample_kernel).__name__ == "InterpretedFunction"


def default_config(device: torch.device | None = None, vocab_size: int | None = None) -> dict:
    """Launch parameters.

    BLOCK: columns per step of pass 1 and the last pass; SBLOCK: of a pivot pass;
    P: pivots per pivot pass; C: bracket slots of the last pass; num_warps;
    SEG_BLOCKS: blocks per pass-1 segment; SPLIT_MAX_BATCH: up to this batch (and with
    more than one segment) pass 1 runs as one program per (segment, row).
    Under the interpreter every block costs Python overhead, so it takes the row in
    a few large blocks; on a GPU the (SBLOCK, P) pivot tiles must fit in registers.
    Every value here may depend on the vocabulary, never on the batch (invariance).
    """
    if _interpreting():
        whole = triton.next_power_of_2(max(int(vocab_size or 1), 16))
        return dict(BLOCK=min(whole, 32768), SBLOCK=min(whole, 32768), P=32, C=64, num_warps=4,
                    SEG_BLOCKS=1, SPLIT_MAX_BATCH=16)
    return dict(BLOCK=2048, SBLOCK=128, P=32, C=64, num_warps=8, SEG_BLOCKS=2, SPLIT_MAX_BATCH=16)


def proxy_sample_triton(base, expert, anti, alpha, temperature, top_k, top_p, min_p, seed, step,
                        vocab_size: int, *, config: dict | None = None,
                        debug: bool = False):
    """Triton backend of ``proxykern::proxy_sample`` (semantics: :mod:`proxykern.reference`).

    ``base``/``expert``/``anti``: (B, >= vocab_size) fp32/bf16/fp16 with unit column
    stride (any row stride, dtypes may differ); the parameters are (B,) tensors
    (alpha, temperature, top_p, min_p float32; top_k, seed, step int64). Returns
    ``(tokens int64, logprobs float32, lse float32, status int32)``, each (B,). One
    launch on the current stream (two at small batch: pass 1 split by segments), no
    host sync (CUDA-graph capturable). ``config`` overrides :func:`default_config`
    (``split=True/False`` forces the split; the results are the same bits either way). ``debug=True`` appends a (B, 2)
    float32 tensor: the passes over the inputs each row took and its final value
    threshold (kept: ``z' >= threshold``, with ``min_p`` on top; -inf: none).
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
    tokens = torch.empty(B, dtype=torch.int64, device=device)
    logprobs = torch.empty(B, dtype=torch.float32, device=device)
    lse = torch.empty(B, dtype=torch.float32, device=device)
    status = torch.empty(B, dtype=torch.int32, device=device)
    dbg = torch.empty((B if debug else 1, 2), dtype=torch.float32, device=device)
    outs = (tokens, logprobs, lse, status) + ((dbg,) if debug else ())
    if B == 0:
        return outs

    def param(t, dtype):
        return t.to(device=device, dtype=dtype).reshape(-1).contiguous()

    cfg = default_config(device, vocab_size)
    if config:
        cfg.update(config)
    for name in ("BLOCK", "SBLOCK", "P", "C"):
        if cfg[name] < 4 or cfg[name] & (cfg[name] - 1):
            raise ValueError(f"{name} must be a power of two >= 4, got {cfg[name]}")
    launch = dict(num_warps=cfg["num_warps"])
    if not _interpreting():
        launch["enable_fp_fusion"] = False  # keep b + alpha * (e - a) rounded twice
    seg = cfg["SEG_BLOCKS"] * cfg["BLOCK"]
    n_seg = -(-vocab_size // seg)
    split = cfg.get("split", "auto")
    if split == "auto":
        split = n_seg > 1 and B <= cfg["SPLIT_MAX_BATCH"]
    split = bool(split) and B <= 65535  # (the grid's second dimension)
    ws_f = torch.empty(B * n_seg * 4 if split else 1, dtype=torch.float32, device=device)
    ws_i = torch.empty(B * n_seg * 5 if split else 1, dtype=torch.int64, device=device)
    row_args = (base, expert, anti, base.stride(0), expert.stride(0), anti.stride(0),
                param(alpha, torch.float32), param(temperature, torch.float32),
                param(top_k, torch.int64), param(top_p, torch.float32), param(min_p, torch.float32),
                param(seed, torch.int64), param(step, torch.int64))
    consts = dict(BLOCK=cfg["BLOCK"], LOG2_BLOCK=cfg["BLOCK"].bit_length() - 1,
                  SBLOCK=cfg["SBLOCK"], P=cfg["P"], C=cfg["C"], MAX_PASSES=48, DEBUG=debug,
                  SEG=seg, SPLIT=split)

    def run():
        if split:
            _segment_kernel[(n_seg, B)](*row_args, ws_f, ws_i, vocab_size, n_seg,
                                        BLOCK=cfg["BLOCK"], SEG=seg, **launch)
        _proxy_sample_kernel[(B,)](*row_args, tokens, logprobs, lse, status, dbg, ws_f, ws_i,
                                   vocab_size, n_seg, **consts, **launch)

    if device.type == "cuda":
        with torch.cuda.device(device):
            run()
    else:
        run()
    return outs
