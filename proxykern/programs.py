"""Logit programs: decoding-time combinations of N models' next-token logits.

A :class:`LogitProgram` names its inputs by *role* (``prog.roles``, in input order) and
says how their logits ``L_r`` (each ``(B, V_r)``) become one row of logits ``z``:

    z = sum_r c_r L_r                         in fp32, over columns [0, vocab_size)
    z[v] = -inf  where a token is -inf in any input, or dropped by the program's mask

then :func:`program_sample` samples ``z`` exactly as :func:`proxykern.proxy_sample` samples
its ``z`` (temperature, top_k / top_p / min_p, the Seeds rule, the Philox/Gumbel-max
noise, logprobs and lse, the bad-row errors: docs/api.md, sections 1 and 1b). The spec
is :func:`proxykern.reference.program_reference`.

Masks (computed from one role's own logits ``L_r`` over the same columns, temperature 1):

* ``"plausibility"`` with ``a`` in (0, 1]: keep ``v`` iff ``L_r[v] >= max_u L_r[u] + log a``
  (computed as ``L_r[v] - max L_r >= log a`` in fp32), i.e. ``p_r(v) >= a * max p_r``:
  the adaptive plausibility constraint of contrastive decoding.
* ``"top_p"`` with ``p`` in (0, 1]: keep the role's own top-p (nucleus) set of
  ``softmax(L_r)``, by the op's top-p rule (ties kept, at least one token): DExperts.

Presets (the papers' defaults): :func:`proxy_tuning`, :func:`dexperts`,
:func:`contrastive` (O'Brien & Lewis 2023, or ``variant="li"``: Li et al. 2022),
:func:`ensemble`. Every coefficient and mask value is a number or a per-row tensor
(0-d or ``(B,)``, real, on the logits' device); tensor values are checked on the device
and a bad row raises naming the argument and the row, as the op's own per-row parameters.

Implementation: :func:`program_rows` is the one entry (no checks, no sync), used by
:func:`program_sample`, the decode step and speculative rounds, on a :class:`BoundProgram`
(the program's values checked once and held as per-row tensors):

* a mask-free difference (proxy tuning) is the fused op itself (bitwise);
* a linear program, or a difference with a plausibility mask, is the fused N-input op
  (:mod:`proxykern.program_ops`): the inputs read once, the mask's row max one extra pass
  over its role;
* a top-p mask (DExperts) is a pre-pass on its role (a sort, the op's own top-p rule) that
  masks a copy of b (difference) or of the first input (linear), then the op as above
  (the mask is also the pre-pass when a difference's e / a were widened).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from . import ops, program_ops, reference

MIN_ROLES, MAX_ROLES = 2, 8
MASK_KINDS = ("plausibility", "top_p")
_PROXY_ROLES = ("base", "expert", "anti_expert")


# --------------------------------------------------------------------------- values

def _check_number_or_tensor(name: str, value, valid, rule: str):
    """A real number satisfying ``valid`` (returned as float), or a 0-d/1-d real
    floating or integer tensor (values checked later, on the device)."""
    if isinstance(value, torch.Tensor):
        if value.dim() > 1:
            raise ValueError(f"{name} must be a number or a 0-d / 1-d (per-row) tensor, "
                             f"got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be a real tensor, got {value.dtype}")
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or a per-row tensor, "
                        f"got {type(value).__name__}")
    value = float(value)
    if not valid(value):
        raise ValueError(f"{name} {rule}, got {value!r}")
    return value


def _finite(v):
    return abs(v) <= ops.FLOAT32_MAX  # NaN fails too (elementwise on tensors)


def _unit_interval(v):
    return (0 < v) & (v <= 1)


_FINITE_RULE = "must be finite and within float32's range"
_UNIT_RULE = "must be in (0, 1]"


@dataclass(frozen=True)
class ProgramMask:
    """Drop tokens by one role's own distribution: ``kind`` "plausibility" (value a:
    keep p_r(v) >= a max p_r) or "top_p" (value p: keep the role's top-p set)."""

    kind: str
    role: str
    value: object  # a float or a per-row tensor
    name: str = "mask value"  # the argument it came from, for error messages

    def __post_init__(self):
        if self.kind not in MASK_KINDS:
            raise ValueError(f"mask kind must be one of {MASK_KINDS}, got {self.kind!r}")
        object.__setattr__(self, "value", _check_number_or_tensor(
            self.name, self.value, _unit_interval, _UNIT_RULE))


@dataclass(frozen=True)
class LogitProgram:
    """``z = sum_r c_r L_r`` over ``roles`` (2..8 names, input order), then ``mask``.

    Give either ``coefficients`` (one per role, a number or a per-row tensor) or
    ``difference = (b, e, a, s)``: ``z = L_b + s (L_e - L_a)`` evaluated in that form
    (proxy tuning's order of operations; the coefficients are then derived from it).
    """

    roles: tuple
    coefficients: tuple | None = None
    mask: ProgramMask | None = None
    difference: tuple | None = None
    name: str = "custom"
    coefficient_names: tuple | None = None  # the argument each came from (messages)

    def __post_init__(self):
        roles = self.roles
        if isinstance(roles, str) or not isinstance(roles, (tuple, list)):
            raise TypeError(f"roles must be a tuple of role names, got {type(roles).__name__}")
        roles = tuple(roles)
        if not MIN_ROLES <= len(roles) <= MAX_ROLES:
            raise ValueError(f"roles: a program reads {MIN_ROLES}..{MAX_ROLES} models, "
                             f"got {len(roles)}")
        for r in roles:
            if not isinstance(r, str) or not r:
                raise TypeError(f"roles must be non-empty strings, got {r!r}")
        if len(set(roles)) != len(roles):
            raise ValueError(f"roles must be distinct, got {roles}")
        object.__setattr__(self, "roles", roles)
        if (self.coefficients is None) == (self.difference is None):
            raise ValueError("give exactly one of coefficients and difference")
        if self.difference is not None:
            if len(self.difference) != 4:
                raise ValueError("difference must be (base_role, expert_role, anti_role, scale)")
            b, e, a, s = self.difference
            for r in (b, e, a):
                if r not in roles:
                    raise ValueError(f"difference names unknown role {r!r}; roles are {roles}")
            if e == a:
                raise ValueError("difference needs two different roles to subtract")
            if set(roles) != {b, e, a}:
                raise ValueError(f"difference must use every role of {roles}")
            sname = (self.coefficient_names or ("scale",))[0]
            s = _check_number_or_tensor(sname, s, _finite, _FINITE_RULE)
            object.__setattr__(self, "difference", (b, e, a, s))
            coeffs = {r: 0.0 for r in roles}
            coeffs[b] = 1.0
            for r, sign in ((e, 1.0), (a, -1.0)):
                c = coeffs[r]
                coeffs[r] = (c + sign * s) if isinstance(s, torch.Tensor) or c else sign * s
            object.__setattr__(self, "coefficients", tuple(coeffs[r] for r in roles))
            object.__setattr__(self, "coefficient_names", (sname,))
        else:
            coeffs = tuple(self.coefficients)
            if len(coeffs) != len(roles):
                raise ValueError(f"coefficients: one per role ({len(roles)}), got {len(coeffs)}")
            names = tuple(self.coefficient_names or (f"coefficients[{r!r}]" for r in roles))
            coeffs = tuple(_check_number_or_tensor(n, c, _finite, _FINITE_RULE)
                           for n, c in zip(names, coeffs))
            object.__setattr__(self, "coefficients", coeffs)
            object.__setattr__(self, "coefficient_names", names)
        if self.mask is not None:
            if not isinstance(self.mask, ProgramMask):
                raise TypeError(f"mask must be a ProgramMask or None, got {type(self.mask).__name__}")
            if self.mask.role not in roles:
                raise ValueError(f"mask names unknown role {self.mask.role!r}; roles are {roles}")

    def coefficient(self, role: str):
        """The linear coefficient c_r of ``role`` (a float or a per-row tensor)."""
        return self.coefficients[self.roles.index(role)]

    def _per_row_values(self):
        """(argument name, value, valid, rule) of every value given as a tensor."""
        out = []
        if self.difference is not None:
            out.append((self.coefficient_names[0], self.difference[3], _finite, _FINITE_RULE))
        else:
            out += [(n, c, _finite, _FINITE_RULE)
                    for n, c in zip(self.coefficient_names, self.coefficients)]
        if self.mask is not None:
            out.append((self.mask.name, self.mask.value, _unit_interval, _UNIT_RULE))
        return [item for item in out if isinstance(item[1], torch.Tensor)]


# --------------------------------------------------------------------------- presets

def proxy_tuning(alpha=1.0) -> LogitProgram:
    """Proxy tuning (Liu et al. 2024, "Tuning Language Models by Proxy", arXiv 2401.08565):
    roles ("base", "expert", "anti_expert"), ``z = L_base + alpha (L_expert - L_anti)``.
    :func:`program_sample` runs it as :func:`proxykern.proxy_sample` itself (bitwise)."""
    return LogitProgram(_PROXY_ROLES, difference=("base", "expert", "anti_expert", alpha),
                        name="proxy_tuning", coefficient_names=("alpha",))


def dexperts(alpha=2.0, base_top_p=0.9) -> LogitProgram:
    """DExperts (Liu et al. 2021, "DExperts: Decoding-Time Controlled Text Generation with
    Experts and Anti-Experts", ACL 2021; defaults alpha 2.0, top-p 0.9 on the base):
    roles ("base", "expert", "anti_expert"); the base's own top-p set (softmax of its
    logits, T = 1) masks ``z = L_base + alpha (L_expert - L_anti)``."""
    return LogitProgram(_PROXY_ROLES, difference=("base", "expert", "anti_expert", alpha),
                        mask=ProgramMask("top_p", "base", base_top_p, name="base_top_p"),
                        name="dexperts", coefficient_names=("alpha",))


def contrastive(beta=None, plausibility=0.1, *, variant="obrien") -> LogitProgram:
    """Contrastive decoding, roles ("expert", "amateur"), masked by the expert's adaptive
    plausibility constraint (keep p_expert(v) >= plausibility * max p_expert).

    * ``variant="obrien"`` (default; O'Brien & Lewis 2023, "Contrastive Decoding Improves
      Reasoning in Large Language Models", arXiv 2309.09117): ``z = (1 + beta) L_expert -
      beta L_amateur``, evaluated as ``L_expert + beta (L_expert - L_amateur)``; beta 0.5,
      plausibility 0.1.
    * ``variant="li"`` (Li et al. 2022, "Contrastive Decoding: Open-ended Text Generation as
      Optimization", arXiv 2210.15097): ``z = L_expert - L_amateur``, plausibility 0.1;
      takes no beta.

    Logits or log-probabilities give the same distribution (a per-row shift); ``lse``
    is of the logits as given.
    """
    if variant not in ("obrien", "li"):
        raise ValueError(f"variant must be 'obrien' or 'li', got {variant!r}")
    mask = ProgramMask("plausibility", "expert", plausibility, name="plausibility")
    roles = ("expert", "amateur")
    if variant == "li":
        if beta is not None:
            raise ValueError("beta: the 'li' variant is L_expert - L_amateur and takes no beta")
        return LogitProgram(roles, coefficients=(1.0, -1.0), mask=mask, name="contrastive_li",
                            coefficient_names=("expert coefficient", "amateur coefficient"))
    beta = 0.5 if beta is None else beta
    return LogitProgram(roles, difference=("expert", "expert", "amateur", beta), mask=mask,
                        name="contrastive", coefficient_names=("beta",))


def ensemble(weights) -> LogitProgram:
    """A weighted product of experts: roles = the keys of ``weights`` (in its order),
    ``z = sum_i w_i L_i`` (Hinton 2002's product of experts, with weights). Weights are
    numbers or per-row tensors, finite; they need not sum to 1 (a sum s acts as a
    temperature 1/s)."""
    if not isinstance(weights, dict):
        raise TypeError(f"weights must be a dict of role -> weight, got {type(weights).__name__}")
    if not MIN_ROLES <= len(weights) <= MAX_ROLES:
        raise ValueError(f"weights must name {MIN_ROLES}..{MAX_ROLES} roles, got {len(weights)}")
    roles = tuple(weights)
    return LogitProgram(roles, coefficients=tuple(weights[r] for r in roles), name="ensemble",
                        coefficient_names=tuple(f"weights[{r!r}]" for r in roles))


# --------------------------------------------------------------------------- sampling

def _check_inputs(program: LogitProgram, logits):
    if not isinstance(program, LogitProgram):
        raise TypeError(f"program must be a LogitProgram, got {type(program).__name__}")
    if not isinstance(logits, dict):
        raise TypeError(f"logits must be a dict of role -> (B, V) tensor, "
                        f"got {type(logits).__name__}")
    missing = [r for r in program.roles if r not in logits]
    if missing:
        raise ValueError(f"logits: missing role(s) {missing}; the program's roles are "
                         f"{program.roles}")
    extra = [r for r in logits if r not in program.roles]
    if extra:
        raise ValueError(f"logits: unknown role(s) {extra}; the program's roles are "
                         f"{program.roles}")
    first = program.roles[0]
    for r in program.roles:
        ops._check_logits(f"logits[{r!r}]", logits[r])
    B, device = logits[first].shape[0], logits[first].device
    for r in program.roles[1:]:
        t = logits[r]
        if t.shape[0] != B:
            raise ValueError(f"logits[{r!r}] has batch size {t.shape[0]} but "
                             f"logits[{first!r}] has {B}")
        if t.device != device:
            raise ValueError(f"logits[{r!r}] is on {t.device} but logits[{first!r}] is on {device}")
    return B, device


def _check_vocab_size(vocab_size, narrowest: int) -> int:
    if vocab_size is None:
        return narrowest
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= narrowest:
        raise ValueError(f"vocab_size must be in [1, {narrowest}] (the narrowest logits width), "
                         f"got {vocab_size}")
    return int(vocab_size)


def _bind_per_row(program: LogitProgram, B: int, device):
    """Check the program's per-row tensors against the batch and device; return
    [(argument name, (B,) bool of rows breaking its rule, (B,) fp32 values, rule)]."""
    bad = []
    for name, value, valid, rule in program._per_row_values():
        if value.dim() == 1 and value.shape[0] != B:
            raise ValueError(f"{name} must be a number or a 1-D tensor of length {B} "
                             f"(the batch size), got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the logits are on {device}")
        v32 = value.float().reshape(-1).expand(B)
        bad.append((name, ~valid(v32), v32, rule))
    return bad


def _raise_on_bad_values(bad) -> None:
    """ValueError naming the argument and the first row that breaks its rule (one sync)."""
    if not bad or not bool(torch.stack([rows for _n, rows, _v, _r in bad]).any()):
        return
    for name, rows, values, rule in bad:
        hit = torch.nonzero(rows).flatten().tolist()
        if hit:
            row = hit[0]
            raise ValueError(f"row {row}: {name} {rule} ({name}[{row}] = {values[row].item()!r})")


def _safe(value, B: int, unit: bool):
    """A per-row tensor with its bad values replaced by harmless ones (those rows are
    reported by name and get token -1), so the kernels' own checks never see them."""
    if not isinstance(value, torch.Tensor):
        return value
    v = value.float().reshape(-1).expand(B)
    if unit:
        return v.nan_to_num(1.0).clamp(min=1e-30, max=1.0)
    return v.nan_to_num(0.0, posinf=0.0, neginf=0.0).clamp(-ops.FLOAT32_MAX, ops.FLOAT32_MAX)


def _bound_safe(program: LogitProgram, B: int, device) -> "BoundProgram":
    """``program`` bound to B rows with its bad per-row values replaced by harmless ones."""
    def row(value, unit):
        v = _safe(value, B, unit)
        return v.contiguous() if isinstance(v, torch.Tensor) else torch.full((B,), v, device=device)

    mask = program.mask and ProgramMask(program.mask.kind, program.mask.role,
                                        row(program.mask.value, True), program.mask.name)
    if program.difference is not None:
        b, e, a, s = program.difference
        return BoundProgram.of(LogitProgram(program.roles, difference=(b, e, a, row(s, False)),
                                            mask=mask, coefficient_names=program.coefficient_names))
    return BoundProgram.of(LogitProgram(
        program.roles, coefficients=tuple(row(c, False) for c in program.coefficients), mask=mask,
        coefficient_names=program.coefficient_names))


def program_sample(program: LogitProgram, logits: dict, *, temperature=0.0, top_k=0, top_p=1.0,
                   min_p=0.0, seed=0, step=0, vocab_size=None, backend="auto") -> ops.SampleOutput:
    """Sample one token per row from ``program`` applied to ``logits`` (role -> (B, V_r)).

    The sampling arguments, the seeds, the noise, ``vocab_size`` (default: the narrowest
    width), ``backend`` and the errors are those of :func:`proxykern.proxy_sample`.
    ``logprobs = log_softmax(z')[token]`` and ``lse = logsumexp(z')`` are over the *masked*
    z' (masked tokens are -inf and carry no mass), before top_k / top_p / min_p. Returns
    ``SampleOutput(tokens, logprobs, lse)``. See the module docstring for the formulas and
    docs/api.md section 1b for the contract.
    """
    B, device = _check_inputs(program, logits)
    V = _check_vocab_size(vocab_size, min(logits[r].shape[1] for r in program.roles))
    kwargs = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed,
                  step=step, vocab_size=V, backend=backend)

    b, e, a, s = program.difference or (None, None, None, None)
    if program.difference is not None and program.mask is None and b != e:
        # Proxy tuning (or any mask-free difference of distinct roles): the op itself.
        return ops.proxy_sample(logits[b], logits[e], logits[a], alpha=s, **kwargs)

    resolved = ops.resolve_backend(backend, device)
    bad = _bind_per_row(program, B, device)
    bound = _bound_safe(program, B, device)
    params, steps, tensor_params = ops.checked_params(
        B, device, V, alpha=bound.scale if bound.scale is not None else 0.0,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=seed, step=step)
    cols = [logits[r] if logits[r].stride(1) == 1 or logits[r].shape[1] <= 1
            else logits[r].contiguous() for r in program.roles]
    tokens, logprobs, lse, status = program_rows(bound, cols, params, steps, V, resolved)
    status, tokens = ops.bad_param_rows(status, tokens, tensor_params)
    out = ops.SampleOutput(tokens, logprobs, lse)
    if bad:
        any_bad = torch.stack([rows for _n, rows, _v, _r in bad]).any(0)
        out = ops.SampleOutput(torch.where(any_bad, torch.full_like(out.tokens, -1), out.tokens),
                               out.logprobs, out.lse)
    if not ops._no_host_sync(device):
        _raise_on_bad_values(bad)
        ops.raise_on_bad_rows(status, tensor_params)
    return out


