"""The ``proxykern`` console script.

``proxykern generate --base B --expert E --anti-expert A --prompt TEXT [...]``
loads three HF causal LMs (local folders or hub names) and the base's
tokenizer, runs :func:`proxykern.fused_proxy_generate` and streams the new
text to stdout as it is generated (with ``--num-return-sequences n > 1`` the n
samples are printed one after another). ``--chat-expert`` gives the expert its
own prompt: the expert tokenizer's chat template applied to TEXT as one user
turn (with the generation prompt); the expert's EOS ids then also stop generation.

``proxykern generate --program NAME ...`` generates under another logit program
(:mod:`proxykern.programs`: ``dexperts``, ``contrastive``, ``contrastive_li``,
``ensemble``) through :func:`proxykern.program_generate`, each role's model given by
``--base`` / ``--expert`` / ``--anti-expert`` or ``--role NAME=PATH``; plain proxy
tuning (the default) keeps :func:`proxykern.fused_proxy_generate`. The program, its
roles and its parameters are checked before anything loads (:func:`resolve_program`;
a misuse exits 2 with one line).

``proxykern generate ... --input prompts.jsonl --output results.jsonl`` is the
file mode (:mod:`proxykern.jsonl_generate` documents the line format and the
output file); ``--output -`` writes the lines to stdout.

Every limit is checked before any work, cheapest first: the flags (sampling
values by the op's own rules, so numbers beyond float32 / int64 are refused;
counts; the device; model paths that look local but do not exist), then
``--output`` and ``--input``, then the models load and each prompt is tokenized
and checked (no tokens, or more positions than a model reads).

Exit status: 0 done; 1 an error, printed as one line ``proxykern: error: ...``;
2 bad usage (argparse; or a program misuse, one line ``proxykern: error: ...``);
130 interrupted by SIGINT (Ctrl-C), 143 by SIGTERM and 129 by
SIGHUP (the terminal closed),
printed as one line with no traceback (file mode removes its temporary file and
leaves an earlier ``--output`` untouched); 141 when stdout is closed early
(``--output - | head``).

``proxykern bench [kernel|generate] [...]`` runs :mod:`proxykern.bench` or
:mod:`proxykern.bench_generate`, and ``proxykern demo [...]`` :func:`proxykern.demo.main`,
with the remaining arguments (imported only then).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from dataclasses import dataclass, field

from ..loading import DTYPE_NAMES
from ..ops import INT64_MAX  # loaded with the package anyway (proxykern/__init__.py)

#: --dtype choices: "auto" and the canonical names of loading.DTYPE_NAMES.
DTYPES = ("auto", *dict.fromkeys(DTYPE_NAMES.values()))
BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")
DEFAULT_BATCH_SIZE = 8
EXIT_SIGINT, EXIT_SIGTERM, EXIT_SIGPIPE, EXIT_SIGHUP = 130, 143, 141, 129
# Flags that only the file mode reads (refused with --prompt rather than ignored).
FILE_MODE_FLAGS = (("batch_size", "--batch-size"), ("logprobs", "--logprobs"),
                   ("skip_bad_lines", "--skip-bad-lines"))

#: --program NAME -> (its roles, None for ensemble: the --weight names; the parameters it
#: takes, as args attributes). Names are the presets' (proxykern.programs); a hyphen may
#: stand for the underscore (contrastive-li).
PROGRAMS = {
    "proxy_tuning": (("base", "expert", "anti_expert"), ("alpha",)),
    "dexperts": (("base", "expert", "anti_expert"), ("alpha", "base_top_p")),
    "contrastive": (("expert", "amateur"), ("beta", "plausibility")),
    "contrastive_li": (("expert", "amateur"), ("plausibility",)),
    "ensemble": (None, ("weight",)),
}
#: args attribute -> its flag, for every program parameter.
PROGRAM_PARAMS = {"alpha": "--alpha", "base_top_p": "--base-top-p", "beta": "--beta",
                  "plausibility": "--plausibility", "weight": "--weight"}
#: The defaults of the papers (proxykern.programs), where a flag is not given.
PROGRAM_DEFAULTS = {("proxy_tuning", "alpha"): 1.0, ("dexperts", "alpha"): 2.0,
                    ("dexperts", "base_top_p"): 0.9, ("contrastive", "beta"): 0.5,
                    ("contrastive", "plausibility"): 0.1, ("contrastive_li", "plausibility"): 0.1}
#: The role flags: args attribute, flag, the role it gives.
ROLE_FLAGS = (("base", "--base", "base"), ("expert", "--expert", "expert"),
              ("anti_expert", "--anti-expert", "anti_expert"))
_ROLE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")

GENERATE_EPILOG = """\
programs (--program NAME; contrastive-li = contrastive_li):
  proxy_tuning    z = base + alpha * (expert - anti_expert)      (Liu et al. 2024)
                  roles base, expert, anti_expert; --alpha (default 1.0)
  dexperts        the same z, masked to the base's own top-p set (softmax, T = 1)
                  roles base, expert, anti_expert; --alpha (default 2.0),
                  --base-top-p (default 0.9)     (DExperts, Liu et al. 2021)
  contrastive     z = (1 + beta) * expert - beta * amateur, masked by the expert's
                  plausibility (keep p_expert >= plausibility * max p_expert)
                  roles expert, amateur; --beta (default 0.5), --plausibility
                  (default 0.1)     (O'Brien & Lewis 2023)
  contrastive_li  z = expert - amateur, the same mask; roles expert, amateur;
                  --plausibility (default 0.1)     (Li et al. 2022)
  ensemble        z = sum of W * the role's logits over each --weight NAME=W
                  (2 to 8 roles, in order); each role needs --role NAME=PATH
  A role's model: --base, --expert, --anti-expert give the roles base, expert and
  anti_expert; --role NAME=PATH any role (e.g. --role amateur=PATH). The tokenizer
  is the first role's folder: base (proxy_tuning, dexperts), expert (contrastive,
  contrastive_li), the first --weight's role (ensemble); so are the default EOS
  and pad ids. --chat-expert and "expert_prompt" apply to the role expert.
  --num-draft-tokens K drafts with the role expert (else the smallest model).
  A parameter flag the program
  does not take, a missing, unknown or repeated role, a malformed NAME=PATH or
  NAME=W: exit 2 with one line, before any model loads. proxy_tuning runs
  fused_proxy_generate; the others proxykern.program_generate.

