"""``fused_proxy_generate``: proxy-tuned decoding with one fused sampling op per step.

Per call: check every argument once (per-row sampling tensors, seeds derived:
:func:`proxykern.generation_args.prepare_generation`), build the step
(:class:`proxykern.engine.ProxyStep`: the expert and anti-expert on their own CUDA streams,
the base on the current one) and run the shared decode loop
(:func:`proxykern.engine.decode.decode`: prefill, then one replayed or eager step per
token, a host check every few steps, trim).

Choices where the contract is silent:

* Finished rows keep running (their tokens are discarded and written as
  ``pad_token_id``); the host learns they are done at the next check, so the
  loop may run up to ``FINISHED_CHECK_INTERVAL - 1`` extra steps on a GPU. The
  output is trimmed to ``N = max(lengths)``. On CPU the check runs every step
  (there is nothing to overlap).
* A finished row is fed its sampled token, not ``pad_token_id``, so a pad id
  outside some model's embedding can never index out of range.
* ``logprobs`` and ``model_logprobs`` hold 0.0 after a row's end.
* ``model_logprobs[name]`` is that model's own ``log_softmax`` (T = 1) over its own
  columns within the base's width, ``-inf`` for a token outside them
  (:mod:`proxykern.generation_args`).
* A streamer gets ``put(prompt)`` (B, T) first, then each step's tokens (B,)
  as CPU tensors until every row has finished (so a B = 1 stream ends at its
  EOS), then ``end()`` -- as ``GenerationMixin.generate`` does. On CUDA the
  copy is asynchronous and the streamer runs one step behind the GPU.
* KV caches: HF ``StaticCache`` sized for prompt + ``max_new_tokens`` for every
  model whose family supports one (on any device), else HF's dynamic cache.
* ``cuda_graphs``: ``"auto"`` captures the step (with ``num_draft_tokens > 0``: the
  speculative round) on CUDA when all three models support a static cache (rounds:
  and use full attention) and otherwise decodes eagerly, saying why in one
  warning; ``True`` raises ``ValueError`` naming what is missing; ``False`` (and
  any CPU run) decodes eagerly. The streamer stays outside the graph.
"""
from __future__ import annotations

import torch

from .engine import ProxyStep
from .engine.decode import TokenFeed, decode
from .generation_args import GenerationArgs, prepare_generation
from .outputs import ProxyGenerateOutput, empty_output

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
    vocabularies differ by padding only work together: the proxy vocabulary is the
    base's width, with a zero delta where the expert or anti-expert is narrower, and a
    model reads ``pad_token_id`` in place of a token it cannot (the rule is in
    :mod:`proxykern.generation_args`).

    Returns :class:`ProxyGenerateOutput`. Bad arguments raise ``ValueError`` /
    ``TypeError`` naming the argument; a row whose combined logits hold NaN/+inf
    raises ``ValueError`` naming the row. See the module docstring for the loop
    and the choices the contract leaves open.

    ``num_draft_tokens=k > 0``: speculative proxy decoding (:mod:`proxykern.engine.speculative`):
    the expert drafts up to k tokens a round, the base and the anti-expert score them
    in one forward each; same output as ``k = 0`` (up to float rounding of batched
    forwards), fewer base forwards; ``out.stats`` reports the acceptance. The rounds run on
    static KV caches with fixed shapes (:mod:`proxykern.engine.static_speculative`) when
    every model supports one and is full attention, captured as a CUDA graph under the
    same ``cuda_graphs`` rule as plain steps, else eagerly on dynamic caches.
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
                from .engine.speculative import speculative_decode
                return speculative_decode(base, expert, anti_expert, args, feed)
            return _decode(base, expert, anti_expert, args, feed)
    except BaseException:
        if feed is not None:  # release a consumer blocked on a TextIteratorStreamer
            args.streamer.end()
        raise


def _decode(base, expert, anti_expert, args: GenerationArgs, feed) -> ProxyGenerateOutput:
    if args.max_new_tokens == 0:
        if feed is not None:
            feed.close()
        return empty_output(args)
    return decode(ProxyStep(base, expert, anti_expert, args, graphs=args.cuda_graphs), args, feed)
