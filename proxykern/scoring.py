"""``proxy_logprobs`` / ``program_logprobs``: teacher-forced log-probabilities under proxy
tuning, or under any logit program (:mod:`proxykern.programs`).

What an evaluation harness's log-likelihood requests need: for each row, the
log-probability of a given continuation, token by token, under

    z = base + alpha * (expert - anti_expert);   logprob = log_softmax(z / temperature)[token]

or, for a program, its ``z`` (:func:`proxykern.reference.program_logits`, mask included).

Layout (one screen, on purpose)::

    per model   one forward over (its own context + the shared continuation), every row
                left-padded so the continuations end in the same column; only the last
                L + 1 positions' logits are kept (L = the longest continuation)
    per chunk   the scored (row, position) pairs, ``chunk_size`` at a time: gather each
                model's logits rows once, then per setting (K for a sweep) run the fused
                op (greedy) -> logsumexp(z) and argmax(z); the continuation token's z is
                gathered, logprob = z[token] / T - lse

Memory: the forwards return each model's logits of the scored positions in the
model's dtype (B x (L + 1) x V each, context positions are never materialised
where the model accepts ``logits_to_keep``); the combination holds at most
``chunk_size`` rows of V in fp32 at a time -- never fp32 B x L x V per model.
Padding positions are never fed to the op.

Programs: a difference program (``difference = (b, e, a, s)``: proxy tuning, DExperts,
O'Brien & Lewis's contrastive decoding) runs the fused op on ``(L_b, L_e, L_a)`` with
``alpha = s``, its mask applied to a copy of ``L_b``'s rows (as
:func:`proxykern.program_sample` does); any other program (Li's contrastive decoding,
ensembles) computes ``z`` per chunk by :func:`proxykern.reference.program_logits` and
runs the op on ``(z, z, z)`` with ``alpha = 0`` (exactly ``z``). A mask is computed from
the masked role's own logits at each scored position. Sweeps (``alpha`` a list, or a
list of programs) share the forwards: each chunk's logits are gathered once and
combined K times.

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
  else 0). Context ids must be readable by the models that read them. A difference
  program follows the same rule with role ``b`` as the base; any other program
  scores over the narrowest width of its roles.
* A model that appears twice with the same context (``expert is anti_expert``,
  or ``base`` reused) runs once.
"""
from __future__ import annotations

import numbers
import types
from typing import NamedTuple

import torch

from . import programs as _programs
from .engine.runner import SideStreamLaunch, left_pad, positions_from_mask
from .generation_args import (check_role_models, program_vocab_plan, resolve_pad_token_id,
                              vocab_plan)
from .models import (MODEL_NAMES, accepts_logits_to_keep, input_width, model_device,
                     position_limit)
from .ops import SAMPLING_RULES, check_sampling_arg, resolve_backend, sample_rows
from .outputs import own_logprobs
from .params import SamplingParams
from .reference import STATUS_EMPTY, STATUS_NONFINITE, program_logits

#: Scored positions combined per fused-op call (rows of V in fp32 held at once).
DEFAULT_CHUNK_SIZE = 1024


class ProxyLogprobs(NamedTuple):
    """Result of :func:`proxy_logprobs` and :func:`program_logprobs`. Token ``j`` of row
    ``i``'s continuation is at ``[i, j]``.

    ``logprobs`` (B, L) float32: ``log_softmax(z / temperature)[token]``, 0.0 past a row's
    end, so ``logprobs.sum(1)`` is each continuation's log-likelihood; ``-inf`` for a
    token a program's mask drops (impossible under the program).
    ``greedy`` (B, L) bool: the token is ``argmax z``; True past a row's end, so
    ``greedy.all(1)`` says whether the whole continuation is the greedy one.
    ``lengths`` (B,) int64: continuation lengths.
    ``model_logprobs``: role (``"base"``, ``"expert"``, ``"anti_expert"`` for proxy
    tuning; the program's roles) -> (B, L) float32, each model's own ``log_softmax``
    (T = 1) of the token over the shared vocabulary, or None.

    A sweep of K settings (``alpha`` a list, or a list of programs) gives ``logprobs``
    and ``greedy`` of shape (K, B, L), setting ``k`` at ``[k]`` (so ``logprobs.sum(-1)``
    is (K, B)); ``lengths`` and ``model_logprobs`` are shared, as the forwards are.
    """

    logprobs: torch.Tensor
    greedy: torch.Tensor
    lengths: torch.Tensor
    model_logprobs: dict | None


