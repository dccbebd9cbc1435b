"""Argument checks shared by ``fused_proxy_generate`` and ``naive_proxy_generate``.

Both entry points take the same arguments and must reject the same bad input
with the same ``ValueError``/``TypeError`` naming the argument, so the rules
live here once. Everything runs before the first forward: a bad call fails
fast, and the few host syncs it needs (mask and id ranges, per-row parameter
tensors) happen once, not per step.

Vocabulary rule (a choice; docs/api.md states it)
---------------------------------------
The three models' output widths (``lm_head`` rows, else ``config.vocab_size``)
may differ by padding only: two widths count as one vocabulary padded
differently when they differ by less than ``MAX_VOCAB_PADDING`` (1024, the
largest padding multiple in use: 128 x 8-way tensor parallelism) *and* by at
most an eighth of the narrower width (so tiny vocabularies stay meaningful).
A larger gap is a different vocabulary and raises ``ValueError`` naming the
model. Two different tokenizers of the same width cannot be told apart here.

The proxy vocabulary (generation and scoring) is the *base's* width ``V_b``
(:class:`VocabPlan`, computed once per call): a narrower expert or anti-expert
never removes base tokens. With ``V_d = min(V_e, V_a, V_b)``, columns ``[0, V_d)``
get ``z = base + alpha * (expert - anti_expert)`` and columns ``[V_d, V_b)`` get a
zero delta, ``z = base``; columns of a wider expert/anti-expert beyond ``V_b`` are
ignored. So ``alpha = 0`` (and ``expert is anti_expert``) give exactly the base
alone, whatever the widths. E.g. Qwen2.5-7B (152064) steered by Qwen2.5-0.5B
experts (151936): base tokens 151936..152063 keep the base's logits.

A token some model cannot read (>= its input embedding rows; possible only when
the base is wider) is fed to that model as ``pad_token_id`` instead, a stand-in
like a tokenizer's unknown token (:class:`StandIn`); the base always reads the
real token. When widths allow this, ``pad_token_id`` must be readable by every
model (``ValueError`` naming it otherwise). ``model_logprobs[name]`` is each
model's own log-softmax over its own columns within ``[0, V_b)``; a token outside
them gets ``-inf`` for that model.
"""
from __future__ import annotations

import contextlib
import numbers
import warnings
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from .models import (MODEL_NAMES, graph_unsupported_reason, input_width, model_device,
                     output_width, position_limit)
from .ops import INT64_MAX, SAMPLING_RULES, check_sampling_arg, resolve_backend
from .params import SamplingParams, row_tensor
from .reference import row_seeds

MAX_VOCAB_PADDING = 1024
#: Rows (prompts x num_return_sequences) one generation call returns at most: a kernel
#: launches one program per row, and CUDA grids hold at most 2**31 - 1 of them.
MAX_ROWS = 2 ** 31 - 1


@dataclass(kw_only=True)
class DecodeArgs:
    """What the decode loop, its steps and outputs read of one validated generation call
    (tensors on ``device``): :class:`GenerationArgs` (proxy tuning) and
    :class:`proxykern.program_generate.ProgramArgs` (logit programs) add their models'
    prompts."""

    device: torch.device
    input_ids: torch.Tensor   # the prompt the output starts with, rows expanded
    max_new_tokens: int
    sampling: SamplingParams  # per-row tensors, built once (seeds: generation_seeds)
    eos_token_ids: list       # [] = never stop early
    pad_token_id: int
    vocab_size: int           # the sampled vocabulary: columns [0, vocab_size)
    vocab: "VocabPlan"        # how the models' widths meet it (module doc)
    backend: str              # the op's backend, resolved
    num_return_sequences: int = 1   # B = prompts * num_return_sequences (rows already expanded)
    cuda_graphs: bool = False       # capture the decode step (resolved from "auto")
    num_draft_tokens: int = 0       # > 0: speculative decoding (proxykern.engine.speculative)
    streamer: object = None
    return_logprobs: bool = False
    return_model_logprobs: bool = False
    eos_tensor: torch.Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    @property
    def greedy(self) -> bool:
        """Every row greedy (the temperature was the number 0)."""
        return self.sampling.greedy


