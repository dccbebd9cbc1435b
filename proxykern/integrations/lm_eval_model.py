"""The lm-evaluation-harness model ``proxykern``: proxy-tuned scoring and generation.

    lm_eval --model proxykern \\
        --model_args base=B,expert=E,anti_expert=A,alpha=1.0,dtype=bfloat16 --tasks gsm8k

``loglikelihood`` / ``loglikelihood_rolling`` run on :func:`proxykern.proxy_logprobs`,
``generate_until`` on :func:`proxykern.fused_proxy_generate`.

Registration: the package declares the entry point ``lm_eval.models: proxykern`` (lm-eval
versions with plugin discovery find it once proxykern is installed). lm-eval 0.4.13 and
older have no such discovery, so there: ``import proxykern.lm_eval_model`` before
``lm_eval.simple_evaluate(model="proxykern", ...)``, or run the ``proxykern-lm-eval``
console script, which is ``lm_eval`` with this model registered (same arguments).

model_args: the table :data:`MODEL_ARGS` below is the one list of names, defaults and
one-line meanings (the constructor accepts exactly those names; ``proxykern-lm-eval
--help`` prints it after lm-eval's own help). Unknown names and bad values raise
``ValueError`` naming the argument. More on some of them:

* ``mode``: ``proxy`` (default), ``base`` (the base alone: ``alpha`` is 0, no expert is
  loaded) or ``expert`` (the expert alone, reading its own -- chat-formatted with
  ``chat_expert`` -- context; base and anti-expert are not loaded). For the
  base-vs-expert-vs-proxy rows of a proxy-tuning table.
* ``chat_expert``: the expert reads each context as one user turn in its tokenizer's
  chat template (the paper's setting for chat experts); the base and the anti-expert
  read it plain; all three then score / produce the same tokens. Rolling
  log-likelihoods (perplexity) use the plain text for every model. Do not combine with
  lm-eval's ``--apply_chat_template``, which formats every model's context.
* ``device`` and ``batch_size`` may come from ``model_args`` or from lm-eval's
  ``--device`` / ``--batch_size`` (``simple_evaluate(device=, batch_size=)``); see
  :func:`merge_lm_eval_config` for which wins.
* ``seed``: request ``i`` of a sampled run (its index in the list lm-eval passes to
  ``generate_until``) draws with the per-row seed ``proxykern.reference.row_seeds(seed,
  i)`` -- the rule a Python-number seed follows everywhere in proxykern -- so its text
  does not depend on ``batch_size`` nor on the batch it lands in. A request's own
  ``seed`` generation kwarg takes the place of ``seed``.

``generate_until`` honours each request's ``until`` (stop strings; the text is cut before
the first one and generation ends once every row of the batch has produced one),
``max_gen_toks`` (aliases ``max_new_tokens``, ``max_tokens``), ``do_sample``,
``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``seed``; other keys raise
``ValueError``. Requests are grouped by their generation kwargs, sorted by length and
batched ``batch_size`` at a time. Greedy unless ``do_sample`` / ``temperature > 0``.
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ..generate import fused_proxy_generate
from ..loading import load_causal_lm, load_tokenizer, resolve_model_path
from ..ops import INT64_MAX, SAMPLING_RULES, check_sampling_arg, resolve_backend
from ..reference import row_seeds
from ..engine.runner import left_pad
from ..scoring import proxy_logprobs

MODES = ("proxy", "base", "expert")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}
GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "do_sample",
              "temperature", "top_k", "top_p", "min_p", "seed"}
DEFAULT_MAX_LENGTH = 2048
LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- model_args

@dataclass(frozen=True)
class ModelArg:
    """One ``model_args`` name: its default and a one-line meaning (``shown`` replaces
    the default in the help where the default is computed)."""
    name: str
    default: object
    help: str
    shown: str | None = None


# The one list of model_args: the constructor accepts exactly these names (with these
# defaults) and ``proxykern-lm-eval --help`` prints this table, so the two cannot drift.
MODEL_ARGS = (
    ModelArg("base", None, "base model, folder or hub name (required unless mode=expert)"),
    ModelArg("expert", None, "tuned expert, folder or hub name (required unless mode=base)"),
    ModelArg("anti_expert", None, "untuned anti-expert, folder or hub name (mode=proxy)"),
    ModelArg("alpha", 1.0, "z = base + alpha * (expert - anti_expert)"),
    ModelArg("mode", "proxy", "proxy, base (the base alone) or expert (the expert alone)"),
    ModelArg("chat_expert", False, "the expert reads each context as one chat user turn"),
    ModelArg("dtype", "auto", "float32, bfloat16, float16; auto: bfloat16 on CUDA, else fp32"),
    ModelArg("device", None, "cuda, cuda:1, cpu, ... or --device", "cuda if there, else cpu"),
    ModelArg("batch_size", 1, "requests per call, an integer (not auto), or --batch_size"),
    ModelArg("max_length", None, "token limit, contexts cut from the left",
             "max_position_embeddings or 2048"),
    ModelArg("max_gen_toks", 256, "new tokens when a request does not say"),
    ModelArg("tokenizer", None, "tokenizer folder or hub name",
             "the base's; mode=expert: the expert's"),
    ModelArg("add_bos_token", False, "contexts get the tokenizer's special tokens"),
    ModelArg("trust_remote_code", False, "let Hugging Face run the models' own code"),
    ModelArg("backend", "auto", "the fused op's backend: auto, cuda, triton, cpu, torch"),
    ModelArg("seed", 0, "sampled request i draws with row_seeds(seed, i)"),
)


def _model_args(given: dict) -> SimpleNamespace:
    """``given`` with every missing name at its :data:`MODEL_ARGS` default; a name not in
    the table raises ``ValueError`` naming it and listing the accepted ones."""
    names = [a.name for a in MODEL_ARGS]
    unknown = sorted(set(given) - set(names))
    if unknown:
        raise ValueError(f"model_args: unknown argument(s) {', '.join(unknown)} "
                         f"(proxykern takes {', '.join(names)})")
    return SimpleNamespace(**{a.name: given.get(a.name, a.default) for a in MODEL_ARGS})


# What lm-eval's command line passes for a --device / --batch_size that was not given
# (0.4.13's EvaluatorConfig defaults device to "cuda:0" and batch_size to 1): such a value
# cannot be told from the same flag given explicitly, so model_args win over it.
LM_EVAL_DEFAULTS = {"device": "cuda:0", "batch_size": "1"}


def merge_lm_eval_config(model_args: dict, additional: dict | None) -> dict:
    """The constructor's keyword arguments from ``model_args`` and lm-eval's additional
    config (``batch_size``, ``max_batch_size``, ``device``: its ``--batch_size`` /
    ``--device`` flags or ``simple_evaluate``'s arguments, always passed).

    * ``None`` means "not given" (as in lm-eval); ``max_batch_size`` is dropped (it only
      bounds ``batch_size=auto``, which proxykern refuses).
    * A name given on one side only takes that value; given on both with the same value
      (compared as text: ``8`` and ``"8"`` agree), that value.
    * Given on both with different values: ``model_args`` win over lm-eval's default
      (:data:`LM_EVAL_DEFAULTS`); any other difference raises ``ValueError`` naming both.
    * A ``device`` that only lm-eval gave and that is its default ``cuda:0`` is taken as
      not given (so proxykern's default applies: CUDA when available, else cpu), as
      lm-eval's own HF model does where CUDA is missing.
    """
    merged = dict(model_args)
    extra = {k: v for k, v in (additional or {}).items()
             if v is not None and k != "max_batch_size"}
    for key, value in extra.items():
        default = LM_EVAL_DEFAULTS.get(key)
        if merged.get(key) is None:  # model_args do not say
            if key == "device" and str(value).strip() == default:
                if not torch.cuda.is_available():
                    LOG.warning("proxykern: lm-eval passed device %r (its default when "
                                "--device is not given) and CUDA is not available: "
                                "running on cpu", value)
                continue
            merged[key] = value
        elif str(merged[key]).strip() != str(value).strip() and str(value).strip() != default:
            raise ValueError(f"{key}: model_args {key}={merged[key]!r} but lm-eval's "
                             f"--{key} (simple_evaluate {key}=) is {value!r}; give one of "
                             f"them or the same value in both")
    return merged


def _as_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name} must be true or false, got {value!r}")


def _as_int(name, value, minimum, maximum=INT64_MAX, where="model_args") -> int:
    """An integer in ``[minimum, maximum]`` (counts are held in int64), from an int or its
    digits; a float, even 3.0, is refused rather than truncated."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) \
            or not minimum <= value <= maximum:
        top = "2**63 - 1" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{where} {name} must be an integer in [{minimum}, {top}], "
                         f"got {value!r}")
    return int(value)


def _as_float(name, value, where="model_args") -> float:
    """A real number by the op's rule for ``name`` (:data:`proxykern.ops.SAMPLING_RULES`:
    e.g. alpha finite within float32's range), from a number or its text."""
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError, OverflowError):
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"{where} {name} must be a finite number, got {value!r}")
    if name in SAMPLING_RULES:
        try:
            check_sampling_arg(name, out, 1)
        except ValueError as exc:
            raise ValueError(f"{where} {exc}") from None
    return out