class _Combination(NamedTuple):
    """One scored setting, its values bound to the batch: ``difference`` ``(b, e, a, s)``
    or None; ``coefficients`` one per role (in ``roles`` order; unused for a difference);
    ``mask`` ``(kind, role, value)`` or None. Values: floats or (B,) fp32 device tensors."""

    roles: tuple
    difference: tuple | None
    coefficients: tuple
    mask: tuple | None


def _at(value, r):
    """A bound value for the chunk's rows ``r``: a float as is, a (B,) tensor indexed."""
    return value[r] if isinstance(value, torch.Tensor) else value


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


def _embedding_rows(models) -> int | None:
    """The ids every one of ``models`` can read (the fewest input embedding rows)."""
    widths = [w for w in (input_width(m) for m in models) if w is not None]
    return min(widths) if widths else None


def _check_reads(reads, cont) -> None:
    """``reads``: (model name, model, its context rows, their argument name). Every model
    reads its context and the continuation: their tokens must fit its positions
    (:func:`proxykern.models.position_limit`); raises naming the row."""
    for name, model, rows, rows_name in reads:
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


def _check_options(chunk_size, return_model_logprobs) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be an int, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if not isinstance(return_model_logprobs, bool):
        raise TypeError(f"return_model_logprobs must be True or False, "
                        f"got {return_model_logprobs!r}")


def _alpha_sweep(alpha) -> list | None:
    """``alpha`` given as a list/tuple of numbers (a sweep): their floats; else None."""
    if not isinstance(alpha, (list, tuple)):
        return None
    if not alpha:
        raise ValueError("alpha is an empty list: a sweep needs at least one value")
    _integral, valid, rule = SAMPLING_RULES["alpha"]
    sweep = []
    for k, a in enumerate(alpha):
        if isinstance(a, bool) or not isinstance(a, numbers.Real):
            raise TypeError(f"alpha[{k}] must be a real number (a sweep is a list of numbers; "
                            f"per-row alphas are one (B,) tensor), got {type(a).__name__}")
        if not valid(a):
            raise ValueError(f"alpha[{k}] {rule}, got {a!r}")
        sweep.append(float(a))
    return sweep


def _check_programs(program) -> tuple[list, bool]:
    """``program``: one LogitProgram, or a non-empty list of them reading the same roles.
    Returns (the programs, whether a list was given)."""
    is_list = isinstance(program, (list, tuple))
    progs = list(program) if is_list else [program]
    if not progs:
        raise ValueError("program is an empty list: give at least one LogitProgram")
    for k, p in enumerate(progs):
        if not isinstance(p, _programs.LogitProgram):
            name = f"program[{k}]" if is_list else "program"
            raise TypeError(f"{name} must be a LogitProgram (proxykern.programs), "
                            f"got {type(p).__name__}")
        if set(p.roles) != set(progs[0].roles):
            raise ValueError(f"program[{k}] reads roles {p.roles} but program[0] reads "
                             f"{progs[0].roles}: a list of programs must share its roles "
                             f"(they share the forwards)")
    return progs, is_list


