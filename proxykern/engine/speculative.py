"""Speculative proxy decoding: ``fused_proxy_generate(..., num_draft_tokens=k)``.

Why it gives the plain-decoding tokens
--------------------------------------
The token of step ``t`` is a deterministic function of that step's three logit
rows and ``(seed[row], t)`` (the op's noise is counter-based). So the expert may
guess ("draft") the next tokens, the base and the anti-expert may score all
drafted positions in one forward each, and the fused op, run at every drafted
position with the step that position would have in plain decoding, returns the
plain-decoding token wherever the context before it was right. Per row we keep
the longest prefix of the draft that the op agrees with plus the op's token at
the first disagreement (or the bonus token after a fully accepted draft).

One round (``P = k_r + 1`` positions, ``k_r = min(k, most tokens any row may
still produce - 1)``)::

    expert    feed the pending token (the last one committed), then draft d_0..d_{k_r-1}
              one at a time: d_j = op(expert, expert, expert; step n_done + j), the
              expert's own logits with the same temperature, filters and noise (over
              the columns the delta applies to, V_d: a base-only token is never drafted)
    base      one forward over [pending, d_0, .., d_{k_r-1}]      -> P logit rows
    anti      one forward over the same tokens                    -> P logit rows
    op        all B * P positions at once, step n_done[row] + j   -> y (B, P)
    accept    c = min(matches + 1, first EOS + 1, tokens left)    (0 for finished rows)
    rollback  every model keeps the first c of its P new columns per row

In the first round there is no pending token: the prefill's logits are position 0
and only the drafts are fed (``k_r`` columns, ``c - 1`` kept).

Cache invariant (the rollback)
------------------------------
Each model keeps one HF ``DynamicCache`` for the whole batch and one attention
mask buffer (:class:`proxykern.runner.ModelRunner`). After every round, for every
row, the columns whose mask is 1 are exactly that row's prompt followed by its
committed tokens except the last (the pending one), in order, at positions
``prompt_len .. prompt_len + n_done - 2``; ``next_pos`` is the position the
pending token will take. Rejected columns stay in the cache with mask 0, so no
query ever attends to them, and the row's next tokens reuse their positions
(positions are given explicitly, never derived from the cache length). A row's
attention therefore sees exactly the keys/values plain decoding would give it,
and its logits equal plain decoding's up to float rounding (a multi-token
forward and the different number of masked columns may round differently).
Columns that no row kept are cropped off the end of the cache; a column some
row kept stays, so the cache is at most ``prompt + sum over rounds of the most
columns any row kept`` long (at most ``prompt + (k + 1) * rounds``). Rolling
back needs every cache layer to be a plain full-attention ``DynamicLayer``
(sliding-window or linear-attention caches cannot hold masked holes correctly:
``ValueError``).

Streaming: step ``s`` is handed to the streamer once every unfinished row has
committed it. ``out.stats`` is a :class:`SpeculativeStats`.
"""
from __future__ import annotations

import torch

from ..generation_args import GenerationArgs
from ..models import MODEL_NAMES, static_rounds_unsupported_reason
from ..ops import sample_rows
from ..outputs import ProxyGenerateOutput, empty_output, own_logprobs
from ..programs import program_rows
from .runner import ModelRunner
from .rounds import SpeculativeStats  # noqa: F401  (re-exported)
from .static_speculative import StaticRounds, round_models, static_speculative_decode
from .step import raise_bad_generation_rows, role_runners

#: How the expert guesses the proxy's token. "expert": the op on the expert's own
#: logits (z = expert), same filters and noise. "contrast": z = expert + alpha *
#: (expert - anti), the anti-expert then runs one token at a time beside the expert
#: and its logits are reused for scoring (no batched anti forward). Measured on the
#: shipped trio in benchmarks/NOTES.md; "expert" is the default.
DRAFTS = ("expert", "contrast")

#: Which rounds ``speculative_decode`` and ``program_speculative_decode`` run: "auto" the
#: static-cache rounds (:mod:`proxykern.engine.static_speculative`) when every model
#: supports a static cache and full attention (and, for proxy tuning, the draft is
#: "expert"), else the eager rounds below; False always the eager rounds; True the static
#: rounds or ``ValueError``. A module switch for tests and benchmarks.
STATIC_ROUNDS = "auto"


def _check_full_attention(runner: ModelRunner, name: str) -> None:
    from transformers.cache_utils import DynamicLayer
    layers = getattr(runner.cache, "layers", None)
    if layers is None:
        return
    for layer in layers:
        if type(layer) is not DynamicLayer:
            raise ValueError(f"num_draft_tokens > 0 needs full-attention models: {name}'s cache "
                             f"has a {type(layer).__name__} layer that cannot be rolled back")


