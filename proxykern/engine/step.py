"""The proxy decode step: three models, the fused op and the bookkeeping, in place.

:class:`ProxyStep` owns a runner per model (a static KV cache where the model
family supports one, else HF's dynamic cache), two side streams on CUDA, the
per-row sampling tensors (built once), the output buffers and a device-side step
counter. :meth:`ProxyStep.prefill` runs the prompts and draws token 0;
:meth:`ProxyStep.advance` feeds the last token to the three models and draws the
next one:

    expert, anti-expert forwards   on their side streams, after waiting on the main stream
    base forward                   on the main stream; then join
    widen (only when narrower)     expert, anti -> the base's width, zero-delta tail (VocabPlan)
    op(base, expert, anti)         -> token, logprob, status     (ops.sample_rows: no checks)
    tokens[:, t] = token (pad after EOS); finished |= token in eos; lengths += alive;
    status |= op status; t += 1                                   (all on the device)

Nothing in ``advance`` syncs with the host or builds Python-side state, so with
static runners on CUDA it is captured once as a CUDA graph (after one eager
warm-up step on a side stream) and replayed for every later step.
"""
from __future__ import annotations

import torch

from .. import ops
from ..models import MODEL_NAMES, static_cache_unsupported_reason
from ..outputs import ProxyGenerateOutput, own_logprobs
from ..programs import program_rows
from .graphs import CapturedCall
from .runner import ModelRunner
from .static_runner import StaticRunner


def raise_bad_generation_rows(status: torch.Tensor, first_step: int, last_step: int) -> None:
    """Raise ``ValueError`` naming the first bad row and the steps it may come from (one sync)."""
    try:
        ops.raise_on_bad_rows(status)
    except ValueError as exc:
        steps = (f"step {last_step}" if first_step == last_step
                 else f"steps {first_step}..{last_step}")
        raise ValueError(f"fused_proxy_generate: {exc} (generation {steps})") from None




def make_runner(model, input_ids, attention_mask, capacity, stream, static: bool,
                stand_in=None):
    """A static runner when asked and supported, else the dynamic-cache runner."""
    if static and static_cache_unsupported_reason(model) is None:
        return StaticRunner(model, input_ids, attention_mask, capacity, stream, stand_in)
    return ModelRunner(model, input_ids, attention_mask, capacity, stream, stand_in)


