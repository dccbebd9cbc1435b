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

model_args (unknown names raise ``ValueError`` naming them):

* ``base``, ``expert``, ``anti_expert``: model folders or hub names (HF causal LMs
  sharing a vocabulary). ``alpha`` (default 1.0): the proxy-tuning weight.
* ``mode``: ``proxy`` (default), ``base`` (the base alone: ``alpha`` is 0, no expert is
  loaded) or ``expert`` (the expert alone, reading its own -- chat-formatted with
  ``chat_expert`` -- context; base and anti-expert are not loaded). For the
  base-vs-expert-vs-proxy rows of a proxy-tuning table.
* ``chat_expert`` (default false): the expert reads each context as one user turn in
  its tokenizer's chat template (the paper's setting for chat experts); the base and
  the anti-expert read it plain; all three then score / produce the same tokens.
  Rolling log-likelihoods (perplexity) use the plain text for every model. Do not
  combine with lm-eval's ``--apply_chat_template``, which formats every model's context.
* ``dtype``: ``auto`` (default: bfloat16 on CUDA, float32 on CPU), ``float32``,
  ``bfloat16``, ``float16``. ``device``: ``cuda``, ``cuda:1``, ``cpu`` (default: CUDA
  when available).
* ``batch_size`` (default 1, an int): requests per call. ``max_length``: the longest
  token sequence a model reads (default: the smallest ``max_position_embeddings`` of
  the models, else 2048); longer contexts are cut from the left.
* ``max_gen_toks`` (default 256): new tokens when a request does not say.
* ``tokenizer`` (default: the base's; the expert's in ``mode=expert``), ``add_bos_token``
  (default false), ``trust_remote_code`` (default false), ``backend`` (the fused op's,
  default ``auto``), ``seed`` (default 0: request ``i`` of a sampled batch draws with
  seed ``seed + i``, so its text does not depend on the batch it lands in).