@dataclass(kw_only=True)
class GenerationArgs(DecodeArgs):
    """Validated, normalised inputs of one proxy-tuning call: ``input_ids`` /
    ``attention_mask`` are the base's and the anti-expert's prompt, the vocabulary is the
    base's width."""

    attention_mask: torch.Tensor
    expert_input_ids: torch.Tensor
    expert_attention_mask: torch.Tensor
    share_anti: bool          # anti-expert logits are the expert's (same model, same prompt)


# --------------------------------------------------------------------------- pieces

def _check_model(name, model):
    if not isinstance(model, torch.nn.Module) or not callable(getattr(model, "forward", None)):
        raise TypeError(f"{name} must be a Hugging Face causal LM (a torch.nn.Module), "
                        f"got {type(model).__name__}")






def same_vocabulary(a: int, b: int) -> bool:
    """True when widths ``a`` and ``b`` are one vocabulary padded differently (module doc)."""
    gap = abs(a - b)
    return gap < MAX_VOCAB_PADDING and gap <= min(a, b) // 8


def checked_widths(base, expert, anti_expert) -> dict:
    """``{name: output width}`` of the three models, after checking they differ by padding only
    (``ValueError`` naming the model otherwise)."""
    widths = dict(zip(MODEL_NAMES, (output_width(m) for m in (base, expert, anti_expert))))
    for a, b in (("base", "expert"), ("base", "anti_expert"), ("expert", "anti_expert")):
        if not same_vocabulary(widths[a], widths[b]):
            raise ValueError(
                f"{b} has a vocabulary of {widths[b]} tokens but {a} has {widths[a]}: more than "
                f"padding apart (proxy tuning needs one shared vocabulary; widths may differ "
                f"by less than {MAX_VOCAB_PADDING} and by at most 1/8)")
    return widths


def shared_vocab_size(base, expert, anti_expert) -> int:
    """The narrowest output width (the columns every model has logits for), after checking
    the widths differ by padding only. Not the proxy vocabulary, which is the base's width
    (:func:`vocab_plan`); kept for callers that need the common columns."""
    return min(checked_widths(base, expert, anti_expert).values())


class StandIn(NamedTuple):
    """Feeds a model ``pad`` in place of the token ids it cannot read (``>= limit``)."""

    limit: int
    pad: int

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        # One device op, no sync: safe inside a captured decode step.
        return torch.where(tokens < self.limit, tokens, self.pad)


@dataclass(frozen=True)
class VocabPlan:
    """How three widths meet in one proxy vocabulary (module doc), decided once per call.

    ``vocab_size``: ``V_b``, the base's output width, the proxy vocabulary.
    ``delta_width``: ``V_d = min(V_e, V_a, V_b)``, the columns the delta applies to.
    ``own_widths``: per model, its own columns within ``[0, V_b)`` (its ``model_logprobs``).
    ``stand_ins``: per model, a :class:`StandIn` when it cannot read every proxy token, else None.
    """

    vocab_size: int
    delta_width: int
    own_widths: dict
    stand_ins: dict

    @property
    def widens(self) -> bool:
        """Whether the expert's and anti-expert's logits need a zero-delta tail."""
        return self.delta_width < self.vocab_size

    def widen(self, expert: torch.Tensor, anti: torch.Tensor, out=None):
        """The expert's and anti-expert's logits ``(..., V)`` as the op reads them.

        Unchanged (no copy, no work) unless :attr:`widens`; then columns ``[0, V_d)`` copied
        into ``(..., V_b)`` buffers whose columns ``[V_d, V_b)`` are zero -- both buffers, so
        the delta there is exactly 0 even when only one model is narrow. ``out``: the
        buffers an earlier call returned, written in place (their tails stay zero).
        """
        if not self.widens:
            return expert, anti
        out_e, out_a = out if out is not None else (None, None)
        wide_e = self._copy_into(expert, out_e)
        return wide_e, (wide_e if anti is expert else self._copy_into(anti, out_a))

    def _copy_into(self, logits, buffer):
        if buffer is None:
            buffer = logits.new_zeros((*logits.shape[:-1], self.vocab_size))
        buffer[..., :self.delta_width].copy_(logits[..., :self.delta_width])
        return buffer


