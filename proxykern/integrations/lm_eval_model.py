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

Programs (:mod:`proxykern.programs`), ``program=``:

* ``proxy_tuning`` (default): ``base``, ``expert``, ``anti_expert``, ``alpha`` -- today's
  path exactly (:func:`proxykern.proxy_logprobs`, :func:`proxykern.fused_proxy_generate`).
* ``dexperts``: ``base``, ``expert``, ``anti_expert``, ``alpha`` (default 2.0, the preset's,
  when ``alpha`` is not given), ``base_top_p`` (0.9).
* ``contrastive`` (O'Brien & Lewis): ``expert``, ``amateur``, ``beta`` (0.5),
  ``plausibility`` (0.1); ``contrastive_li`` (Li et al.): ``expert``, ``amateur``,
  ``plausibility`` (0.1).
* ``ensemble``: ``roles=ROLE:PATH;ROLE:PATH;...`` (2 to 8) and ``weights=ROLE:W;ROLE:W;...``
  (default 1/N each); ``z = sum_r w_r L_r``.

Lists inside model_args use ``;`` (lm-eval splits model_args at commas; in a shell,
quote the whole ``--model_args`` value, as ``;`` ends a command there); from Python
(``simple_evaluate(model_args={...})``) a list / dict is taken as well. Non-proxy
programs score through :func:`proxykern.program_logprobs` and generate through
:func:`proxykern.program_generate`; ``chat_expert`` applies to the role named ``expert``
(an ensemble without one refuses it). The tokenizer is the vocabulary role's: the base
(proxy tuning, DExperts), the expert (contrastive) or the first ensemble role. A model_arg
the chosen program does not take (``beta`` with ``dexperts``, ``base`` with
``contrastive``, ...) raises ``ValueError`` naming it; so does ``mode=base|expert`` with a
program other than proxy_tuning.

Sweeps (tuning a coefficient): one of ``alpha``, ``beta``, ``plausibility``,
``base_top_p`` may be a list, ``alpha=0.5;1.0;2.0``. Log-likelihood requests then score
every value from the same forwards (one per model per batch: ``proxy_logprobs(alpha=[...])``
or ``program_logprobs([programs])``). lm-eval gets the *first* value's result (its
metrics are those of the first value); :meth:`ProxyKernLM.loglikelihood_sweep` returns
all K (``[k][i]`` = request ``i`` at value ``k``, what ``loglikelihood`` returns for a
model built with that one value), and ``sweep_output=PATH`` writes, after every
``loglikelihood`` / ``loglikelihood_rolling`` call, a JSON file with each request's K
summed log-likelihoods and greedy flags (task, doc_id, choice index) and per-task sums
(:func:`sweep_summary`; :func:`sweep_accuracy` turns it into multiple-choice accuracy
per value given the gold choices). A continuation a program's mask drops scores
``-inf`` (written as ``-Infinity``, which Python's ``json`` reads). ``generate_until``
refuses a sweep (generation needs one value).
"""
from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .. import programs as presets
from ..generate import fused_proxy_generate
from ..program_generate import program_generate
from ..loading import (eos_token_ids, load_causal_lm, load_tokenizer, resolve_device,
                       resolve_dtype, resolve_model_path)
from ..ops import INT64_MAX, SAMPLING_RULES, check_sampling_arg, resolve_backend
from ..reference import row_seeds
from ..engine.runner import left_pad
from ..scoring import program_logprobs, proxy_logprobs

MODES = ("proxy", "base", "expert")
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
    ModelArg("program", "proxy_tuning",
             "proxy_tuning, dexperts, contrastive, contrastive_li or ensemble"),
    ModelArg("base", None, "base model, folder or hub name (required unless mode=expert)"),
    ModelArg("expert", None, "tuned expert, folder or hub name (required unless mode=base)"),
    ModelArg("anti_expert", None, "untuned anti-expert, folder or hub name (mode=proxy)"),
    ModelArg("amateur", None, "contrastive(_li): the amateur, folder or hub name"),
    ModelArg("roles", None, "ensemble: its models, ROLE:PATH;ROLE:PATH;... (2 to 8)"),
    ModelArg("alpha", 1.0, "z = base + alpha * (expert - anti_expert); A;B;C = a sweep",
             "1.0; dexperts: 2.0"),
    ModelArg("beta", None, "contrastive: z = (1 + beta) expert - beta amateur", "0.5"),
    ModelArg("plausibility", None, "contrastive(_li): keep p_expert >= this * max p_expert",
             "0.1"),
    ModelArg("base_top_p", None, "dexperts: the base's own top-p set masks z", "0.9"),
    ModelArg("weights", None, "ensemble: ROLE:W;ROLE:W;... (z = sum w L)", "1/N each"),
    ModelArg("sweep_output", None, "JSON file: every value of a sweep, per request and task"),
    ModelArg("mode", "proxy", "proxy, base (the base alone) or expert (the expert alone)"),
    ModelArg("chat_expert", False, "the expert reads each context as one chat user turn"),
    ModelArg("dtype", "auto", "float32, bfloat16, float16; auto: bfloat16 on CUDA, else fp32"),
    ModelArg("device", None, "cuda, cuda:1, cpu, ... or --device", "cuda if there, else cpu"),
    ModelArg("batch_size", 1, "requests per call, an integer (not auto), or --batch_size"),
    ModelArg("max_length", None, "token limit, contexts cut from the left",
             "max_position_embeddings or 2048"),
    ModelArg("max_gen_toks", 256, "new tokens when a request does not say"),
    ModelArg("tokenizer", None, "tokenizer folder or hub name",
             "the vocabulary role's: base; expert (mode=expert, contrastive); ensemble: "
             "the first role"),
    ModelArg("add_bos_token", False, "contexts get the tokenizer's special tokens"),
    ModelArg("trust_remote_code", False, "let Hugging Face run the models' own code"),
    ModelArg("backend", "auto", "the fused op's backend: auto, cuda, triton, cpu, torch"),
    ModelArg("seed", 0, "sampled request i draws with row_seeds(seed, i)"),
)


MODEL_ARGS_DEFAULTS = {a.name: a.default for a in MODEL_ARGS}


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


# --------------------------------------------------------------------------- programs

# program -> (the model_args naming its models, the model_args setting its parameters)
PROGRAMS = {
    "proxy_tuning": (("base", "expert", "anti_expert"), ("alpha",)),
    "dexperts": (("base", "expert", "anti_expert"), ("alpha", "base_top_p")),
    "contrastive": (("expert", "amateur"), ("beta", "plausibility")),
    "contrastive_li": (("expert", "amateur"), ("plausibility",)),
    "ensemble": (("roles",), ("weights",)),
}
PROGRAM_ARGS = ("base", "expert", "anti_expert", "amateur", "roles", "alpha", "beta",
                "plausibility", "base_top_p", "weights")
SWEEPABLE = ("alpha", "beta", "plausibility", "base_top_p")
_ROLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ProgramSpec:
    """The program a ``model_args`` dict asks for (:func:`program_spec`), nothing loaded.

    ``paths``: role -> model path as given, in the program's role order; ``programs``: the
    K :class:`proxykern.programs.LogitProgram` scored (K = 1 without a sweep); ``sweep``:
    ``(model_arg, [K values])`` or None; ``params``: each parameter's value (the swept one:
    its list) -- the preset's default where not given."""
    name: str
    paths: dict
    programs: tuple
    sweep: tuple | None
    params: dict