file mode (--input PROMPTS.jsonl --output RESULTS.jsonl):
  Each input line is a JSON object (UTF-8; blank lines are ignored):
    "prompt"          the text (required, non-empty)
    "expert_prompt"   the expert's own prompt (else it reads "prompt",
                      in its chat template with --chat-expert)
    "alpha", "temperature", "top_k", "top_p", "min_p", "seed", "max_new_tokens"
                      this line's value of the flag of the same name ("alpha":
                      proxy_tuning and dexperts only, a bad line otherwise)
    any other field   copied to the output as is
  Each output line, in input order, is the input object plus "completion",
  "num_tokens", "finish_reason" ("stop" or "length") and with --logprobs
  "logprobs" (lists "completions", ... with --num-return-sequences > 1).
  Every line is parsed, tokenized and checked before anything is generated; a
  bad line stops the run naming it, or with --skip-bad-lines is reported and
  left out. The output is written to a temporary file and renamed at the end
  (a symlink is written through; a replaced file keeps its mode); --output -
  writes each line to stdout as soon as every earlier line is done.

examples:
  proxykern generate --base examples/trio/models/base \\
      --expert examples/trio/models/expert --anti-expert examples/trio/models/anti_expert \\
      --prompt "question : where does gus wren live ? answer :" --max-new-tokens 10
  proxykern generate --base B --expert E --anti-expert A \\
      --input prompts.jsonl --output results.jsonl --batch-size 16 --logprobs
  proxykern generate --base B --expert E --anti-expert A \\
      --input prompts.jsonl --output - | jq -r .completion
  proxykern generate --program contrastive --expert BIG --role amateur=SMALL \\
      --beta 0.5 --prompt "..."
  proxykern generate --program ensemble --weight a=0.7 --weight b=0.3 \\
      --role a=MODEL_A --role b=MODEL_B --prompt "..."