def plan_vocabulary(output_widths: dict, read_widths: dict, pad_token_id: int) -> VocabPlan:
    """The :class:`VocabPlan` of models with these widths (``{name: int}``; a read width of
    None means "reads its output width"); checks the stand-in ``pad_token_id`` is readable
    by every model when some model needs it (``ValueError`` naming pad_token_id)."""
    V_b = output_widths["base"]
    reads = {n: read_widths.get(n) or output_widths[n] for n in output_widths}
    stand_ins = {n: StandIn(r, pad_token_id) if r < V_b else None for n, r in reads.items()}
    needers = [n for n, s in stand_ins.items() if s is not None]
    for name, rows in reads.items():
        if needers and pad_token_id >= rows:
            raise ValueError(
                f"pad_token_id {pad_token_id} is fed to {needers[0]} in place of the base's "
                f"tokens it cannot read (ids >= {reads[needers[0]]}), but {name} reads only "
                f"ids below {rows}: pass a pad_token_id every model can read")
    return VocabPlan(vocab_size=V_b,
                     delta_width=min(output_widths["expert"], output_widths["anti_expert"], V_b),
                     own_widths={n: min(w, V_b) for n, w in output_widths.items()},
                     stand_ins=stand_ins)


def program_vocab_plan(program, models: dict, pad_token_id: int) -> VocabPlan:
    """The :class:`VocabPlan` (keyed by role) of a logit program over ``models``: a
    difference program's vocabulary is role b's width with a zero delta where e / a are
    narrower (the proxy rule); any other program's is the narrowest width of its roles.
    Widths must differ by padding only (``ValueError`` naming the models)."""
    roles = program.roles
    widths = {r: output_width(models[r]) for r in roles}
    for i, r1 in enumerate(roles):
        for r2 in roles[i + 1:]:
            if not same_vocabulary(widths[r1], widths[r2]):
                raise ValueError(
                    f"models[{r2!r}] has a vocabulary of {widths[r2]} tokens but "
                    f"models[{r1!r}] has {widths[r1]}: more than padding apart (a program "
                    f"combines one shared vocabulary)")
    if program.difference is not None:
        b, e, a, _s = program.difference
        V = widths[b]
        delta = min(widths[e], widths[a], V)
    else:
        V = delta = min(widths.values())
    reads = {r: input_width(models[r]) or widths[r] for r in roles}
    stand_ins = {r: StandIn(reads[r], pad_token_id) if reads[r] < V else None for r in roles}
    needers = [r for r in roles if stand_ins[r] is not None]
    for r in roles:
        if needers and pad_token_id >= reads[r]:
            raise ValueError(
                f"pad_token_id {pad_token_id} is fed to models[{needers[0]!r}] in place of "
                f"tokens it cannot read (ids >= {reads[needers[0]]}), but models[{r!r}] "
                f"reads only ids below {reads[r]}: pass a pad_token_id every model can read")
    return VocabPlan(vocab_size=V, delta_width=delta,
                     own_widths={r: min(w, V) for r, w in widths.items()}, stand_ins=stand_ins)


