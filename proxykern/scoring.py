"""``proxy_logprobs``: teacher-forced log-probabilities under the proxy-tuned distribution.

What an evaluation harness's log-likelihood requests need: for each row, the
log-probability of a given continuation, token by token, under

    z = base + alpha * (expert - anti_expert);   logprob = log_softmax(z / temperature)[token]

Layout (one screen, on purpose)::

    per model   one forward over (its own context + the shared continuation), every row
                left-padded so the continuations end in the same column; only the last
                L + 1 positions' logits are kept (L = the longest continuation)
    per chunk   the scored (row, position) pairs, ``chunk_size`` at a time: gather their
                three logits rows, run the fused op (greedy) -> logsumexp(z) and argmax(z);
                the continuation token's z is gathered, logprob = z[token] / T - lse

Memory: the forwards return each model's logits of the scored positions in the
model's dtype (B x (L + 1) x V each, context positions are never materialised
where the model accepts ``logits_to_keep``); the combination holds at most
``chunk_size`` rows of V in fp32 at a time -- never fp32 B x L x V per model.
Padding positions are never fed to the op.

Choices where the contract is silent:

* Token ids in, not text: ``context`` / ``continuation`` are ragged lists of id
  sequences (or 2-D id tensors, every row full length). A tokenizer's
  context/continuation split (e.g. where a word-boundary space goes) is the
  caller's business, as in lm-evaluation-harness.
* Every context row needs at least one token (the first continuation token is
  predicted from it); a continuation may be empty (its log-likelihood is 0).
* ``temperature`` (default 1, must be > 0) divides z. With ``temperature == 1``
  one fused-op call per chunk gives both logsumexp and argmax; otherwise a
  second call computes ``logsumexp(z / T)``.
* ``greedy`` compares each token with argmax z (lowest index on ties), which
  is the greedy choice at any temperature.
* Models share one vocabulary up to padding, and the proxy vocabulary is the
  base's (generation's rule, :mod:`proxykern.generation_args`): where the expert or
  anti-expert is narrower the delta is zero (``z = base``). Continuation ids may be
  any base token; a model that cannot read one reads ``pad_token_id`` in its place
  (default as in generation: the base's generation config, else its first EOS,
  else 0). Context ids must be readable by the models that read them.
* A model that appears twice with the same context (``expert is anti_expert``,
  or ``base`` reused) runs once.
"""
from __future__ import annotations

import functools
import inspect
import numbers
from typing import NamedTuple

import torch

from .generation_args import resolve_pad_token_id, vocab_plan
from .models import MODEL_NAMES, input_width, model_device, position_limit
from .ops import check_sampling_arg, proxy_sample_with_status, resolve_backend
from .outputs import own_logprobs
from .reference import STATUS_EMPTY, STATUS_NONFINITE
from .engine.runner import left_pad

#: Scored positions combined per fused-op call (rows of V in fp32 held at once).
DEFAULT_CHUNK_SIZE = 1024


class ProxyLogprobs(NamedTuple):
    """Result of :func:`proxy_logprobs`. Token ``j`` of row ``i``'s continuation is at ``[i, j]``.

    ``logprobs`` (B, L) float32: ``log_softmax(z / temperature)[token]``, 0.0 past a row's
    end, so ``logprobs.sum(1)`` is each continuation's log-likelihood.
    ``greedy`` (B, L) bool: the token is ``argmax z``; True past a row's end, so
    ``greedy.all(1)`` says whether the whole continuation is the greedy one.
    ``lengths`` (B,) int64: continuation lengths.
    ``model_logprobs``: ``{"base", "expert", "anti_expert"}`` -> (B, L) float32, each
    model's own ``log_softmax`` (T = 1) of the token over the shared vocabulary, or None.
    """

    logprobs: torch.Tensor
    greedy: torch.Tensor
    lengths: torch.Tensor
    model_logprobs: dict | None


# --------------------------------------------------------------------------- checks