exit status: 0 done, 1 error, 2 bad usage, 130 SIGINT, 143 SIGTERM,
129 SIGHUP, 141 stdout closed early
"""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help (none for flags without one); epilogs as written."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def _version() -> str:
    """The installed distribution's version, else the package's own."""
    from importlib import metadata
    try:
        return metadata.version("proxykern")
    except metadata.PackageNotFoundError:
        from .. import __version__
        return __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="proxykern", formatter_class=_HelpFormatter,
        description="Fast proxy tuning (Liu et al. 2024): base + alpha * (expert - anti-expert).",
        epilog="'proxykern generate --help' lists the generation flags and the JSONL format.")
    parser.add_argument("--version", action="version", version=f"proxykern {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{generate,bench,demo}",
                                title="commands")

    gen = sub.add_parser("generate", help="proxy-tuned generation: one prompt streamed to "
                         "stdout, or a JSONL file of prompts", formatter_class=_HelpFormatter,
                         description="Proxy-tuned generation: base + alpha * (expert - "
                                     "anti-expert),\none fused sampling kernel per step; "
                                     "--program picks another logit program\n(DExperts, "
                                     "contrastive decoding, an ensemble).",
                         epilog=GENERATE_EPILOG)
    gen.add_argument("--program", default="proxy_tuning", metavar="NAME",
                     type=lambda name: name.replace("-", "_"), choices=tuple(PROGRAMS),
                     help="the logit program: " + ", ".join(PROGRAMS) + " (see 'programs' "
                          "below)")
    gen.add_argument("--base", metavar="PATH",
                     help="the role base: base model (folder or hub name)")
    gen.add_argument("--expert", metavar="PATH", help="the role expert: tuned expert model")
    gen.add_argument("--anti-expert", metavar="PATH",
                     help="the role anti_expert: untuned anti-expert model")
    gen.add_argument("--role", action="append", metavar="NAME=PATH",
                     help="a model for the program's role NAME (repeatable), e.g. "
                          "amateur=PATH for contrastive")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", metavar="TEXT",
                     help="one prompt; its text is streamed to stdout")
    src.add_argument("--input", metavar="PROMPTS.jsonl",
                     help="a JSON-lines file of prompts (file mode; needs --output)")
    gen.add_argument("--output", metavar="RESULTS.jsonl",
                     help="file mode: where the input lines go, each with its completion "
                          "('-': stdout)")
    gen.add_argument("--batch-size", type=int, default=None, metavar="N",
                     help=f"file mode: prompts per generation call, sorted by length "
                          f"(default: {DEFAULT_BATCH_SIZE})")
    gen.add_argument("--skip-bad-lines", action="store_true",
                     help="file mode: report bad lines on stderr and go on without them")
    gen.add_argument("--logprobs", action="store_true",
                     help="file mode: add the log-probability of every new token")
    gen.add_argument("--num-draft-tokens", type=int, default=0, metavar="K",
                     help="speculative decoding: the role expert (else the smallest model) "
                          "drafts up to K tokens a round (same output as 0, fewer forwards of "
                          "the other models)")
    gen.add_argument("--num-return-sequences", type=int, default=1, metavar="N",
                     help="samples per prompt (use a temperature > 0 for distinct ones)")
    gen.add_argument("--chat-expert", action="store_true",
                     help="give the role expert the prompt in its tokenizer's chat template")
    gen.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                     help="new tokens at most (prompt + max_new_tokens - 1 must fit each "
                          "model's max_position_embeddings)")
    gen.add_argument("--alpha", type=float, default=None, metavar="A",
                     help="proxy_tuning, dexperts: the expert's weight (default: 1.0 for "
                          "proxy_tuning, 2.0 for dexperts)")
    gen.add_argument("--base-top-p", type=float, default=None, metavar="P",
                     help="dexperts: the base's top-p mask, in (0, 1] (default: 0.9)")
    gen.add_argument("--beta", type=float, default=None, metavar="B",
                     help="contrastive: the contrast's weight (default: 0.5)")
    gen.add_argument("--plausibility", type=float, default=None, metavar="A",
                     help="contrastive, contrastive_li: keep tokens with p_expert >= A * "
                          "max p_expert, A in (0, 1] (default: 0.1)")
    gen.add_argument("--weight", action="append", metavar="NAME=W",
                     help="ensemble: the weight of role NAME (repeatable, 2 to 8 roles)")
    gen.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = all tokens")
    gen.add_argument("--top-p", type=float, default=1.0, metavar="P",
                     help="nucleus mass, in (0, 1]")
    gen.add_argument("--min-p", type=float, default=0.0, metavar="P",
                     help="keep tokens with p >= min_p * p_max, in [0, 1)")
    gen.add_argument("--seed", type=int, default=0, metavar="S",
                     help="sampling seed (file mode: line i without a seed gets "
                          "row_seeds(seed, i - 1))")
    gen.add_argument("--device", default="auto", metavar="D",
                     help="'auto' (cuda if available, else cpu), cpu, cuda, cuda:0, ...")
    gen.add_argument("--dtype", choices=DTYPES, default="auto",
                     help="'auto': bfloat16 on CUDA, float32 on CPU")
    gen.add_argument("--backend", choices=BACKENDS, default="auto", help="the fused op's backend")

    sub.add_parser("bench", add_help=False,
                   help="kernel and generation benchmarks against the naive baseline "
                        "(arguments go to proxykern.bench)")
    sub.add_parser("demo", add_help=False,
                   help="the shipped trio's answers side by side, and tokens/s (proxykern.demo)")
    return parser


# --------------------------------------------------------------------------- programs

class UsageError(ValueError):
    """A misuse of the program flags (a parameter or role the program does not take, ...):
    exit 2 with one line, before anything loads."""


@dataclass
class ProgramSpec:
    """``--program`` resolved: its name, roles (in order; the first gives the tokenizer),
    each role's model as (flag, path, how messages name it) and the parameter values."""
    name: str
    roles: tuple
    paths: dict                                  # role -> (flag, path, label)
    params: dict = field(default_factory=dict)   # base_top_p, beta, plausibility, weights

    @property
    def takes_alpha(self) -> bool:
        return "alpha" in PROGRAMS[self.name][1]

    @property
    def is_proxy(self) -> bool:
        """Plain proxy tuning: generated by fused_proxy_generate, as before programs."""
        return self.name == "proxy_tuning"

    def build(self, alpha=None):
        """The :class:`proxykern.programs.LogitProgram` (``alpha``: a number or per-row
        tensor, for the programs that take one)."""
        from .. import programs

        p = self.params
        if self.name == "proxy_tuning":
            return programs.proxy_tuning(alpha)
        if self.name == "dexperts":
            return programs.dexperts(alpha, base_top_p=p["base_top_p"])
        if self.name == "contrastive":
            return programs.contrastive(p["beta"], plausibility=p["plausibility"])
        if self.name == "contrastive_li":
            return programs.contrastive(variant="li", plausibility=p["plausibility"])
        return programs.ensemble(dict(p["weights"]))


