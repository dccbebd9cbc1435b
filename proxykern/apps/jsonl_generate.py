"""``proxykern generate --input prompts.jsonl --output results.jsonl``: batch generation from a file.

Input: one JSON object per line (UTF-8; blank lines are ignored) with a
``"prompt"`` string and optionally

* ``"expert_prompt"``: the expert's own prompt text (used as is; otherwise the
  expert reads ``"prompt"``, in its chat template with ``--chat-expert``);
* per-row sampling fields ``"alpha"``, ``"temperature"``, ``"top_k"``,
  ``"top_p"``, ``"min_p"``, ``"seed"``, ``"max_new_tokens"`` (else the flags').

With ``--program`` (:mod:`proxykern.apps.cli`) other than proxy tuning the lines go
through :func:`proxykern.program_generate`: ``"expert_prompt"`` is the role expert's
prompt (a bad line where the program has no role expert), ``"alpha"`` is the per-row
alpha of dexperts (a bad line for contrastive, contrastive_li and ensemble, which take
no alpha), the other sampling fields work as for proxy tuning.

Output: one line per input line, in input order, each input object with all its
fields plus ``"completion"`` (the new text, special tokens skipped),
``"num_tokens"`` (new tokens, EOS included) and ``"finish_reason"`` (``"stop"``
at an EOS, else ``"length"``); with ``--logprobs`` also ``"logprobs"`` (the
op's log-probability of each new token). With ``--num-return-sequences n > 1``
these four become lists of n entries (``"completions"``, ...).

Seeds: a line without ``"seed"`` gets ``row_seeds(--seed, line number - 1)``
(:func:`proxykern.reference.row_seeds`), and with per-row seeds a row's tokens do
not depend on its batch, so the output does not depend on ``--batch-size`` or on
the order of the other lines.

Every limit is checked before anything is generated: ``--output`` is checked
(and its temporary file created) and every line parsed before the models load;
then every line is tokenized and checked against the models (no tokens, token
ids beyond an embedding, prompt + max_new_tokens beyond a model's positions).
A bad line stops the run naming it (``--skip-bad-lines``: reported on stderr and
left out). Prompts are then sorted by length and generated ``--batch-size`` at a
time (a batch is cut short where its longest prompt and largest max_new_tokens
together would exceed a model's positions).

Lines are written in input order as soon as every earlier line is done: to a
temporary file beside ``--output`` (its real path: a symlink is written through),
renamed onto it at the end, so a failed or interrupted run leaves no file behind
and an earlier ``--output`` untouched; or, with ``--output -``, to stdout.
"""
from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import stat
import sys
import tempfile
import time

import torch

from ..generation_args import MAX_ROWS, check_positions
from ..models import input_width
from ..ops import INT64_MAX, PARAM_DTYPES, check_sampling_arg
from ..reference import as_int64, row_seeds
from ..engine.runner import left_pad

#: Per-row sampling fields a line may carry: the op's parameters less the step.
ROW_FIELDS = tuple(name for name in PARAM_DTYPES if name != "step")
DEFAULT_BATCH_SIZE = 8
#: The longest input line read (bytes): a longer one (or an endless stream such as
#: /dev/zero) stops the run instead of filling memory.
MAX_LINE_BYTES = 64 * 2 ** 20


#: The fields each output line gets (an input line holding one would lose it: refused).
OUTPUT_FIELDS = ("completion", "completions", "num_tokens", "finish_reason", "logprobs")


def _no_duplicate_keys(pairs):
    """``json`` object hook: a key given twice would silently lose its first value."""
    obj = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"the key {key!r} appears twice in one object")
        obj[key] = value
    return obj


def _non_finite(value) -> bool:
    """Whether a parsed JSON value holds NaN or an infinity anywhere (Python's json reads
    NaN / Infinity literals and turns 1e400 into inf; written back they are not JSON)."""
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    if isinstance(value, list):
        return any(_non_finite(v) for v in value)
    return False


class BadLine(ValueError):
    """A line of the input file that cannot be used; the message starts with its number."""


# --------------------------------------------------------------------------- output

