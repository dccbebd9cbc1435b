"""Speculative decoding on static KV caches: fixed-shape rounds, bookkeeping on the device.

Same contract as :mod:`proxykern.engine.speculative` (the eager rounds on dynamic
caches), for proxy tuning and for logit programs: the output is plain decoding's
(tokens, lengths; logprobs up to the float rounding of a multi-token forward),
``out.stats`` is a :class:`~proxykern.engine.rounds.SpeculativeStats`. What changes is
the layout, so that a round has the same shapes and reads no host value every time (the
prerequisite for replaying it as a CUDA graph).

One round (always ``P = k + 1`` columns, ``k = num_draft_tokens``; proxy tuning's roles
named, the expert drafting)::

    expert    P single-token forwards: the pending token (the last one committed), then
              d_0 .. d_{k-1}, d_j = op(expert, expert, expert; step n_done + j) over the
              delta columns (argmax when greedy); its logits at the P positions are kept
    base      one forward over [pending, d_0, .., d_{k-1}]          -> (B, P, V)
    anti      one forward over the same tokens                      -> (B, P, V)
    op        all B * P positions at once, step n_done[row] + j     -> y (B, P)
    accept    c = min(matches + 1, first EOS + 1, tokens left)      (0 for a done row)
    commit    tokens[row, n_done + j] = y (pad where j >= c); n_done += c; ...

For a logit program the drafter is ``draft_role``'s model, every other role's model
scores like the base, and the op is the program's draw.

Token 0 is drawn from the prefill logits (as plain decoding does), so every round
has a pending token and the same shapes. Drafts past a row's budget are computed and
thrown away (fixed k, never a smaller last round).

Cache invariant (the rollback)
------------------------------
Each model owns a :class:`~proxykern.engine.static_runner.StaticRunner`: an HF
``StaticCache`` of ``L = prompt + capacity`` slots shared by the batch and one
full-width (B, L) attention mask. ``slot`` (a (1,) device tensor, the runner's
``cache_position``) is row-agnostic. Round r writes its P columns, for every row,
at slots ``slot .. slot + P - 1`` (mask set to 1 there before the forward, so the
round's own columns are attended causally); after the op, row ``i``'s mask over those
P slots becomes ``[1] * c_i + [0] * (P - c_i)`` and ``slot += max_i c_i``. Hence,
after every round, for every row:

* the slots with mask 1 are exactly the row's prompt followed by its committed tokens
  except the pending one, in order, at positions ``n_prompt .. n_prompt + n_done - 2``
  (positions come from ``position_ids`` (B, 1), a device tensor advanced by ``c``,
  never from slots);
* every slot ``>= slot`` is free: the columns no row kept are overwritten by the next
  round; a rejected column below ``slot`` (a row that kept fewer than the round's most)
  is a masked hole that no later query attends.

So a row's attention sees exactly the keys/values plain decoding gives it. ``slot``
advances by at most ``min(B, P) * (n_max - 1)`` over a call (the sum over rounds of
the most any row kept is at most the tokens committed by all rows, and at most P per
round), so ``capacity = min(B, P) * (n_max - 1) + P`` slots always suffice; rounds run
after every row is done (between host checks) keep nothing and rewrite the same slots.
Positions past the last one plain decoding ever feeds (``n_prompt + n_max - 2``) are
clamped to it (learned position tables stay in range); their logits are never kept.

Host reads: one per ``ROUND_CHECK_INTERVAL`` rounds (every round on CPU): (some row still
going, some row bad, the streaming frontier). Stats are accumulated on the device and
read once at the end. Full attention only (same rule as the eager path: a
sliding-window model cannot keep masked holes); the caller picks this path only when
every model supports a static cache (:func:`proxykern.models.static_rounds_unsupported_reason`).

Capture
-------
A round (:meth:`StaticRounds._round`) touches only buffers made before it (the caches,
masks, positions, slots, output buffers and counters, all written in place), uses the
same shapes every time and reads nothing on the host, so with ``cuda_graphs`` it runs
once eagerly, is then captured as one CUDA graph and replayed
(:class:`proxykern.engine.graphs.CapturedCall`). On CUDA the base's verification forward
runs on the current stream while the anti-expert's verification and the expert's last
single-token forward (after ``d_{k-1}``) run on their own side streams: three
independent branches of the graph, joined before the op. Rounds past every row's end
(between host checks) commit nothing.
"""
from __future__ import annotations

import torch