def _as_device(value) -> torch.device:
    """``value`` as a torch device (``None`` / ``""``: CUDA when available, else cpu)."""
    if value is None or value == "":
        value = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"model_args device: {value!r} is not a torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"model_args device={value!r} but CUDA is not available here")
    return device


def _as_dtype(value, device: torch.device) -> torch.dtype:
    """``value`` (a name of :data:`DTYPES`, ``auto`` or a torch dtype) as a torch dtype."""
    if isinstance(value, torch.dtype):
        return value
    if not isinstance(value, str) or (value != "auto" and value not in DTYPES):
        raise ValueError(f"model_args dtype must be auto, float32, bfloat16 or float16, "
                         f"got {value!r}")
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[value]


class _StopWhenDone(Exception):
    """Raised by :class:`_StopWatch` to end a generation whose every row has stopped."""


class _StopWatch:
    """An HF-style streamer (put/end) that collects each row's tokens and stops the decode
    once every row has produced an EOS id or a stop string (checked on the decoded text)."""

    def __init__(self, tokenizer, stops, eos_ids, batch_size):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.eos = set(eos_ids)
        self.rows = [[] for _ in range(batch_size)]
        self.done = [False] * batch_size

    def put(self, value):
        if value.dim() != 1:  # the prompt, (B, T)
            return
        for i, t in enumerate(value.tolist()):
            if self.done[i]:
                continue
            if t in self.eos:
                self.done[i] = True
                continue
            self.rows[i].append(t)
            if self.stops:
                text = self.tokenizer.decode(self.rows[i], skip_special_tokens=True)
                self.done[i] = any(s in text for s in self.stops)
        if all(self.done):
            raise _StopWhenDone

    def end(self):
        pass