class DecodeStep:
    """What every decode step shares: the runners (role order), the output buffers, the
    device-side bookkeeping, the capture of :meth:`advance` and the host flags.

    A subclass builds its runners, calls :meth:`_setup`, and defines :meth:`_draw`
    (logits in role order -> tokens, logprobs, status, on the device, no checks).
    ``args`` holds the validated call (batch, device, budget, pad, eos, outputs asked for).
    """

    def _setup(self, args, roles: tuple, role_runners: list, own_widths: dict, graphs: bool):
        B, n_max, dev = args.batch_size, args.max_new_tokens, args.device
        self.args, self.batch_size, self.roles = args, B, roles
        self.role_runners = role_runners          # per role; a shared one appears twice
        # Launch order: side streams first, the main-stream runner last; each once.
        unique = list({id(r): r for r in role_runners}.values())
        self.runners = [r for r in unique if r.stream is not None] + \
            [r for r in unique if r.stream is None]
        self.own_widths = own_widths
        self._advance = CapturedCall(self._advance_eager, args.device, graphs)
        self.backend = args.backend
        self.step_rows = torch.zeros(B, dtype=torch.long, device=dev)   # RNG step of every row
        self.column = torch.zeros(1, dtype=torch.long, device=dev)      # the same, as an index
        self.pad = torch.full((B,), args.pad_token_id, dtype=torch.long, device=dev)
        self.eos = args.eos_tensor
        self.tokens = torch.full((B, n_max), args.pad_token_id, dtype=torch.long, device=dev)
        self.logprobs = torch.zeros((B, n_max), device=dev) if args.return_logprobs else None
        self.model_logprobs = ({n: torch.zeros((B, n_max), device=dev) for n in roles}
                               if args.return_model_logprobs else None)
        self.finished = torch.zeros(B, dtype=torch.bool, device=dev)
        self.lengths = torch.zeros(B, dtype=torch.long, device=dev)
        self.status = torch.zeros(B, dtype=torch.int32, device=dev)
        self.last_token = torch.zeros(B, dtype=torch.long, device=dev)  # token t (pad after EOS)
        self.next_input = torch.zeros(B, dtype=torch.long, device=dev)  # what the models read next

    def _draw(self, logits: list):
        raise NotImplementedError

    # ------------------------------------------------------------------ the step

    def _join(self) -> list:
        """The logits of every role (role order), safe to read on the current stream."""
        joined = {id(r): r.join() for r in self.runners}
        return [joined[id(r)] for r in self.role_runners]

    def _sample(self, logits) -> None:
        """Draw token t from the three logit rows and record it (device only)."""
        tok, lp, status = self._draw(logits)
        finished = self.finished
        self.status.bitwise_or_(status.masked_fill(finished, 0))  # a finished row's garbage is ignored
        token = torch.where(finished, self.pad, tok)
        column = self.column.view(1, 1).expand(self.batch_size, 1)
        self.tokens.scatter_(1, column, token[:, None])
        if self.logprobs is not None:
            self.logprobs.scatter_(1, column, lp.masked_fill(finished, 0.0)[:, None])
        if self.model_logprobs is not None:
            for name, lg in zip(self.roles, logits):
                own = own_logprobs(lg, token, self.own_widths[name])
                own = own.masked_fill(finished, 0.0)
                self.model_logprobs[name].scatter_(1, column, own[:, None])
        self.lengths.add_(~finished)
        if self.eos is not None:  # a broadcast compare: no sync, whatever the sizes
            self.finished.logical_or_((token[:, None] == self.eos).any(1))
        self.last_token.copy_(token)
        # Finished rows are fed their sampled token (always < vocab_size: the base reads it,
        # a model that cannot gets its stand-in); a bad row (token -1) reads 0 and raises at
        # the next host check.
        self.next_input.copy_(tok.clamp(min=0))
        self.step_rows.add_(1)
        self.column.add_(1)

    def prefill(self) -> None:
        """Run the prompts (side streams first) and draw token 0."""
        for r in self.runners:
            r.launch_prefill()
        self._sample(self._join())

    def _advance_eager(self) -> None:
        for r in self.runners:
            r.launch_step(self.next_input)
        self._sample(self._join())

    def advance(self) -> None:
        """Feed the last token to every model and draw the next one (eager, or the captured
        step replayed: :class:`proxykern.engine.graphs.CapturedCall`)."""
        self._advance()

    @property
    def graph(self):
        """The captured step (a ``torch.cuda.CUDAGraph``) once captured, else None."""
        return self._advance.graph

    # ------------------------------------------------------------------ host side

    def flags(self) -> tuple[bool, bool]:
        """(every row finished, some row bad): one host sync."""
        done, bad = torch.stack((self.finished.all(), self.status.any())).tolist()
        return bool(done), bool(bad)

    def output(self) -> ProxyGenerateOutput:
        n = int(self.lengths.max())
        tokens = self.tokens[:, :n]
        return ProxyGenerateOutput(
            sequences=torch.cat([self.args.input_ids, tokens], dim=1), tokens=tokens,
            lengths=self.lengths,
            logprobs=self.logprobs[:, :n] if self.logprobs is not None else None,
            model_logprobs={k: v[:, :n] for k, v in self.model_logprobs.items()}
            if self.model_logprobs is not None else None)