# --------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class BoundProgram:
    """A program bound to the B rows of one call, its per-row values checked once
    (:func:`bind_program`): what the decode step reads, with no checks and no sync.

    ``program``: the program with every per-row value a ``(B,)`` fp32 tensor. Derived once
    (:meth:`of`): ``indices`` the role indices ``(b, e, a)`` of a difference program (else
    None) and ``scale`` its ``(B,)`` scale; ``coefficients`` the fused op's ``(B, N)`` (linear)
    or ``(B, 1)`` (difference) fp32 matrix; ``mask_input`` the fused op's input index of a
    plausibility mask (-1: none, or a top-p mask, which is a pre-pass) and ``log_a`` its
    ``(B,)`` ``log(a)``.
    """

    program: LogitProgram
    indices: tuple | None
    scale: torch.Tensor | None
    coefficients: torch.Tensor
    mask_input: int
    log_a: torch.Tensor | None

    @classmethod
    def of(cls, program: LogitProgram) -> "BoundProgram":
        """The bound form of ``program`` (every value already a checked (B,) fp32 tensor)."""
        mask, roles = program.mask, program.roles
        if program.difference is not None:
            b, e, a, scale = program.difference
            indices = tuple(roles.index(r) for r in (b, e, a))
            inputs, coefficients = (b, e, a), scale[:, None]
        else:
            indices = scale = None
            inputs, coefficients = roles, torch.stack(program.coefficients, 1)
        plausible = mask is not None and mask.kind == "plausibility"
        return cls(program, indices, scale, coefficients.contiguous(),
                   inputs.index(mask.role) if plausible else -1,
                   torch.log(mask.value) if plausible else None)

    @property
    def roles(self) -> tuple:
        return self.program.roles

    def repeat_rows(self, repeats: int) -> "BoundProgram":
        """Each row's values repeated ``repeats`` times (row r -> rows r*P .. r*P+P-1)."""
        prog = self.program

        def rep(value):
            return value.repeat_interleave(repeats)

        mask = prog.mask and ProgramMask(prog.mask.kind, prog.mask.role, rep(prog.mask.value),
                                         prog.mask.name)
        if prog.difference is not None:
            b, e, a, s = prog.difference
            return BoundProgram.of(LogitProgram(
                prog.roles, difference=(b, e, a, rep(s)), mask=mask, name=prog.name,
                coefficient_names=prog.coefficient_names))
        return BoundProgram.of(LogitProgram(
            prog.roles, coefficients=tuple(rep(c) for c in prog.coefficients), mask=mask,
            name=prog.name, coefficient_names=prog.coefficient_names))