def _proxy_parts(base, expert, anti_expert, args: GenerationArgs, contrast: bool):
    """Proxy tuning's rounds: (runners(make) -> a runner per role, draft_token, draw), as
    :func:`speculative_rounds` and :class:`StaticRounds` take them."""
    V, plan = args.vocab_size, args.vocab
    stand_in = plan.stand_ins
    # Drafts are guesses from the expert's own logits: the columns it (and the anti-expert)
    # has. A base token beyond them is never drafted, only taken as the op's correction.
    V_draft = plan.delta_width
    draft_params = args.sampling if contrast else args.sampling.replace(alpha=0.0)

    def draft_token(rows, step):
        lg_e = rows[0]
        if args.greedy and not contrast:  # the op's greedy token, without its call overhead
            return lg_e[:, :V_draft].argmax(-1)
        lg_a = rows[1] if contrast else lg_e
        return sample_rows(lg_e, lg_e, lg_a, draft_params, step, V_draft,
                           args.backend)[0].clamp(min=0)  # a bad row's -1 is rejected

    def draw(flat, params, steps):
        wide_e, wide_a = plan.widen(flat[1], flat[2])  # zero-delta tail where narrower
        y, lp, _, status = sample_rows(flat[0], wide_e, wide_a, params, steps, V, args.backend)
        return y, lp, status

    def runners(make):
        b_run = make(base, args.input_ids, args.attention_mask, stand_in["base"])
        e_run = make(expert, args.expert_input_ids, args.expert_attention_mask,
                     stand_in["expert"])
        a_run = e_run if args.share_anti else make(anti_expert, args.input_ids,
                                                   args.attention_mask, stand_in["anti_expert"])
        return [b_run, e_run, a_run]

    return runners, draft_token, draw


def proxy_static_rounds(base, expert, anti_expert, args: GenerationArgs) -> StaticRounds:
    """Proxy tuning's static rounds for ``args`` (the expert drafts; captured when
    ``args.cuda_graphs``)."""
    runners, draft_token, draw = _proxy_parts(base, expert, anti_expert, args, contrast=False)
    return StaticRounds(runners(round_models(args)), MODEL_NAMES, 1, draft_token, draw,
                        args.vocab.own_widths, args, graphs=args.cuda_graphs)


def speculative_decode(base, expert, anti_expert, args: GenerationArgs, feed,
                       draft: str = "expert") -> ProxyGenerateOutput:
    """Decode with ``args.num_draft_tokens`` drafted tokens per round (module doc)."""
    if draft not in DRAFTS:
        raise ValueError(f"draft must be one of {DRAFTS}, got {draft!r}")
    if args.max_new_tokens == 0:
        if feed is not None:
            feed.close()
        return empty_output(args)
    if STATIC_ROUNDS is not False:
        reason = ("the static rounds draft with the expert only" if draft != "expert" else
                  static_rounds_unsupported_reason((base, expert, None if args.share_anti
                                                    else anti_expert)))
        if reason is None:
            return static_speculative_decode(
                proxy_static_rounds(base, expert, anti_expert, args), feed)
        if STATIC_ROUNDS is True:
            raise ValueError(f"static speculative rounds unavailable: {reason}")
    # The eager rounds below are never captured: a resolved cuda_graphs=True only comes
    # with models the static rounds take (generation_args.decode_graphs), so only the
    # module switches above (tests, benchmarks) get here with it.
    contrast = draft == "contrast" and not args.share_anti
    runners, draft_token, draw = _proxy_parts(base, expert, anti_expert, args, contrast)
    n_max = args.max_new_tokens
    eager = runners(lambda model, ids, mask, s: ModelRunner(model, ids, mask, n_max,
                                                            stand_in=s))
    return speculative_rounds(eager, MODEL_NAMES, [1, 2] if contrast else [1],
                              draft_token, draw, args.vocab.own_widths, args, feed)


