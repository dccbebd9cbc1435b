"""``program_generate``: generation under a logit program (N models by role, one fused
draw per step). The program contract is :mod:`proxykern.programs` (docs/api.md, 1b).

Per call: check every argument once (:func:`prepare_program_generation`: the models by
role, each role's prompt, the program's per-row values, the vocabulary, the sampling
tensors and seeds), build :class:`proxykern.engine.step.ProgramStep` (a runner and KV
cache per role, side streams on CUDA, capturable as one CUDA graph) and run the shared
decode loop (:func:`proxykern.engine.decode.decode`).

Choices where the contract is silent:

* Prompts: every role reads ``input_ids`` unless ``role_input_ids[role]`` gives its own
  (with ``role_attention_mask[role]``, default all ones); ``sequences`` starts with
  ``input_ids``.
* Vocabulary (the widths rule of generation: models differ by padding only): a
  *difference* program ``z = L_b + s (L_e - L_a)`` samples over role b's width with a zero
  delta where e or a is narrower (proxy tuning's rule); any other program over the
  narrowest width (the columns every role has). A role that cannot read a sampled token
  reads ``pad_token_id`` instead. ``eos_token_id`` / ``pad_token_id`` default to the
  generation config of role b (difference programs) or of the first role.
* ``model_logprobs`` is keyed by role: each model's own log-softmax (T = 1).
* A proxy-tuning program (roles base / expert / anti_expert, no mask) with the anti-expert
  on the base's prompt runs as :func:`proxykern.fused_proxy_generate` itself (the same
  tokens, speculative decoding included, when the expert drafts).
* ``num_draft_tokens=k > 0``: speculative decoding (:mod:`proxykern.engine.speculative`):
  ``draft_role``'s model drafts up to k tokens a round from its own logits, the other roles
  score them in one forward each, and the output is plain decoding's (tokens exactly;
  logprobs up to the rounding of multi-token forwards). ``draft_role`` defaults to
  "expert" when the program has that role (the small tuned model of proxy tuning and
  DExperts; contrastive decoding's expert), else to the role with the fewest parameters.
  The rounds run on static caches, captured as a CUDA graph under the same
  ``cuda_graphs`` rule as plain steps, when every role's model supports a static cache and
  full attention; otherwise eagerly on dynamic caches.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .engine.decode import TokenFeed, decode
from .engine.speculative import program_speculative_decode
from .engine.step import ProgramStep
from .generation_args import (DecodeArgs, _check_count, _check_id_range, _check_ids, _check_mask,
                              _check_sampling, check_outputs, check_positions, check_role_models,
                              check_rows, decode_graphs, generation_seeds, program_vocab_plan,
                              resolve_eos_pad, rows_in_memory)
from .ops import resolve_backend
from .outputs import ProxyGenerateOutput, empty_output
from .params import SamplingParams
from .programs import BoundProgram, LogitProgram, bind_program

_PROXY_ROLES = ("base", "expert", "anti_expert")


@dataclass(kw_only=True)
class ProgramArgs(DecodeArgs):
    """Validated, normalised inputs of one ``program_generate`` call: ``input_ids`` is the
    default prompt (the output's prefix), each role's own prompt is in ``role_input_ids``
    (rows expanded); ``sampling.alpha`` is the bound scale (difference) or 0; ``vocab`` is
    keyed by role."""

    roles: tuple
    role_input_ids: dict
    role_attention_mask: dict
    bound: BoundProgram
    draft_role: str | None = None


def _check_models(program, models) -> torch.device:
    if not isinstance(program, LogitProgram):
        raise TypeError(f"program must be a LogitProgram, got {type(program).__name__}")
    return check_role_models(models, program.roles)[1]


def _role_prompts(program, ids, mask, role_input_ids, role_attention_mask, device):
    """role -> (ids, mask): each role's own prompt where given, else the shared one."""
    for name, given in (("role_input_ids", role_input_ids),
                        ("role_attention_mask", role_attention_mask)):
        unknown = [r for r in (given or {}) if r not in program.roles]
        if unknown:
            raise ValueError(f"{name} names unknown role(s) {unknown}; the program's roles "
                             f"are {program.roles}")
    role_input_ids, role_attention_mask = role_input_ids or {}, role_attention_mask or {}
    for r in role_attention_mask:
        if r not in role_input_ids:
            raise ValueError(f"role_attention_mask[{r!r}] is given without role_input_ids[{r!r}]")
    prompts = {}
    for r in program.roles:
        if r not in role_input_ids:
            prompts[r] = (ids, mask)
            continue
        r_ids = _check_ids(f"role_input_ids[{r!r}]", role_input_ids[r], device)
        if r_ids.shape[0] != ids.shape[0]:
            raise ValueError(f"role_input_ids[{r!r}] has batch size {r_ids.shape[0]} but "
                             f"input_ids has {ids.shape[0]}")
        prompts[r] = (r_ids, _check_mask(f"role_attention_mask[{r!r}]",
                                         role_attention_mask.get(r), r_ids,
                                         f"role_input_ids[{r!r}]", device))
    return prompts


def _delegates_to_proxy(program: LogitProgram, role_input_ids, role_attention_mask) -> bool:
    """Whether the call is plain proxy tuning that fused_proxy_generate runs as it is."""
    own_prompts = set(role_input_ids or {}) | set(role_attention_mask or {})
    return (program.mask is None and program.difference is not None
            and tuple(program.difference[:3]) == _PROXY_ROLES and own_prompts <= {"expert"})


def prepare_program_generation(program, models, input_ids, attention_mask, *, max_new_tokens,
                               role_input_ids, role_attention_mask, temperature, top_k, top_p,
                               min_p, seed, eos_token_id, pad_token_id, return_logprobs,
                               return_model_logprobs, streamer, backend, cuda_graphs,
                               num_return_sequences=1, num_draft_tokens=0,
                               draft_role=None) -> ProgramArgs:
    """Check every argument of a ``program_generate`` call; raise naming the first bad one."""
    device = _check_models(program, models)
    roles = program.roles
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 0)
    ids = _check_ids("input_ids", input_ids, device)
    mask = _check_mask("attention_mask", attention_mask, ids, "input_ids", device)
    prompts = _role_prompts(program, ids, mask, role_input_ids, role_attention_mask, device)
    for r in roles:
        name = f"role_input_ids[{r!r}]" if prompts[r][0] is not ids else "input_ids"
        _check_id_range(name, prompts[r][0], (models[r],))
    check_positions([(f"models[{r!r}]", models[r], int(prompts[r][1].sum(1).max()))
                     for r in roles], max_new_tokens)

    vocab_role = program.difference[0] if program.difference is not None else roles[0]
    eos, pad = resolve_eos_pad(models[vocab_role], eos_token_id, pad_token_id)
    plan = program_vocab_plan(program, models, pad)
    B = ids.shape[0]
    n = _check_count("num_return_sequences", num_return_sequences, 1)
    rows = check_rows(B, n)
    bound = bind_program(program, rows, device, n)
    values = {name: _check_sampling(name, value, B, n, device) for name, value in (
        ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p))}
    values["alpha"] = bound.scale if bound.scale is not None else 0.0
    with rows_in_memory(n, B, device):
        values["seed"] = generation_seeds(seed, B, n, device)
        if n > 1:  # rows i*n .. i*n+n-1 are prompt i's samples, as in HF generate
            ids = ids.repeat_interleave(n, dim=0)
            prompts = {r: tuple(t.repeat_interleave(n, dim=0) for t in p)
                       for r, p in prompts.items()}
    check_outputs(streamer, return_logprobs, return_model_logprobs)
    num_draft_tokens = _check_count("num_draft_tokens", num_draft_tokens, 0)
    use_graphs = decode_graphs(cuda_graphs, num_draft_tokens, device,
                               [models[r] for r in roles], [f"models[{r!r}]" for r in roles])
    if draft_role is None:
        draft_role = "expert" if "expert" in roles else min(
            roles, key=lambda r: sum(p.numel() for p in models[r].parameters()))
    return ProgramArgs(
        device=device, roles=roles, input_ids=ids,
        role_input_ids={r: p[0] for r, p in prompts.items()},
        role_attention_mask={r: p[1] for r, p in prompts.items()},
        max_new_tokens=max_new_tokens, bound=bound,
        sampling=SamplingParams.build(values, rows, device, plan.vocab_size),
        eos_token_ids=eos, pad_token_id=pad, vocab_size=plan.vocab_size, vocab=plan,
        backend=resolve_backend(backend, device), num_return_sequences=n,
        cuda_graphs=use_graphs, num_draft_tokens=num_draft_tokens, draft_role=draft_role,
        streamer=streamer, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs,
        eos_tensor=torch.tensor(eos, dtype=torch.long, device=device) if eos else None)