def _pairs(flag: str, entries, what: str) -> list:
    """[(NAME, VALUE text)] of repeated ``flag NAME=VALUE`` entries (UsageError if malformed)."""
    out = []
    for entry in entries or ():
        name, eq, value = entry.partition("=")
        if not eq or not _ROLE_NAME.fullmatch(name) or not value:
            raise UsageError(f"{flag} {entry!r}: expected NAME={what} (NAME: letters, digits, "
                             f"'_', '-', '.')")
        out.append((name, value))
    return out


def resolve_program(args) -> ProgramSpec:
    """Check ``--program`` against its roles and parameter flags; no file is read.

    Raises :class:`UsageError` (exit 2) naming the flag for a parameter the program does
    not take, a malformed ``NAME=PATH`` / ``NAME=W``, a role the program does not have,
    one given twice or missing and ``--chat-expert`` without a role expert; fills in the
    defaults (``args.alpha``: 0.0, unused, for programs without alpha).
    """
    name = args.program
    roles, takes = PROGRAMS[name]
    role_entries = _pairs("--role", args.role, "PATH")
    weight_entries = _pairs("--weight", args.weight, "W")
    for attr, flag in PROGRAM_PARAMS.items():
        if attr not in takes and getattr(args, attr) is not None:
            own = ", ".join(PROGRAM_PARAMS[a] for a in takes)
            raise UsageError(f"{flag} does not apply to --program {name} (it takes {own})")
    params = {attr: getattr(args, attr) if getattr(args, attr) is not None
              else PROGRAM_DEFAULTS[(name, attr)]
              for attr in takes if attr not in ("alpha", "weight")}
    if roles is None:  # ensemble: the roles are the --weight names
        weights = {}
        for role, text in weight_entries:
            if role in weights:
                raise UsageError(f"--weight {role}=...: the role {role!r} is given a weight twice")
            try:
                weights[role] = float(text)
            except ValueError:
                raise UsageError(f"--weight {role}={text}: expected NAME=W with W a number") \
                    from None
        from ..programs import MAX_ROLES, MIN_ROLES
        if not MIN_ROLES <= len(weights) <= MAX_ROLES:
            raise UsageError(f"--weight: --program ensemble needs {MIN_ROLES} to {MAX_ROLES} "
                             f"roles (--weight NAME=W each), got {len(weights)}")
        roles, params["weights"] = tuple(weights), weights
    listed = ", ".join(roles)
    paths = {}
    given = [(flag, role, getattr(args, attr), f"{flag} {getattr(args, attr)}")
             for attr, flag, role in ROLE_FLAGS if getattr(args, attr) is not None]
    given += [("--role " + role, role, path, f"--role {role}={path}")
              for role, path in role_entries]
    for flag, role, path, label in given:
        shown = flag if flag.startswith("--role") else f"{flag} (the role {role})"
        if role not in roles:
            raise UsageError(f"{shown}: --program {name} has no role {role!r} (its roles: "
                             f"{listed})")
        if role in paths:
            raise UsageError(f"{shown}: the role {role!r} is given twice (also by "
                             f"{paths[role][0]})")
        paths[role] = (flag, path, label)
    missing = [r for r in roles if r not in paths]
    if missing:
        role = missing[0]
        how = dict((r, f) for _a, f, r in ROLE_FLAGS).get(role)
        how = f"{how} PATH or --role {role}=PATH" if how else f"--role {role}=PATH"
        raise UsageError(f"--program {name} needs a model for its role {role!r}: give {how} "
                         f"(its roles: {listed})")
    if args.chat_expert and "expert" not in roles:
        raise UsageError(f"--chat-expert: --program {name} has no role 'expert' (its roles: "
                         f"{listed})")
    if "alpha" in takes:
        if args.alpha is None:
            args.alpha = PROGRAM_DEFAULTS[(name, "alpha")]
    else:
        args.alpha = 0.0  # a placeholder the sampling checks read; the program takes none
    return ProgramSpec(name, roles, paths, params)