def _id_rows(name: str, value, B: int | None, allow_empty: bool) -> list[list[int]]:
    """Ragged token-id rows from a list of sequences or a 2-D integer tensor."""
    if isinstance(value, torch.Tensor):
        if value.dtype.is_floating_point or value.is_complex() or value.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer token ids, got {value.dtype}")
        if value.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (batch, length) or a list of "
                             f"sequences, got shape {tuple(value.shape)}")
        rows = value.tolist()
    elif isinstance(value, (list, tuple)):
        rows = []
        for i, r in enumerate(value):
            if isinstance(r, torch.Tensor):
                if r.dim() != 1 or r.dtype.is_floating_point or r.dtype == torch.bool:
                    raise TypeError(f"{name}[{i}] must be a 1-D integer tensor or a list of "
                                    f"ints, got {r.dtype} of shape {tuple(r.shape)}")
                r = r.tolist()
            if not isinstance(r, (list, tuple)) or any(
                    isinstance(t, bool) or not isinstance(t, numbers.Integral) for t in r):
                raise TypeError(f"{name}[{i}] must be a sequence of int token ids, got {r!r:.80}")
            rows.append([int(t) for t in r])
    else:
        raise TypeError(f"{name} must be a list of token-id sequences or a 2-D tensor, "
                        f"got {type(value).__name__}")
    if not rows:
        raise ValueError(f"{name} is empty: need at least one row")
    if B is not None and len(rows) != B:
        raise ValueError(f"{name} has {len(rows)} rows but context has {B}")
    if not allow_empty:
        for i, r in enumerate(rows):
            if not r:
                raise ValueError(f"{name}[{i}] is empty: every row needs at least one context "
                                 f"token (e.g. a BOS/EOS id)")
    return rows


def _check_range(name: str, rows, limit: int | None, what: str) -> None:
    if limit is None:
        return
    for i, r in enumerate(rows):
        if r and (min(r) < 0 or max(r) >= limit):
            t = min(r) if min(r) < 0 else max(r)
            raise ValueError(f"{name}[{i}] holds token id {t}, outside [0, {limit}) ({what})")


def _check_positions(base, expert, anti_expert, ctx, e_ctx, cont, e_name: str) -> None:
    """Every model reads its context and the continuation: their tokens must fit its
    positions (:func:`proxykern.generation_args.position_limit`); raises naming the row."""
    for name, model, rows, rows_name in (("base", base, ctx, "context"),
                                         ("expert", expert, e_ctx, e_name),
                                         ("anti_expert", anti_expert, ctx, "context")):
        limit = position_limit(model)
        if limit is None:
            continue
        for i, (c, x) in enumerate(zip(rows, cont)):
            if len(c) + len(x) > limit:
                raise ValueError(
                    f"{rows_name}[{i}] + continuation[{i}] hold {len(c) + len(x)} tokens but "
                    f"{name} reads at most {limit} positions (max_position_embeddings): cut "
                    f"the context from the left")


def _per_row(name: str, value, B: int, device, positive: bool):
    value = check_sampling_arg(name, value, B)
    if isinstance(value, torch.Tensor):
        value = value.to(device=device, dtype=torch.float32)
        bad = ~torch.isfinite(value)
        if positive:
            bad |= value <= 0
        rows = torch.nonzero(bad).flatten().tolist()
        if rows:
            rule = "must be finite and > 0" if positive else "must be finite"
            raise ValueError(f"{name}[{rows[0]}] {rule}, got {value[rows[0]].item()!r}")
        return value
    if positive and not value > 0:
        raise ValueError(f"{name} must be > 0 (log-probabilities of a greedy distribution "
                         f"are undefined), got {value!r}")
    return float(value)


# --------------------------------------------------------------------------- forwards

@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(forward_fn) -> bool:
    return "logits_to_keep" in inspect.signature(forward_fn).parameters


def _pack(contexts, continuations, device):
    """Left-padded (B, T) ids and mask of context + continuation (continuations end-aligned)."""
    return left_pad([c + x for c, x in zip(contexts, continuations)], 0, device)