def _role_contexts(role_context, roles, ctx, B) -> tuple[dict, dict]:
    """Each role's context rows and their argument name (``role_context[role]`` or
    ``context``)."""
    if role_context is None:
        role_context = {}
    if not isinstance(role_context, dict):
        raise TypeError(f"role_context must be None or a dict of role -> token-id rows, "
                        f"got {type(role_context).__name__}")
    extra = [r for r in role_context if r not in roles]
    if extra:
        raise ValueError(f"role_context: unknown role(s) {extra}; the program's roles are "
                         f"{roles}")
    rows, names = {}, {}
    for r in roles:
        names[r] = f"role_context[{r!r}]" if r in role_context else "context"
        rows[r] = (_id_rows(names[r], role_context[r], B, allow_empty=False)
                   if r in role_context else ctx)
    return rows, names


def _bind(program, B: int, device) -> _Combination:
    """A program's values bound to the batch (per-row tensors checked: shape, device and
    values, raising naming the argument and the row) as a :class:`_Combination`."""
    _programs._raise_on_bad_values(_programs._bind_per_row(program, B, device))

    def bound(v):
        return v.float().reshape(-1).expand(B) if isinstance(v, torch.Tensor) else v

    diff = program.difference
    mask = program.mask
    return _Combination(
        program.roles,
        None if diff is None else (*diff[:3], bound(diff[3])),
        tuple(bound(c) for c in program.coefficients),
        None if mask is None else (mask.kind, mask.role, bound(mask.value)))


# --------------------------------------------------------------------------- forwards

def _pack(contexts, continuations, device):
    """Left-padded (B, T) ids and mask of context + continuation (continuations end-aligned)."""
    return left_pad([c + x for c, x in zip(contexts, continuations)], 0, device)


def _forward_scored(model, ids, mask, n_scored: int) -> torch.Tensor:
    """Logits (B, n_scored, V) of the positions that predict the last ``n_scored`` columns
    (positions from the mask, as the engine's runners take them)."""
    kwargs = {"logits_to_keep": n_scored + 1} if accepts_logits_to_keep(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask),
                use_cache=False, **kwargs)
    return out.logits[:, -(n_scored + 1):-1, :]


class _ScoredForward(SideStreamLaunch):
    """One scoring forward, launched as an engine runner launches its prefill: on its own
    CUDA stream when it has one (:class:`proxykern.engine.runner.SideStreamLaunch`)."""

    def __init__(self, model, ids, mask, n_scored: int, stream=None):
        self.model, self.ids, self.mask, self.n_scored = model, ids, mask, n_scored
        self.stream = stream
        if stream is not None:  # made here, read on the side stream: free only after its work
            ids.record_stream(stream)
            mask.record_stream(stream)

    def prefill(self) -> torch.Tensor:
        return _forward_scored(self.model, self.ids, self.mask, self.n_scored)


def _run_forwards(jobs: dict, device) -> dict:
    """Run each distinct (model, ids, mask) job: on CUDA all but the first on their own
    side streams, launched first so they overlap the first (the base) on the current one."""
    side = (lambda: torch.cuda.Stream(device)) if device.type == "cuda" else (lambda: None)
    launches = {key: _ScoredForward(*job, stream=side() if i else None)
                for i, (key, job) in enumerate(jobs.items())}
    order = list(launches.values())
    for launch in order[1:] + order[:1]:
        launch.launch_prefill()
    return {key: launch.join() for key, launch in launches.items()}


def _role_forwards(models: dict, contexts: dict, cont, L: int, stand_ins: dict, device):
    """One forward per distinct (model, ids): ``(role -> key, key -> scored logits)``.

    Equal contexts are packed once; a role whose model cannot read every continuation
    token reads its stand-in's ids (made once per context and stand-in); a model reused
    with the same ids (``expert is anti_expert``) runs once."""
    packs = []  # (rows, (ids, mask)), one per distinct context
    readable = {}
    keys, jobs = {}, {}
    for role, model in models.items():
        rows = contexts[role]
        ids_mask = next((p for r, p in packs if r is rows or r == rows), None)
        if ids_mask is None:
            ids_mask = _pack(rows, cont, device)
            packs.append((rows, ids_mask))
        stand_in = stand_ins[role]
        if stand_in is not None:
            if (id(ids_mask[0]), stand_in) not in readable:
                readable[id(ids_mask[0]), stand_in] = (stand_in(ids_mask[0]), ids_mask[1])
            ids_mask = readable[id(ids_mask[0]), stand_in]
        key = (id(model), id(ids_mask[0]))
        keys[role] = key
        if key not in jobs:
            jobs[key] = (model, *ids_mask, L)
    return keys, _run_forwards(jobs, device)