def _check_program_values(spec: ProgramSpec, alpha) -> None:
    """Build the program once, so a bad --beta, --plausibility, --base-top-p or --weight is
    refused (exit 1, as the sampling flags) naming its flag."""
    try:
        spec.build(alpha)
    except (TypeError, ValueError) as exc:
        message = str(exc)
        for attr, flag in (("base_top_p", "--base-top-p"), ("beta", "--beta"),
                           ("plausibility", "--plausibility"), ("alpha", "--alpha")):
            if message.startswith(attr + " "):
                raise ValueError(flag + message[len(attr):]) from None
        match = re.match(r"weights\['(.*?)'\] (.*)", message)
        if match:
            raise ValueError(f"--weight {match.group(1)} {match.group(2)}") from None
        raise ValueError(f"--program {spec.name}: {message}") from None


# --------------------------------------------------------------------------- flags

def _check_count(flag: str, value: int, minimum: int, maximum: int = INT64_MAX) -> None:
    if not minimum <= value <= maximum:
        top = "2**63 - 1" if maximum == INT64_MAX else str(maximum)
        raise ValueError(f"{flag} must be an int in [{minimum}, {top}], got {value}")


def check_flags(args):
    """Check every flag before any file is read or model loaded; returns the device.

    Sampling values go through the op's own rules
    (:func:`proxykern.ops.check_sampling_arg`: numbers beyond float32 / int64 are
    refused), named as flags; file-mode flags are refused in prompt mode. The program
    flags come first (:func:`resolve_program`: ``args.spec``; a misuse is a
    :class:`UsageError`, exit 2), then the program's parameter values.
    """
    from ..generation_args import MAX_ROWS
    from .jsonl_generate import ROW_FIELDS
    from ..loading import resolve_device, resolve_model_path
    from ..ops import check_sampling_arg

    args.spec = spec = resolve_program(args)
    if (args.input is None) != (args.output is None):
        raise ValueError("--input and --output go together (file mode)")
    if args.input is None:
        given = [flag for attr, flag in FILE_MODE_FLAGS
                 if getattr(args, attr) is not None and getattr(args, attr) is not False]
        if given:
            raise ValueError(f"{given[0]} applies to file mode (--input/--output) only")
        try:  # a lone surrogate (undecodable bytes in argv) cannot be tokenized
            args.prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("--prompt is not valid UTF-8 text") from None
    else:
        if args.batch_size is None:
            args.batch_size = DEFAULT_BATCH_SIZE
        _check_count("--batch-size", args.batch_size, 1)
    _check_count("--max-new-tokens", args.max_new_tokens, 0)
    # the rows one call returns (generation_args.MAX_ROWS), refused before any model loads
    _check_count("--num-return-sequences", args.num_return_sequences, 1, MAX_ROWS)
    _check_count("--num-draft-tokens", args.num_draft_tokens, 0)
    for name in ROW_FIELDS:
        try:
            check_sampling_arg(name, getattr(args, name), 1)
        except (TypeError, ValueError) as exc:
            message, flag = str(exc), "--" + name.replace("_", "-")
            raise ValueError(flag + message[len(name):] if message.startswith(name)
                             else f"{flag}: {message}") from None
    if not spec.is_proxy:
        _check_program_values(spec, args.alpha if spec.takes_alpha else None)
    for flag, path, _label in spec.paths.values():
        resolve_model_path(flag, path)  # a local-looking path that is not there
    return resolve_device("--device", args.device)