def speculative_rounds(role_runners, names, drafting, draft_token, draw, own_widths, args,
                       feed) -> ProxyGenerateOutput:
    """The eager rounds of the module doc, for any set of roles.

    ``role_runners``: a :class:`ModelRunner` per role (role order; one runner may serve two
    roles). ``drafting``: the indices of the roles that run one token at a time while
    drafting, the drafter first; every other runner scores a round's tokens in one forward.
    ``draft_token(rows, step)``: the draft token from the drafting roles' logits (B, V) at
    one position. ``draw(flat, params, steps)``: (tokens, logprobs, status) of B * P
    positions from every role's logits (role order, (B * P, V_r)), ``params`` the sampling
    parameters repeated P times (``args.sampling.repeat_rows(P)``).
    """
    B, n_max, dev = args.batch_size, args.max_new_tokens, args.device
    k = args.num_draft_tokens
    unique = list({id(r): r for r in role_runners}.values())
    heads = {id(r): r.prefill() for r in unique}
    for r in unique:
        _check_full_attention(r, names[role_runners.index(r)])
    drafters = list({id(role_runners[i]): role_runners[i] for i in drafting}.values())
    scorers = [r for r in unique if all(r is not d for d in drafters)]
    # The last position plain decoding ever feeds: prompt + n_max - 2 (drafts past it are
    # never kept; clamping keeps learned position tables in range).
    max_pos = {id(r): r.next_pos + max(n_max - 2, 0) for r in unique}

    pad = args.pad_token_id
    tokens = torch.full((B, n_max), pad, dtype=torch.long, device=dev)
    logprobs = torch.zeros((B, n_max), device=dev) if args.return_logprobs else None
    model_lp = ({n: torch.zeros((B, n_max), device=dev) for n in names}
                if args.return_model_logprobs else None)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    n_done = torch.zeros(B, dtype=torch.long, device=dev)
    expanded = {}
    rounds = drafted = accepted = 0
    base_forwards = 1  # the prefill
    streamed = 0
    pending = None

    while True:
        left = (n_max - n_done).masked_fill(finished, 0)
        most_left = int(left.max())
        if most_left == 0:
            break
        kr = min(k, most_left - 1)
        P = kr + 1

        # 1. the drafter drafts (one token at a time), keeping the drafting roles' logits
        rows = {id(r): [] for r in drafters}
        for r in drafters:
            rows[id(r)].append(heads[id(r)] if pending is None else
                               r.extend(pending[:, None], max_pos[id(r)])[:, 0])
        drafts = []
        for j in range(kr):
            d = draft_token([rows[id(r)][j] for r in drafters], n_done + j)
            drafts.append(d)
            for r in drafters:
                rows[id(r)].append(r.extend(d[:, None], max_pos[id(r)])[:, 0])
        D = torch.stack(drafts, 1) if drafts else n_done.new_empty((B, 0))

        # 2. every other model scores every position in one forward
        fed = D if pending is None else torch.cat([pending[:, None], D], 1)
        scored = {id(r): torch.stack(rows[id(r)], 1) for r in drafters}
        for r in scorers:
            new = r.extend(fed, max_pos[id(r)]) if fed.shape[1] else None
            if pending is None:
                head = heads[id(r)][:, None]
                scored[id(r)] = head if new is None else torch.cat([head, new], 1)
            else:
                scored[id(r)] = new
        base_forwards += fed.shape[1] > 0

        # 3. the token at every position, with each position's plain-decoding step
        if P not in expanded:
            expanded[P] = args.sampling.repeat_rows(P)
        steps = (n_done[:, None] + torch.arange(P, device=dev)).reshape(-1)
        flat_by_runner = {i: lg.reshape(B * P, lg.shape[-1]) for i, lg in scored.items()}
        flat = [flat_by_runner[id(r)] for r in role_runners]
        y, lp, status = draw(flat, expanded[P], steps)
        y = y.view(B, P)

        # 4. accept per row: agreeing draft prefix + the correction, cut at EOS and budget
        matches = (y[:, :kr] == D).long().cumprod(1).sum(1)
        usable = left                       # tokens a row may still take this round
        if args.eos_tensor is not None:
            is_eos = (y[:, :, None] == args.eos_tensor).any(-1)
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), P)
            usable = torch.minimum(usable, first_eos + 1)
        c = torch.minimum(matches + 1, usable)
        cols = torch.arange(P, device=dev)
        keep = cols[None, :] < c[:, None]                                  # (B, P)
        bad = status.view(B, P).masked_fill(~keep, 0)
        if bool(bad.any()):
            row_status = bad[torch.arange(B, device=dev), (bad != 0).int().argmax(1)]
            first = int(n_done.min())
            raise_bad_generation_rows(row_status, first, first + P - 1)
        r_idx, j_idx = keep.nonzero(as_tuple=True)
        t_idx = n_done[r_idx] + j_idx
        tokens[r_idx, t_idx] = y[r_idx, j_idx]
        if logprobs is not None:
            logprobs[r_idx, t_idx] = lp.view(B, P)[r_idx, j_idx]
        if model_lp is not None:
            y_flat = y.reshape(-1).clamp(min=0)
            for name, lg in zip(names, flat):
                own = own_logprobs(lg, y_flat, own_widths[name]).view(B, P)
                model_lp[name][r_idx, t_idx] = own[r_idx, j_idx]
        if args.eos_tensor is not None:
            finished |= first_eos < c
        alive = left > 0
        drafted += int((usable - 1).clamp(min=0, max=kr).sum())
        accepted += int((c - 1).clamp(min=0).sum())
        rounds += 1
        n_done += c

        # 5. rollback: each model keeps the columns of its committed tokens (module doc)
        valid = (c - (1 if pending is None else 0)).clamp(min=0)
        max_valid = int(valid.max())
        for r in unique:
            r.keep(valid, max_valid)
        pending = y.gather(1, (c - 1).clamp(min=0)[:, None]).squeeze(1).clamp(min=0)

        if feed is not None:
            still = alive & ~finished & (n_done < n_max)
            frontier = int(n_done[still].min()) if bool(still.any()) else int(n_done.max())
            for s in range(streamed, frontier):
                feed.push(s, tokens[:, s])
            streamed = max(streamed, frontier)

    if feed is not None:
        feed.close()
    lengths = n_done
    n = int(lengths.max())
    tokens = tokens[:, :n]
    stats = SpeculativeStats(num_draft_tokens=k, rounds=rounds, drafted=drafted,
                             accepted=accepted, base_forwards=base_forwards, steps=n)
    return ProxyGenerateOutput(
        sequences=torch.cat([args.input_ids, tokens], dim=1), tokens=tokens, lengths=lengths,
        logprobs=logprobs[:, :n] if logprobs is not None else None,
        model_logprobs={k_: v[:, :n] for k_, v in model_lp.items()} if model_lp is not None
        else None, stats=stats)