def check_role_models(models, roles) -> tuple[dict, torch.device]:
    """``models``: role -> causal LM, exactly a program's ``roles``, on one device; returns
    (the models in role order, their device)."""
    if not isinstance(models, dict):
        raise TypeError(f"models must be a dict of role -> Hugging Face causal LM, "
                        f"got {type(models).__name__}")
    missing = [r for r in roles if r not in models]
    extra = [r for r in models if r not in roles]
    if missing or extra:
        raise ValueError(f"models: the program's roles are {roles}; "
                         + (f"missing {missing}" if missing else f"unknown {extra}"))
    for r in roles:
        if not isinstance(models[r], torch.nn.Module):
            raise TypeError(f"models[{r!r}] must be a Hugging Face causal LM "
                            f"(a torch.nn.Module), got {type(models[r]).__name__}")
    device = model_device(models[roles[0]])
    for r in roles[1:]:
        if model_device(models[r]) != device:
            raise ValueError(f"models[{r!r}] is on {model_device(models[r])} but "
                             f"models[{roles[0]!r}] is on {device}: the models must share "
                             f"one device")
    return {r: models[r] for r in roles}, device


def vocab_plan(base, expert, anti_expert, pad_token_id: int) -> VocabPlan:
    """The :class:`VocabPlan` of three models (widths checked: :func:`checked_widths`)."""
    widths = checked_widths(base, expert, anti_expert)
    reads = dict(zip(MODEL_NAMES, (input_width(m) for m in (base, expert, anti_expert))))
    return plan_vocabulary(widths, reads, pad_token_id)




def check_positions(reads, max_new_tokens: int) -> None:
    """Refuse a generation whose positions some model cannot read, before any work.

    ``reads``: ``(model_name, model, prompt_tokens)`` for each model (its longest prompt
    row, padding excluded). A model reads its prompt and every new token but the last
    (the last is never fed back), so ``prompt_tokens + max_new_tokens - 1`` must not
    exceed its :func:`position_limit`. Raises ``ValueError`` naming the model.
    """
    for name, model, prompt_tokens in reads:
        limit = position_limit(model)
        needed = prompt_tokens + max(max_new_tokens - 1, 0)
        if limit is None or needed <= limit:
            continue
        if prompt_tokens > limit:
            raise ValueError(f"{name} reads at most {limit} positions (max_position_embeddings) "
                             f"but the prompt alone has {prompt_tokens} tokens")
        raise ValueError(
            f"{name} reads at most {limit} positions (max_position_embeddings) but the "
            f"prompt ({prompt_tokens} tokens) and max_new_tokens ({max_new_tokens}) need "
            f"{needed}: lower max_new_tokens to at most {limit - prompt_tokens + 1}")


def _check_ids(name, ids, device):
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids, got {ids.dtype}")
    if ids.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, length), got shape {tuple(ids.shape)}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(ids.shape)}): every row needs a prompt")
    return ids.to(device=device, dtype=torch.long)


def _check_mask(name, mask, ids, ids_name, device):
    """A 0/1 (B, T) mask with at least one token per row, left-padded."""
    if mask is None:
        return torch.ones_like(ids)
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)} but {ids_name} has "
                         f"{tuple(ids.shape)}")
    mask = mask.to(device=device)
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0 and 1")
    mask = mask.to(torch.long)
    empty = torch.nonzero(mask.sum(1) == 0).flatten().tolist()
    if empty:
        raise ValueError(f"{name} row {empty[0]} has no tokens: every row needs a prompt")
    right = torch.nonzero(mask[:, -1] == 0).flatten().tolist()
    if right:
        raise ValueError(f"{name} row {right[0]} ends with padding: prompts must be left-padded")
    return mask


def _check_id_range(name, ids, models):
    """Prompt ids must index every model that reads them (an out-of-range id is a device assert)."""
    limits = [w for w in (input_width(m) for m in models) if w is not None]
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (limits and hi >= min(limits)):
        raise ValueError(f"{name} holds token ids in [{lo}, {hi}] but the model's embedding "
                         f"has {min(limits) if limits else '?'} rows")