# --------------------------------------------------------------------------- models

@dataclass
class Session:
    """The loaded models and what generation needs besides the prompts."""
    models: tuple          # in role order: (base, expert, anti_expert) for proxy tuning
    names: tuple           # how messages name them: ("--base PATH", ...)
    tokenizer: object      # the first role's
    encode_expert: object  # record -> the expert's token ids, or None (it reads the prompt)
    eos: list
    pad: int
    device: object
    roles: tuple = ("base", "expert", "anti_expert")
    spec: object = None    # the ProgramSpec; None or is_proxy: fused_proxy_generate
    expert_index: int | None = 1  # the role that reads its own prompt, if any

    @property
    def program(self):
        """Whether generation goes through program_generate (not plain proxy tuning)."""
        return self.spec is not None and not self.spec.is_proxy


def _load(args, device) -> Session:
    """Load the tokenizer(s) and each role's model; equal paths share one model."""
    from ..generation_args import shared_vocab_size
    from ..loading import eos_token_ids, load_causal_lm, load_tokenizer, resolve_dtype

    spec = getattr(args, "spec", None) or resolve_program(args)
    dtype = resolve_dtype("--dtype", args.dtype, device)
    loaded = {}

    def model(flag, path):
        if path not in loaded:
            loaded[path] = load_causal_lm(flag, path, dtype, device)
        return loaded[path]

    roles = spec.roles
    first_flag, first_path, _ = spec.paths[roles[0]]
    tokenizer = load_tokenizer(first_flag, first_path)
    expert_tokenizer = load_tokenizer(*spec.paths["expert"][:2]) if args.chat_expert else None
    models = tuple(model(*spec.paths[r][:2]) for r in roles)
    expert_index = roles.index("expert") if "expert" in roles else None
    encode_expert = _expert_encoder(args, tokenizer, expert_tokenizer, spec)
    first = models[0]
    # A chat expert ends its turn with its own EOS.
    eos = (eos_token_ids(first, models[expert_index]) if args.chat_expert
           else eos_token_ids(first))
    pad = first.generation_config.pad_token_id
    if pad is None:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    # one vocabulary: refused now, not at the first batch
    if spec.is_proxy:
        shared_vocab_size(*models)
    else:
        from ..generation_args import program_vocab_plan
        program_vocab_plan(spec.build(args.alpha if spec.takes_alpha else None),
                           dict(zip(roles, models)), pad)
    names = tuple(spec.paths[r][2] for r in roles)
    return Session(models, names, tokenizer, encode_expert, eos, pad, device, roles, spec,
                   expert_index)