# --------------------------------------------------------------------------- entries

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

    ``alpha``: a number or a (B,) tensor (finite), or a *sweep*: a non-empty list/tuple of
    K numbers, scored from the same forwards (one per model) -- ``logprobs`` and
    ``greedy`` are then (K, B, L), ``[k]`` equal to the call with ``alpha[k]``.
    ``temperature``: a number or a (B,) tensor, > 0 (default 1). ``return_model_logprobs``:
    also each model's own log-softmax (T = 1) of the tokens over its own columns
    (``-inf`` for a token it has no column for). ``backend``: the fused op's (see
    :func:`proxykern.proxy_sample`). ``pad_token_id``: what a model reads in place of a
    continuation token it cannot read (a base wider than it; module docstring).

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
    _check_options(chunk_size, return_model_logprobs)
    sweep = _alpha_sweep(alpha)
    alphas = sweep if sweep is not None else [_per_row("alpha", alpha, B, device,
                                                       positive=False)]
    temperature = _per_row("temperature", temperature, B, device, positive=True)
    backend = resolve_backend(backend, device)

    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, numbers.Integral) else list(eos or [])
    plan = vocab_plan(base, expert, anti_expert,
                      resolve_pad_token_id(base, pad_token_id, eos))
    V = plan.vocab_size
    readers = {"base": (base, anti_expert) if expert_context is not None else
               (base, expert, anti_expert), "expert": (expert,)}
    _check_range("context", ctx, _embedding_rows(readers["base"]),
                 "the models' embedding rows")
    if expert_context is not None:
        _check_range("expert_context", e_ctx, _embedding_rows(readers["expert"]),
                     "the expert's embedding rows")
    _check_range("continuation", cont, min(V, input_width(base) or V), "the base's vocabulary")
    e_name = "expert_context" if expert_context is not None else "context"
    _check_reads((("base", base, ctx, "context"), ("expert", expert, e_ctx, e_name),
                  ("anti_expert", anti_expert, ctx, "context")), cont)

    combos = [_Combination(MODEL_NAMES, (*MODEL_NAMES, a), (), None) for a in alphas]
    return _score(dict(zip(MODEL_NAMES, (base, expert, anti_expert))),
                  {"base": ctx, "expert": e_ctx, "anti_expert": ctx}, cont, combos, plan,
                  temperature, return_model_logprobs, chunk_size, backend, device,
                  caller="proxy_logprobs", sweep_name="alpha" if sweep is not None else None)