class Output:
    """Where the output lines go: ``--output -`` is stdout, anything else a file.

    A file target is checked when opened, before any work: not a folder, not a
    device or pipe, writable, its folder present. Lines go to a temporary file
    in the folder of the target's real path (a symlink is written through: the
    link stays and its target gets the lines); :meth:`commit` gives it the mode
    of the file it replaces (a new file: 0666 less the umask) and renames it onto
    the target. Leaving the ``with`` block without a commit (an error, a signal)
    removes the temporary file.
    """

    def __init__(self, path: str):
        self.path, self.tmp_path, self._file = path, None, None
        if path == "-":
            self.name = "standard output"
            return
        self.name = path
        real = os.path.realpath(path)
        folder = os.path.dirname(real)
        where = f"--output {path}" + (f" (a link to {real})" if os.path.islink(path) else "")
        if os.path.isdir(real):
            raise ValueError(f"{where} is a folder: name a file (or - for standard output)")
        if not os.path.isdir(folder):
            raise ValueError(f"{where}: the folder {folder} does not exist")
        if os.path.exists(real):
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"{where} is not a regular file (use --output - for "
                                 f"standard output)")
            if not os.access(real, os.W_OK):
                raise ValueError(f"{where} is not writable")
            self.mode = stat.S_IMODE(st.st_mode)  # a replaced file keeps its mode
        else:
            umask = os.umask(0)
            os.umask(umask)
            self.mode = 0o666 & ~umask  # what open() would give a new file
        self.real = real
        try:
            fd, self.tmp_path = tempfile.mkstemp(prefix=".proxykern-", suffix=".jsonl.tmp",
                                                 dir=folder)
        except OSError as exc:  # name the folder, not the temporary file
            raise ValueError(f"{where}: cannot write in {folder} ({exc.strerror})") from None
        self._file = os.fdopen(fd, "w", encoding="utf-8")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        if self.tmp_path is not None:  # not committed: a failure or a signal
            self._discard()
        return False

    def _discard(self) -> None:
        """Remove the temporary file, even when closing it fails (a full disk fails the
        flush of what is still buffered)."""
        file, self._file = self._file, None
        try:
            if file is not None:
                with contextlib.suppress(OSError):
                    file.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.tmp_path)
            self.tmp_path = None

    def write(self, line: str) -> None:
        if self._file is None:
            sys.stdout.write(line)
            sys.stdout.flush()  # a reader of the stream gets each line when it is done
        else:
            try:
                self._file.write(line)
            except OSError as exc:  # disk full, quota, I/O error: the temporary file goes
                raise self._write_error(exc) from None

    def _write_error(self, exc: OSError) -> ValueError:
        return ValueError(f"--output {self.path}: cannot write it ({exc.strerror or exc})")

    def commit(self) -> None:
        """The lines written become the target (a no-op for stdout)."""
        if self._file is None:
            return
        try:  # a write error (disk full, ...) here leaves the target as it was
            self._file.flush()
            os.fsync(self._file.fileno())
            os.fchmod(self._file.fileno(), self.mode)
            self._file.close()
            self._file = None
            os.replace(self.tmp_path, self.real)
        except OSError as exc:
            self._discard()
            raise self._write_error(exc) from None
        self.tmp_path = None


class _InOrder:
    """Writes results given in any order to ``output`` in input order, each as soon as
    every earlier one is done."""

    def __init__(self, records: list, output: Output):
        self.records, self.output, self.done, self.next = records, output, {}, 0

    def put(self, index: int, result: dict) -> None:
        self.done[index] = result
        while self.next in self.done:
            result = self.done.pop(self.next)
            obj = self.records[self.next]["obj"]
            self.output.write(json.dumps({**obj, **result}, ensure_ascii=False) + "\n")
            self.next += 1


# --------------------------------------------------------------------------- input