def _forward_scored(model, ids, mask, n_scored: int) -> torch.Tensor:
    """Logits (B, n_scored, V) of the positions that predict the last ``n_scored`` columns."""
    kwargs = {}
    if _accepts_logits_to_keep(type(model).forward):
        kwargs["logits_to_keep"] = n_scored + 1
    position_ids = (mask.cumsum(-1) - 1).clamp_(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                **kwargs)
    logits = out.logits
    return logits[:, -(n_scored + 1):-1, :]


def _run_forwards(jobs: dict, device) -> dict:
    """Run each distinct (model, ids, mask) job: on CUDA all but the first on their own
    side streams, launched first so they overlap the first (the base) on the current one."""
    items = list(jobs.items())
    if device.type != "cuda":
        return {key: _forward_scored(*job) for key, job in items}
    main = torch.cuda.current_stream(device)
    results, events = {}, {}
    for key, (model, ids, mask, n) in items[1:]:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(main)  # the packed ids and masks are ready
        ids.record_stream(stream)
        mask.record_stream(stream)
        with torch.cuda.stream(stream):
            results[key] = _forward_scored(model, ids, mask, n)
            events[key] = torch.cuda.Event()
            events[key].record(stream)
    key, job = items[0]
    results[key] = _forward_scored(*job)
    for key, event in events.items():
        main.wait_event(event)
        results[key].record_stream(main)
    return results


# --------------------------------------------------------------------------- entry

