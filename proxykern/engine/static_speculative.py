"""Speculative proxy decoding on static KV caches: fixed-shape rounds, bookkeeping on the device.

Same contract as :mod:`proxykern.engine.speculative` (the eager rounds on dynamic
caches): the output is plain decoding's (tokens, lengths; logprobs up to the float
rounding of a multi-token forward), ``out.stats`` is a
:class:`~proxykern.engine.rounds.SpeculativeStats`. What changes is the layout,
so that a round has the same shapes and reads no host value every time (the
prerequisite for replaying it as a CUDA graph).

One round (always ``P = k + 1`` columns, ``k = num_draft_tokens``)::

    expert    P single-token forwards: the pending token (the last one committed), then
              d_0 .. d_{k-1}, d_j = op(expert, expert, expert; step n_done + j) over the
              delta columns (argmax when greedy); its logits at the P positions are kept
    base      one forward over [pending, d_0, .., d_{k-1}]          -> (B, P, V)
    anti      one forward over the same tokens                      -> (B, P, V)
    op        all B * P positions at once, step n_done[row] + j     -> y (B, P)
    accept    c = min(matches + 1, first EOS + 1, tokens left)      (0 for a done row)
    commit    tokens[row, n_done + j] = y (pad where j >= c); n_done += c; ...

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

from .. import ops
from ..generation_args import GenerationArgs
from ..outputs import ProxyGenerateOutput, own_logprobs
from .rounds import SpeculativeStats
from ..models import MODEL_NAMES
from .graphs import CapturedCall
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


def _on(stream, fn, *args):
    """``fn(*args)`` queued on ``stream`` after the current stream's work so far (inline when
    ``stream`` is None); the caller joins with :func:`_join` before reading the result, and
    keeps every tensor both streams touch referenced until then."""
    if stream is None:
        return fn(*args)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        return fn(*args)


def _join(streams) -> None:
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)


class StaticRounds:
    """The state of one static speculative call (module doc): three static runners, the
    output buffers, the device-side bookkeeping and stats. :meth:`prefill` draws token 0;
    :meth:`advance` runs one round (eager, or captured and replayed); :meth:`flags` is the
    host read; :meth:`output` trims. ``graphs``: capture the round (CUDA)."""

    def __init__(self, base, expert, anti_expert, args: GenerationArgs, graphs: bool = False):
        B, n_max, dev = args.batch_size, args.max_new_tokens, args.device
        self.args, self.B, self.n_max, self.V = args, B, n_max, args.vocab_size
        self.k = k = args.num_draft_tokens
        self.P = P = k + 1
        self.plan = plan = args.vocab
        stand_in = plan.stand_ins
        cap = capacity_for(B, k, n_max)
        self.b_m = _Model(base, args.input_ids, args.attention_mask, cap, n_max, stand_in["base"])
        self.e_m = _Model(expert, args.expert_input_ids, args.expert_attention_mask, cap, n_max,
                          stand_in["expert"])
        self.a_m = None if args.share_anti else _Model(
            anti_expert, args.input_ids, args.attention_mask, cap, n_max, stand_in["anti_expert"])
        self.models = [m for m in (self.b_m, self.e_m, self.a_m) if m is not None]
        # Side streams (CUDA): the anti-expert's verification and the expert's last
        # forward run beside the base's verification.
        side = (lambda: torch.cuda.Stream(dev)) if dev.type == "cuda" else (lambda: None)
        self.e_stream = side()
        self.a_stream = side() if self.a_m is not None else None
        self.cols = torch.arange(P, device=dev)
        self.params1 = args.sampling
        self.paramsP = args.sampling.repeat_rows(P)
        self.draft_params = args.sampling.replace(alpha=0.0)

        pad = args.pad_token_id
        W = n_max + P  # room for a round's writes past a row's end (pad there, trimmed later)
        self.tokens = torch.full((B, W), pad, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((B, W), device=dev) if args.return_logprobs else None
        self.model_lp = ({n: torch.zeros((B, W), device=dev) for n in MODEL_NAMES}
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

    def prefill(self) -> None:
        """Every model's prompt; token 0 from the prefill logits."""
        args, plan = self.args, self.plan
        head_b, head_e = self.b_m.prefill(), self.e_m.prefill()
        head_a = self.a_m.prefill() if self.a_m is not None else head_e
        wide_e, wide_a = plan.widen(head_e, head_a)
        zero = torch.zeros(self.B, dtype=torch.long, device=args.device)
        tok0, lp0, _, status = ops.sample_rows(head_b, wide_e, wide_a, self.params1, zero,
                                               self.V, args.backend)
        self.tokens[:, 0] = tok0
        if self.logprobs is not None:
            self.logprobs[:, 0] = lp0
        if self.model_lp is not None:
            for name, lg in zip(MODEL_NAMES, (head_b, head_e, head_a)):
                self.model_lp[name][:, 0] = own_logprobs(lg, tok0.clamp(min=0),
                                                         plan.own_widths[name])
        if self.eos is not None:
            self.finished.copy_((tok0[:, None] == self.eos).any(1))
        self.n_done.fill_(1)
        self.pending.copy_(tok0.clamp(min=0))
        self.status.copy_(status)

    def _draft(self, lg_e: torch.Tensor, j: int) -> torch.Tensor:
        """The expert's guess at step ``n_done + j`` from its own logits (its columns only)."""
        V_draft = self.plan.delta_width
        if self.args.greedy:
            return lg_e[:, :V_draft].argmax(-1)
        d = ops.sample_rows(lg_e, lg_e, lg_e, self.draft_params, self.n_done + j, V_draft,
                            self.args.backend)[0]
        return d.clamp(min=0)  # a bad row's -1 is simply rejected

    def _round(self) -> None:
        """One round, on the device only: the same shapes, buffers and ops every call (so it
        can be captured); every persistent value is written in place."""
        B, P, k, cols = self.B, self.P, self.k, self.cols
        n_done, finished, eos, plan = self.n_done, self.finished, self.eos, self.plan
        left = (self.n_max - n_done).masked_fill(finished, 0)
        # 1. the expert drafts d_0 .. d_{k-1}, one token at a time
        e_rows, drafts = [], []
        fed_tok = self.pending
        for j in range(k):
            lg_e = self.e_m.forward(fed_tok[:, None], j, cols)[:, 0]
            e_rows.append(lg_e)
            fed_tok = self._draft(lg_e, j)
            drafts.append(fed_tok)
        D = torch.stack(drafts, 1)
        fed = torch.cat([self.pending[:, None], D], 1)
        # 2. the base and anti-expert score the P positions in one forward each, beside the
        #    expert's last forward (after d_{k-1}): three independent branches
        last_e = _on(self.e_stream, self.e_m.forward, D[:, k - 1:], k, cols)
        lg_a = _on(self.a_stream, self.a_m.forward, fed, 0, cols) if self.a_m else None
        lg_b = self.b_m.forward(fed, 0, cols)
        _join([s for s in (self.e_stream, self.a_stream) if s is not None])
        e_rows.append(last_e[:, 0])
        lg_e = torch.stack(e_rows, 1)
        flat = [lg.reshape(B * P, lg.shape[-1]) for lg in (lg_b, lg_e)]
        flat.append(flat[1] if lg_a is None else lg_a.reshape(B * P, lg_a.shape[-1]))
        w_e, w_a = plan.widen(flat[1], flat[2])
        steps = (n_done[:, None] + cols).reshape(-1)
        y, lp, _, st = ops.sample_rows(flat[0], w_e, w_a, self.paramsP, steps, self.V,
                                       self.args.backend)
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
            y_flat = y.reshape(-1).clamp(min=0)
            for name, lg in zip(MODEL_NAMES, flat):
                own = own_logprobs(lg, y_flat, plan.own_widths[name]).view(B, P)
                self.model_lp[name].scatter_(1, idx, own.masked_fill(~keep, 0.0))
        if eos is not None:
            finished.logical_or_(first_eos < c)
        self.drafted.add_((usable - 1).clamp(min=0, max=k).sum())
        self.accepted.add_((c - 1).clamp(min=0).sum())
        self.rounds.add_((left > 0).any().long())
        # 5. rollback: mask the rejected columns, advance positions and the slot
        advance = c.max().reshape(1)
        for m in self.models:
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


def static_speculative_decode(base, expert, anti_expert, args: GenerationArgs,
                              feed) -> ProxyGenerateOutput:
    """Decode with ``args.num_draft_tokens`` drafts per round on static caches (module doc;
    ``args.max_new_tokens >= 1``: :func:`proxykern.engine.speculative.speculative_decode`
    answers 0 itself). Rounds are captured and replayed when ``args.cuda_graphs``."""
    rounds = StaticRounds(base, expert, anti_expert, args, graphs=args.cuda_graphs)
    rounds.prefill()
    interval = 1 if args.device.type == "cpu" else ROUND_CHECK_INTERVAL
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
