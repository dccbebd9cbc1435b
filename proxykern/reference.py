"""The spec of proxykern in plain PyTorch: the oracle every backend is tested against.

Nothing here is tuned for speed; every step is written the way the contract
(``docs/api.md``, section 1) states it.

Noise mapping (the same in every backend)
-----------------------------------------
The noise of token ``v`` in a row with ``seed`` and ``step`` (both int64) is

    key     = (k0, k1) = (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF)
    counter = (c0, c1, c2, c3) = (v >> 2, step & 0xFFFFFFFF, (step >> 32) & 0xFFFFFFFF, 0)
    x       = Philox4x32-10(counter, key)[v & 3]          # one 32-bit word
    u       = ((x >> 9) + 0.5) * 2**-23                    # exact in fp32, in (0, 1)
    g       = -log(-log(u))                                # standard Gumbel, fp32

so one Philox call serves four neighbouring tokens. Philox4x32-10 is the
generator behind ``tl.rand``/``tl.randint4x`` (Salmon et al., 2011): round
multipliers 0xD2511F53 / 0xCD9E8D57, key bumps 0x9E3779B9 / 0xBB67AE85.

Row seeds (the same in every backend; derived once, before any kernel runs)
----------------------------------------------------------------------------
A per-row ``seed`` tensor is used exactly as given. A Python-number ``seed``
gives row ``r`` its own seed, the ``(r + 1)``-th output of SplitMix64 started at
``seed`` (Steele et al., 2014; all arithmetic mod 2**64)::

    x = seed + (r + 1) * 0x9E3779B97F4A7C15
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    row_seed = x ^ (x >> 31)                  # as int64: the same 64 bits

So identical rows of one call are independent draws (as with
``torch.multinomial``), and a row's draw depends on its index in the batch only
through its seed: give seeds per row for batch invariance. :func:`row_seeds`
computes it on the device (no host sync, capturable).

Sampling semantics (where the contract is silent, the choices are written here)
--------------------------------------------------------------------------------
    z  = base + alpha * (expert - anti)       fp32; -inf in any input -> z = -inf
    z' = z / temperature                      (z' = z when temperature == 0)
    lse = logsumexp(z'),  logprob = z'[token] - lse   (before filtering)

* temperature == 0: token = argmax z, lowest index on ties; filters do not apply.
* Temperatures too small for fp32 (one rule, the same in every backend): a row is
  sampled exactly as at temperature 0 (greedy: token = argmax z, z' = z for logprob and
  lse, filters ignored) when T is below the smallest normal fp32 (0 < T < 2**-126), or
  when its largest z, divided by T in fp32 (correctly rounded), is +inf or -inf -- since
  division by T > 0 is monotone, that is exactly when the scaled logits overflow at the
  top (the T -> 0 limit of the draw is the argmax). Otherwise a z' = z / T that rounds to
  -inf (a finite z far below the max) is a token of probability 0, as exp would make it.
  ``temperature`` itself must be finite: the op rejects inf and NaN.
* top_k > 0: keep z' >= the k-th largest z'. Ties at the threshold are all kept
  (like Hugging Face's TopKLogitsWarper), so the kept set never depends on
  token order.
* top_p < 1: in the renormalised top-k distribution, sort descending; the
  threshold is the value of the first entry at which the cumulative mass reaches
  top_p; keep z' >= it (ties kept). At least one token is always kept.
* min_p > 0: keep tokens with exp(z' - max z') >= min_p, i.e. p >= min_p * p_max.
* The draw is Gumbel-max over the kept set: argmax(z' + g), lowest index on ties.

Row status (bit flags, 0 = fine): ``STATUS_NONFINITE`` when z holds NaN or
+inf, ``STATUS_EMPTY`` when no token is kept (every z is -inf). Such rows get
token -1; the eager op raises naming the row.
"""
from __future__ import annotations

import torch

STATUS_NONFINITE = 1
STATUS_EMPTY = 2