def _row_values(name, value, rows: int, n_samples: int, device, valid, rule, unit: bool):
    """``value`` as a (rows,) fp32 tensor: a number, a 0-d tensor, one value per prompt
    (``rows // n_samples``, repeated for each sample) or one per row; checked on the host
    (``ValueError`` naming the argument and the row)."""
    if isinstance(value, torch.Tensor):
        prompts = rows // n_samples
        if value.dim() == 1 and value.shape[0] == prompts and n_samples > 1:
            value = value.repeat_interleave(n_samples)
        if value.dim() == 1 and value.shape[0] != rows:
            per = (f"{prompts} (one per prompt) or {rows} (one per returned sequence)"
                   if n_samples > 1 else f"{rows} (the batch size)")
            raise ValueError(f"{name} must be a number or a 1-D tensor of length {per}, "
                             f"got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the models are on {device}")
        v = value.float().reshape(-1).expand(rows).contiguous()
        bad = torch.nonzero(~valid(v)).flatten().tolist()
        if bad:
            raise ValueError(f"row {bad[0]}: {name} {rule} ({name}[{bad[0]}] = "
                             f"{v[bad[0]].item()!r})")
        return v
    return torch.full((rows,), float(value), device=device)


def bind_program(program: LogitProgram, rows: int, device, n_samples: int = 1) -> BoundProgram:
    """Check ``program``'s per-row values against ``rows`` rows on ``device`` (a tensor gives
    one value per row, or one per prompt when ``n_samples > 1``) and hold each as a
    ``(rows,)`` fp32 tensor. Raises naming the argument and the first bad row."""
    if not isinstance(program, LogitProgram):
        raise TypeError(f"program must be a LogitProgram, got {type(program).__name__}")

    def coeff(name, value):
        return _row_values(name, value, rows, n_samples, device, _finite, _FINITE_RULE, False)

    mask = program.mask
    if mask is not None:
        mask = ProgramMask(mask.kind, mask.role, _row_values(
            mask.name, mask.value, rows, n_samples, device, _unit_interval, _UNIT_RULE, True),
            mask.name)
    if program.difference is not None:
        b, e, a, s = program.difference
        scale = coeff(program.coefficient_names[0], s)
        return BoundProgram.of(LogitProgram(
            program.roles, difference=(b, e, a, scale), mask=mask, name=program.name,
            coefficient_names=program.coefficient_names))
    coeffs = tuple(coeff(n, c) for n, c in zip(program.coefficient_names, program.coefficients))
    return BoundProgram.of(LogitProgram(program.roles, coefficients=coeffs, mask=mask,
                                        name=program.name,
                                        coefficient_names=program.coefficient_names))


