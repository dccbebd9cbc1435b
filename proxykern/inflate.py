"""Exact inflation of a small Llama-family model to a larger shape (for GPU benchmarks).

:func:`inflate_llama` returns a ``LlamaForCausalLM`` of the requested shape that computes
the same function as the small model (same logits up to float rounding) at the compute and
memory cost of the large shape. It lets benchmarks run the shipped trained trio
(``examples/trio/models``) with its real behaviour (real speculative acceptance, real proxy
effect) at paper-like cost.

Exactness: the small model lives in a corner of the large one and every added weight is
zero, so the residual stream stays zero outside the original ``hidden_size`` coordinates:

* embeddings (and an untied ``lm_head``) get zero columns; q/k/v/gate/up read only the
  original coordinates; o_proj/down_proj write only them (zero rows elsewhere).
* RMSNorm ``w * x / sqrt(mean(x**2) + eps)``: with ``h`` of ``H`` coordinates nonzero,
  ``mean_H(x**2) = (h/H) * mean_h(x**2)``; with ``eps' = eps * h/H`` the denominator is
  ``sqrt(h/H) * sqrt(mean_h(x**2) + eps)``, so ``w' = w * sqrt(h/H)`` gives the original
  output. Every norm shares ``config.rms_norm_eps``, so one rescaled value serves them all.
* attention heads: each original query head keeps reading its original kv head under HF's
  grouping (query head ``i`` reads kv head ``i // (heads / kv_heads)``); an original kv
  head is duplicated into several kv slots when the large groups are smaller. Added heads
  have zero q/k/v (uniform attention over zero values) and zero o_proj columns.
* head_dim: kept, or (default RoPE only) enlarged from ``d`` to ``D``: original dims
  ``[0, d/2)`` and ``[d/2, d)`` go to ``[0, d/2)`` and ``[D/2, D/2 + d/2)`` so rotate_half
  pairs them as before; ``rope_theta' = rope_theta ** (D/d)`` makes frequency ``k < d/2``
  equal to the original (and the first ``d/2`` frequencies are copied bit-exactly into
  the rotary buffer); q is scaled by ``sqrt(D/d)`` to undo the softmax scale ``D**-0.5``.
* MLP: added intermediate units have zero gate/up rows (``act(0) * 0 = 0``) and zero
  down_proj columns.
* added layers (after the original ones) have zero o_proj and down_proj, so the residual
  passes through them unchanged.

The vocabulary is not enlarged (padded tokens would get logit 0, not -inf).
"""
from __future__ import annotations

import copy
import math

import torch

SUPPORTED = ("llama", "mistral", "qwen2")


def inflate_llama(model, *, hidden_size: int, intermediate_size: int,
                  num_attention_heads: int, num_key_value_heads: int, num_hidden_layers: int,
                  head_dim: int | None = None, max_position_embeddings: int | None = None,
                  dtype=None, device=None):
    """A ``LlamaForCausalLM`` of the given shape computing the same logits as ``model``.

    ``model``: a LlamaForCausalLM, MistralForCausalLM (without sliding window) or
    Qwen2ForCausalLM (without sliding layers); anything else raises ValueError. Each
    requested dimension must be >= the model's (ValueError naming the argument);
    ``head_dim`` defaults to the model's; a larger one needs the default RoPE.
    ``max_position_embeddings`` defaults to the model's; a larger value states more positions
    than the small model was trained on (RoPE computes any position; benchmarks that time
    long sequences need it, and the function is still the small model's at every position).
    ``dtype`` / ``device`` default to the model's; the large model is built there directly
    (e.g. a 13B shape straight on the GPU in bf16, never in fp32 on the host). ``model`` is
    not modified and shares no tensors with the result. In fp32 the logits agree to ~1e-6
    of their scale; in bf16 the rescaled norm weights add bf16 rounding.
    """
    _check_supported(model)
    small = _shape_of(model.config)
    head_dim = small["head_dim"] if head_dim is None else head_dim
    shape = dict(hidden_size=hidden_size, intermediate_size=intermediate_size,
                 num_attention_heads=num_attention_heads,
                 num_key_value_heads=num_key_value_heads,
                 num_hidden_layers=num_hidden_layers, head_dim=head_dim)
    _check_shape(model.config, small, shape)
    positions = model.config.max_position_embeddings
    if max_position_embeddings is not None:
        if isinstance(max_position_embeddings, bool) or not isinstance(
                max_position_embeddings, int) or max_position_embeddings < positions:
            raise ValueError(f"max_position_embeddings must be an int >= the model's "
                             f"({positions}), got {max_position_embeddings!r}")
        positions = max_position_embeddings
    ref = next(model.parameters())
    dtype = ref.dtype if dtype is None else dtype
    device = ref.device if device is None else torch.device(device)
    big = _build(_inflated_config(model.config, shape, _norm_eps(model), positions), dtype,
                 device)
    with torch.no_grad():
        _copy_weights(model, big)
    big.generation_config = copy.deepcopy(model.generation_config)
    return big.eval()