def _number_or_list(name, value):
    """A model_arg that is a number or a sweep (``A;B;C``, or a list from Python): a
    float, or a list of floats (each checked by :func:`_as_float`'s rule for ``name``)."""
    if isinstance(value, (list, tuple)) or (isinstance(value, str) and ";" in value):
        items = [v.strip() for v in value.split(";")] if isinstance(value, str) else list(value)
        if not items:
            raise ValueError(f"model_args {name}: an empty list (a sweep needs >= 1 value)")
        out = []
        for k, item in enumerate(items):
            try:
                out.append(_as_float(name, item))
            except ValueError as exc:
                raise ValueError(f"{exc} (item {k} of {name}={value!r}; a list is "
                                 f"values separated by ';')") from None
        return out
    return _as_float(name, value)


def _unit(name, value):
    for v in value if isinstance(value, list) else [value]:
        if not 0 < v <= 1:
            raise ValueError(f"model_args {name} must be in (0, 1], got {v!r}")
    return value


def _role_items(name, value, what) -> list[tuple[str, object]]:
    """``ROLE:X;ROLE:X;...`` (or a dict from Python) as [(role, X)], roles checked."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, str):
        items = []
        for part in (p.strip() for p in value.split(";")):
            if not part:
                continue
            if ":" not in part:
                raise ValueError(f"model_args {name}: expected ROLE:{what} items separated by "
                                 f"';' (e.g. {name}=a:{what};b:{what}), got {part!r}")
            role, x = part.split(":", 1)
            items.append((role.strip(), x.strip()))
    else:
        raise ValueError(f"model_args {name}: expected ROLE:{what};ROLE:{what};..., "
                         f"got {value!r}")
    roles = [r for r, _x in items]
    for r in roles:
        if not isinstance(r, str) or not _ROLE_NAME.fullmatch(r):
            raise ValueError(f"model_args {name}: bad role name {r!r} (letters, digits, _ . -)")
    if len(set(roles)) != len(roles):
        raise ValueError(f"model_args {name}: a role is named twice in {roles}")
    return items


def _ensemble(given: dict):
    """(role -> path, role -> weight) of ``program=ensemble``."""
    if given.get("roles") is None:
        raise ValueError("model_args roles is required (program=ensemble): "
                         "roles=ROLE:PATH;ROLE:PATH;...")
    paths = dict(_role_items("roles", given["roles"], "PATH"))
    if not presets.MIN_ROLES <= len(paths) <= presets.MAX_ROLES:
        raise ValueError(f"model_args roles: an ensemble reads {presets.MIN_ROLES} to "
                         f"{presets.MAX_ROLES} models, got {len(paths)}")
    if given.get("weights") is None:
        return paths, {r: 1.0 / len(paths) for r in paths}
    weights = {}
    for role, w in _role_items("weights", given["weights"], "W"):
        if role not in paths:
            raise ValueError(f"model_args weights: role {role!r} is not one of roles "
                             f"({', '.join(paths)})")
        weights[role] = _as_float(f"weights {role}", w)
    missing = [r for r in paths if r not in weights]
    if missing:
        raise ValueError(f"model_args weights: no weight for role(s) {', '.join(missing)}")
    return paths, {r: weights[r] for r in paths}


def program_spec(given: dict, mode: str = "proxy") -> ProgramSpec:
    """The program of a ``model_args`` dict (names from :data:`MODEL_ARGS`; a value of None
    counts as not given): its roles' paths, its K programs, its sweep. Raises ``ValueError``
    naming the model_arg for an unknown program, a model_arg the program does not take, a
    missing model, a bad value or two sweeps. Loads nothing and checks no path."""
    given = {k: v for k, v in given.items() if v is not None}
    name = given.get("program", "proxy_tuning")
    if name not in PROGRAMS:
        raise ValueError(f"model_args program must be one of {', '.join(PROGRAMS)}, "
                         f"got {name!r}")
    role_args, param_args = PROGRAMS[name]
    if name != "proxy_tuning" and mode != "proxy":
        raise ValueError(f"model_args mode={mode} applies to program=proxy_tuning only "
                         f"(program={name})")
    for arg in PROGRAM_ARGS:
        if arg in given and arg not in role_args + param_args:
            raise ValueError(f"model_args {arg} does not apply to program={name} (it takes "
                             f"{', '.join(role_args + param_args)})")
    params = {}
    for arg in param_args:
        if arg in given and arg in SWEEPABLE:
            value = given[arg]
            if mode != "proxy":  # alpha is unused alone (as before); a sweep is refused
                if isinstance(value, (list, tuple)) or (isinstance(value, str) and ";" in value):
                    raise ValueError(f"model_args {arg}: a sweep needs mode=proxy (mode={mode} "
                                     f"scores one model alone)")
                continue
            params[arg] = _number_or_list(arg, value)
    if name == "proxy_tuning" and "alpha" not in params:
        params["alpha"] = 0.0 if mode != "proxy" else _as_float("alpha",
                                                                 MODEL_ARGS_DEFAULTS["alpha"])
    for arg in ("plausibility", "base_top_p"):
        if arg in params:
            _unit(arg, params[arg])
    swept = [a for a in SWEEPABLE if isinstance(params.get(a), list)]
    if len(swept) > 1:
        raise ValueError(f"model_args {swept[1]}: only one model_arg may be a list (a sweep); "
                         f"{swept[0]} is one already")
    sweep = (swept[0], params[swept[0]]) if swept else None

    if name == "ensemble":
        paths, weights = _ensemble(given)
        params["weights"] = weights

        def make(**_):
            return presets.ensemble(dict(weights))
    else:
        roles = {"proxy_tuning": ("base", "expert", "anti_expert"),
                 "dexperts": ("base", "expert", "anti_expert"),
                 "contrastive": ("expert", "amateur"),
                 "contrastive_li": ("expert", "amateur")}[name]
        paths = {r: given.get(r) for r in roles}
        make = {"proxy_tuning": presets.proxy_tuning, "dexperts": presets.dexperts,
                "contrastive": presets.contrastive,
                "contrastive_li": lambda **kw: presets.contrastive(variant="li", **kw)}[name]

    def build(**override):
        values = {a: v for a, v in params.items() if a in SWEEPABLE and not isinstance(v, list)}
        values.update(override)
        try:
            return make(**values)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"model_args {exc}") from None

    programs = tuple(build(**{sweep[0]: v}) for v in sweep[1]) if sweep else (build(),)
    first = programs[0]
    if first.difference is not None:  # the preset defaults actually used, for reporting
        params.setdefault({"contrastive": "beta"}.get(name, "alpha"),
                          sweep[1] if sweep and sweep[0] in ("alpha", "beta")
                          else first.difference[3])
    if first.mask is not None:
        params.setdefault(first.mask.name, sweep[1] if sweep and sweep[0] == first.mask.name
                          else first.mask.value)
    return ProgramSpec(name, paths, programs, sweep, params)


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
    """lm-eval model: ``base`` steered by ``expert`` - ``anti_expert``, or another logit
    program (``program=``), with alpha / coefficient sweeps (module docstring)."""

    def __init__(self, **model_args):
        """Load the models named by ``model_args`` (:data:`MODEL_ARGS`); a bad or unknown
        one raises ``ValueError`` naming it, before anything slow where possible."""
        super().__init__()
        args = _model_args(model_args)
        if args.mode not in MODES:
            raise ValueError(f"model_args mode must be one of {', '.join(MODES)}, "
                             f"got {args.mode!r}")
        self.mode = args.mode
        spec = program_spec({k: getattr(args, k) for k in ("program", *PROGRAM_ARGS)
                             if k in model_args}, args.mode)
        self.spec = spec
        self.program_name = spec.name
        self.programs = spec.programs
        self.sweep = spec.sweep
        self.sweep_output = args.sweep_output
        if self.sweep_output is not None:
            if self.sweep is None:
                raise ValueError(f"model_args sweep_output: there is no sweep to write (give "
                                 f"one of {', '.join(SWEEPABLE)} as a list, e.g. alpha=0.5;1;2)")
            if not isinstance(self.sweep_output, str) or not self.sweep_output.strip():
                raise ValueError(f"model_args sweep_output must be a file path, "
                                 f"got {self.sweep_output!r}")
            folder = os.path.dirname(os.path.abspath(os.path.expanduser(self.sweep_output)))
            if not os.path.isdir(folder):
                raise ValueError(f"model_args sweep_output: no such folder: {folder}")
        self._sweep_records = []
        self._last_settings = None
        if spec.name == "proxy_tuning":
            needed = {"proxy": ("base", "expert", "anti_expert"), "base": ("base",),
                      "expert": ("expert",)}[args.mode]
            paths = dict(base=args.base, expert=args.expert, anti_expert=args.anti_expert)
            where = f"mode={args.mode}"
        else:
            needed = tuple(spec.paths)
            paths = dict(spec.paths)
            where = f"program={spec.name}"
        for name in needed:  # every path checked before the first (slow) load
            arg = name if spec.name != "ensemble" else f"roles ({name})"
            if paths[name] is None:
                raise ValueError(f"model_args {arg} is required ({where})")
            paths[name], _ = resolve_model_path(f"model_args {arg}", paths[name])
        if args.tokenizer is not None:
            resolve_model_path("model_args tokenizer", args.tokenizer)
        if spec.name == "proxy_tuning":
            alphas = spec.params["alpha"]
            self.alpha = alphas[0] if isinstance(alphas, list) else alphas
        else:
            self.alpha = None
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
        self._device = resolve_device("model_args device", args.device)
        try:
            self.op_backend = resolve_backend(args.backend, self._device)
        except ValueError as exc:
            raise ValueError(f"model_args backend: {exc}") from None
        dtype = resolve_dtype("model_args dtype", args.dtype, self._device)

        loaded = {}  # equal paths share one model

        def load(name):
            if paths[name] not in loaded:
                label = name if spec.name != "ensemble" else f"roles ({name})"
                loaded[paths[name]] = load_causal_lm(f"model_args {label}", paths[name], dtype,
                                                     self._device, trust_remote_code=trust)
            return loaded[paths[name]]

        if self.chat_expert and spec.name != "proxy_tuning" and "expert" not in needed:
            raise ValueError(f"model_args chat_expert: {where} has no role named expert "
                             f"(its roles: {', '.join(needed)})")
        if spec.name != "proxy_tuning":
            self.role_models = {r: load(r) for r in needed}
            self.models = tuple(self.role_models.values())
            first = spec.programs[0]
            vocab_role = first.difference[0] if first.difference is not None else first.roles[0]
            self._eos_model = self.role_models[vocab_role]
            self._expert_model = self.role_models.get("expert")
        elif args.mode == "proxy":
            self.models = (load("base"), load("expert"), load("anti_expert"))
            self.role_models = dict(zip(("base", "expert", "anti_expert"), self.models))
            vocab_role = "base"
        else:
            m = load(needed[0])
            self.models = (m, m, m)
            self.role_models = {needed[0]: m}
            vocab_role = needed[0]
        if spec.name == "proxy_tuning":
            self._eos_model, self._expert_model = self.models[0], self.models[1]
        tok_name = ("model_args tokenizer" if args.tokenizer is not None
                    else f"model_args {vocab_role} (its tokenizer)")
        self.tokenizer = load_tokenizer(tok_name, args.tokenizer or paths[vocab_role],
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
        sources = [self._eos_model, self.tokenizer]
        if self.expert_tokenizer is not None:  # a chat expert ends its turn with its own EOS
            sources += [self._expert_model, self.expert_tokenizer]
        return eos_token_ids(*sources)

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

    def _score(self, items, desc: str, disable_tqdm: bool) -> list[list[tuple[float, bool]]]:
        """items: (base ctx, expert ctx, continuation) token lists -> per setting (K: the
        sweep's values, else 1) a list of (sum logprob, greedy), one per item.

        Longest first (less padding; a batch too big for memory fails at once). One
        forward per model per batch, whatever K."""
        order = sorted(range(len(items)), key=lambda i: -(len(items[i][0]) + len(items[i][2])))
        K = len(self.sweep[1]) if self.sweep is not None else 1
        results = [[None] * len(items) for _ in range(K)]
        for s in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc=desc):
            idx = order[s:s + self.batch_size]
            ctx = [items[i][0] for i in idx]
            e_ctx = [items[i][1] for i in idx]
            cont = [items[i][2] for i in idx]
            out = self._logprobs(ctx, e_ctx, cont)
            logprobs, greedy = out.logprobs, out.greedy
            if logprobs.dim() == 2:  # one setting
                logprobs, greedy = logprobs[None], greedy[None]
            totals = logprobs.sum(-1).tolist()
            greedy = greedy.all(-1).tolist()
            for k in range(K):
                for i, t, g in zip(idx, totals[k], greedy[k]):
                    results[k][i] = (float(t), bool(g))
        return results

    def _logprobs(self, ctx, e_ctx, cont):
        """One batch's :class:`proxykern.ProxyLogprobs` (``(K, B, L)`` for a sweep)."""
        if self.program_name != "proxy_tuning":
            role_context = {"expert": e_ctx} if self.chat_expert else None
            program = list(self.programs) if self.sweep is not None else self.programs[0]
            return program_logprobs(program, self.role_models, ctx, cont,
                                    role_context=role_context, backend=self.op_backend)
        base, expert, anti = self.models
        if self.mode == "expert":  # the expert alone, on its own context
            return proxy_logprobs(expert, expert, expert, e_ctx, cont, alpha=0.0,
                                  backend=self.op_backend)
        alpha = list(self.sweep[1]) if self.sweep is not None else self.alpha
        return proxy_logprobs(base, expert, anti, ctx, cont,
                              expert_context=e_ctx if self.chat_expert else None,
                              alpha=alpha, backend=self.op_backend)

    # ------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """lm-eval's hook: the first setting's results (all K kept in ``_last_settings``)."""
        items = []
        for (context, _continuation), ctx_enc, cont_enc in requests:
            ctx, cont = self._fit(list(ctx_enc), list(cont_enc))
            e_ctx = self._expert_context(context, ctx) if context else ctx
            if self.chat_expert and context:
                e_ctx, _ = self._fit(e_ctx, cont)
            items.append((ctx, e_ctx, cont))
        settings = self._score(items, "proxykern loglikelihood", disable_tqdm)
        self._last_settings = settings
        results = settings[0]
        for (key, _c, _x), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's log-likelihood requests: ``(sum logprob, greedy)`` each -- for a sweep,
        the first value's (all K written to ``sweep_output`` when given)."""
        self._last_settings = None
        results = super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        if self.sweep is not None and self._last_settings is not None:
            self._record("loglikelihood", requests, self._last_settings)
        return results

    def loglikelihood_sweep(self, requests, disable_tqdm: bool = False) \
            -> list[list[tuple[float, bool]]]:
        """Every setting of the sweep for lm-eval log-likelihood requests (``Instance``s, or
        ``(context, continuation)`` pairs), from one set of forwards: ``[k][i]`` is request
        ``i``'s ``(sum logprob, greedy)`` at the sweep's value ``k`` (``self.sweep[1][k]``),
        which is what :meth:`loglikelihood` returns for a model given that one value.
        Without a sweep: ``[loglikelihood(requests)]``. Writes nothing."""
        requests = [r if hasattr(r, "args") else SimpleNamespace(args=tuple(r))
                    for r in requests]
        self._last_settings = None
        TemplateLM.loglikelihood(self, requests, disable_tqdm=disable_tqdm)
        return self._last_settings if self._last_settings is not None else [[]]

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
        settings = self._score(windows, "proxykern loglikelihood_rolling", disable_tqdm)
        per_setting = []
        for scored in settings:
            totals = [0.0] * len(requests)
            for r, (ll, _g) in zip(owner, scored):
                totals[r] += ll
            per_setting.append(totals)
        if self.sweep is not None:
            self._record("loglikelihood_rolling", requests,
                         [[(t, None) for t in totals] for totals in per_setting])
        totals = per_setting[0]
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ------------------------------------------------------------------ sweeps

    def _record(self, kind: str, requests, settings) -> None:
        """Keep one sweep record per request and rewrite ``sweep_output`` (all so far)."""
        for i, req in enumerate(requests):
            self._sweep_records.append(dict(
                type=kind, task=getattr(req, "task_name", None),
                doc_id=getattr(req, "doc_id", None), idx=getattr(req, "idx", None),
                loglikelihood=[settings[k][i][0] for k in range(len(settings))],
                greedy=[settings[k][i][1] for k in range(len(settings))]))
        if self.sweep_output is not None:
            path = os.path.expanduser(self.sweep_output)
            with open(path + ".tmp", "w") as f:
                json.dump(self.sweep_report(), f, indent=1)
            os.replace(path + ".tmp", path)

    def sweep_report(self) -> dict:
        """What ``sweep_output`` holds: the program, the swept model_arg and its values
        (``reported``: the one lm-eval got), every request scored so far (``requests``:
        type, task, doc_id, idx -- the choice index of a multiple-choice doc -- and its K
        summed log-likelihoods and greedy flags) and per task :func:`sweep_summary`."""
        name, values = self.sweep
        return dict(program=self.program_name, sweep=name, values=list(values),
                    reported=values[0], params={k: v for k, v in self.spec.params.items()
                                                if k != name},
                    tasks=sweep_summary(self._sweep_records, len(values)),
                    requests=self._sweep_records)

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
        if self.sweep is not None:
            name, values = self.sweep
            raise ValueError(f"generate_until: model_args {name} is a sweep "
                             f"({';'.join(f'{v:g}' for v in values)}) but generation needs one "
                             f"value: give {name} one number for generation tasks (sweeps "
                             f"score log-likelihood requests)")
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
        plain = [(e or [self.prefix_token_id])[-room:] for e in encoded]
        expert_rows = ([self._expert_context(c, p)[-room:] for c, p in zip(contexts, plain)]
                       if self.chat_expert else None)
        if self.program_name != "proxy_tuning":
            # Every role on the plain context; the expert on its chat-formatted one.
            ids, mask = left_pad(plain, 0, self.device)
            own = left_pad(expert_rows, 0, self.device) if expert_rows is not None else None

            def run(**common):
                return program_generate(
                    self.programs[0], self.role_models, ids, mask,
                    role_input_ids={"expert": own[0]} if own else None,
                    role_attention_mask={"expert": own[1]} if own else None, **common)
            return self._until_stops(run, len(plain), request_ids, settings)
        base, expert, anti = self.models
        if self.mode == "expert":
            rows, models, alpha = expert_rows or plain, (expert, expert, expert), 0.0
            expert_rows = None
        else:
            rows, models, alpha = plain, (base, expert, anti), self.alpha
        ids, mask = left_pad(rows, 0, self.device)
        e_ids = e_mask = None
        if expert_rows is not None:
            e_ids, e_mask = left_pad(expert_rows, 0, self.device)

        def run(**common):
            return fused_proxy_generate(*models, ids, mask, alpha=alpha, expert_input_ids=e_ids,
                                        expert_attention_mask=e_mask, **common)
        return self._until_stops(run, len(rows), request_ids, settings)

    def _until_stops(self, run, n_rows: int, request_ids, settings) -> list[str]:
        """``run(**common)`` (a generation call with the request batch's sampling, seeds,
        EOS, pad, stop-string streamer and backend), its texts cut at the stops."""
        pad = self.tokenizer.pad_token_id
        pad = self.eos_ids[0] if pad is None else pad
        # The one seed rule (docs/api.md, "Seeds and noise"): request i draws like row i
        # of a call seeded with the number -- independent of the batch it lands in.
        seeds = row_seeds(settings["seed"], torch.tensor(request_ids)).to(self.device)
        watch = _StopWatch(self.tokenizer, settings["until"], self.eos_ids, n_rows)
        try:
            run(max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
                top_k=settings["top_k"], top_p=settings["top_p"], min_p=settings["min_p"],
                seed=seeds, eos_token_id=self.eos_ids, pad_token_id=pad, streamer=watch,
                backend=self.op_backend)
        except _StopWhenDone:
            pass  # every row has stopped; its tokens are in the watch
        return [cut_at_stops(self.tok_decode(r), settings["until"]) for r in watch.rows]


def sweep_summary(records, k: int) -> dict:
    """Per task (``None``: requests without one), per request type, over a sweep's
    ``records`` (``sweep_output``'s ``requests``): ``requests`` (how many), ``loglikelihood``
    (K sums) and, for log-likelihood requests, ``greedy`` (K counts of greedy
    continuations) and ``docs`` (how many docs)."""
    out = {}
    for r in records:
        entry = out.setdefault(str(r["task"]), {}).setdefault(r["type"], dict(
            requests=0, loglikelihood=[0.0] * k, docs=set(),
            **({"greedy": [0] * k} if r["type"] == "loglikelihood" else {})))
        entry["requests"] += 1
        entry["docs"].add(r["doc_id"])
        for j in range(k):
            entry["loglikelihood"][j] += r["loglikelihood"][j]
            if "greedy" in entry:
                entry["greedy"][j] += int(bool(r["greedy"][j]))
    for task in out.values():
        for entry in task.values():
            entry["docs"] = len(entry["docs"])
    return out


def sweep_accuracy(report, gold: dict, task: str | None = None) -> list[float]:
    """Multiple-choice accuracy at each of a sweep's K values (lm-eval's ``acc``: a doc is
    right when its gold choice has the highest summed log-likelihood, first on ties).

    ``report``: :meth:`ProxyKernLM.sweep_report` or the ``sweep_output`` file's JSON (a
    dict, or the file's path); ``gold``: doc_id -> the gold choice index (e.g. from
    lm-eval's logged samples: ``{s["doc_id"]: s["target"] for s in samples[task]}``);
    ``task``: which task's requests (default: all). Docs missing from ``gold`` are skipped."""
    if isinstance(report, str):
        with open(report) as f:
            report = json.load(f)
    k = len(report["values"])
    docs = {}
    for r in report["requests"]:
        if r["type"] == "loglikelihood" and (task is None or r["task"] == task) \
                and r["doc_id"] in gold:
            docs.setdefault(r["doc_id"], []).append(r)
    if not docs:
        raise ValueError("sweep_accuracy: no log-likelihood request of the report has a doc "
                         "in gold" + (f" (task {task!r})" if task else ""))
    right = [0] * k
    for doc_id, choices in docs.items():
        choices.sort(key=lambda r: r["idx"])
        for j in range(k):
            best = max(range(len(choices)), key=lambda c: (choices[c]["loglikelihood"][j], -c))
            right[j] += int(choices[best]["idx"] == gold[doc_id])
    return [n / len(docs) for n in right]


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


# Printed after the table; no line starts with two spaces (those are the table's rows).
PROGRAMS_HELP = """\
Programs (program=; each takes only its own model_args, others raise naming them):
* proxy_tuning: base, expert, anti_expert, alpha (mode=base|expert: one model alone)
* dexperts: base, expert, anti_expert, alpha (2.0), base_top_p (0.9)
* contrastive: expert, amateur, beta (0.5), plausibility (0.1); contrastive_li: expert,
amateur, plausibility (0.1)
* ensemble: roles=a:PATH1;b:PATH2 weights=a:0.5;b:0.5 (';' between items: lm-eval
splits model_args at commas; quote model_args in a shell, where ';' ends a command)
chat_expert formats the context of the role named expert.
Sweeps: one of alpha, beta, plausibility, base_top_p as a list, e.g. alpha=0.5;1.0;2.0:
log-likelihood requests score every value from one forward per model; lm-eval reports
the first value; sweep_output=PATH writes every value's per-request log-likelihoods and
greedy flags and per-task sums (JSON). Generation tasks need one value."""


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
    lines += ["", PROGRAMS_HELP, "",
              "The local lm-eval tasks on the shipped trio (repository root, CPU):",
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