def mask_drop(kind: str, value, own: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The (n, vocab_size) tokens a mask of ``kind`` and ``value`` drops (True), from the
    masked role's own logits ``own`` (:func:`proxykern.reference.program_mask`); a role
    narrower than ``vocab_size`` gives the columns it lacks no mass (dropped)."""
    width = min(own.shape[-1], vocab_size)
    drop = reference.program_mask(kind, value, own[:, :width].float())
    if width < vocab_size:
        drop = torch.cat([drop, drop.new_ones((drop.shape[0], vocab_size - width))], 1)
    return drop


def masked_columns(bound: BoundProgram, logits: list, vocab_size: int) -> torch.Tensor | None:
    """:func:`mask_drop` of a bound program's mask over its role's logits, or None."""
    mask = bound.program.mask
    if mask is None:
        return None
    return mask_drop(mask.kind, mask.value, logits[bound.roles.index(mask.role)], vocab_size)


def program_rows(bound: BoundProgram, logits: list, params, step: torch.Tensor,
                 vocab_size: int, backend: str, delta=None):
    """The decode step's entry for programs: no checks, no host sync.

    ``logits`` in role order, each ``(B, >= vocab_size)`` (narrower only for a difference
    program's ``e`` / ``a``, which ``delta`` then replaces: the two widened with a
    zero-delta tail), unit stride along the vocabulary. ``params``: a
    :class:`proxykern.params.SamplingParams` whose ``alpha`` is the bound scale of a
    difference program (0 otherwise). Returns (tokens, logprobs, lse, status) as
    :func:`proxykern.ops.sample_rows`.
    """
    top_p_mask = bound.program.mask is not None and bound.mask_input < 0
    if bound.indices is not None:
        b, e, a = (logits[i] for i in bound.indices)
        if delta is not None:
            e, a = delta
        if bound.program.mask is None:  # proxy tuning's own op
            return ops.sample_rows(b, e, a, params, step, vocab_size, backend)
        if top_p_mask or delta is not None:  # a pre-pass mask on b, then the op's combine
            b = b[:, :vocab_size].masked_fill(masked_columns(bound, logits, vocab_size),
                                              float("-inf"))
            return ops.sample_rows(b, e, a, params, step, vocab_size, backend)
        inputs, mode = [b, e, a], "difference"
    else:
        inputs, mode = list(logits), "linear"
        if top_p_mask:  # the mask's own pass (a sort), then the fused N-input op on the rest
            drop = masked_columns(bound, logits, vocab_size)
            inputs[0] = inputs[0][:, :vocab_size].masked_fill(drop, float("-inf"))
    return program_ops.program_rows(inputs, bound.coefficients, mode, bound.mask_input,
                                    bound.log_a, params, step, vocab_size, backend)