class ProxyStep(DecodeStep):
    """Decode state of one proxy-tuning call (``args``: validated :class:`GenerationArgs`).

    ``static``: use static KV caches where supported (required for ``graphs``).
    ``graphs``: capture :meth:`advance` once and replay it (CUDA, static runners).
    """

    def __init__(self, base, expert, anti_expert, args, *, static: bool = True,
                 graphs: bool = False):
        n_max, dev = args.max_new_tokens, args.device
        self.vocab_size, self.vocab, self.wide = args.vocab_size, args.vocab, None
        stand_in = args.vocab.stand_ins
        side = (lambda: torch.cuda.Stream(dev)) if dev.type == "cuda" else (lambda: None)
        self.base = make_runner(base, args.input_ids, args.attention_mask, n_max, None, static,
                                stand_in["base"])
        self.expert = make_runner(expert, args.expert_input_ids, args.expert_attention_mask,
                                  n_max, side(), static, stand_in["expert"])
        self.anti = self.expert if args.share_anti else make_runner(
            anti_expert, args.input_ids, args.attention_mask, n_max, side(), static,
            stand_in["anti_expert"])
        self._setup(args, MODEL_NAMES, [self.base, self.expert, self.anti],
                    args.vocab.own_widths, graphs)
        self.params = args.sampling  # per-row tensors, built once by prepare_generation

    def _draw(self, logits: list):
        """The fused op on (base, expert, anti), the narrower ones widened with a zero-delta
        tail (VocabPlan.widen) into buffers made at the prefill and rewritten in place."""
        base, expert, anti = logits
        if self.vocab.widens:
            self.wide = self.vocab.widen(expert, anti, self.wide)
            expert, anti = self.wide
        tok, lp, _, status = ops.sample_rows(base, expert, anti, self.params, self.step_rows,
                                             self.vocab_size, self.backend)
        return tok, lp, status


def role_runners(models: dict, args, make) -> list:
    """A runner per role of a program call (``args``: ProgramArgs), in role order, made by
    ``make(role_index, model, ids, mask, stand_in)``; roles that are the same model on the
    same prompt share one runner."""
    made, runners = {}, []
    for index, role in enumerate(args.roles):
        ids, mask = args.role_input_ids[role], args.role_attention_mask[role]
        key = (id(models[role]), id(ids), id(mask))
        if key not in made:
            made[key] = make(index, models[role], ids, mask, args.vocab.stand_ins[role])
        runners.append(made[key])
    return runners


class ProgramStep(DecodeStep):
    """Decode state of one logit-program call (``args``: validated
    :class:`proxykern.program_generate.ProgramArgs`): a runner per role, each on its own
    prompt and KV cache (one runner when two roles are the same model on the same prompt),
    the first role's on the current stream and the others on side streams on CUDA; the draw
    is :func:`proxykern.programs.program_rows` on the roles' logits."""

    def __init__(self, models: dict, args, *, static: bool = True, graphs: bool = False):
        n_max, dev = args.max_new_tokens, args.device
        self.vocab_size, self.vocab, self.wide = args.vocab_size, args.vocab, None
        self.bound = args.bound
        def make(index, model, ids, mask, stand_in):
            stream = torch.cuda.Stream(dev) if dev.type == "cuda" and index > 0 else None
            return make_runner(model, ids, mask, n_max, stream, static, stand_in)

        runners = role_runners(models, args, make)
        self._setup(args, args.roles, runners, args.vocab.own_widths, graphs)
        self.params = args.sampling
        self.widened = args.bound.indices[1:] if args.bound.indices is not None else ()

    def _draw(self, logits: list):
        """A difference program's e and a widened with a zero-delta tail where narrower (the
        proxy rule), then the program's entry to the op."""
        delta = None
        if self.vocab.widens and self.widened:
            e, a = self.widened
            self.wide = delta = self.vocab.widen(logits[e], logits[a], self.wide)
        tok, lp, _, status = program_rows(self.bound, logits, self.params, self.step_rows,
                                          self.vocab_size, self.backend, delta)
        return tok, lp, status