def parse_line(text: str, number: int, defaults: dict,
               refused: dict | None = None) -> dict | None:
    """The record of one input line (None for a blank line); raises :class:`BadLine`.

    ``refused``: field -> why this run cannot use it (e.g. ``"alpha"`` under a program
    without alpha): a line holding it is bad."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise BadLine(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an int of too many digits, deep nesting
        raise BadLine(f"line {number}: not usable JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line {number}: expected a JSON object, got {type(obj).__name__}")
    try:  # a lone surrogate (\ud800) parses but cannot be tokenized or written as UTF-8
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadLine(f"line {number}: holds text that is not valid Unicode "
                      f"({exc.object[exc.start:exc.end]!r}, a lone surrogate)") from None
    taken = [key for key in OUTPUT_FIELDS if key in obj]
    if taken:
        raise BadLine(f"line {number}: has a field {taken[0]!r}, which the output line "
                      f"writes (its value would be lost): rename it")
    for key, why in (refused or {}).items():
        if key in obj:
            raise BadLine(f"line {number}: field {key!r}: {why}")
    if not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        raise BadLine(f"line {number}: needs a non-empty string field \"prompt\"")
    if "expert_prompt" in obj and (not isinstance(obj["expert_prompt"], str)
                                   or not obj["expert_prompt"]):
        raise BadLine(f"line {number}: \"expert_prompt\" must be a non-empty string")
    params = {}
    for name in ROW_FIELDS:
        value = obj.get(name, defaults[name])
        try:
            params[name] = check_sampling_arg(name, value, 1)
        except (TypeError, ValueError) as exc:
            raise BadLine(f"line {number}: {exc}") from None
    odd = [key for key, value in obj.items() if _non_finite(value)]
    if odd:  # a sampling field was refused above by its own rule
        raise BadLine(f"line {number}: field {odd[0]!r} holds NaN or an infinity (a number "
                      f"beyond float64), which the output line could not write as JSON")
    if "seed" not in obj:
        params["seed"] = int(row_seeds(defaults["seed"], torch.tensor([number - 1])))
    else:
        params["seed"] = as_int64(params["seed"])
    n_new = obj.get("max_new_tokens", defaults["max_new_tokens"])
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral) \
            or not 0 <= n_new <= INT64_MAX:
        raise BadLine(f"line {number}: max_new_tokens must be an int in [0, 2**63 - 1], "
                      f"got {n_new!r}")
    return {"line": number, "obj": obj, "params": params, "max_new_tokens": int(n_new)}


def _report(exc: BadLine, path: str, skip_bad_lines: bool) -> None:
    """Raise the bad line naming the file, or (``--skip-bad-lines``) report it on stderr."""
    if not skip_bad_lines:
        raise BadLine(f"--input {path}: {exc}") from None
    print(f"proxykern: skipping --input {path}: {exc}", file=sys.stderr)


def _lines(path: str):
    """(number, text) of each line of ``path``; a line that is not UTF-8 is a BadLine."""
    try:
        f = open(path, "rb")
    except OSError as exc:
        raise ValueError(f"--input {path}: cannot read it ({exc.strerror})") from None
    with f:
        number = 0
        while True:  # readline with a cap: /dev/zero or a huge line never fills memory
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            number += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                raise BadLine(f"--input {path}: line {number} is longer than "
                              f"{MAX_LINE_BYTES // 2 ** 20} MiB")
            try:  # a UTF-8 byte-order mark at the start is not part of the JSON
                yield number, raw.decode("utf-8-sig" if number == 1 else "utf-8")
            except UnicodeDecodeError as exc:
                yield number, BadLine(f"line {number}: not valid UTF-8 (byte "
                                      f"0x{raw[exc.start]:02x} at byte {exc.start + 1})")


def read_records(path: str, defaults: dict, skip_bad_lines: bool,
                 refused: dict | None = None) -> list[dict]:
    """Every usable record of ``path`` in order; a bad line raises (or is reported and
    skipped); ``refused`` as :func:`parse_line`'s."""
    records = []
    for number, text in _lines(path):
        try:
            if isinstance(text, BadLine):
                raise text
            record = parse_line(text, number, defaults, refused)
        except BadLine as exc:
            _report(exc, path, skip_bad_lines)
            continue
        if record is not None:
            records.append(record)
    return records


# --------------------------------------------------------------------------- checks

def _lengths(models, base_len: int, expert_len: int | None, expert_index: int | None):
    """(name index, model, prompt length) of each model: the expert reads its own prompt
    where it has one."""
    return [(k, m, expert_len if k == expert_index and expert_len is not None else base_len)
            for k, m in enumerate(models)]