def program_logprobs(program, models, context, continuation, *, role_context=None,
                     temperature=1.0, return_model_logprobs=False,
                     chunk_size=DEFAULT_CHUNK_SIZE, backend="auto",
                     pad_token_id=None) -> ProxyLogprobs:
    """Teacher-forced log-probabilities of ``continuation`` given ``context`` under a program.

    At every continuation position, ``z`` is ``program``'s combination of the roles'
    logits there (:func:`proxykern.reference.program_logits`: fp32, ``-inf`` in any role
    excluded, then the mask -- plausibility or top-p computed from the masked role's own
    logits at that position) and each token's log-probability is
    ``log_softmax(z / temperature)[token]``. A token the mask drops gets ``-inf``: it
    is impossible under the program (so is the continuation's log-likelihood).
    ``program_logprobs(programs.proxy_tuning(alpha), {...}, ...)`` is
    :func:`proxy_logprobs` with that alpha.

    ``program``: a :class:`proxykern.programs.LogitProgram`, or a non-empty list of them
    reading the same roles (a sweep: ``logprobs`` and ``greedy`` are then (K, B, L),
    ``[k]`` equal to the call with ``program[k]``; per-row values are (B,) tensors).
    ``models``: role -> Hugging Face causal LM, exactly the program's roles, on one
    device; one forward per distinct (model, context) pair, whatever K.
    ``context``, ``continuation``: as in :func:`proxy_logprobs`; ``role_context``:
    optional role -> that role's own context rows (e.g. a chat-formatted prompt), B
    rows each; every role then reads the shared continuation.

    Vocabulary: a difference program (``difference = (b, e, a, s)``) scores over role
    b's width with a zero delta where e or a are narrower (proxy tuning's rule); any
    other program over the narrowest width of its roles. Continuation ids must lie in
    it; a model that cannot read one reads ``pad_token_id`` (default: role b's, else
    the first role's generation config / first EOS / 0).

    ``temperature``, ``return_model_logprobs`` (keyed by role), ``chunk_size``,
    ``backend``: as in :func:`proxy_logprobs`. Returns :class:`ProxyLogprobs`. Bad
    arguments raise ``ValueError``/``TypeError`` naming the argument (``program``,
    ``program[k]``, ``models[role]``, ``role_context[role]``, a program's value and row);
    combined logits with NaN/+inf raise naming the row and the continuation token.
    """
    progs, is_list = _check_programs(program)
    roles = progs[0].roles
    models, device = check_role_models(models, roles)
    ctx = _id_rows("context", context, None, allow_empty=False)
    B = len(ctx)
    cont = _id_rows("continuation", continuation, B, allow_empty=True)
    contexts, ctx_names = _role_contexts(role_context, roles, ctx, B)
    _check_options(chunk_size, return_model_logprobs)
    temperature = _per_row("temperature", temperature, B, device, positive=True)
    combos = [_bind(p, B, device) for p in progs]
    backend = resolve_backend(backend, device)

    anchor = models[(progs[0].difference or roles)[0]]
    eos = getattr(getattr(anchor, "generation_config", None), "eos_token_id", None)
    eos = [eos] if isinstance(eos, numbers.Integral) else list(eos or [])
    pad = resolve_pad_token_id(anchor, pad_token_id, eos)
    plans = [program_vocab_plan(p, models, pad) for p in progs]
    for k, p in enumerate(plans[1:], 1):
        if (p.vocab_size, p.delta_width) != (plans[0].vocab_size, plans[0].delta_width):
            raise ValueError(f"program[{k}] scores over {p.vocab_size} tokens but program[0] "
                             f"over {plans[0].vocab_size}: a list of programs must share "
                             f"its vocabulary")
    plan = plans[0]
    readers = {}  # argument name -> the roles reading it
    for r in roles:
        readers.setdefault(ctx_names[r], []).append(r)
    for name, rs in readers.items():
        _check_range(name, contexts[rs[0]], _embedding_rows([models[r] for r in rs]),
                     "the embedding rows of the models that read it")
    exact = [input_width(models[p.difference[0]]) for p in progs if p.difference is not None]
    limit = min([plan.vocab_size] + [w for w in exact if w is not None])
    _check_range("continuation", cont, limit, "the program's vocabulary")
    _check_reads(((f"models[{r!r}]", models[r], contexts[r], ctx_names[r]) for r in roles), cont)

    return _score(models, contexts, cont, combos, plan, temperature, return_model_logprobs,
                  chunk_size, backend, device, caller="program_logprobs",
                  sweep_name="program" if is_list else None)


# --------------------------------------------------------------------------- combination