def cut_at_stops(text: str, stops) -> str:
    """``text`` before the first occurrence of any stop string."""
    cut = len(text)
    for s in stops:
        if s:
            at = text.find(s)
            if at != -1:
                cut = min(cut, at)
    return text[:cut]


class ProxyKernLM(TemplateLM):
    """lm-eval model: ``base`` steered by ``expert`` - ``anti_expert`` (module docstring)."""

    def __init__(self, **model_args):
        """Load the models named by ``model_args`` (:data:`MODEL_ARGS`); a bad or unknown
        one raises ``ValueError`` naming it, before anything slow where possible."""
        super().__init__()
        args = _model_args(model_args)
        if args.mode not in MODES:
            raise ValueError(f"model_args mode must be one of {', '.join(MODES)}, "
                             f"got {args.mode!r}")
        self.mode = args.mode
        needed = {"proxy": ("base", "expert", "anti_expert"), "base": ("base",),
                  "expert": ("expert",)}[args.mode]
        paths = dict(base=args.base, expert=args.expert, anti_expert=args.anti_expert)
        for name in needed:  # every path checked before the first (slow) load
            if paths[name] is None:
                raise ValueError(f"model_args {name} is required (mode={args.mode})")
            paths[name], _ = resolve_model_path(f"model_args {name}", paths[name])
        if args.tokenizer is not None:
            resolve_model_path("model_args tokenizer", args.tokenizer)
        self.alpha = 0.0 if args.mode != "proxy" else _as_float("alpha", args.alpha)
        self.chat_expert = _as_bool("chat_expert", args.chat_expert)
        self.add_bos_token = _as_bool("add_bos_token", args.add_bos_token)
        trust = _as_bool("trust_remote_code", args.trust_remote_code)
        if isinstance(args.batch_size, str) and args.batch_size.strip().startswith("auto"):
            raise ValueError("model_args batch_size: 'auto' is not supported by proxykern; "
                             "pass a number")
        self.batch_size = _as_int("batch_size", args.batch_size, 1)
        self.max_gen_toks = _as_int("max_gen_toks", args.max_gen_toks, 1)
        self.seed = _as_int("seed", args.seed, 0, 2 ** 64 - 1)  # 64 bits, as everywhere
        max_length = None if args.max_length is None else _as_int("max_length", args.max_length, 2)
        self._device = _as_device(args.device)
        try:
            self.op_backend = resolve_backend(args.backend, self._device)
        except ValueError as exc:
            raise ValueError(f"model_args backend: {exc}") from None
        dtype = _as_dtype(args.dtype, self._device)

        loaded = {}  # equal paths share one model

        def load(name):
            if paths[name] not in loaded:
                loaded[paths[name]] = load_causal_lm(f"model_args {name}", paths[name], dtype,
                                                     self._device, trust_remote_code=trust)
            return loaded[paths[name]]

        if args.mode == "proxy":
            self.models = (load("base"), load("expert"), load("anti_expert"))
        else:
            m = load(needed[0])
            self.models = (m, m, m)
        tok_name = ("model_args tokenizer" if args.tokenizer is not None
                    else f"model_args {needed[0]} (its tokenizer)")
        self.tokenizer = load_tokenizer(tok_name, args.tokenizer or paths[needed[0]],
                                        trust_remote_code=trust)
        self.expert_tokenizer = (
            load_tokenizer("model_args expert (its tokenizer, for chat_expert)",
                           paths["expert"], trust_remote_code=trust)
            if self.chat_expert and args.mode != "base" else None)
        if self.expert_tokenizer is not None and not getattr(self.expert_tokenizer,
                                                             "chat_template", None):
            raise ValueError(f"model_args chat_expert: the expert's tokenizer "
                             f"({paths['expert']!r}) has no chat template")

        if max_length is None:
            limits = [getattr(getattr(m, "config", None), "max_position_embeddings", None)
                      for m in self.models]
            limits = [x for x in limits if isinstance(x, int) and x > 0]
            max_length = min(limits) if limits else DEFAULT_MAX_LENGTH
        self._max_length = max_length
        self.eos_ids = self._eos_ids()
        if not self.eos_ids:
            raise ValueError("model_args tokenizer: no EOS token id in the tokenizer or the "
                             "base's generation config (needed as the empty-context prefix)")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        """lm-eval's constructor from ``"name=value,..."`` plus its ``--device`` /
        ``--batch_size`` (:func:`merge_lm_eval_config` decides between the two)."""
        from lm_eval.utils import simple_parse_args_string

        return cls(**merge_lm_eval_config(simple_parse_args_string(arg_string),
                                          additional_config))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """lm-eval's constructor from a dict (its command line's path), as
        :meth:`create_from_arg_string`."""
        return cls(**merge_lm_eval_config(dict(arg_dict or {}), additional_config))

    # ------------------------------------------------------------------ lm-eval hooks

    @property
    def eot_token_id(self) -> int:
        return self.eos_ids[0]

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "proxykern").replace("/", "__")

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> list[int]:
        special = self.add_bos_token if add_special_tokens is None else add_special_tokens
        return self.tokenizer(string, add_special_tokens=special).input_ids

    def tok_decode(self, tokens, skip_special_tokens=True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ helpers

    def _eos_ids(self) -> list[int]:
        ids = []
        def config_eos(model):
            return getattr(getattr(model, "generation_config", None), "eos_token_id", None)

        sources = [config_eos(self.models[0]), self.tokenizer.eos_token_id]
        if self.expert_tokenizer is not None:  # a chat expert ends its turn with its own EOS
            sources += [config_eos(self.models[1]), self.expert_tokenizer.eos_token_id]
        for e in sources:
            for x in ([e] if isinstance(e, int) else list(e or [])):
                if x not in ids:
                    ids.append(x)
        return ids

    def _expert_context(self, context: str | None, fallback: list[int]) -> list[int]:
        """The expert's context tokens: ``context`` as one chat user turn, when chat_expert."""
        if self.expert_tokenizer is None or context is None:
            return fallback
        text = self.expert_tokenizer.apply_chat_template(
            [{"role": "user", "content": context.rstrip()}], tokenize=False,
            add_generation_prompt=True)
        ids = self.expert_tokenizer(text, add_special_tokens=False).input_ids
        return ids or fallback

    def _fit(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """Cut from the left so that ctx + cont fits ``max_length`` (ctx keeps >= 1 token)."""
        n = self.max_length
        if len(cont) > n - 1:  # only the last n - 1 tokens can be scored
            full = ctx + cont
            return full[-n:-(n - 1)], cont[-(n - 1):]
        return ctx[-(n - len(cont)):], cont

    def _score(self, items, desc: str, disable_tqdm: bool) -> list[tuple[float, bool]]:
        """items: (base ctx, expert ctx, continuation) token lists -> (sum logprob, greedy).

        Longest first (less padding; a batch too big for memory fails at once)."""
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][2])))
        results = [None] * len(items)
        base, expert, anti = self.models
        for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc=desc):
            idx = order[s:s + self.batch_size]
            ctx = [items[i][0] for i in idx]
            e_ctx = [items[i][1] for i in idx]
            cont = [items[i][2] for i in idx]
            if self.mode == "expert":  # the expert alone, on its own context
                out = proxy_logprobs(expert, expert, expert, e_ctx, cont, alpha=0.0,
                                     backend=self.op_backend)
            else:
                out = proxy_logprobs(base, expert, anti, ctx, cont,
                                     expert_context=e_ctx if self.chat_expert else None,
                                     alpha=self.alpha, backend=self.op_backend)
            totals = out.logprobs.sum(1).tolist()
            greedy = out.greedy.all(1).tolist()
            for i, t, g in zip(idx, totals, greedy):
                results[i] = (float(t), bool(g))
        return results

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        items = []
        for (context, _continuation), ctx_enc, cont_enc in requests:
            ctx, cont = self._fit(list(ctx_enc), list(cont_enc))
            e_ctx = self._expert_context(context, ctx) if context else ctx
            if self.chat_expert and context:
                e_ctx, _ = self._fit(e_ctx, cont)
            items.append((ctx, e_ctx, cont))
        results = self._score(items, "proxykern loglikelihood", disable_tqdm)
        for (key, _c, _x), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            # Inputs are context + continuation, so a window of max_length - 1 predictions
            # plus its context fits max_length tokens.
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length - 1, context_len=1)):
                windows.append((ctx, ctx, cont))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (ll, _g) in zip(owner, self._score(windows, "proxykern loglikelihood_rolling",
                                                  disable_tqdm)):
            totals[r] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _gen_settings(self, gen_kwargs) -> dict:
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until: generation kwargs must be a dict, got "
                             f"{type(gen_kwargs).__name__}")
        unknown = set(gen_kwargs) - GEN_KWARGS
        if unknown:
            raise ValueError(f"generate_until: generation kwarg(s) {', '.join(sorted(unknown))} "
                             f"not supported by proxykern (supported: "
                             f"{', '.join(sorted(GEN_KWARGS))})")
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until or [])
        if not all(isinstance(u, str) for u in until):
            raise ValueError(f"generate_until: until must be a string or a list of strings, "
                             f"got {gen_kwargs.get('until')!r}")
        where = "generate_until: generation kwarg"

        def get(key, default, kind):
            # the op's rules (SAMPLING_RULES), at the edge: a NaN temperature must not turn
            # into greedy decoding, nor top_k=3.7 into 3
            value = gen_kwargs.get(key)
            if value is None:
                return default
            if kind is int:
                return _as_int(key, value, -(2 ** 63) if key == "seed" else 0,
                               2 ** 64 - 1 if key == "seed" else INT64_MAX, where)
            return _as_float(key, value, where)

        max_new = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                        if gen_kwargs.get(k) is not None), self.max_gen_toks)
        max_new = _as_int("max_gen_toks", max_new, 1, where=where)
        temperature = get("temperature", 0.0, float)
        do_sample = gen_kwargs.get("do_sample")
        if do_sample is None:
            do_sample = temperature > 0
        if not do_sample:
            temperature = 0.0
        elif "temperature" not in gen_kwargs:
            temperature = 1.0  # do_sample without a temperature: HF's default
        return dict(until=until, max_new_tokens=max_new, temperature=temperature,
                    top_k=get("top_k", 0, int), top_p=get("top_p", 1.0, float),
                    min_p=get("min_p", 0.0, float), seed=get("seed", self.seed, int))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = {}
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            key = json.dumps(gen_kwargs, sort_keys=True, default=str)
            groups.setdefault(key, (gen_kwargs, []))[1].append(i)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="proxykern generate_until")
        for gen_kwargs, idx in groups.values():
            settings = self._gen_settings(gen_kwargs)
            encoded = {i: self.tok_encode(requests[i].args[0]) for i in idx}
            idx = sorted(idx, key=lambda i: -len(encoded[i]))
            for s in range(0, len(idx), self.batch_size):
                batch = idx[s:s + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch],
                                       [encoded[i] for i in batch], batch, settings)
                for i, text in zip(batch, texts):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    def _generate(self, contexts, encoded, request_ids, settings) -> list[str]:
        n = settings["max_new_tokens"]
        room = self.max_length - n
        if room < 1:
            raise ValueError(f"generate_until: max_gen_toks {n} leaves no room for the context "
                             f"within max_length {self.max_length}")
        base, expert, anti = self.models
        plain = [(e or [self.prefix_token_id])[-room:] for e in encoded]
        expert_rows = ([self._expert_context(c, p)[-room:] for c, p in zip(contexts, plain)]
                       if self.chat_expert else None)
        if self.mode == "expert":
            rows, models, alpha = expert_rows or plain, (expert, expert, expert), 0.0
            expert_rows = None
        else:
            rows, models, alpha = plain, (base, expert, anti), self.alpha
        ids, mask = left_pad(rows, 0, self.device)
        e_ids = e_mask = None
        if expert_rows is not None:
            e_ids, e_mask = left_pad(expert_rows, 0, self.device)
        pad = self.tokenizer.pad_token_id
        pad = self.eos_ids[0] if pad is None else pad
        # The one seed rule (docs/api.md, "Seeds and noise"): request i draws like row i
        # of a call seeded with the number -- independent of the batch it lands in.
        seeds = row_seeds(settings["seed"], torch.tensor(request_ids)).to(self.device)
        watch = _StopWatch(self.tokenizer, settings["until"], self.eos_ids, len(rows))
        try:
            fused_proxy_generate(
                *models, ids, mask, max_new_tokens=n, alpha=alpha,
                temperature=settings["temperature"], top_k=settings["top_k"],
                top_p=settings["top_p"], min_p=settings["min_p"], seed=seeds,
                eos_token_id=self.eos_ids, pad_token_id=pad, expert_input_ids=e_ids,
                expert_attention_mask=e_mask, streamer=watch, backend=self.op_backend)
        except _StopWhenDone:
            pass  # every row has stopped; its tokens are in the watch
        return [cut_at_stops(self.tok_decode(r), settings["until"]) for r in watch.rows]