from ..outputs import ProxyGenerateOutput, own_logprobs
from .graphs import CapturedCall
from .rounds import SpeculativeStats
from .static_runner import StaticRunner
from .step import raise_bad_generation_rows

#: Rounds between host checks of (some row going, some row bad) on an accelerator.
ROUND_CHECK_INTERVAL = 2


def capacity_for(batch_size: int, num_draft_tokens: int, max_new_tokens: int) -> int:
    """Cache slots past the prompt that a call needs (module doc)."""
    P = num_draft_tokens + 1
    return min(batch_size, P) * max(max_new_tokens - 1, 0) + P


class _Model:
    """One model's static state for rounds: forwards of n columns at ``slot + j``."""

    def __init__(self, model, ids, mask, capacity, n_max, stand_in):
        self.run = StaticRunner(model, ids, mask, capacity, None, stand_in)
        self.n_max = n_max
        self.max_pos = None

    def prefill(self) -> torch.Tensor:
        logits = self.run.prefill()
        # position_ids is the count of prompt tokens: the position of token 0
        self.max_pos = self.run.position_ids + max(self.n_max - 2, 0)
        # transformers' StaticLayer writes at its own counter (``cumulative_length``, advanced
        # by every update) and masks causally from it, not from ``cache_position``: each
        # forward points it at its first slot (in place: the layer's static address).
        self.lengths = [layer.cumulative_length for layer in self.run.cache.layers]
        if not all(isinstance(t, torch.Tensor) for t in self.lengths):
            raise ValueError("static speculative rounds need transformers' StaticLayer caches")
        return logits

    def forward(self, tokens: torch.Tensor, j: int, cols: torch.Tensor) -> torch.Tensor:
        """Feed ``tokens`` (B, n) at slots ``slot + j + 0..n-1``; logits (B, n, V)."""
        r = self.run
        n = tokens.shape[1]
        offs = cols[j:j + n]
        cache_pos = r.cache_position + offs
        pos = torch.minimum(r.position_ids + offs, self.max_pos)
        r.mask.index_fill_(1, cache_pos, 1)
        start = cache_pos[0]
        for length in self.lengths:  # where HF's StaticLayer writes and its causal offset
            length.copy_(start)
        if r.stand_in is not None:
            tokens = r.stand_in(tokens)
        out = r.model(input_ids=tokens, attention_mask=r.mask, position_ids=pos,
                      cache_position=cache_pos, use_cache=True, **{r._cache_arg: r.cache})
        return out.logits

    def commit(self, keep: torch.Tensor, c: torch.Tensor, advance: torch.Tensor,
               cols: torch.Tensor) -> None:
        """Mask the round's rejected columns, advance positions by c and the slot."""
        r = self.run
        slots = (r.cache_position + cols)[None, :].expand(keep.shape[0], -1)
        r.mask.scatter_(1, slots, keep.to(r.mask.dtype))
        r.position_ids.add_(c[:, None])
        r.cache_position.add_(advance)


def round_models(args) -> "callable":
    """``make(model, ids, mask, stand_in)`` -> a :class:`_Model` sized for ``args``'s call."""
    cap = capacity_for(args.batch_size, args.num_draft_tokens, args.max_new_tokens)
    return lambda model, ids, mask, stand_in: _Model(model, ids, mask, cap,
                                                     args.max_new_tokens, stand_in)


