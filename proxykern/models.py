"""What proxykern needs to know about a Hugging Face causal LM, in one place: its device,
its logits and input widths, its position limit, the name of its cache argument, and
whether its family decodes with a static KV cache (and so can be captured in a CUDA graph).

Every layer reads models through these (argument checks, the engine, scoring, the
integrations); nothing here imports transformers.
"""
from __future__ import annotations

import functools
import inspect
import numbers

import torch

#: The three models of proxy tuning, in the op's input order.
MODEL_NAMES = ("base", "expert", "anti_expert")


@functools.lru_cache(maxsize=None)
def _forward_params(forward_fn) -> frozenset:
    return frozenset(inspect.signature(forward_fn).parameters)


def cache_kwarg(model) -> str:
    """Name of the KV-cache argument of ``model.forward``.

    transformers renamed ``past_key_values`` to ``cache`` (5.2x keeps the old
    name as a deprecated alias); asking the signature supports both without
    warnings.
    """
    params = _forward_params(type(model).forward)
    return "cache" if "cache" in params else "past_key_values"


def accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in _forward_params(type(model).forward)


def model_device(model) -> torch.device:
    """The device of a model's first parameter (``model.device`` for HF models)."""
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def output_width(model) -> int:
    """Width of the model's logits: its output embedding rows, else ``config.vocab_size``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0])
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    width = getattr(config, "vocab_size", None)
    if not isinstance(width, int):
        raise ValueError("cannot tell the vocabulary width of a model without an output "
                         "embedding or config.vocab_size")
    return width


def input_width(model) -> int | None:
    """Rows of the model's input embedding (the ids it can read), or None when unknown."""
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    n = getattr(emb, "num_embeddings", None)
    return int(n) if isinstance(n, int) else None


def position_limit(model) -> int | None:
    """The most positions ``model`` reads: ``max_position_embeddings`` of its (text) config,
    or None when the config states no limit."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, numbers.Integral) and limit > 0 else None


def static_cache_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot decode with a static KV cache here (None when it can)."""
    name = type(model).__name__
    if not getattr(type(model), "_can_compile_fullgraph", False):
        return (f"{name} does not support a static KV cache (transformers marks it "
                f"_can_compile_fullgraph=False)")
    params = _forward_params(type(model).forward)
    if "cache_position" not in params and not any(
            p.kind == inspect.Parameter.VAR_KEYWORD
            for p in inspect.signature(type(model).forward).parameters.values()):
        return f"{name}.forward takes no cache_position"
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return f"{name} is an encoder-decoder model"
    return None


def rollback_unsupported_reason(model) -> str | None:
    """Why ``model``'s cache cannot keep rolled-back (masked) columns, as speculative rounds
    need (None when it can): every layer must be full attention."""
    config = getattr(model, "config", None)
    text = getattr(config, "get_text_config", lambda: config)()
    if getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True):
        return "sliding-window attention cannot keep rolled-back columns"
    types = getattr(text, "layer_types", None)
    if types and any(t != "full_attention" for t in types):
        return "not every layer is full attention"
    return None


def static_rounds_unsupported_reason(models, names=MODEL_NAMES) -> str | None:
    """Why ``models`` (None entries skipped) cannot run speculative rounds on static caches
    (None when they can): a static cache and a full-attention rollback for every one."""
    for name, model in zip(names, models):
        if model is None:
            continue
        reason = static_cache_unsupported_reason(model) or rollback_unsupported_reason(model)
        if reason is not None:
            return f"{name}: {reason}"
    return None


def graph_unsupported_reason(models, device: torch.device, names=MODEL_NAMES,
                             rounds: bool = False) -> str | None:
    """Why the decode step of ``models`` (``rounds``: their speculative round) cannot be
    captured in a CUDA graph (None if it can)."""
    if device.type != "cuda":
        return f"CUDA graphs need models on a CUDA device, they are on {device}"
    if rounds:
        return static_rounds_unsupported_reason(models, names)
    for name, model in zip(names, models):
        reason = static_cache_unsupported_reason(model)
        if reason is not None:
            return f"{name}: {reason}"
    return None