def _expert_encoder(args, tokenizer, expert_tokenizer, spec=None):
    """prompt record -> the expert's token ids (its own prompt or the chat template), or
    None when the expert reads the base prompt."""
    if args.chat_expert and not getattr(expert_tokenizer, "chat_template", None):
        path = spec.paths["expert"][1] if spec is not None else args.expert
        raise ValueError(f"--chat-expert: the tokenizer of {path!r} has no chat template")

    def encode(record: dict) -> list | None:
        if "expert_prompt" in record:
            return (expert_tokenizer or tokenizer)(record["expert_prompt"])["input_ids"]
        if not args.chat_expert:
            return None  # the expert reads the base prompt
        text = expert_tokenizer.apply_chat_template(
            [{"role": "user", "content": record["prompt"]}], tokenize=False,
            add_generation_prompt=True)
        return expert_tokenizer(text, add_special_tokens=False)["input_ids"]
    return encode


# --------------------------------------------------------------------------- generate

def _generate_prompt(args, session: Session) -> int:
    """Prompt mode: check the prompt against the models, then stream its text to stdout."""
    from transformers import TextStreamer

    from ..generate import fused_proxy_generate
    from .jsonl_generate import check_prompt
    from ..engine.runner import left_pad

    tokenizer, device, pad, n = session.tokenizer, session.device, session.pad, \
        args.num_return_sequences
    row = tokenizer(args.prompt)["input_ids"]
    e_row = session.encode_expert({"prompt": args.prompt})
    check_prompt(session.models, session.names, row, e_row, args.max_new_tokens,
                 ("--prompt", "the expert's chat prompt"), expert_index=session.expert_index)
    ids, mask = left_pad([row], pad)
    e_ids, e_mask = left_pad([e_row], pad) if e_row is not None else (None, None)
    # One sequence streams as it is generated; n > 1 are printed one after another.
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) \
        if n == 1 else None
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, seed=args.seed,
                    eos_token_id=session.eos or None, pad_token_id=pad, streamer=streamer,
                    backend=args.backend, num_return_sequences=n)
    if session.program:  # another program: program_generate, the expert on its own prompt
        from ..program_generate import program_generate
        spec = session.spec
        own = {"expert": e_ids.to(device)} if e_ids is not None else None
        own_mask = {"expert": e_mask.to(device)} if e_ids is not None else None
        out = program_generate(
            spec.build(args.alpha if spec.takes_alpha else None),
            dict(zip(session.roles, session.models)), ids.to(device), mask.to(device),
            role_input_ids=own, role_attention_mask=own_mask,
            num_draft_tokens=args.num_draft_tokens, **sampling)
    else:
        out = fused_proxy_generate(
            *session.models, ids.to(device), mask.to(device), alpha=args.alpha,
            expert_input_ids=e_ids.to(device) if e_ids is not None else None,
            expert_attention_mask=e_mask.to(device) if e_mask is not None else None,
            num_draft_tokens=args.num_draft_tokens, **sampling)
    if streamer is None:
        for j in range(n):
            text = tokenizer.decode(out.tokens[j, :int(out.lengths[j])].tolist(),
                                    skip_special_tokens=True)
            print(f"--- sequence {j + 1} of {n} ---\n{text}", flush=True)
    return 0