def _token_id_list(name, value) -> list:
    if value is None:
        return []
    if isinstance(value, torch.Tensor):
        value = value.flatten().tolist()
    values = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) \
        else list(value) if isinstance(value, (list, tuple, set)) else None
    if values is None or any(isinstance(v, bool) or not isinstance(v, numbers.Integral)
                             for v in values):
        raise TypeError(f"{name} must be an int, a list of ints or None, got {value!r}")
    if any(not 0 <= v <= INT64_MAX for v in values):
        raise ValueError(f"{name} must be in [0, 2**63 - 1] (int64 token ids), got {value!r}")
    return [int(v) for v in values]


def _check_sampling(name, value, n_prompts, n_samples, device):
    """A Python number, or a (rows,) tensor on ``device`` whose values are checked here,
    once per call (the op's own rules: :data:`proxykern.ops.SAMPLING_RULES`).

    A tensor may give one value per prompt (length ``n_prompts``, repeated for each of
    its ``n_samples`` sequences) or one per returned row (``n_prompts * n_samples``).
    """
    rows = n_prompts * n_samples
    if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == n_prompts \
            and n_samples > 1:
        value = value.repeat_interleave(n_samples)
    elif isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] not in (rows,):
        per = f"{n_prompts} (one per prompt) or {rows} (one per returned sequence)" \
            if n_samples > 1 else f"{rows} (the batch size)"
        raise ValueError(f"{name} must be a Python number or a 1-D tensor of length {per}, "
                         f"got shape {tuple(value.shape)}")
    value = check_sampling_arg(name, value, rows)
    if isinstance(value, torch.Tensor):
        value = value.to(device)
        _integral, valid, rule = SAMPLING_RULES[name]
        bad = [i for i, v in enumerate(value.tolist()) if not valid(v)]
        if bad:
            raise ValueError(f"{name}[{bad[0]}] {rule}, got {value[bad[0]].item()!r}")
    return value


def generation_seeds(seed, n_prompts: int, n_samples: int, device) -> torch.Tensor:
    """The (n_prompts * n_samples,) int64 seeds of a generation call, derived once.

    A Python number (or 0-d tensor): every returned row gets its own,
    ``row_seeds(seed, row)`` -- the op's own rule (:mod:`proxykern.params`). A
    tensor with one seed per returned row: used exactly as given. A tensor with one
    seed per prompt: used as given when ``n_samples == 1``, else sample ``j`` of
    prompt ``i`` gets ``row_seeds(seed[i], j)`` (so a prompt's samples do not depend
    on the batch either way).
    """
    rows = n_prompts * n_samples
    if not isinstance(seed, torch.Tensor) or seed.dim() == 0:
        check_sampling_arg("seed", seed, rows)
        return row_tensor("seed", seed, rows, device)
    if seed.dim() == 1 and seed.shape[0] == n_prompts and n_samples > 1:
        seed = _check_sampling("seed", seed, n_prompts, 1, device)
        sample = torch.arange(n_samples, device=device).repeat(n_prompts)
        return row_seeds(seed.to(torch.int64).repeat_interleave(n_samples), sample)
    return _check_sampling("seed", seed, n_prompts, n_samples, device).to(torch.int64).contiguous()