def _score(models, contexts, cont, combos, plan, temperature, return_model_logprobs,
           chunk_size, backend, device, *, caller: str, sweep_name: str | None):
    """Validated inputs -> :class:`ProxyLogprobs`: the forwards, then the chunks.
    ``sweep_name``: the argument a sweep came from (results stacked (K, B, L)), or None."""
    lengths = torch.tensor([len(x) for x in cont], dtype=torch.long)
    L = int(lengths.max())
    B, K = len(cont), len(combos)
    if L == 0:
        shape = (K, B, 0) if sweep_name is not None else (B, 0)
        empty = torch.zeros((B, 0), device=device)
        return ProxyLogprobs(torch.zeros(shape, device=device),
                             torch.ones(shape, dtype=torch.bool, device=device),
                             lengths.to(device),
                             {r: empty.clone() for r in models} if return_model_logprobs
                             else None)
    with torch.no_grad():
        keys, logits = _role_forwards(models, contexts, cont, L, plan.stand_ins, device)
        return _combine(keys, logits, combos, cont, lengths, L, plan, temperature,
                        return_model_logprobs, chunk_size, backend, caller, sweep_name)


def _combine(keys, logits, combos, cont, lengths, L, plan, temperature, return_model_logprobs,
             chunk_size, backend, caller, sweep_name) -> ProxyLogprobs:
    """The scored pairs, chunk by chunk (see the module docstring): each model's rows
    gathered once per chunk, then every combination scored on them.

    ``keys``: role -> forward key; ``logits``: key -> (B, L, V_key) scored logits;
    ``plan``: the :class:`proxykern.generation_args.VocabPlan` (keyed by role)."""
    device = next(iter(logits.values())).device
    B, K = len(cont), len(combos)
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

    lp = torch.empty((K, N), device=device)
    greedy = torch.empty((K, N), dtype=torch.bool, device=device)
    status = torch.zeros((K, N), dtype=torch.int32, device=device)
    distinct = {}  # model logprobs: once per distinct forward
    own_width = {}  # its model's own columns within [0, V)
    if return_model_logprobs:
        for role, key in keys.items():
            distinct.setdefault(key, torch.empty(N, device=device))
            own_width[key] = plan.own_widths[role]
    unit_T = not isinstance(temperature, torch.Tensor) and temperature == 1.0

    for s in range(0, N, chunk_size):
        r, c, t = rows[s:s + chunk_size], cols[s:s + chunk_size], targets[s:s + chunk_size]
        gathered = {}  # key -> this chunk's logits rows, gathered once
        for key in keys.values():
            if key not in gathered:
                gathered[key] = logits[key][r, c]
        by_role = {role: gathered[key] for role, key in keys.items()}
        T = None if unit_T else _at(temperature, r)
        widened = {}
        for k, combo in enumerate(combos):
            lp[k, s:s + chunk_size], greedy[k, s:s + chunk_size], status[k, s:s + chunk_size] = \
                _chunk_scores(combo, by_role, t, r, T, plan, backend, widened)
        for key, buf in distinct.items():
            buf[s:s + chunk_size] = own_logprobs(gathered[key], t, own_width[key])

    _raise_bad(status, rows, cols, lengths_dev, L, caller, sweep_name)
    # Back to left-aligned (B, L): token j of row i sits at kept column L - len_i + j.
    left = cols - (L - lengths_dev[rows])

    def place(values, fill):
        outp = torch.full((*values.shape[:-1], B, L), fill, dtype=values.dtype, device=device)
        outp[..., rows, left] = values
        return outp

    model_lp = ({role: place(distinct[key], 0.0) for role, key in keys.items()}
                if return_model_logprobs else None)
    lp, greedy = place(lp, 0.0), place(greedy, True)
    if sweep_name is None:
        lp, greedy = lp[0], greedy[0]
    return ProxyLogprobs(lp, greedy, lengths_dev, model_lp)