FP32_MIN_NORMAL = 2.0 ** -126  # temperatures below it sample as greedy (see above)

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
_MASK32 = 0xFFFFFFFF


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32-bit words of a * b for uint32 values held in int64.

    The int64 product may wrap, but its 64 bits are still the true product mod
    2**64, so shifting and masking recovers both words.
    """
    prod = b * a
    return (prod >> 32) & _MASK32, prod & _MASK32


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values; returns 4 words."""
    c0, c1, c2, c3, k0, k1 = (torch.as_tensor(x, dtype=torch.int64) & _MASK32
                              for x in (c0, c1, c2, c3, k0, k1))
    for _ in range(rounds):
        hi_a, lo_a = _mulhilo(PHILOX_ROUND_A, c0)
        hi_b, lo_b = _mulhilo(PHILOX_ROUND_B, c2)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & _MASK32
        k1 = (k1 + PHILOX_KEY_B) & _MASK32
    return c0, c1, c2, c3


def philox_bits(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """The 32-bit word (as int64) for every (row, token): shape (B, vocab)."""
    seed = seed.to(torch.int64).reshape(-1, 1)
    step = step.to(torch.int64).reshape(-1, 1).to(seed.device)
    v = torch.arange(vocab, device=seed.device, dtype=torch.int64).reshape(1, -1)
    words = philox4x32(v >> 2, step & _MASK32, (step >> 32) & _MASK32, torch.zeros_like(v),
                       seed & _MASK32, (seed >> 32) & _MASK32)
    lane = (v & 3).expand(seed.shape[0], -1)
    stacked = torch.stack(torch.broadcast_tensors(*words), dim=-1)
    return stacked.gather(-1, lane.unsqueeze(-1)).squeeze(-1)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """u in (0, 1), fp32, shape (B, vocab): ((x >> 9) + 0.5) * 2**-23."""
    x = philox_bits(seed, step, vocab)
    return ((x >> 9).to(torch.float32) + 0.5) * (2.0 ** -23)


def gumbel_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """Standard Gumbel noise g = -log(-log(u)), fp32, shape (B, vocab)."""
    u = uniform_noise(seed, step, vocab)
    return -torch.log(-torch.log(u))


SPLITMIX64_GAMMA = 0x9E3779B97F4A7C15
SPLITMIX64_MUL_A = 0xBF58476D1CE4E5B9
SPLITMIX64_MUL_B = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the signed int64 with the same bits."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


def _shr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 tensors holding 64-bit patterns."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's output mix of int64 tensors (wrapping arithmetic: the bits of mod 2**64)."""
    x = (x ^ _shr(x, 30)) * as_int64(SPLITMIX64_MUL_A)
    x = (x ^ _shr(x, 27)) * as_int64(SPLITMIX64_MUL_B)
    return x ^ _shr(x, 31)


def row_seeds(seed, index: torch.Tensor) -> torch.Tensor:
    """Derived per-row seeds (int64): ``splitmix64(seed + (index + 1) * 0x9E3779B97F4A7C15)``.

    ``seed`` is a Python int (any value that fits 64 bits, signed or unsigned) or an
    int64 tensor broadcastable to ``index``; ``index`` holds the row numbers (or,
    for several samples of one prompt, the sample number). See the module docstring.
    """
    base = as_int64(int(seed)) if not isinstance(seed, torch.Tensor) else seed.to(torch.int64)
    # int64 arithmetic wraps like uint64 mod 2**64, so the bits are SplitMix64's.
    return splitmix64((index.to(torch.int64) + 1) * as_int64(SPLITMIX64_GAMMA) + base)


def combine_logits(base, expert, anti, alpha, vocab_size: int) -> torch.Tensor:
    """z = base + alpha * (expert - anti) in fp32 over columns [0, vocab_size)."""
    b = base[:, :vocab_size].float()
    e = expert[:, :vocab_size].float()
    a = anti[:, :vocab_size].float()
    excluded = torch.isneginf(b) | torch.isneginf(e) | torch.isneginf(a)
    z = b + alpha.float().reshape(-1, 1) * (e - a)
    return z.masked_fill(excluded, float("-inf"))


def kept_mask(zp: torch.Tensor, top_k, top_p, min_p) -> torch.Tensor:
    """The kept set of each row of scaled logits z' (B, V) under top_k, top_p, min_p."""
    B, V = zp.shape
    finite = zp > float("-inf")
    sorted_z, _ = torch.sort(zp, dim=1, descending=True)
    row_max = sorted_z[:, :1]

    k = top_k.to(torch.int64).reshape(-1, 1)
    k = torch.where((k <= 0) | (k > V), torch.full_like(k, V), k)
    kth = sorted_z.gather(1, k - 1)
    kept = finite & (zp >= kth)

    # top_p over the renormalised top-k distribution, masses in float64.
    in_top_k = (sorted_z >= kth) & (sorted_z > float("-inf"))
    mass = torch.where(in_top_k, torch.exp((sorted_z - row_max).double()), 0.0)
    cum = mass.cumsum(1)
    total = cum[:, -1:]
    p = top_p.double().reshape(-1, 1)
    n_below = (cum < p * total).sum(1, keepdim=True)
    last_kept = (in_top_k.sum(1, keepdim=True) - 1).clamp(min=0)
    idx = torch.minimum(n_below, last_kept)
    p_threshold = sorted_z.gather(1, idx)
    kept &= torch.where(p >= 1.0, True, zp >= p_threshold)

    kept &= torch.exp(zp - row_max) >= min_p.float().reshape(-1, 1)
    return kept


def proxy_sample_reference(base, expert, anti, alpha, temperature, top_k, top_p, min_p,
                           seed, step, vocab_size: int):
    """The fused op's spec on per-row parameter tensors (all shape (B,)).

    Returns (tokens int64, logprobs fp32, lse fp32, status int32), each (B,).
    """
    z = combine_logits(base, expert, anti, alpha, vocab_size)
    return sample_logits_reference(z, temperature, top_k, top_p, min_p, seed, step)


def sample_logits_reference(z, temperature, top_k, top_p, min_p, seed, step):
    """Everything after the combination: temperature, filters, draw, logprobs, lse, status,
    on fp32 logits ``z`` of shape (B, V) (``-inf`` = excluded) and per-row tensors."""
    vocab_size = z.shape[1]
    temperature = temperature.float()
    greedy = temperature.abs() < FP32_MIN_NORMAL  # 0, and the subnormal temperatures
    t = torch.where(greedy, torch.ones_like(temperature), temperature).reshape(-1, 1)
    zp = z / t
    # The overflow rule: a row whose largest z / T is +-inf is sampled as greedy.
    live = (z > float("-inf")).any(1) & ~(torch.isnan(z) | torch.isposinf(z)).any(1)
    overflow = ~greedy & live & torch.isinf(zp.max(1).values)
    greedy = greedy | overflow  # (recomputed for every row: no host sync)
    t = torch.where(greedy, torch.ones_like(temperature), temperature).reshape(-1, 1)
    zp = z / t
    lse = torch.logsumexp(zp, dim=1)

    kept = kept_mask(zp, top_k, top_p, min_p)
    keys = torch.where(kept, zp + gumbel_noise(seed, step, vocab_size).to(zp.device),
                       float("-inf"))
    sampled = keys.argmax(1)
    tokens = torch.where(greedy, z.argmax(1), sampled)

    nonfinite = (torch.isnan(z) | torch.isposinf(z)).any(1)
    empty = ~(z > float("-inf")).any(1)
    status = (nonfinite.int() * STATUS_NONFINITE) | (empty.int() * STATUS_EMPTY)
    tokens = torch.where(status != 0, torch.full_like(tokens, -1), tokens)
    logprobs = zp.gather(1, tokens.clamp(min=0).reshape(-1, 1)).squeeze(1) - lse
    return tokens, logprobs, lse, status.to(torch.int32)


# --------------------------------------------------------------------------- logit programs
#
# The spec of proxykern.programs (docs/api.md, section 1b). A program reads N logit
# tensors by role, combines them in fp32 over [0, vocab_size) into z, optionally masks z
# with a set computed from one role's own logits, then samples z exactly like the op.

def _row_column(value, B: int, device) -> torch.Tensor:
    """A number or a (B,) / 0-d tensor as a (B, 1) fp32 column."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.reshape(-1, 1).expand(B, 1) if t.dim() == 0 else t.float().reshape(B, 1)


def plausibility_drop(logits: torch.Tensor, log_a: torch.Tensor) -> torch.Tensor:
    """The plausibility mask on fp32 logits L (B, V) given ``log_a`` = ``torch.log(a)``
    ((B,) or (B, 1) fp32): drop v iff ``L[v] - max_u L[u] < log_a`` (fp32), except in a
    row whose L holds NaN or +inf (left unmasked, so it fails as the op's bad rows do)."""
    m = logits.max(dim=1, keepdim=True).values
    drop = (logits - m) < log_a.float().reshape(-1, 1)
    bad_row = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1, keepdim=True)
    return drop & ~bad_row


def program_mask(kind: str, value, logits: torch.Tensor) -> torch.Tensor:
    """The tokens a program's mask drops (True = set to -inf), from one role's fp32 logits
    L (B, V) over the program's columns:

    * ``"plausibility"`` with a in (0, 1]: drop v iff ``L[v] - max_u L[u] < log(a)`` (fp32),
      i.e. keep exactly the tokens with ``p(v) >= a * max p`` (Li et al. 2022's
      adaptive plausibility constraint).
    * ``"top_p"`` with p in (0, 1]: drop what the op's own top-p rule (:func:`kept_mask`
      at temperature 1, no top-k, no min-p) does not keep in softmax(L).

    A row whose L holds NaN or +inf is not masked, so the combined z keeps its NaN/+inf
    and the row fails as the op's nonfinite rows do (never as an "empty" row).
    """
    B = logits.shape[0]
    col = _row_column(value, B, logits.device)
    if kind == "plausibility":
        return plausibility_drop(logits, torch.log(col))
    if kind != "top_p":
        raise ValueError(f"unknown mask kind {kind!r}")
    drop = ~kept_mask(logits, torch.zeros(B, dtype=torch.int64, device=logits.device),
                      col.reshape(B), torch.zeros(B, device=logits.device))
    bad_row = (torch.isnan(logits) | torch.isposinf(logits)).any(dim=1, keepdim=True)
    return drop & ~bad_row


def program_logits(program, logits: dict, vocab_size: int) -> torch.Tensor:
    """z of a program (fp32, (B, vocab_size)), mask applied:

    * a difference program (``program.difference = (b, e, a, s)``): ``z = L_b + s (L_e - L_a)``,
      evaluated exactly as :func:`combine_logits` (proxy tuning's order of operations);
    * otherwise ``z = c_0 L_0 + c_1 L_1 + ...`` in role order, left to right, each ``c_i``
      an fp32 column.

    A token that is ``-inf`` in any role's logits is excluded (``-inf``), as in the op;
    then the mask's dropped tokens are ``-inf``.
    """
    roles = program.roles
    first = logits[roles[0]]
    B, device = first.shape[0], first.device
    cols = {r: logits[r][:, :vocab_size].float() for r in roles}
    excluded = torch.zeros(B, vocab_size, dtype=torch.bool, device=device)
    for r in roles:
        excluded |= torch.isneginf(cols[r])
    if program.difference is not None:
        b, e, a, s = program.difference
        z = cols[b] + _row_column(s, B, device) * (cols[e] - cols[a])
    else:
        z = None
        for r, c in zip(roles, program.coefficients):
            term = _row_column(c, B, device) * cols[r]
            z = term if z is None else z + term
    z = z.masked_fill(excluded, float("-inf"))
    if program.mask is not None:
        z = z.masked_fill(program_mask(program.mask.kind, program.mask.value,
                                       cols[program.mask.role]), float("-inf"))
    return z


def program_reference(program, logits: dict, temperature, top_k, top_p, min_p, seed, step,
                      vocab_size: int):
    """The spec of ``proxykern.program_sample`` on per-row parameter tensors (each (B,)):
    :func:`program_logits`, then the op's sampling on z (:func:`sample_logits_reference`).

    ``logprobs = log_softmax(z')[token]`` and ``lse = logsumexp(z')`` are over the masked
    z' (dropped tokens are -inf, so they carry no mass). Returns (tokens, logprobs, lse,
    status) like :func:`proxy_sample_reference`.
    """
    z = program_logits(program, logits, vocab_size)
    return sample_logits_reference(z, temperature, top_k, top_p, min_p, seed, step)