def proxy_logprobs(base, expert, anti_expert, context, continuation, *, expert_context=None,
                   alpha=1.0, temperature=1.0, return_model_logprobs=False,
                   chunk_size=DEFAULT_CHUNK_SIZE, backend="auto",
                   pad_token_id=None) -> ProxyLogprobs:
    """Log-probabilities of ``continuation`` given ``context`` under proxy tuning, teacher-forced.

    ``z = base + alpha * (expert - anti_expert)`` (fp32, over the shared vocabulary) at
    every continuation position; each token's log-probability is
    ``log_softmax(z / temperature)[token]``. One forward per model over its context
    followed by the continuation (not a token loop); the combination runs through the
    fused op (:func:`proxykern.proxy_sample`'s ``lse``), ``chunk_size`` positions at a time.

    ``context``, ``continuation``: B token-id sequences each (lists of ints or 1-D integer
    tensors; ragged lengths), or 2-D integer tensors without padding. Every context row
    needs >= 1 token; continuations may be empty. The base and the anti-expert read
    ``context``; the expert reads ``expert_context`` (its own, e.g. chat-formatted,
    ragged lengths) when given, else ``context``. All three then read the same
    continuation.

    ``alpha``: a number or a (B,) tensor (finite); ``temperature``: a number or a (B,)
    tensor, > 0 (default 1). ``return_model_logprobs``: also each model's own
    log-softmax (T = 1) of the tokens over its own columns (``-inf`` for a token it
    has no column for). ``backend``: the fused op's (see :func:`proxykern.proxy_sample`).
    ``pad_token_id``: what a model reads in place of a continuation token it cannot
    read (a base wider than it; module docstring).

    Returns :class:`ProxyLogprobs` (``logprobs``, ``greedy``, ``lengths``,
    ``model_logprobs``), left-aligned, padded past each row's end. Bad arguments raise
    ``ValueError``/``TypeError`` naming the argument; combined logits with NaN/+inf
    raise ``ValueError`` naming the row and the continuation token. See the module
    docstring for the layout and memory bound.
    """
    for name, model in zip(MODEL_NAMES, (base, expert, anti_expert)):
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"{name} must be a Hugging Face causal LM (a torch.nn.Module), "
                            f"got {type(model).__name__}")
    device = model_device(base)
    for name, model in (("expert", expert), ("anti_expert", anti_expert)):
        if model_device(model) != device:
            raise ValueError(f"{name} is on {model_device(model)} but base is on {device}: "
                             f"the three models must share one device")
    ctx = _id_rows("context", context, None, allow_empty=False)
    B = len(ctx)
    cont = _id_rows("continuation", continuation, B, allow_empty=True)
    e_ctx = ctx if expert_context is None else _id_rows("expert_context", expert_context, B,
                                                        allow_empty=False)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(return_model_logprobs, bool):
        raise TypeError(f"return_model_logprobs must be True or False, "
                        f"got {return_model_logprobs!r}")
    alpha = _per_row("alpha", alpha, B, device, positive=False)
    temperature = _per_row("temperature", temperature, B, device, positive=True)
    backend = resolve_backend(backend, device)

    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, numbers.Integral) else list(eos or [])
    plan = vocab_plan(base, expert, anti_expert,
                      resolve_pad_token_id(base, pad_token_id, eos))
    V = plan.vocab_size
    readers = {"base": (base, anti_expert) if expert_context is not None else
               (base, expert, anti_expert), "expert": (expert,)}

    def embedding_rows(models):
        widths = [w for w in (input_width(m) for m in models) if w is not None]
        return min(widths) if widths else None

    _check_range("context", ctx, embedding_rows(readers["base"]), "the models' embedding rows")
    if expert_context is not None:
        _check_range("expert_context", e_ctx, embedding_rows(readers["expert"]),
                     "the expert's embedding rows")
    _check_range("continuation", cont, min(V, input_width(base) or V), "the base's vocabulary")
    _check_positions(base, expert, anti_expert, ctx, e_ctx, cont,
                     "expert_context" if expert_context is not None else "context")

    lengths = torch.tensor([len(x) for x in cont], dtype=torch.long)
    L = int(lengths.max())
    if L == 0:
        empty = torch.zeros((B, 0), device=device)
        return ProxyLogprobs(empty, torch.ones((B, 0), dtype=torch.bool, device=device),
                             lengths.to(device),
                             {n: empty.clone() for n in MODEL_NAMES} if return_model_logprobs
                             else None)

    with torch.no_grad():
        packed = {"base": _pack(ctx, cont, device)}
        packed["expert"] = packed["base"] if expert_context is None else _pack(e_ctx, cont, device)
        readable = {}  # (which, stand-in) -> ids with unreadable tokens replaced, made once

        def reads(which, name):
            stand_in = plan.stand_ins[name]
            if stand_in is None:
                return packed[which]
            if (which, stand_in) not in readable:
                ids, mask = packed[which]
                readable[which, stand_in] = (stand_in(ids), mask)
            return readable[which, stand_in]

        # One forward per distinct (model, ids): a shared expert/anti-expert runs once.
        keys = {}
        jobs = {}
        for name, model, which in (("base", base, "base"), ("expert", expert, "expert"),
                                   ("anti_expert", anti_expert, "base")):
            ids_mask = reads(which, name)
            key = (id(model), id(ids_mask[0]))
            keys[name] = key
            if key not in jobs:
                jobs[key] = (model, *ids_mask, L)
        logits = _run_forwards(jobs, device)
        b_logits, e_logits, a_logits = (logits[keys[n]] for n in MODEL_NAMES)
        return _combine(b_logits, e_logits, a_logits, cont, lengths, L, plan, alpha,
                        temperature, return_model_logprobs, chunk_size, backend, keys, logits)