class StaticRounds:
    """The state of one static speculative call (module doc) for any set of roles: a
    :class:`_Model` per role, the output buffers, the device-side bookkeeping and stats.
    :meth:`prefill` draws token 0; :meth:`advance` runs one round (eager, or captured and
    replayed when ``graphs``); :meth:`flags` is the host read; :meth:`output` trims.

    ``runners``: a :class:`_Model` per role, role order (one may serve several roles);
    ``names``: the roles; ``drafter``: the index of the role whose model drafts.
    ``draft_token(rows, step)``: the draft token from ``[drafter's logits (B, V)]`` at
    steps ``step`` (B,); ``draw(flat, params, steps)``: (tokens, logprobs, status) of
    B * n positions from every role's logits (role order, (B * n, V_r)) with ``params``
    repeated n times -- the same two functions as the eager rounds
    (:func:`proxykern.engine.speculative.speculative_rounds`).
    """

    def __init__(self, runners: list, names, drafter: int, draft_token, draw, own_widths,
                 args, graphs: bool = False):
        B, n_max, dev = args.batch_size, args.max_new_tokens, args.device
        self.args, self.B, self.n_max, self.names = args, B, n_max, names
        self.k = k = args.num_draft_tokens
        self.P = P = k + 1
        self.runners, self.draft_token, self.draw = runners, draft_token, draw
        self.own_widths = own_widths
        self.unique = list({id(r): r for r in runners}.values())
        self.drafter = runners[drafter]
        self.scorers = [r for r in self.unique if r is not self.drafter]
        # Side streams (CUDA): the drafter's last forward and every scorer but the first run
        # beside the first scorer's verification (three branches for proxy tuning), each
        # launched and joined by its runner (runner.SideStreamLaunch).
        if dev.type == "cuda":
            for r in [self.drafter, *self.scorers[1:]]:
                r.run.stream = torch.cuda.Stream(dev)
        self.cols = torch.arange(P, device=dev)
        self.params1 = args.sampling
        self.paramsP = args.sampling.repeat_rows(P)

        pad = args.pad_token_id
        W = n_max + P  # room for a round's writes past a row's end (pad there, trimmed later)
        self.tokens = torch.full((B, W), pad, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((B, W), device=dev) if args.return_logprobs else None
        self.model_lp = ({n: torch.zeros((B, W), device=dev) for n in names}
                         if args.return_model_logprobs else None)
        self.pad_row = torch.full((B, P), pad, dtype=torch.long, device=dev)
        self.eos = args.eos_tensor
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.n_done = torch.zeros(B, dtype=torch.long, device=dev)
        self.pending = torch.zeros(B, dtype=torch.long, device=dev)  # last token committed
        self.status = torch.zeros(B, dtype=torch.int32, device=dev)
        self.drafted = torch.zeros((), dtype=torch.long, device=dev)
        self.accepted = torch.zeros((), dtype=torch.long, device=dev)
        self.rounds = torch.zeros((), dtype=torch.long, device=dev)
        self.advance = CapturedCall(self._round, dev, graphs)

    def _model_logprobs(self, flat, tokens, idx=None, keep=None) -> None:
        for name, lg in zip(self.names, flat):
            own = own_logprobs(lg, tokens, self.own_widths[name])
            if idx is None:
                self.model_lp[name][:, 0] = own
            else:
                own = own.view(self.B, self.P).masked_fill(~keep, 0.0)
                self.model_lp[name].scatter_(1, idx, own)

    def prefill(self) -> None:
        """Every model's prompt; token 0 from the prefill logits."""
        heads = {id(r): r.prefill() for r in self.unique}
        flat = [heads[id(r)] for r in self.runners]
        zero = torch.zeros(self.B, dtype=torch.long, device=self.args.device)
        tok0, lp0, status = self.draw(flat, self.params1, zero)
        self.tokens[:, 0] = tok0
        if self.logprobs is not None:
            self.logprobs[:, 0] = lp0
        if self.model_lp is not None:
            self._model_logprobs(flat, tok0.clamp(min=0))
        if self.eos is not None:
            self.finished.copy_((tok0[:, None] == self.eos).any(1))
        self.n_done.fill_(1)
        self.pending.copy_(tok0.clamp(min=0))
        self.status.copy_(status)

    def _round(self) -> None:
        """One round, on the device only: the same shapes, buffers and ops every call (so it
        can be captured); every persistent value is written in place."""
        B, P, k, cols = self.B, self.P, self.k, self.cols
        n_done, finished, eos = self.n_done, self.finished, self.eos
        left = (self.n_max - n_done).masked_fill(finished, 0)
        # 1. the drafter drafts d_0 .. d_{k-1}, one token at a time
        rows, drafts = [], []
        fed_tok = self.pending
        for j in range(k):
            lg = self.drafter.forward(fed_tok[:, None], j, cols)[:, 0]
            rows.append(lg)
            fed_tok = self.draft_token([lg], n_done + j)
            drafts.append(fed_tok)
        D = torch.stack(drafts, 1)
        fed = torch.cat([self.pending[:, None], D], 1)
        # 2. every other model scores the P positions in one forward, beside the drafter's
        #    last forward (after d_{k-1}): independent branches, joined before the draw
        self.drafter.run.launch(self.drafter.forward, D[:, k - 1:], k, cols)
        for r in reversed(self.scorers):  # side streams first, the first scorer inline last
            r.run.launch(r.forward, fed, 0, cols)
        scored = {id(r): r.run.join() for r in self.scorers}
        rows.append(self.drafter.run.join()[:, 0])
        scored[id(self.drafter)] = torch.stack(rows, 1)
        flat = [scored[id(r)].reshape(B * P, -1) for r in self.runners]
        steps = (n_done[:, None] + cols).reshape(-1)
        y, lp, st = self.draw(flat, self.paramsP, steps)
        y = y.view(B, P)
        # 3. accept: agreeing draft prefix + the correction, cut at EOS and budget
        matches = (y[:, :k] == D).long().cumprod(1).sum(1)
        usable = left
        if eos is not None:
            is_eos = (y[:, :, None] == eos).any(-1)
            first_eos = torch.where(is_eos.any(1), is_eos.int().argmax(1), P)
            usable = torch.minimum(usable, first_eos + 1)
        c = torch.minimum(matches + 1, usable)
        keep = cols[None, :] < c[:, None]
        bad = st.view(B, P).masked_fill(~keep, 0)
        self.status.bitwise_or_(bad.gather(1, (bad != 0).int().argmax(1, keepdim=True))
                                .squeeze(1))
        # 4. commit on the device (fixed shapes: the non-kept columns write pad / 0)
        idx = n_done[:, None] + cols
        self.tokens.scatter_(1, idx, torch.where(keep, y, self.pad_row))
        if self.logprobs is not None:
            self.logprobs.scatter_(1, idx, lp.view(B, P).masked_fill(~keep, 0.0))
        if self.model_lp is not None:
            self._model_logprobs(flat, y.reshape(-1).clamp(min=0), idx, keep)
        if eos is not None:
            finished.logical_or_(first_eos < c)
        self.drafted.add_((usable - 1).clamp(min=0, max=k).sum())
        self.accepted.add_((c - 1).clamp(min=0).sum())
        self.rounds.add_((left > 0).any().long())
        # 5. rollback: mask the rejected columns, advance positions and the slot
        advance = c.max().reshape(1)
        for m in self.unique:
            m.commit(keep, c, advance, cols)
        self.pending.copy_(y.gather(1, (c - 1).clamp(min=0)[:, None]).squeeze(1).clamp(min=0))
        n_done.add_(c)

    def flags(self) -> tuple[bool, bool, int, int]:
        """One host read: (some row still going, some row bad, the streaming frontier: the
        first step some going row has not committed, the most steps any row committed)."""
        n_done, n_max = self.n_done, self.n_max
        still = ~self.finished & (n_done < n_max)
        frontier = torch.where(still.any(), n_done.masked_fill(~still, n_max).min(),
                               n_done.max()).clamp(max=n_max)
        going, bad, front, top = torch.stack(
            (still.any().long(), self.status.any().long(), frontier, n_done.max())).tolist()
        return bool(going), bool(bad), front, top

    def output(self) -> ProxyGenerateOutput:
        lengths = self.n_done
        n = int(lengths.max())
        drafted, accepted, rounds = torch.stack(
            (self.drafted, self.accepted, self.rounds)).tolist()
        stats = SpeculativeStats(num_draft_tokens=self.k, rounds=rounds, drafted=drafted,
                                 accepted=accepted, base_forwards=1 + rounds, steps=n)
        out_tokens = self.tokens[:, :n]
        lp, model_lp = self.logprobs, self.model_lp
        return ProxyGenerateOutput(
            sequences=torch.cat([self.args.input_ids, out_tokens], dim=1), tokens=out_tokens,
            lengths=lengths, logprobs=lp[:, :n] if lp is not None else None,
            model_logprobs={name: v[:, :n] for name, v in model_lp.items()}
            if model_lp is not None else None, stats=stats)


def static_speculative_decode(rounds: StaticRounds, feed) -> ProxyGenerateOutput:
    """Run ``rounds`` (built for a call with ``max_new_tokens >= 1``: the callers answer 0
    themselves) to the end: prefill, then a round at a time (replayed or eager) with a host
    check every ``ROUND_CHECK_INTERVAL`` rounds; ``feed``: a TokenFeed or None."""
    rounds.prefill()
    interval = 1 if rounds.args.device.type == "cpu" else ROUND_CHECK_INTERVAL
    streamed = checked_steps = r = 0
    while True:
        if r % interval == 0:  # the only host read of the loop
            going, any_bad, front, top = rounds.flags()
            if any_bad:
                raise_bad_generation_rows(rounds.status, checked_steps,
                                          max(top - 1, checked_steps))
            checked_steps = top
            if feed is not None:
                for s in range(streamed, front):
                    feed.push(s, rounds.tokens[:, s])
                streamed = max(streamed, front)
            if not going:
                break
        rounds.advance()                    # one round: replayed graph or eager
        r += 1
    if feed is not None:
        feed.close()
    return rounds.output()
