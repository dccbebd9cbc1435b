"""The spec of proxykern in plain PyTorch: the oracle every backend is tested against.

Nothing here is tuned for speed; every step is written the way the contract
(``shared/design/API.md`` section 1) states it.

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


# ---- generation baseline ----

def _rows(value, B: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A sampling parameter as a (B,) tensor (unsigned 64-bit seeds wrap to int64, as in the op)."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=dtype).expand(B)
    if dtype == torch.int64 and value >= 2 ** 63:
        value -= 2 ** 64
    return torch.full((B,), value, dtype=dtype, device=device)


def naive_proxy_generate(base, expert, anti_expert, input_ids, attention_mask=None, *,
                         max_new_tokens, alpha=1.0, temperature=0.0, top_k=0, top_p=1.0,
                         min_p=0.0, seed=0, eos_token_id=None, pad_token_id=None,
                         expert_input_ids=None, expert_attention_mask=None,
                         return_logprobs=False, return_model_logprobs=False, streamer=None,
                         backend="auto", cuda_graphs="auto"):
    """The baseline: proxy-tuned decoding the way the paper's reference code does it.

    Each step runs the three models one after the other (eager, each with its own
    HF ``DynamicCache``), combines their last logits with plain PyTorch ops, draws
    the token (greedy: argmax; sampling: :func:`proxy_sample_reference`, the op's
    spec, so the tokens equal ``fused_proxy_generate``'s), and reads the finished
    flags on the host. Same arguments, checks and output as
    :func:`proxykern.fused_proxy_generate`; ``backend`` and ``cuda_graphs`` are
    checked but unused (nothing here is fused or captured). It is the spec the
    tests compare against and the baseline every benchmark reports a ratio to.
    """
    from .generate import ProxyGenerateOutput, empty_output, own_logprobs
    from .generation_args import prepare_generation
    from .ops import raise_on_bad_rows
    from .runner import cache_kwarg, new_dynamic_cache, positions_from_mask

    args = prepare_generation(
        base, expert, anti_expert, input_ids, attention_mask, max_new_tokens=max_new_tokens,
        alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, expert_input_ids=expert_input_ids,
        expert_attention_mask=expert_attention_mask, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs, streamer=streamer, backend=backend,
        cuda_graphs=cuda_graphs)
    B, dev, V = args.batch_size, args.device, args.vocab_size
    if streamer is not None:
        streamer.put(args.input_ids.cpu())
    if args.max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return empty_output(args)

    s = args.sampling
    params = dict(alpha=_rows(s["alpha"], B, torch.float32, dev),
                  temperature=_rows(s["temperature"], B, torch.float32, dev),
                  top_k=_rows(s["top_k"], B, torch.int64, dev),
                  top_p=_rows(s["top_p"], B, torch.float32, dev),
                  min_p=_rows(s["min_p"], B, torch.float32, dev),
                  seed=_rows(s["seed"], B, torch.int64, dev))
    names = ("base", "expert", "anti_expert")
    models = (base, expert, anti_expert)
    ids = [args.input_ids, args.expert_input_ids, args.input_ids]
    masks = [args.attention_mask, args.expert_attention_mask, args.attention_mask]
    positions = [positions_from_mask(m) for m in masks]
    caches = [new_dynamic_cache(m) for m in models]
    eos = torch.tensor(args.eos_token_ids, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    new_tokens, logprobs = [], []
    model_lps = {n: [] for n in names}

    with torch.no_grad():
        for t in range(args.max_new_tokens):
            logits = []
            for i, model in enumerate(models):
                out = model(input_ids=ids[i], attention_mask=masks[i], position_ids=positions[i],
                            use_cache=True, **{cache_kwarg(model): caches[i]})
                logits.append(out.logits[:, -1, :])

            if args.greedy:  # as the paper's code: argmax of the combined logits
                z = combine_logits(*logits, params["alpha"], V)
                status = (torch.isnan(z) | torch.isposinf(z)).any(1).int() * STATUS_NONFINITE \
                    | (~(z > float("-inf")).any(1)).int() * STATUS_EMPTY
                sampled = z.argmax(1)
                logprob = z.gather(1, sampled[:, None]).squeeze(1) - torch.logsumexp(z, 1)
            else:
                sampled, logprob, _, status = proxy_sample_reference(
                    *logits, params["alpha"], params["temperature"], params["top_k"],
                    params["top_p"], params["min_p"], params["seed"],
                    torch.full((B,), t, dtype=torch.int64, device=dev), V)
            status = status.masked_fill(finished, 0)
            if status.any():  # host check, every step
                try:
                    raise_on_bad_rows(status)
                except ValueError as exc:
                    raise ValueError(f"naive_proxy_generate: {exc} (generation step {t})") from None

            token = torch.where(finished, args.pad_token_id, sampled)
            new_tokens.append(token)
            logprobs.append(logprob.masked_fill(finished, 0.0))
            if args.return_model_logprobs:
                for name, lg in zip(names, logits):
                    model_lps[name].append(own_logprobs(lg, token, V).masked_fill(finished, 0.0))
            lengths += ~finished
            finished |= torch.isin(token, eos)
            if streamer is not None:
                streamer.put(token.cpu())
            if finished.all():
                break
            # Finished rows are fed their sampled token (always a valid id); it is discarded.
            for i in range(3):
                ids[i] = sampled[:, None]
                masks[i] = torch.cat([masks[i], masks[i].new_ones((B, 1))], dim=1)
                positions[i] = positions[i][:, -1:] + 1

    if streamer is not None:
        streamer.end()
    tokens = torch.stack(new_tokens, dim=1)
    return ProxyGenerateOutput(
        sequences=torch.cat([args.input_ids, tokens], dim=1), tokens=tokens, lengths=lengths,
        logprobs=torch.stack(logprobs, 1) if args.return_logprobs else None,
        model_logprobs={n: torch.stack(v, 1) for n, v in model_lps.items()}
        if args.return_model_logprobs else None)