def _register() -> None:
    """Register the class as ``proxykern`` (a no-op where lm-eval's entry-point discovery
    already holds the name for this same class)."""
    try:
        register_model("proxykern")(ProxyKernLM)
    except ValueError:
        pass


_register()



TRIO_EXAMPLE = """\
  T=examples/trio/models
  proxykern-lm-eval --model proxykern --device cpu --batch_size 64 \\
      --model_args base=$T/base,expert=$T/expert,anti_expert=$T/anti_expert \\
      --include_path examples/trio/lm_eval --tasks trio_qa_mc,trio_qa_gen --limit 50"""


def model_args_help() -> str:
    """The help section on proxykern's model_args (from :data:`MODEL_ARGS`, one line each:
    ``name=default``, meaning) and the local-task example, printed after lm-eval's help
    by ``proxykern-lm-eval --help``."""
    def first_column(arg):
        if arg.default is None:
            return arg.name
        default = str(arg.default).lower() if isinstance(arg.default, bool) else arg.default
        return f"{arg.name}={default}"

    width = max(len(first_column(a)) for a in MODEL_ARGS)
    lines = ["", "proxykern model (--model proxykern --model_args name=value,name=value,...):"]
    for a in MODEL_ARGS:
        shown = f" (default: {a.shown})" if a.shown else ""
        lines.append(f"  {first_column(a):<{width}}  {a.help}{shown}")
    lines += ["", "The local lm-eval tasks on the shipped trio (repository root, CPU):",
              TRIO_EXAMPLE, ""]
    return "\n".join(lines)


def _asks_for_help(argv: list) -> bool:
    """Whether lm-eval's command line would print the help of its top level or of ``run``
    (the command that takes --model_args) for ``argv``."""
    if not argv or argv == ["run"]:
        return True
    command = argv[0] if not argv[0].startswith("-") else None
    return command in (None, "run") and any(a in ("-h", "--help") for a in argv)


def cli_main(argv: list | None = None) -> None:
    """``proxykern-lm-eval``: lm-eval's command line, with the ``proxykern`` model
    registered; its help is followed by :func:`model_args_help`."""
    from lm_eval.__main__ import cli_evaluate

    argv = list(sys.argv[1:] if argv is None else argv)
    saved = sys.argv
    sys.argv = [saved[0] if saved else "proxykern-lm-eval", *argv]  # lm-eval parses sys.argv
    try:
        if not _asks_for_help(argv):
            sys.exit(cli_evaluate())
        try:
            cli_evaluate()
        except SystemExit as exc:  # argparse's --help exits 0; anything else is an error
            if exc.code not in (0, None):
                raise
    finally:
        sys.argv = saved
    print(model_args_help())
    sys.exit(0)