def check_prompt(models, names, base_ids: list, expert_ids: list | None, max_new_tokens: int,
                 fields=("prompt", "expert prompt"), expert_index: int | None = 1) -> None:
    """Refuse a prompt that cannot be generated from, before any work (``ValueError``).

    ``models``: the models in role order ((base, expert, anti_expert) for proxy
    tuning); ``names``: how the messages name them (e.g. ``--base PATH``);
    ``expert_ids``: the own tokens of the model at ``expert_index`` (the role expert),
    or None when it reads ``base_ids``; ``fields``: how the messages name the two
    prompts. The rules: some tokens; ids within each reader's embedding; positions
    within each model's limit (:func:`proxykern.generation_args.check_positions`).
    """
    own = expert_ids is not None and expert_index is not None
    everyone = tuple(range(len(models)))
    for ids, field, readers in (
            (base_ids, fields[0], tuple(k for k in everyone if not own or k != expert_index)),
            (expert_ids if own else None, fields[1], (expert_index,))):
        if ids is None:
            continue
        if not ids:
            raise ValueError(f"{field} tokenizes to no tokens")
        for k in readers:
            width = input_width(models[k])
            if width is not None and not 0 <= min(ids) <= max(ids) < width:
                raise ValueError(f"{field} holds token ids in [{min(ids)}, {max(ids)}] but "
                                 f"{names[k]} has {width} embedding rows")
    check_positions([(names[k], m, n) for k, m, n in _lengths(
        models, len(base_ids), len(expert_ids) if own else None, expert_index)], max_new_tokens)


def _tokenize(records, session, skip_bad_lines: bool, path: str):
    """Tokenize every record and check it against the models; returns the records kept
    and their (base ids, expert ids or None) rows."""
    kept, rows = [], []
    for record in records:
        number = record["line"]
        try:
            base_ids = session.tokenizer(record["obj"]["prompt"])["input_ids"]
            expert_ids = session.encode_expert(record["obj"])
            fields = ('"prompt"', '"expert_prompt"' if "expert_prompt" in record["obj"]
                      else "the expert's chat prompt")
            check_prompt(session.models, session.names, base_ids, expert_ids,
                         record["max_new_tokens"], fields,
                         expert_index=getattr(session, "expert_index", 1))
        except ValueError as exc:
            _report(BadLine(f"line {number}: {exc}"), path, skip_bad_lines)
            continue
        kept.append(record)
        rows.append((base_ids, expert_ids))
    return kept, rows


def _fits(session, rows, limits) -> bool:
    """Whether one batch of these rows stays within every model's positions (the batch
    runs to its largest max_new_tokens)."""
    base_len = max(len(b) for b, _ in rows)
    e_len = max(len(e if e is not None else b) for b, e in rows)
    try:
        check_positions([(session.names[k], m, n) for k, m, n in _lengths(
            session.models, base_len, e_len, getattr(session, "expert_index", 1))], max(limits))
    except ValueError:
        return False
    return True