# --------------------------------------------------------------------------- checks

def _check_supported(model) -> None:
    """ValueError unless ``model`` has the Llama layout this module knows how to inflate."""
    config = model.config
    kind = getattr(config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"inflate_llama: model_type {kind!r} is not supported "
                         f"(supported: {', '.join(SUPPORTED)})")
    if not (hasattr(model, "lm_head") and hasattr(model, "model")):
        raise ValueError(f"inflate_llama: needs a *ForCausalLM model, got {type(model).__name__}")
    # Mistral applies its window to every layer; Qwen2 only to layers marked sliding.
    if kind == "mistral" and getattr(config, "sliding_window", None) is not None:
        raise ValueError("inflate_llama: a Mistral model with sliding_window set is not "
                         "supported (Llama attends to the whole context)")
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()):
        raise ValueError("inflate_llama: models with sliding-attention layers are not supported")
    if config.tie_word_embeddings and not torch.equal(model.lm_head.weight,
                                                      model.model.embed_tokens.weight):
        raise ValueError("inflate_llama: tie_word_embeddings is set but lm_head differs "
                         "from the embeddings")


def _shape_of(config) -> dict:
    """The model's dimensions under the argument names of :func:`inflate_llama`."""
    names = ("hidden_size", "intermediate_size", "num_attention_heads",
             "num_key_value_heads", "num_hidden_layers")
    shape = {n: getattr(config, n) for n in names}
    shape["head_dim"] = (getattr(config, "head_dim", None)
                         or config.hidden_size // config.num_attention_heads)
    return shape


def _check_shape(config, small: dict, shape: dict) -> None:
    """ValueError naming the argument when ``shape`` cannot hold ``small`` exactly."""
    for name, value in shape.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
        if value < small[name]:
            raise ValueError(f"{name}={value} is smaller than the model's {small[name]}")
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    if shape["hidden_size"] % heads:  # LlamaConfig requires it, whatever head_dim is
        raise ValueError(f"hidden_size={shape['hidden_size']} is not a multiple of "
                         f"num_attention_heads={heads}")
    if heads % kv:
        raise ValueError(f"num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv}")
    s_heads, s_kv = small["num_attention_heads"], small["num_key_value_heads"]
    copies = _kv_copies(s_heads, s_kv, heads, kv)
    if s_kv * copies > kv:
        raise ValueError(
            f"num_key_value_heads={kv} is too few: each of the model's {s_kv} kv heads "
            f"needs {copies} slots to serve its {s_heads // s_kv} query heads in groups "
            f"of {heads // kv}")
    d, big_d = small["head_dim"], shape["head_dim"]
    if big_d != d:
        rope = dict(getattr(config, "rope_parameters", None) or {})
        if rope.get("rope_type", "default") != "default" or \
                rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"head_dim={big_d} differs from the model's {d}: only exact "
                             f"with the default RoPE (this model has {rope})")
        if big_d % 2 or d % 2:
            raise ValueError(f"head_dim={big_d} must be even")


def _norm_eps(model) -> float:
    """The one epsilon all RMSNorms of ``model`` share (ValueError if they differ)."""
    eps = {m.variance_epsilon for m in model.modules() if hasattr(m, "variance_epsilon")}
    if len(eps) != 1:
        raise ValueError(f"inflate_llama: the model's norms use several epsilons {eps}")
    return eps.pop()


