"""``fused_proxy_generate``: proxy-tuned decoding with one fused sampling op per step.

Decode loop (one screen, on purpose)::

    prefill   expert, anti-expert (own CUDA streams), base (current stream); join
    step t    op(base, expert, anti) -> token t       # proxy_sample_with_status, no sync
              write token/logprobs into preallocated (B, max_new_tokens) buffers
              finished |= token in eos; status |= op status      (device flags)
              every FINISHED_CHECK_INTERVAL steps: one host read of (all finished, any bad)
              launch the three forwards of token t: side streams first, then base; join

Choices where API.md is silent:

* Finished rows keep running (their tokens are discarded and written as
  ``pad_token_id``); the host learns they are done at the next check, so the
  loop may run up to ``FINISHED_CHECK_INTERVAL - 1`` extra steps on a GPU. The
  output is trimmed to ``N = max(lengths)``. On CPU the check runs every step
  (there is nothing to overlap).
* A finished row is fed its sampled token, not ``pad_token_id``, so a pad id
  outside some model's embedding can never index out of range.
* ``logprobs`` and ``model_logprobs`` hold 0.0 after a row's end.
* ``model_logprobs[name]`` is that model's own ``log_softmax`` (T = 1) over the
  shared vocabulary ``[0, vocab_size)`` -- columns beyond it are padding.
* A streamer gets ``put(prompt)`` (B, T) first, then each step's tokens (B,)
  as CPU tensors until every row has finished (so a B = 1 stream ends at its
  EOS), then ``end()`` -- as ``GenerationMixin.generate`` does. On CUDA the
  copy is asynchronous and the streamer runs one step behind the GPU.
* ``cuda_graphs``: ``"auto"`` and ``False`` decode eagerly for now; ``True``
  raises ``ValueError`` until CUDA-graph decoding lands (see runner.py).
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple

import torch

from .generation_args import GenerationArgs, prepare_generation
from .ops import proxy_sample_with_status, raise_on_bad_rows
from .runner import ModelRunner

#: Steps between host checks of the finished/bad-row flags on an accelerator (one sync each).
FINISHED_CHECK_INTERVAL = 8


class ProxyGenerateOutput(NamedTuple):
    """Result of :func:`fused_proxy_generate` / :func:`naive_proxy_generate`.

    ``sequences`` (B, T + N) int64, ``tokens`` (B, N) int64 (``pad_token_id`` after a
    row's EOS), ``lengths`` (B,) int64 (new tokens per row, EOS included),
    ``logprobs`` (B, N) float32 or None, ``model_logprobs`` dict
    ``{"base", "expert", "anti_expert"}`` -> (B, N) float32, or None. ``stats``:
    a :class:`proxykern.speculative.SpeculativeStats` (acceptance rate, base
    forwards per token) when ``num_draft_tokens > 0``, else None.
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    logprobs: torch.Tensor | None
    model_logprobs: dict | None
    stats: object = None


def own_logprobs(logits: torch.Tensor, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A model's own log-softmax (T = 1, fp32) over ``[0, vocab_size)`` at ``tokens``."""
    logp = torch.log_softmax(logits[:, :vocab_size].float(), dim=-1)
    return logp.gather(1, tokens.clamp(0, vocab_size - 1).reshape(-1, 1)).squeeze(1)


def empty_output(args: GenerationArgs) -> ProxyGenerateOutput:
    """The result of ``max_new_tokens=0``: no forward runs."""
    B, dev = args.batch_size, args.device
    empty = torch.empty((B, 0), dtype=torch.float32, device=dev)
    return ProxyGenerateOutput(
        sequences=args.input_ids.clone(), tokens=torch.empty((B, 0), dtype=torch.long, device=dev),
        lengths=torch.zeros(B, dtype=torch.long, device=dev),
        logprobs=empty.clone() if args.return_logprobs else None,
        model_logprobs={n: empty.clone() for n in ("base", "expert", "anti_expert")}
        if args.return_model_logprobs else None)


class TokenFeed:
    """Hands each step's tokens to an HF streamer, stopping once every row has finished.

    On CUDA the tokens go to pinned host memory with a non-blocking copy and the
    streamer is served one step late, so the copy never stalls the GPU. The host
    copies also tell the loop when all rows are done (no extra sync).
    """

    def __init__(self, streamer, args: GenerationArgs):
        self.streamer = streamer
        self.eos = torch.tensor(args.eos_token_ids, dtype=torch.long)
        self.finished = torch.zeros(args.batch_size, dtype=torch.bool)
        self.all_done = False
        self.on_cuda = args.device.type == "cuda"
        self.lag = 1 if self.on_cuda else 0
        self.host = (torch.empty((max(args.max_new_tokens, 1), args.batch_size), dtype=torch.long,
                                 pin_memory=True) if self.on_cuda else None)
        self.pending = deque()
        streamer.put(args.input_ids.cpu())

    def push(self, step: int, tokens: torch.Tensor) -> None:
        if self.on_cuda:
            self.host[step].copy_(tokens, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.pending.append((self.host[step], event))
        else:
            self.pending.append((tokens.clone(), None))
        while len(self.pending) > self.lag:
            self._emit(*self.pending.popleft())

    def _emit(self, tokens, event) -> None:
        if event is not None:
            event.synchronize()
        if self.all_done:
            return
        self.streamer.put(tokens)
        if len(self.eos):
            self.finished |= torch.isin(tokens, self.eos)
            self.all_done = bool(self.finished.all())

    def close(self) -> None:
        while self.pending:
            self._emit(*self.pending.popleft())
        self.streamer.end()


def _check_interval(device: torch.device) -> int:
    return 1 if device.type == "cpu" else FINISHED_CHECK_INTERVAL


def _raise_bad_rows(status: torch.Tensor, first_step: int, last_step: int) -> None:
    try:
        raise_on_bad_rows(status)
    except ValueError as exc:
        steps = (f"step {last_step}" if first_step == last_step
                 else f"steps {first_step}..{last_step}")
        raise ValueError(f"fused_proxy_generate: {exc} (generation {steps})") from None


def fused_proxy_generate(base, expert, anti_expert, input_ids, attention_mask=None, *,
                         max_new_tokens, alpha=1.0, temperature=0.0, top_k=0, top_p=1.0,
                         min_p=0.0, seed=0, eos_token_id=None, pad_token_id=None,
                         expert_input_ids=None, expert_attention_mask=None,
                         return_logprobs=False, return_model_logprobs=False, streamer=None,
                         num_return_sequences=1, num_draft_tokens=0, backend="auto",
                         cuda_graphs="auto") -> ProxyGenerateOutput:
    """Proxy-tuned generation: ``z = base + alpha * (expert - anti_expert)`` each step.

    ``input_ids`` / ``attention_mask`` (B, T): the left-padded prompt of the base and
    the anti-expert; the expert reads ``expert_input_ids`` / ``expert_attention_mask``
    when given (its own length), else the same prompt. Each model keeps its own KV
    cache; positions come from the masks, so a padded row gets what it would alone
    (``attention_mask=None``: no padding).
    Sampling follows :func:`proxykern.proxy_sample`; the RNG step of a row is the
    index of the token being generated. ``num_return_sequences=n`` returns n
    sequences per prompt: rows ``i*n .. i*n+n-1`` of the output belong to prompt
    ``i`` (as in HF ``generate``). ``alpha``, ``temperature``, ``top_k``, ``top_p``,
    ``min_p`` and ``seed`` take a number or a 1-D tensor with one value per prompt
    (length B) or per returned row (length B * n).

    Seeds: a number gives every returned row its own seed
    (``proxykern.reference.row_seeds(seed, row)``, SplitMix64), so duplicated
    prompts and the n samples of a prompt are independent draws. A tensor per
    returned row is used exactly as given; a tensor per prompt is used as given
    when n = 1, else sample j of prompt i gets ``row_seeds(seed[i], j)``. With
    per-row (or per-prompt) seeds a row's tokens do not depend on the batch it
    sits in. Rows stop at any
    ``eos_token_id`` (default ``base.generation_config``) and are padded with
    ``pad_token_id`` (default: generation config, else the first EOS). Models whose
    vocabularies differ by padding only share the narrowest width (the rule is in
    :mod:`proxykern.generation_args`).

    Returns :class:`ProxyGenerateOutput`. Bad arguments raise ``ValueError`` /
    ``TypeError`` naming the argument; a row whose combined logits hold NaN/+inf
    raises ``ValueError`` naming the row. See the module docstring for the loop
    and the choices API.md leaves open.

    ``num_draft_tokens=k > 0``: speculative proxy decoding (:mod:`proxykern.speculative`):
    the expert drafts up to k tokens a round, the base and the anti-expert score them
    in one forward each; same output as ``k = 0`` (up to float rounding of batched
    forwards), fewer base forwards; ``out.stats`` reports the acceptance. Eager only.
    """
    args = prepare_generation(
        base, expert, anti_expert, input_ids, attention_mask, max_new_tokens=max_new_tokens,
        alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, expert_input_ids=expert_input_ids,
        expert_attention_mask=expert_attention_mask, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs, streamer=streamer, backend=backend,
        cuda_graphs=cuda_graphs, num_return_sequences=num_return_sequences,
        num_draft_tokens=num_draft_tokens)
    feed = TokenFeed(args.streamer, args) if args.streamer is not None else None
    try:
        with torch.no_grad():
            if args.num_draft_tokens:
                from .speculative import speculative_decode
                return speculative_decode(base, expert, anti_expert, args, feed)
            return _decode(base, expert, anti_expert, args, feed)
    except BaseException:
        if feed is not None:  # release a consumer blocked on a TextIteratorStreamer
            args.streamer.end()
        raise


def _decode(base, expert, anti_expert, args: GenerationArgs, feed) -> ProxyGenerateOutput:
    B, n_max, dev, V = args.batch_size, args.max_new_tokens, args.device, args.vocab_size
    if n_max == 0:
        if feed is not None:
            feed.close()
        return empty_output(args)

    side = (lambda: torch.cuda.Stream(dev)) if dev.type == "cuda" else (lambda: None)
    b_run = ModelRunner(base, args.input_ids, args.attention_mask, n_max)
    e_run = ModelRunner(expert, args.expert_input_ids, args.expert_attention_mask, n_max, side())
    a_run = None if args.share_anti else ModelRunner(anti_expert, args.input_ids,
                                                     args.attention_mask, n_max, side())
    runners = [r for r in (e_run, a_run, b_run) if r is not None]  # side streams first

    def join():
        b, e = b_run.join(), e_run.join()
        return b, e, (a_run.join() if a_run is not None else e)

    pad = torch.tensor(args.pad_token_id, dtype=torch.long, device=dev)
    tokens = torch.full((B, n_max), args.pad_token_id, dtype=torch.long, device=dev)
    logprobs = torch.zeros((B, n_max), device=dev) if args.return_logprobs else None
    model_lp = ({n: torch.zeros((B, n_max), device=dev) for n in ("base", "expert", "anti_expert")}
                if args.return_model_logprobs else None)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    lengths = torch.zeros(B, dtype=torch.long, device=dev)
    status_seen = torch.zeros(B, dtype=torch.int32, device=dev)
    interval, last_check = _check_interval(dev), -1

    for r in runners:
        r.launch_prefill()
    logits = join()
    for t in range(n_max):
        out, status = proxy_sample_with_status(*logits, **args.sampling, step=t, vocab_size=V,
                                               backend=args.backend)
        alive = ~finished
        status_seen |= status.masked_fill(finished, 0)  # a finished row's garbage is ignored
        tok = torch.where(alive, out.tokens, pad)
        tokens[:, t] = tok
        if logprobs is not None:
            logprobs[:, t] = out.logprobs.masked_fill(finished, 0.0)
        if model_lp is not None:
            for name, lg in zip(("base", "expert", "anti_expert"), logits):
                model_lp[name][:, t] = own_logprobs(lg, tok, V).masked_fill(finished, 0.0)
        lengths += alive
        if args.eos_tensor is not None:  # a broadcast compare: no sync, whatever the sizes
            finished = finished | (tok[:, None] == args.eos_tensor).any(1)
        if feed is not None:
            feed.push(t, tok)

        if t + 1 == n_max or t - last_check >= interval or (feed is not None and feed.all_done):
            all_done, any_bad = torch.stack((finished.all(), status_seen.any())).tolist()
            if any_bad:
                _raise_bad_rows(status_seen, last_check + 1, t)
            last_check = t
            if all_done or t + 1 == n_max:
                break
        # Feed the sampled token even to finished rows (always < vocab_size, so in range
        # for every model); bad rows (token -1) get 0 and raise at the next check.
        nxt = out.tokens.clamp(min=0)
        for r in runners:
            r.launch_step(nxt)
        logits = join()

    if feed is not None:
        feed.close()
    n = int(lengths.max())
    tokens = tokens[:, :n]
    return ProxyGenerateOutput(
        sequences=torch.cat([args.input_ids, tokens], dim=1), tokens=tokens, lengths=lengths,
        logprobs=logprobs[:, :n] if logprobs is not None else None,
        model_logprobs={k: v[:, :n] for k, v in model_lp.items()} if model_lp is not None else None)
