"""``naive_proxy_generate``: the baseline, proxy-tuned decoding the way the paper's code does it.

Three eager forwards one after the other (each model with its own HF
``DynamicCache``), logits combined and sampled with plain PyTorch ops
(:mod:`proxykern.reference`), a host check of the finished rows every step. It
is the spec the generation tests compare against and the "naive
implementation" every benchmark reports a ratio to. Keep it plain.
"""
from __future__ import annotations

import torch

from .generation_args import prepare_generation
from .ops import raise_on_bad_rows
from .outputs import ProxyGenerateOutput, empty_output, own_logprobs
from .reference import STATUS_EMPTY, STATUS_NONFINITE, combine_logits, proxy_sample_reference
from .engine.runner import new_dynamic_cache, positions_from_mask
from .models import cache_kwarg


def naive_proxy_generate(base, expert, anti_expert, input_ids, attention_mask=None, *,
                         max_new_tokens, alpha=1.0, temperature=0.0, top_k=0, top_p=1.0,
                         min_p=0.0, seed=0, eos_token_id=None, pad_token_id=None,
                         expert_input_ids=None, expert_attention_mask=None,
                         return_logprobs=False, return_model_logprobs=False, streamer=None,
                         num_return_sequences=1, backend="auto"):
    """The baseline: proxy-tuned decoding the way the paper's reference code does it.

    Same signature as :func:`proxykern.fused_proxy_generate` less ``num_draft_tokens``
    and ``cuda_graphs`` (seeds and ``num_return_sequences`` follow the same rules).
    Each step runs the three models one after the other (eager, each with its own
    HF ``DynamicCache``), combines their last logits with plain PyTorch ops, draws
    the token (greedy: argmax; sampling: :func:`proxy_sample_reference`, the op's
    spec, so the tokens equal ``fused_proxy_generate``'s), and reads the finished
    flags on the host. Same arguments, checks and output as
    :func:`proxykern.fused_proxy_generate`; ``backend`` is checked but unused
    (nothing here is fused). It is the spec the
    tests compare against and the baseline every benchmark reports a ratio to.
    """
    args = prepare_generation(
        base, expert, anti_expert, input_ids, attention_mask, max_new_tokens=max_new_tokens,
        alpha=alpha, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, expert_input_ids=expert_input_ids,
        expert_attention_mask=expert_attention_mask, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs, streamer=streamer, backend=backend,
        cuda_graphs=False, num_return_sequences=num_return_sequences)
    B, dev, V = args.batch_size, args.device, args.vocab_size
    plan = args.vocab
    if streamer is not None:
        streamer.put(args.input_ids.cpu())
    if args.max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return empty_output(args)

    params = args.sampling
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
            # The vocabulary rule, plainly: the expert's and anti-expert's columns [0, V_d),
            # then zeros up to the base's width V_b (z = base there).
            b, e, a = (logits[0], *(torch.nn.functional.pad(
                lg[:, :plan.delta_width], (0, V - plan.delta_width)) for lg in logits[1:]))

            if args.greedy:  # as the paper's code: argmax of the combined logits
                z = combine_logits(b, e, a, params.alpha, V)
                status = (torch.isnan(z) | torch.isposinf(z)).any(1).int() * STATUS_NONFINITE \
                    | (~(z > float("-inf")).any(1)).int() * STATUS_EMPTY
                sampled = z.argmax(1)
                logprob = z.gather(1, sampled[:, None]).squeeze(1) - torch.logsumexp(z, 1)
            else:
                sampled, logprob, _, status = proxy_sample_reference(
                    b, e, a, *params.tensors(),
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
                    own = own_logprobs(lg, token, plan.own_widths[name])
                    model_lps[name].append(own.masked_fill(finished, 0.0))
            lengths += ~finished
            finished |= torch.isin(token, eos)
            if streamer is not None:
                streamer.put(token.cpu())
            if finished.all():
                break
            # Finished rows are fed their sampled token (discarded); a model that cannot
            # read a token (a base wider than it) reads pad_token_id in its place.
            for i in range(3):
                stand_in = plan.stand_ins[names[i]]
                ids[i] = (sampled if stand_in is None else stand_in(sampled))[:, None]
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