def generate_main(args) -> int:
    """``proxykern generate``: check the flags, then the prompt or the file mode."""
    device = check_flags(args)
    if args.input is not None:
        from .jsonl_generate import generate_file
        generate_file(args, lambda: _load(args, device))
        return 0
    return _generate_prompt(args, _load(args, device))


# --------------------------------------------------------------------------- signals

class Terminated(BaseException):
    """SIGTERM or SIGHUP (``signum``), raised in the main thread like KeyboardInterrupt for
    SIGINT, so that the same cleanup (the temporary output file) runs; not an Exception,
    so no library handler swallows it."""

    def __init__(self, signum=signal.SIGTERM):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


#: Signals whose default action would end the process without cleanup (the temporary
#: output file would stay): each raises :class:`Terminated`, then exits 128 + its number
#: with one line. (SIGINT is KeyboardInterrupt; SIGPIPE is BrokenPipeError; SIGQUIT
#: keeps its core dump; SIGKILL cannot be caught.)
CAUGHT_SIGNALS = {signal.SIGTERM: (EXIT_SIGTERM, "terminated by SIGTERM"),
                  signal.SIGHUP: (EXIT_SIGHUP, "hung up (SIGHUP)"),
                  **{s: (128 + s, f"terminated by {s.name}") for s in (
                      signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGXCPU)}}


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM, SIGHUP and the rest of :data:`CAUGHT_SIGNALS` raise :class:`Terminated`
    inside the block (each unless it is
    ignored, as by a parent that asked for that -- e.g. ``nohup`` ignores SIGHUP -- or
    the block runs off the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}
    try:
        for signum in CAUGHT_SIGNALS:
            if signal.getsignal(signum) != signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _raise_terminated)
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _stop(parser, status: int, message: str, signalled: bool = False):
    """Exit with ``status`` and one line on stderr (a signal: on a line of its own, as a
    bar or streamed text may have left the terminal's line unfinished)."""
    with contextlib.suppress(OSError, ValueError):
        sys.stdout.flush()
    fresh = "\n" if signalled and sys.stderr.isatty() else ""
    parser.exit(status, f"{fresh}proxykern: {message}\n")


def _silence_stdout() -> None:
    """stdout's reader is gone: point it at /dev/null so the exit's flush stays quiet."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no file descriptor (a captured stdout)
        pass


BENCH_USAGE = """usage: proxykern bench {kernel,generate} [options]

  kernel     the fused op against the naive sampling step (the default)
  generate   naive_proxy_generate against the engine, eager and CUDA graphs

'proxykern bench kernel --help' and 'proxykern bench generate --help' list the options.
"""


def _bench(argv: list) -> int:
    if argv[:1] == ["generate"]:
        from . import bench_generate
        return bench_generate.main(argv[1:]) or 0
    if argv[:1] in (["-h"], ["--help"]):
        print(BENCH_USAGE, end="")
        return 0
    from . import bench
    return bench.main(argv) or 0


def main(argv=None) -> int:
    """Entry point of the ``proxykern`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if argv and argv[0] == "bench":  # benchmark code loads only when asked for
        return _bench(argv[1:])
    if argv and argv[0] == "demo":
        from . import demo
        return demo.main(argv[1:]) or 0
    args = parser.parse_args(argv)
    try:
        with _sigterm_raises():
            return generate_main(args)
    except KeyboardInterrupt:
        _stop(parser, EXIT_SIGINT, "interrupted by SIGINT", signalled=True)
    except Terminated as stop:
        status, message = CAUGHT_SIGNALS.get(stop.signum, CAUGHT_SIGNALS[signal.SIGTERM])
        _stop(parser, status, message, signalled=True)
    except BrokenPipeError:  # --output - | head: the reader has what it wanted
        _silence_stdout()
        return EXIT_SIGPIPE
    except UsageError as exc:  # a program misuse: bad usage, before anything loaded
        _stop(parser, 2, f"error: {exc}")
    except (ValueError, OSError) as exc:  # bad arguments, lines, models that cannot load
        _stop(parser, 1, f"error: {exc}")


if __name__ == "__main__":
    sys.exit(main())