# --------------------------------------------------------------------------- layout

def _kv_copies(heads: int, kv: int, big_heads: int, big_kv: int) -> int:
    """Large kv slots per original kv head: its query group over the large group size."""
    return -(-(heads // kv) // (big_heads // big_kv))


def head_slots(heads: int, kv: int, big_heads: int, big_kv: int):
    """Where the original heads go: ``(q_slot, kv_slots)``.

    ``q_slot[i]``: the large query head holding original query head ``i``;
    ``kv_slots[j]``: the large kv heads holding copies of original kv head ``j``. Under
    HF's grouping ``q_slot[i] // (big_heads // big_kv)`` is one of ``kv_slots[i // (heads
    // kv)]``, so every original query head reads its own kv head.
    """
    group, big_group = heads // kv, big_heads // big_kv
    copies = _kv_copies(heads, kv, big_heads, big_kv)
    kv_slots = [[j * copies + t for t in range(copies)] for j in range(kv)]
    q_slot = []
    for i in range(heads):
        j, r = divmod(i, group)
        q_slot.append(kv_slots[j][r // big_group] * big_group + r % big_group)
    return q_slot, kv_slots


def _dim_map(d: int, big_d: int) -> torch.Tensor:
    """Large within-head positions of the original ``d`` dims (rotate_half pairs kept)."""
    half = torch.arange(d // 2)
    return torch.cat([half, big_d // 2 + half])


def _rows(slots, d: int, big_d: int) -> torch.Tensor:
    """Large projection rows of heads placed at ``slots`` (one per original head, in order)."""
    dims = _dim_map(d, big_d)
    return torch.cat([s * big_d + dims for s in slots])


# --------------------------------------------------------------------------- build

def _inflated_config(small, shape: dict, eps: float, positions: int):
    from transformers import LlamaConfig
    rope = copy.deepcopy(dict(small.rope_parameters))
    d = _shape_of(small)["head_dim"]
    if shape["head_dim"] != d:  # frequency k < d/2 of the large head = the original's
        rope["rope_theta"] = float(rope["rope_theta"]) ** (shape["head_dim"] / d)
    qkv_bias = small.model_type == "qwen2" or bool(getattr(small, "attention_bias", False))
    return LlamaConfig(
        vocab_size=small.vocab_size, hidden_act=small.hidden_act,
        max_position_embeddings=positions,
        rms_norm_eps=eps * small.hidden_size / shape["hidden_size"], rope_parameters=rope,
        attention_bias=qkv_bias, mlp_bias=bool(getattr(small, "mlp_bias", False)),
        attention_dropout=0.0, tie_word_embeddings=bool(small.tie_word_embeddings),
        bos_token_id=small.bos_token_id, eos_token_id=small.eos_token_id,
        pad_token_id=getattr(small, "pad_token_id", None),
        initializer_range=getattr(small, "initializer_range", 0.02), **shape)


def _build(config, dtype, device):
    """An all-zero LlamaForCausalLM built directly on ``device`` in ``dtype``."""
    from transformers import LlamaForCausalLM
    from transformers.initialization import no_init_weights
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        # no random init (everything is zeroed next); the rotary buffers are computed in
        # __init__ in fp32 as HF makes them
        with torch.device(device), no_init_weights():
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.tie_weights()  # HF ties in init_weights, which no_init_weights skips
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("inflate_llama: the inflated model's embeddings are not tied")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def _put(dst: torch.Tensor, src: torch.Tensor, *index, scale: float = 1.0) -> None:
    """``dst[index] = src * scale``, rounded once into ``dst``'s dtype."""
    value = src.detach().to(dst.device, torch.float64) * scale
    index = tuple(torch.meshgrid(*[i.to(dst.device) for i in index], indexing="ij"))
    dst[index] = value.to(dst.dtype)


def _copy_weights(small_model, big) -> None:
    small, config = _shape_of(small_model.config), big.config
    vocab = torch.arange(config.vocab_size)
    h = torch.arange(small["hidden_size"])
    inter = torch.arange(small["intermediate_size"])
    d, big_d = small["head_dim"], config.head_dim
    kv = small["num_key_value_heads"]
    q_slot, kv_slots = head_slots(small["num_attention_heads"], kv,
                                  config.num_attention_heads, config.num_key_value_heads)
    q_rows = _rows(q_slot, d, big_d)
    kv_copies = len(kv_slots[0])
    kv_rows = _rows([s for slots in kv_slots for s in slots], d, big_d)
    # source rows of kv_rows: original kv head j's rows, once per copy
    kv_src = torch.cat([torch.arange(j * d, (j + 1) * d)
                        for j in range(kv) for _ in range(kv_copies)])
    q_scale = math.sqrt(big_d / d)  # undoes the softmax scale big_d ** -0.5 (vs d ** -0.5)
    norm_scale = math.sqrt(small["hidden_size"] / config.hidden_size)

    _put(big.model.embed_tokens.weight, small_model.model.embed_tokens.weight, vocab, h)
    if not config.tie_word_embeddings:
        _put(big.lm_head.weight, small_model.lm_head.weight, vocab, h)
    _put(big.model.norm.weight, small_model.model.norm.weight, h, scale=norm_scale)
    for old, new in zip(small_model.model.layers, big.model.layers):
        _copy_attention(old.self_attn, new.self_attn, h, q_rows, kv_rows, kv_src, q_scale)
        _copy_mlp(old.mlp, new.mlp, h, inter)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            _put(getattr(new, norm).weight, getattr(old, norm).weight, h, scale=norm_scale)
    for extra in big.model.layers[small["num_hidden_layers"]:]:
        # o_proj and down_proj stay zero: the residual passes through unchanged
        extra.input_layernorm.weight.fill_(1.0)
        extra.post_attention_layernorm.weight.fill_(1.0)
    _copy_rope(small_model, big, d)


def _copy_attention(old, new, h, q_rows, kv_rows, kv_src, q_scale) -> None:
    _put(new.q_proj.weight, old.q_proj.weight, q_rows, h, scale=q_scale)
    _put(new.k_proj.weight, old.k_proj.weight[kv_src], kv_rows, h)
    _put(new.v_proj.weight, old.v_proj.weight[kv_src], kv_rows, h)
    _put(new.o_proj.weight, old.o_proj.weight, h, q_rows)
    if old.q_proj.bias is not None:
        _put(new.q_proj.bias, old.q_proj.bias, q_rows, scale=q_scale)
        _put(new.k_proj.bias, old.k_proj.bias[kv_src], kv_rows)
        _put(new.v_proj.bias, old.v_proj.bias[kv_src], kv_rows)
    if old.o_proj.bias is not None:
        _put(new.o_proj.bias, old.o_proj.bias, h)


def _copy_mlp(old, new, h, inter) -> None:
    for name in ("gate_proj", "up_proj"):
        _put(getattr(new, name).weight, getattr(old, name).weight, inter, h)
        if getattr(old, name).bias is not None:
            _put(getattr(new, name).bias, getattr(old, name).bias, inter)
    _put(new.down_proj.weight, old.down_proj.weight, h, inter)
    if old.down_proj.bias is not None:
        _put(new.down_proj.bias, old.down_proj.bias, h)


def _copy_rope(small_model, big, d: int) -> None:
    """Check the large model's RoPE frequencies, then copy the original ones bit-exactly.

    The large config reproduces the first ``d/2`` frequencies up to float rounding (so a
    saved and reloaded model stays exact to rounding); the in-memory buffers get the
    original values so the rotary angles are identical.
    """
    old, new = small_model.model.rotary_emb, big.model.rotary_emb
    if old.attention_scaling != new.attention_scaling:
        raise ValueError(f"inflate_llama: RoPE attention scaling changed "
                         f"({old.attention_scaling} -> {new.attention_scaling})")
    for name in ("inv_freq", "original_inv_freq"):
        src, dst = getattr(old, name), getattr(new, name)
        want = src.to(dst.device, dst.dtype)
        rtol = max(1e-4, torch.finfo(src.dtype).eps)  # src may have been cast to bf16
        if not torch.allclose(dst[: d // 2], want, rtol=rtol, atol=0):
            raise ValueError("inflate_llama: the large model's RoPE frequencies do not "
                             "reproduce the original ones (rope_theta overflow?)")
        dst[: d // 2] = want
