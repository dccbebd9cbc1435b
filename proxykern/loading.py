"""Loading Hugging Face causal LMs and tokenizers with errors that name the argument.

Hugging Face treats any path that is not an existing folder as a hub name, so a mistyped
folder fails with a hub error ("Repo id must use alphanumeric chars ...", "not a valid
model identifier") that names neither the argument nor the folder. These helpers check
a *local-looking* path first and raise ``ValueError`` with the caller's name for the
argument (``"--base"``, ``"model_args base"``, ...) and the path:

* local-looking and missing: ``"<name>: no such folder: <path>"``, before Hugging Face
  is called (so no network, no hub error);
* an existing file, not a folder: ``"<name>: not a folder: <path>"``;
* anything else that does not load: ``"<name>: cannot load <path>: <Hugging Face's
  message>"``.

A path is local-looking when it cannot be a hub name (absolute, ``./``, ``../``, ``~``,
a backslash, more than one ``/``, characters a repo id does not allow). An ``org/name``
whose ``org`` is an existing local folder is tried on the hub (it may be a hub name
that only shares its organisation with a folder here), and if that fails the error
says that the folder does not exist.
"""
from __future__ import annotations

import os
import re

# A hub repo id: "name" or "org/name" of letters, digits, '-', '_', '.'.
_HUB_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def can_be_hub_name(path: str) -> bool:
    """Whether ``path`` has the shape of a hub repo id (``name`` or ``org/name``)."""
    return _HUB_NAME.fullmatch(path) is not None and ".." not in path


def resolve_model_path(name: str, path) -> tuple[str, bool]:
    """``(path to pass to from_pretrained, whether it is hub-shaped with a local parent)``.

    Raises ``ValueError`` naming ``name`` for an empty or non-string path, a local-looking
    path that does not exist, or an existing file. ``~`` is expanded.
    """
    if not isinstance(path, str) or not path.strip():
        raise ValueError(f"{name}: expected a model folder or hub name, got {path!r}")
    path = os.path.expanduser(path.strip())
    if os.path.isdir(path):
        return path, False
    if os.path.exists(path):
        raise ValueError(f"{name}: not a folder: {path}")
    if not can_be_hub_name(path):
        raise ValueError(f"{name}: no such folder: {path}")
    parent = os.path.dirname(path)
    return path, bool(parent) and os.path.isdir(parent)


def _load(name: str, path, load):
    """``load(resolved path)``, with Hugging Face's load errors re-raised naming ``name``."""
    resolved, local_parent = resolve_model_path(name, path)
    try:
        return load(resolved)
    except (OSError, ValueError) as exc:  # missing files, no such repo, bad config
        if local_parent:
            raise ValueError(f"{name}: no such folder: {resolved} (nor a loadable hub "
                             f"name: {exc})") from None
        raise ValueError(f"{name}: cannot load {resolved}: {exc}") from None


def load_causal_lm(name: str, path, dtype, device, trust_remote_code: bool = False):
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` on ``device``, in eval mode.

    ``name`` is how the caller's user spells the argument (``"--base"``, ``"model_args
    base"``); every error is a ``ValueError`` that starts with it and names the path.
    """
    from transformers import AutoModelForCausalLM

    model = _load(name, path, lambda p: AutoModelForCausalLM.from_pretrained(
        p, dtype=dtype, trust_remote_code=trust_remote_code))
    return model.to(device).eval()


def load_tokenizer(name: str, path, trust_remote_code: bool = False):
    """``AutoTokenizer.from_pretrained(path)``; errors as :func:`load_causal_lm`'s."""
    from transformers import AutoTokenizer

    return _load(name, path, lambda p: AutoTokenizer.from_pretrained(
        p, trust_remote_code=trust_remote_code))


# --------------------------------------------------------------------------- device, dtype

#: Model dtypes by name (the CLI's ``--dtype`` choices and lm-eval's ``dtype``), as torch
#: attribute names so that this module stays importable without torch; "auto" is bfloat16
#: on CUDA and float32 elsewhere.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
               "bf16": "bfloat16", "float16": "float16", "fp16": "float16", "half": "float16"}


def resolve_device(name: str, spec):
    """The torch device ``spec`` names (``"auto"``, None or ``""``: CUDA when available, else
    cpu); ``ValueError`` naming the argument ``name`` unless it exists and is available."""
    import torch

    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{name} {spec}: not a device (auto, cpu, cuda, cuda:N, ...)") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{name} {spec}: CUDA is not available here")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {spec}: there are {count} CUDA device(s) here")
        return device
    module = getattr(torch, device.type, None)  # torch.mps, torch.xpu, ...
    available = getattr(module, "is_available", None)
    if device.type != "meta" and callable(available) and available():
        return device
    raise ValueError(f"{name} {spec}: {device.type} devices are not available here "
                     f"(use cpu or cuda)")


def resolve_dtype(name: str, value, device):
    """The torch dtype ``value`` names (a key of :data:`DTYPE_NAMES`, ``"auto"`` or a torch
    dtype) for models on ``device``; ``ValueError`` naming the argument ``name``."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    if value == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if not isinstance(value, str) or value not in DTYPE_NAMES:
        raise ValueError(f"{name} must be auto, float32, bfloat16 or float16, got {value!r}")
    return getattr(torch, DTYPE_NAMES[value])


def eos_token_ids(*sources) -> list:
    """The distinct EOS ids of ``sources``, in order: a model's
    ``generation_config.eos_token_id``, a tokenizer's ``eos_token_id``, or ids themselves
    (an int, a list, or None)."""
    ids = []
    for source in sources:
        if hasattr(source, "generation_config"):
            source = getattr(source.generation_config, "eos_token_id", None)
        elif hasattr(source, "eos_token_id"):
            source = source.eos_token_id
        for eos in ([source] if isinstance(source, int) else list(source or [])):
            if eos not in ids:
                ids.append(eos)
    return ids
