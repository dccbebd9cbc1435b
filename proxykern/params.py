"""The per-row sampling parameters of one call, as one typed, frozen object.

:class:`SamplingParams` holds a ``(B,)`` device tensor per parameter (``alpha``,
``temperature``, ``top_k``, ``top_p``, ``min_p``, ``seed``) in the dtype the op reads
(:data:`PARAM_DTYPES`) and the two facts a launch needs from the numbers as given
(``greedy``, ``may_filter``). It is built once at the edge -- by
:func:`proxykern.generation_args.prepare_generation` (host-checked values) or by
:func:`proxykern.ops.proxy_sample` (tensor values checked on the device) -- and every
later user (the decode step, speculative rounds, the baseline, the program step) takes
it as it is: no re-validation, no tensor built per step.

The seed rule lives here once: a number (or 0-d tensor) ``s`` gives row ``r`` the seed
``reference.row_seeds(s, r)`` (SplitMix64); a per-row tensor is used as given.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from . import reference

#: The op's per-row parameters and the dtype each is held in.
PARAM_DTYPES = {"alpha": torch.float32, "temperature": torch.float32, "top_k": torch.int64,
                "top_p": torch.float32, "min_p": torch.float32, "seed": torch.int64,
                "step": torch.int64}
#: The parameters a :class:`SamplingParams` holds, in the op's argument order.
FIELDS = ("alpha", "temperature", "top_k", "top_p", "min_p", "seed")
DEFAULTS = {"alpha": 1.0, "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
            "seed": 0}


def may_filter(values: dict, vocab_size: int) -> bool:
    """Whether a row may have top_k, top_p or min_p active, from the parameters as given
    (numbers or tensors; missing ones take the op's defaults). False only when the
    numbers rule it out (temperature 0, or every filter off); a tensor counts as
    "may". It picks the Triton backend's launches (filters staged across programs at
    small batch, or not), never a result, so a value computed for a wider vocabulary
    is safe for a narrower one."""
    def number(name, default):
        value = values.get(name, default)
        return None if isinstance(value, torch.Tensor) else value

    temperature = number("temperature", 0.0)
    if temperature is not None and temperature == 0:
        return False
    top_k, top_p, min_p = number("top_k", 0), number("top_p", 1.0), number("min_p", 0.0)
    filters_off = (top_k is not None and (top_k <= 0 or top_k >= vocab_size)
                   and top_p is not None and top_p >= 1.0
                   and min_p is not None and min_p <= 0.0)
    return not filters_off


def row_tensor(name: str, value, B: int, device) -> torch.Tensor:
    """A ``(B,)`` tensor of parameter ``name`` from a number or a checked 0-d / 1-D tensor
    (the seed rule of the module doc for ``seed``)."""
    dtype = PARAM_DTYPES[name]
    if isinstance(value, torch.Tensor):
        if name == "seed" and value.dim() == 0:  # a number held in a tensor: one seed per row
            return reference.row_seeds(value.to(device=device, dtype=torch.int64),
                                       torch.arange(B, device=device))
        return value.to(device=device, dtype=dtype).reshape(-1).expand(B).contiguous()
    if name == "seed":
        return reference.row_seeds(value, torch.arange(B, device=device))
    if name == "step":
        value = reference.as_int64(value)  # unsigned 64-bit values wrap to the same bits
    return torch.full((B,), value, dtype=dtype, device=device)


@dataclass(frozen=True)
class SamplingParams:
    """Per-row sampling parameters of a batch of B rows, each a ``(B,)`` device tensor.

    ``greedy``: the temperature was the number 0 (every row greedy: callers may take the
    argmax without the op). ``may_filter``: :func:`may_filter` of the values as given
    (a launch hint). Build with :meth:`build`; derive with :meth:`replace` and
    :meth:`repeat_rows`.
    """

    alpha: torch.Tensor
    temperature: torch.Tensor
    top_k: torch.Tensor
    top_p: torch.Tensor
    min_p: torch.Tensor
    seed: torch.Tensor
    greedy: bool = False
    may_filter: bool = True

    @classmethod
    def build(cls, values: dict, batch_size: int, device, vocab_size: int) -> "SamplingParams":
        """From ``values`` (name -> number or tensor, already checked by the caller's rules;
        missing names take the op's defaults) for ``batch_size`` rows on ``device``."""
        given = {**DEFAULTS, **values}
        unknown = set(given) - set(FIELDS)
        if unknown:
            raise TypeError(f"unknown sampling parameter(s) {sorted(unknown)}")
        temperature = given["temperature"]
        return cls(**{n: row_tensor(n, given[n], batch_size, device) for n in FIELDS},
                   greedy=not isinstance(temperature, torch.Tensor) and temperature == 0,
                   may_filter=may_filter(given, vocab_size))

    @property
    def batch_size(self) -> int:
        return self.alpha.shape[0]

    def tensors(self) -> tuple:
        """The ``(B,)`` tensors in the op's argument order (:data:`FIELDS`)."""
        return tuple(getattr(self, n) for n in FIELDS)

    def replace(self, **changes) -> "SamplingParams":
        """A copy with some fields replaced (a number becomes a ``(B,)`` tensor)."""
        B, device = self.batch_size, self.alpha.device
        changes = {n: (row_tensor(n, v, B, device) if n in FIELDS else v)
                   for n, v in changes.items()}
        return dataclasses.replace(self, **changes)

    def repeat_rows(self, repeats: int) -> "SamplingParams":
        """Each row's parameters repeated ``repeats`` times (row r -> rows r*P .. r*P+P-1)."""
        return dataclasses.replace(self, **{n: getattr(self, n).repeat_interleave(repeats)
                                           for n in FIELDS})