def program_speculative_decode(models: dict, args, feed, draft_role: str) -> ProxyGenerateOutput:
    """Speculative decoding of a logit program (``args``: a validated
    :class:`proxykern.program_generate.ProgramArgs`, ``max_new_tokens >= 1``): ``draft_role``'s
    model drafts from its own logits (the op on them alone: the same temperature, filters
    and noise, over the columns every role's delta covers), every other role scores a
    round's tokens in one forward, and the program's draw at every position keeps the
    plain-decoding tokens (module doc). The rounds run on static caches (captured as a CUDA
    graph when ``args.cuda_graphs``) when every role's model supports it, else eagerly on
    dynamic caches (:data:`STATIC_ROUNDS`)."""
    n_max, plan, V = args.max_new_tokens, args.vocab, args.vocab_size
    drafter = args.roles.index(draft_role)
    V_draft = plan.delta_width
    draft_params = args.sampling.replace(alpha=0.0)
    widened = args.bound.indices[1:] if args.bound.indices is not None and plan.widens else ()
    bound_rows = {}

    def draft_token(rows, step):
        if args.sampling.greedy:
            return rows[0][:, :V_draft].argmax(-1)
        lg = rows[0]
        return sample_rows(lg, lg, lg, draft_params, step, V_draft,
                           args.backend)[0].clamp(min=0)

    def draw(flat, params, steps):
        P = params.batch_size // args.batch_size
        if P not in bound_rows:
            bound_rows[P] = args.bound.repeat_rows(P)
        delta = plan.widen(flat[widened[0]], flat[widened[1]]) if widened else None
        y, lp, _, status = program_rows(bound_rows[P], flat, params, steps, V, args.backend,
                                        delta)
        return y, lp, status

    if STATIC_ROUNDS is not False:
        reason = static_rounds_unsupported_reason([models[r] for r in args.roles], args.roles)
        if reason is None:
            make = round_models(args)
            runners = role_runners(models, args, lambda _index, model, ids, mask, stand_in:
                                   make(model, ids, mask, stand_in))
            return static_speculative_decode(
                StaticRounds(runners, args.roles, drafter, draft_token, draw, plan.own_widths,
                             args, graphs=args.cuda_graphs), feed)
        if STATIC_ROUNDS is True:
            raise ValueError(f"static speculative rounds unavailable: {reason}")
    runners = role_runners(models, args, lambda _index, model, ids, mask, stand_in:
                           ModelRunner(model, ids, mask, n_max, stand_in=stand_in))
    return speculative_rounds(runners, args.roles, [drafter], draft_token, draw,
                              plan.own_widths, args, feed)