``generate_until`` honours each request's ``until`` (stop strings; the text is cut before
the first one and generation ends once every row of the batch has produced one),
``max_gen_toks`` (aliases ``max_new_tokens``, ``max_tokens``), ``do_sample``,
``temperature``, ``top_k``, ``top_p``, ``min_p`` and ``seed``; other keys raise
``ValueError``. Requests are grouped by their generation kwargs, sorted by length and
batched ``batch_size`` at a time. Greedy unless ``do_sample`` / ``temperature > 0``.
"""
from __future__ import annotations

import json
import math
import numbers
import sys

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .generate import fused_proxy_generate
from .ops import resolve_backend
from .runner import left_pad
from .scoring import proxy_logprobs

MODES = ("proxy", "base", "expert")
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16}
GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "max_tokens", "do_sample",
              "temperature", "top_k", "top_p", "min_p", "seed"}
DEFAULT_MAX_LENGTH = 2048


# --------------------------------------------------------------------------- model_args

def _as_bool(name, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"model_args {name} must be true or false, got {value!r}")


def _as_int(name, value, minimum) -> int:
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"model_args {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_float(name, value) -> float:
    try:
        out = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        out = math.nan
    if not math.isfinite(out):
        raise ValueError(f"model_args {name} must be a finite number, got {value!r}")
    return out


def _as_path(name, value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"model_args {name} must be a model folder or hub name, got {value!r}")
    return value.strip()


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

    def __init__(self, base=None, expert=None, anti_expert=None, alpha=1.0, mode="proxy",
                 chat_expert=False, dtype="auto", device=None, batch_size=1, max_batch_size=None,
                 max_length=None, max_gen_toks=256, tokenizer=None, add_bos_token=False,
                 trust_remote_code=False, backend="auto", seed=0, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown argument(s) {', '.join(sorted(unknown))} "
                             f"(proxykern takes base, expert, anti_expert, alpha, mode, "
                             f"chat_expert, dtype, device, batch_size, max_length, max_gen_toks, "
                             f"tokenizer, add_bos_token, trust_remote_code, backend, seed)")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if mode not in MODES:
            raise ValueError(f"model_args mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        needed = {"proxy": ("base", "expert", "anti_expert"), "base": ("base",),
                  "expert": ("expert",)}[mode]
        paths = dict(base=base, expert=expert, anti_expert=anti_expert)
        for name in needed:
            if paths[name] is None:
                raise ValueError(f"model_args {name} is required (mode={mode})")
            paths[name] = _as_path(name, paths[name])
        self.alpha = 0.0 if mode != "proxy" else _as_float("alpha", alpha)
        self.chat_expert = _as_bool("chat_expert", chat_expert)
        self.add_bos_token = _as_bool("add_bos_token", add_bos_token)
        trust_remote_code = _as_bool("trust_remote_code", trust_remote_code)
        if isinstance(batch_size, str) and batch_size.strip().startswith("auto"):
            raise ValueError("model_args batch_size: 'auto' is not supported by proxykern; "
                             "pass a number")
        self.batch_size = _as_int("batch_size", batch_size, 1)
        self.max_gen_toks = _as_int("max_gen_toks", max_gen_toks, 1)
        self.seed = _as_int("seed", seed, 0)
        max_length = None if max_length is None else _as_int("max_length", max_length, 2)

        if device is None or device == "":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"model_args device: {device!r} is not a torch device "
                             f"({exc})") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"model_args device={device!r} but CUDA is not available here")
        try:
            self.op_backend = resolve_backend(backend, self._device)
        except ValueError as exc:
            raise ValueError(f"model_args backend: {exc}") from None
        if not isinstance(dtype, (str, torch.dtype)) or (
                isinstance(dtype, str) and dtype != "auto" and dtype not in DTYPES):
            raise ValueError(f"model_args dtype must be auto, float32, bfloat16 or float16, "
                             f"got {dtype!r}")
        torch_dtype = (dtype if isinstance(dtype, torch.dtype) else
                       DTYPES[dtype] if dtype != "auto" else
                       torch.bfloat16 if self._device.type == "cuda" else torch.float32)

        loaded = {}

        def load(name):
            path = paths[name]
            if path not in loaded:
                try:
                    loaded[path] = AutoModelForCausalLM.from_pretrained(
                        path, dtype=torch_dtype, trust_remote_code=trust_remote_code
                    ).to(self._device).eval()
                except (OSError, ValueError) as exc:  # no such folder / repo, bad config
                    raise ValueError(f"model_args {name}={path!r} cannot be loaded: "
                                     f"{exc}") from None
            return loaded[path]

        if mode == "proxy":
            self.models = (load("base"), load("expert"), load("anti_expert"))
        else:
            m = load(needed[0])
            self.models = (m, m, m)
        tok_path = tokenizer or paths[needed[0]]
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(_as_path("tokenizer", tok_path),
                                                           trust_remote_code=trust_remote_code)
            self.expert_tokenizer = (AutoTokenizer.from_pretrained(
                paths["expert"], trust_remote_code=trust_remote_code)
                if self.chat_expert and mode != "base" else None)
        except (OSError, ValueError) as exc:
            raise ValueError(f"model_args tokenizer: cannot load a tokenizer from "
                             f"{tok_path!r}: {exc}") from None
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
        def get(key, default, kind):
            value = gen_kwargs.get(key)
            if value is None:
                return default
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"generate_until: generation kwarg {key} must be "
                                 f"{kind.__name__}, got {value!r}") from None

        max_new = next((gen_kwargs[k] for k in ("max_gen_toks", "max_new_tokens", "max_tokens")
                        if gen_kwargs.get(k) is not None), self.max_gen_toks)
        max_new = _as_int("max_gen_toks", max_new, 1)
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
        seeds = torch.tensor([settings["seed"] + i for i in request_ids], dtype=torch.long,
                             device=self.device)
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



def cli_main() -> None:
    """``proxykern-lm-eval``: lm-eval's command line, with the ``proxykern`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    sys.exit(cli_evaluate())