def _batches(session, records, rows, batch_size: int, num_return_sequences: int = 1):
    """Index lists of at most ``batch_size`` records, shortest prompts first; a batch is
    closed early where one more record would exceed a model's positions (each record
    fits alone: :func:`check_prompt`)."""
    # a batch returns batch x num_return_sequences rows, at most MAX_ROWS per call
    batch_size = max(1, min(batch_size, MAX_ROWS // num_return_sequences))
    order = sorted(range(len(records)), key=lambda i: len(rows[i][0]))
    batch: list = []
    for i in order:
        grown = batch + [i]
        if batch and (len(grown) > batch_size or not _fits(
                session, [rows[j] for j in grown], [records[j]["max_new_tokens"] for j in grown])):
            yield batch
            grown = [i]
        batch = grown
    if batch:
        yield batch


def _row_result(tokens, length, limit, logprobs, eos_ids, tokenizer) -> dict:
    """One returned row, cut at its own max_new_tokens."""
    n = min(int(length), limit)
    ids = tokens[:n].tolist()
    stopped = n > 0 and ids[-1] in eos_ids
    result = {"completion": tokenizer.decode(ids, skip_special_tokens=True), "num_tokens": n,
              "finish_reason": "stop" if stopped else "length"}
    if logprobs is not None:
        result["logprobs"] = [float(x) for x in logprobs[:n].tolist()]
    return result


# --------------------------------------------------------------------------- the run

def generate_file(args, load) -> int:
    """Run the file mode of ``proxykern generate``; returns the number of lines written.

    ``load()`` loads the models and returns a session with ``models`` (base, expert,
    anti_expert; or a program's models in role order, with ``roles``, ``spec``,
    ``expert_index`` and ``program`` true), ``names`` (how messages name them),
    ``tokenizer``, ``encode_expert`` (record -> the expert's ids or None), ``eos``,
    ``pad`` and ``device``. It runs after
    ``--output`` and ``--input`` are checked, so neither costs a model load to refuse.
    """
    from tqdm.auto import tqdm

    from ..generate import fused_proxy_generate
    from ..program_generate import program_generate

    defaults = {name: getattr(args, name) for name in ROW_FIELDS}
    defaults["max_new_tokens"] = args.max_new_tokens
    n = args.num_return_sequences
    spec = getattr(args, "spec", None)
    refused = {}
    if spec is not None and not spec.takes_alpha:
        refused["alpha"] = f"--program {spec.name} takes no alpha"
    if spec is not None and "expert" not in spec.roles:
        refused["expert_prompt"] = (f"--program {spec.name} has no role 'expert' (its roles: "
                                    f"{', '.join(spec.roles)})")
    with Output(args.output) as output:
        records = read_records(args.input, defaults, args.skip_bad_lines, refused)
        session = load()
        records, rows = _tokenize(records, session, args.skip_bad_lines, args.input)
        writer = _InOrder(records, output)
        print(f"proxykern: generating {len(records)} prompt(s) from {args.input} into "
              f"{output.name}", file=sys.stderr, flush=True)
        device, pad = session.device, session.pad
        with tqdm(total=len(records), unit="prompt", file=sys.stderr, dynamic_ncols=True,
                  disable=None) as bar:
            new_tokens, started = 0, time.perf_counter()
            for index in _batches(session, records, rows, args.batch_size, n):
                ids, mask = left_pad([rows[i][0] for i in index], pad)
                own = [rows[i][1] for i in index]
                e_ids = e_mask = None
                if any(row is not None for row in own):  # else the expert reads the base prompt
                    e_ids, e_mask = (t.to(device) for t in left_pad(
                        [row if row is not None else rows[i][0] for row, i in zip(own, index)],
                        pad))
                params = {name: torch.tensor([records[i]["params"][name] for i in index],
                                             dtype=PARAM_DTYPES[name], device=device)
                          for name in ROW_FIELDS}
                limits = [records[i]["max_new_tokens"] for i in index]
                if getattr(session, "program", False):  # program_generate, per-row alpha
                    alpha = params.pop("alpha")
                    out = program_generate(
                        session.spec.build(alpha if session.spec.takes_alpha else None),
                        dict(zip(session.roles, session.models)), ids.to(device),
                        mask.to(device), max_new_tokens=max(limits), **params,
                        eos_token_id=session.eos or None, pad_token_id=pad,
                        role_input_ids={"expert": e_ids} if e_ids is not None else None,
                        role_attention_mask={"expert": e_mask} if e_ids is not None else None,
                        return_logprobs=args.logprobs, num_return_sequences=n,
                        backend=args.backend, num_draft_tokens=args.num_draft_tokens)
                else:
                    out = fused_proxy_generate(
                        *session.models, ids.to(device), mask.to(device),
                        max_new_tokens=max(limits), **params, eos_token_id=session.eos or None,
                        pad_token_id=pad, expert_input_ids=e_ids, expert_attention_mask=e_mask,
                        return_logprobs=args.logprobs, num_return_sequences=n,
                        backend=args.backend, num_draft_tokens=args.num_draft_tokens)
                tokens, lengths = out.tokens.cpu(), out.lengths.cpu()
                logprobs = out.logprobs.cpu() if out.logprobs is not None else None
                for k, i in enumerate(index):
                    results = [_row_result(tokens[k * n + j], lengths[k * n + j], limits[k],
                                           logprobs[k * n + j] if logprobs is not None else None,
                                           session.eos, session.tokenizer) for j in range(n)]
                    new_tokens += sum(r["num_tokens"] for r in results)
                    writer.put(i, results[0] if n == 1 else {
                        ("completions" if key == "completion" else key): [r[key] for r in results]
                        for key in results[0]})
                bar.update(len(index))
                bar.set_postfix_str(
                    f"{new_tokens / max(time.perf_counter() - started, 1e-9):.1f} tok/s")
        output.commit()
    return len(records)