def program_generate(program, models, input_ids, attention_mask=None, *, max_new_tokens,
                     role_input_ids=None, role_attention_mask=None, temperature=0.0, top_k=0,
                     top_p=1.0, min_p=0.0, seed=0, eos_token_id=None, pad_token_id=None,
                     return_logprobs=False, return_model_logprobs=False, streamer=None,
                     num_return_sequences=1, num_draft_tokens=0, draft_role=None,
                     backend="auto", cuda_graphs="auto") -> ProxyGenerateOutput:
    """Generate under ``program`` (a :class:`proxykern.programs.LogitProgram`) with
    ``models`` (role -> HF causal LM): each step every role's model reads the last token on
    its own prompt and KV cache, and one fused draw samples the program's ``z``.

    ``input_ids`` / ``attention_mask`` (B, T): the left-padded prompt every role reads
    unless ``role_input_ids`` / ``role_attention_mask`` (dicts by role) give its own. The
    sampling and output arguments, seeds, ``num_return_sequences``, ``streamer``,
    ``backend`` and ``cuda_graphs`` are those of :func:`proxykern.fused_proxy_generate`;
    the program's coefficients and mask values may be per-row tensors (one per prompt or
    per returned row). ``num_draft_tokens`` / ``draft_role``: speculative decoding with that
    role drafting (module doc). Returns :class:`ProxyGenerateOutput`
    (``model_logprobs`` keyed by role). See the module docstring for the choices made.
    """
    for name, given in (("role_input_ids", role_input_ids),
                        ("role_attention_mask", role_attention_mask)):
        if given is not None and not isinstance(given, dict):
            raise TypeError(f"{name} must be a dict of role -> tensor or None, "
                            f"got {type(given).__name__}")
    if draft_role is not None and draft_role not in getattr(program, "roles", ()):
        raise ValueError(f"draft_role {draft_role!r} is not a role of the program "
                         f"({getattr(program, 'roles', ())})")
    if isinstance(program, LogitProgram) and draft_role in (None, "expert") \
            and _delegates_to_proxy(program, role_input_ids, role_attention_mask):
        from .generate import fused_proxy_generate
        _check_models(program, models)
        given = role_input_ids or {}
        return fused_proxy_generate(
            models["base"], models["expert"], models["anti_expert"], input_ids, attention_mask,
            max_new_tokens=max_new_tokens, alpha=program.difference[3], temperature=temperature,
            top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, expert_input_ids=given.get("expert"),
            expert_attention_mask=(role_attention_mask or {}).get("expert"),
            return_logprobs=return_logprobs, return_model_logprobs=return_model_logprobs,
            streamer=streamer, num_return_sequences=num_return_sequences,
            num_draft_tokens=num_draft_tokens, backend=backend, cuda_graphs=cuda_graphs)
    args = prepare_program_generation(
        program, models, input_ids, attention_mask, max_new_tokens=max_new_tokens,
        role_input_ids=role_input_ids, role_attention_mask=role_attention_mask,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs, streamer=streamer, backend=backend,
        cuda_graphs=cuda_graphs, num_return_sequences=num_return_sequences,
        num_draft_tokens=num_draft_tokens, draft_role=draft_role)
    feed = TokenFeed(args.streamer, args) if args.streamer is not None else None
    try:
        with torch.no_grad():
            if args.max_new_tokens == 0:
                if feed is not None:
                    feed.close()
                return empty_output(args)
            if args.num_draft_tokens:
                return program_speculative_decode(models, args, feed, args.draft_role)
            return decode(ProgramStep(models, args, graphs=args.cuda_graphs), args, feed)
    except BaseException:
        if feed is not None:
            args.streamer.end()
        raise