def _chunk_scores(combo, by_role, t, r, T, plan, backend, widened):
    """(logprob, token is argmax z, op status) of the chunk's tokens ``t`` under one
    combination. ``by_role``: the chunk's logits rows; ``T``: None for temperature 1;
    ``widened``: this chunk's widened (expert, anti) rows, shared by the combinations."""
    V = plan.vocab_size
    if combo.difference is not None:
        b, e, a, s = combo.difference
        if (e, a) not in widened:  # zero-delta tail where narrower (no copy otherwise)
            widened[e, a] = plan.widen(by_role[e], by_role[a])
        bl = by_role[b]
        if combo.mask is not None:
            bl = bl.masked_fill(_mask_drop(combo.mask, by_role, r, plan), float("-inf"))
        inputs, alpha = (bl, *widened[e, a]), _at(s, r)
    else:
        z = _linear_z(combo, by_role, r, plan)
        inputs, alpha = (z, z, z), 0.0  # the op's combine is then exactly z
    # The op's hot entry on values checked at the edge: greedy (argmax z and logsumexp z),
    # and at temperature T for logsumexp(z / T).
    n = t.shape[0]
    params = SamplingParams.build({"alpha": alpha, "temperature": 0.0}, n, t.device, V)
    steps = torch.zeros(n, dtype=torch.long, device=t.device)
    tokens, _, lse, st = sample_rows(*inputs, params, steps, V, backend)
    if T is not None:
        _, _, lse, st_t = sample_rows(*inputs, params.replace(temperature=T), steps, V, backend)
        st = st | st_t
    # z at the continuation token, exactly as the op combines (fp32; -inf anywhere -> -inf).
    tb, te, ta = (x.gather(1, t[:, None]).squeeze(1).float() for x in inputs)
    a_t = alpha if not isinstance(alpha, torch.Tensor) else alpha.float()
    z_t = (tb + a_t * (te - ta)).masked_fill(
        torch.isneginf(tb) | torch.isneginf(te) | torch.isneginf(ta), float("-inf"))
    if T is not None:
        z_t = z_t / (T if not isinstance(T, torch.Tensor) else T.float())
    return z_t - lse, tokens == t, st


def _mask_drop(mask, by_role, r, plan) -> torch.Tensor:
    """(n, V) bool: the tokens a program's mask ``(kind, role, value)`` drops for the
    chunk's rows ``r`` (:func:`proxykern.programs.mask_drop`)."""
    kind, role, value = mask
    return _programs.mask_drop(kind, _at(value, r), by_role[role], plan.vocab_size)


def _linear_z(combo, by_role, r, plan) -> torch.Tensor:
    """A linear program's z (fp32, (n, V)) for the chunk's rows: reference.program_logits,
    then the mask."""
    chunk = types.SimpleNamespace(roles=combo.roles, difference=None, mask=None,
                                  coefficients=tuple(_at(c, r) for c in combo.coefficients))
    z = program_logits(chunk, by_role, plan.vocab_size)
    if combo.mask is not None:
        z = z.masked_fill(_mask_drop(combo.mask, by_role, r, plan), float("-inf"))
    return z


def _raise_bad(status, rows, cols, lengths, L, caller: str, sweep_name) -> None:
    """Raise naming the first (row, continuation token) whose combined logits are unusable
    (and, in a sweep, the setting)."""
    bad = torch.nonzero(status.reshape(-1)).flatten().tolist()  # the one host sync of the check
    if not bad:
        return
    k, n = divmod(bad[0], status.shape[1])
    i = int(rows[n])
    j = int(cols[n]) - (L - int(lengths[i]))
    code = int(status[k, n])
    reason = ("its combined logits hold NaN or +inf" if code & STATUS_NONFINITE
              else "every combined logit is -inf" if code & STATUS_EMPTY
              else f"the fused op reported status {code}")
    where = f" ({sweep_name}[{k}])" if sweep_name is not None else ""
    raise ValueError(f"{caller}: row {i}, continuation token {j}{where}: {reason}")