def _combine(b_logits, e_logits, a_logits, cont, lengths, L, plan, alpha, temperature,
             return_model_logprobs, chunk_size, backend, keys, logits) -> ProxyLogprobs:
    """The scored pairs, chunk by chunk, through the fused op (see the module docstring).

    ``plan``: the :class:`proxykern.generation_args.VocabPlan`; the op reads the base's
    width, the expert's and anti-expert's logits widened with a zero-delta tail where
    they are narrower."""
    device = b_logits.device
    V = plan.vocab_size
    B = len(cont)
    # Continuations are end-aligned: column k of the kept logits predicts right-aligned
    # continuation column k; row i's tokens sit in columns L - len_i .. L - 1.
    targets = torch.zeros((B, L), dtype=torch.long)
    for i, x in enumerate(cont):
        if x:
            targets[i, L - len(x):] = torch.tensor(x, dtype=torch.long)
    lengths_dev = lengths.to(device)
    valid = torch.arange(L, device=device)[None, :] >= (L - lengths_dev)[:, None]
    rows, cols = torch.nonzero(valid, as_tuple=True)
    targets = targets.to(device)[rows, cols]
    N = rows.shape[0]

    lp = torch.empty(N, device=device)
    greedy = torch.empty(N, dtype=torch.bool, device=device)
    status = torch.zeros(N, dtype=torch.int32, device=device)
    distinct = {}  # model logprobs: once per distinct forward
    own_width = {}  # its model's own columns within [0, V)
    if return_model_logprobs:
        for name in MODEL_NAMES:
            distinct.setdefault(keys[name], torch.empty(N, device=device))
            own_width[keys[name]] = plan.own_widths[name]
    unit_T = not isinstance(temperature, torch.Tensor) and temperature == 1.0

    for s in range(0, N, chunk_size):
        r, c, t = rows[s:s + chunk_size], cols[s:s + chunk_size], targets[s:s + chunk_size]
        bl, el = b_logits[r, c], e_logits[r, c]
        al = el if a_logits is e_logits else a_logits[r, c]
        el, al = plan.widen(el, al)  # zero-delta tail where narrower (no copy otherwise)
        a = alpha[r] if isinstance(alpha, torch.Tensor) else alpha
        out, st = proxy_sample_with_status(bl, el, al, alpha=a, temperature=0.0, vocab_size=V,
                                           backend=backend)
        lse = out.lse
        if not unit_T:
            T = temperature[r] if isinstance(temperature, torch.Tensor) else temperature
            out_t, st_t = proxy_sample_with_status(bl, el, al, alpha=a, temperature=T,
                                                   vocab_size=V, backend=backend)
            lse, st = out_t.lse, st | st_t
        # z at the continuation token, exactly as the op combines (fp32; -inf anywhere -> -inf).
        tb, te, ta = (x.gather(1, t[:, None]).squeeze(1).float() for x in (bl, el, al))
        a_t = a if not isinstance(a, torch.Tensor) else a.float()
        z_t = (tb + a_t * (te - ta)).masked_fill(
            torch.isneginf(tb) | torch.isneginf(te) | torch.isneginf(ta), float("-inf"))
        if not unit_T:
            z_t = z_t / (T if not isinstance(T, torch.Tensor) else T.float())
        lp[s:s + chunk_size] = z_t - lse
        greedy[s:s + chunk_size] = out.tokens == t
        status[s:s + chunk_size] = st
        for key, buf in distinct.items():
            buf[s:s + chunk_size] = own_logprobs(logits[key][r, c], t, own_width[key])

    _raise_bad(status, rows, cols, lengths_dev, L)
    # Back to left-aligned (B, L): token j of row i sits at kept column L - len_i + j.
    left = cols - (L - lengths_dev[rows])

    def place(values, fill):
        outp = torch.full((B, L), fill, dtype=values.dtype, device=device)
        outp[rows, left] = values
        return outp

    model_lp = ({n: place(distinct[keys[n]], 0.0) for n in MODEL_NAMES}
                if return_model_logprobs else None)
    return ProxyLogprobs(place(lp, 0.0), place(greedy, True), lengths_dev, model_lp)


def _raise_bad(status, rows, cols, lengths, L) -> None:
    """Raise naming the first (row, continuation token) whose combined logits are unusable."""
    bad = torch.nonzero(status).flatten().tolist()  # the one host sync of the check
    if not bad:
        return
    k = bad[0]
    i = int(rows[k])
    j = int(cols[k]) - (L - int(lengths[i]))
    code = int(status[k])
    reason = ("its combined logits hold NaN or +inf" if code & STATUS_NONFINITE
              else "every combined logit is -inf" if code & STATUS_EMPTY
              else f"the fused op reported status {code}")
    raise ValueError(f"proxy_logprobs: row {i}, continuation token {j}: {reason}")