def _check_count(name, value, minimum: int, maximum: int = INT64_MAX) -> int:
    """An int in ``[minimum, maximum]`` (``TypeError`` / ``ValueError`` naming it); counts
    are held in int64, so none may exceed it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return int(value)


def check_rows(prompts: int, num_return_sequences: int) -> int:
    """The returned rows ``prompts * num_return_sequences``, refused (``ValueError`` naming
    num_return_sequences) beyond :data:`MAX_ROWS` -- before any row-sized tensor exists."""
    rows = prompts * num_return_sequences
    if rows > MAX_ROWS:
        raise ValueError(f"num_return_sequences {num_return_sequences} x {prompts} prompt(s) "
                         f"= {rows} rows, more than the {MAX_ROWS} one call can return")
    return rows


def _check_bool(name, value):
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


_warned_eager: set = set()


def check_cuda_graphs(cuda_graphs, device, models, names=MODEL_NAMES,
                      rounds: bool = False) -> bool:
    """Whether to capture the decode step (``rounds``: the speculative round) in a CUDA graph
    (rules in generate.py's docstring)."""
    if cuda_graphs not in ("auto", True, False) or (isinstance(cuda_graphs, int)
                                                     and not isinstance(cuda_graphs, bool)):
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {cuda_graphs!r}")
    if cuda_graphs is False or (cuda_graphs == "auto" and device.type != "cuda"):
        return False
    reason = graph_unsupported_reason(models, device, names, rounds)
    if reason is None:
        return True
    if cuda_graphs is True:
        raise ValueError(f"cuda_graphs=True cannot be honoured: {reason}")
    if reason not in _warned_eager:
        _warned_eager.add(reason)
        warnings.warn(f"proxykern: decoding without CUDA graphs: {reason}", RuntimeWarning,
                      stacklevel=4)
    return False


@contextlib.contextmanager
def rows_in_memory(n_samples: int, prompts: int, device):
    """Around a call's first row-sized tensors: with ``n_samples > 1`` an allocation that
    fails is the caller's count, a ``ValueError`` naming num_return_sequences."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if n_samples == 1 or not ("memory" in str(exc) or "allocate" in str(exc)):
            raise
        raise ValueError(f"num_return_sequences {n_samples} x {prompts} prompt(s) = "
                         f"{prompts * n_samples} rows do not fit in memory on {device}") from None


def resolve_eos_pad(model, eos_token_id, pad_token_id) -> tuple[list, int]:
    """(EOS ids, pad id) of a call: ``eos_token_id`` or ``model``'s generation config's,
    then :func:`resolve_pad_token_id`."""
    if eos_token_id is None:
        eos_token_id = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = _token_id_list("eos_token_id", eos_token_id)
    return eos, resolve_pad_token_id(model, pad_token_id, eos)


def check_outputs(streamer, return_logprobs, return_model_logprobs) -> None:
    """The output arguments of a generation call (``TypeError`` naming the argument)."""
    if streamer is not None and not (callable(getattr(streamer, "put", None))
                                     and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put() and end() (an HF BaseStreamer), "
                        f"got {type(streamer).__name__}")
    _check_bool("return_logprobs", return_logprobs)
    _check_bool("return_model_logprobs", return_model_logprobs)


def decode_graphs(cuda_graphs, num_draft_tokens: int, device, models,
                  names=MODEL_NAMES) -> bool:
    """Whether to capture the decode step (:func:`check_cuda_graphs`); with drafts
    (``num_draft_tokens > 0``) the speculative round, which needs a static cache and full
    attention in every model."""
    return check_cuda_graphs(cuda_graphs, device, models, names, rounds=num_draft_tokens > 0)


def resolve_pad_token_id(base, pad_token_id, eos: list) -> int:
    """``pad_token_id`` checked, or its default: the base's generation config, else the first
    of ``eos``, else 0 (with no EOS nothing is ever padded)."""
    if pad_token_id is None:
        pad_token_id = getattr(getattr(base, "generation_config", None), "pad_token_id", None)
        if isinstance(pad_token_id, (list, tuple)):
            pad_token_id = pad_token_id[0] if pad_token_id else None
        if pad_token_id is None:
            pad_token_id = eos[0] if eos else 0
    pads = _token_id_list("pad_token_id", pad_token_id)
    if len(pads) != 1:
        raise TypeError(f"pad_token_id must be one int, got {pad_token_id!r}")
    return pads[0]


# --------------------------------------------------------------------------- entry

def prepare_generation(base, expert, anti_expert, input_ids, attention_mask, *, max_new_tokens,
                       alpha, temperature, top_k, top_p, min_p, seed, eos_token_id, pad_token_id,
                       expert_input_ids, expert_attention_mask, return_logprobs,
                       return_model_logprobs, streamer, backend, cuda_graphs,
                       num_return_sequences=1, num_draft_tokens=0) -> GenerationArgs:
    """Check every argument of a generation call; raise naming the first bad one."""
    for name, model in zip(MODEL_NAMES, (base, expert, anti_expert)):
        _check_model(name, model)
    device = model_device(base)
    for name, model in (("expert", expert), ("anti_expert", anti_expert)):
        if model_device(model) != device:
            raise ValueError(f"{name} is on {model_device(model)} but base is on {device}: "
                             f"the three models must share one device")

    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 0)

    input_ids = _check_ids("input_ids", input_ids, device)
    attention_mask = _check_mask("attention_mask", attention_mask, input_ids, "input_ids", device)
    B = input_ids.shape[0]
    if expert_input_ids is None:
        if expert_attention_mask is not None:
            raise ValueError("expert_attention_mask is given without expert_input_ids")
        e_ids, e_mask = input_ids, attention_mask
    else:
        e_ids = _check_ids("expert_input_ids", expert_input_ids, device)
        if e_ids.shape[0] != B:
            raise ValueError(f"expert_input_ids has batch size {e_ids.shape[0]} but input_ids "
                             f"has {B}")
        e_mask = _check_mask("expert_attention_mask", expert_attention_mask, e_ids,
                             "expert_input_ids", device)
    base_readers = (base, anti_expert) if expert_input_ids is not None else (base, expert,
                                                                              anti_expert)
    _check_id_range("input_ids", input_ids, base_readers)
    if expert_input_ids is not None:
        _check_id_range("expert_input_ids", e_ids, (expert,))

    base_len, expert_len = (int(m.sum(1).max()) for m in (attention_mask, e_mask))
    check_positions((("base", base, base_len), ("expert", expert, expert_len),
                     ("anti_expert", anti_expert, base_len)), max_new_tokens)

    eos, pad = resolve_eos_pad(base, eos_token_id, pad_token_id)
    plan = vocab_plan(base, expert, anti_expert, pad)  # vocabularies beyond padding fail here
    n = _check_count("num_return_sequences", num_return_sequences, 1)
    check_rows(B, n)
    num_draft_tokens = _check_count("num_draft_tokens", num_draft_tokens, 0)
    values = {name: _check_sampling(name, value, B, n, device) for name, value in (
        ("alpha", alpha), ("temperature", temperature), ("top_k", top_k), ("top_p", top_p),
        ("min_p", min_p))}
    with rows_in_memory(n, B, device):
        values["seed"] = generation_seeds(seed, B, n, device)
        if n > 1:  # rows i*n .. i*n+n-1 are prompt i's samples, as in HF generate
            input_ids, attention_mask, e_ids, e_mask = (
                t.repeat_interleave(n, dim=0) for t in (input_ids, attention_mask, e_ids, e_mask))

    check_outputs(streamer, return_logprobs, return_model_logprobs)
    use_graphs = decode_graphs(cuda_graphs, num_draft_tokens, device, (base, expert, anti_expert))
    backend = resolve_backend(backend, device)

    sampling = SamplingParams.build(values, B * n, device, plan.vocab_size)
    return GenerationArgs(
        device=device, input_ids=input_ids, attention_mask=attention_mask,
        expert_input_ids=e_ids, expert_attention_mask=e_mask, max_new_tokens=max_new_tokens,
        sampling=sampling, eos_token_ids=eos, pad_token_id=pad, vocab_size=plan.vocab_size,
        vocab=plan,
        share_anti=expert is anti_expert and expert_input_ids is None, backend=backend,
        num_return_sequences=n, cuda_graphs=use_graphs, num_draft_tokens=num_draft_tokens,
        streamer=streamer, return_logprobs=return_logprobs,
        return_model_logprobs=return_model_logprobs,
        eos_tensor=torch.tensor(eos, dtype=torch.long, device=device) if eos else None)
