"""``proxykern generate --input prompts.jsonl --output results.jsonl``: batch generation from a file.

Input: one JSON object per line (blank lines are ignored) with a ``"prompt"``
string and optionally

* ``"expert_prompt"``: the expert's own prompt text (used as is; otherwise the
  expert reads ``"prompt"``, in its chat template with ``--chat-expert``);
* per-row sampling fields ``"alpha"``, ``"temperature"``, ``"top_k"``,
  ``"top_p"``, ``"min_p"``, ``"seed"``, ``"max_new_tokens"`` (else the flags').

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

Prompts are sorted by length and generated ``--batch-size`` at a time (less
padding). A malformed line stops the run with its line number before anything
is generated (``--skip-bad-lines``: reported on stderr and left out). The output
goes to a temporary file next to ``--output``, renamed at the end: a failed run
leaves no half-written file.
"""
from __future__ import annotations

import json
import numbers
import os
import sys
import tempfile
import time

import torch

from .ops import PARAM_DTYPES, check_sampling_arg
from .reference import as_int64, row_seeds
from .runner import left_pad

#: Per-row sampling fields a line may carry: the op's parameters less the step.
ROW_FIELDS = tuple(name for name in PARAM_DTYPES if name != "step")


class BadLine(ValueError):
    """A line of the input file that cannot be used; the message starts with its number."""


def parse_line(text: str, number: int, defaults: dict) -> dict | None:
    """The record of one input line (None for a blank line); raises :class:`BadLine`."""
    if not text.strip():
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadLine(f"line {number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise BadLine(f"line {number}: expected a JSON object, got {type(obj).__name__}")
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
    if "seed" not in obj:
        params["seed"] = int(row_seeds(defaults["seed"], torch.tensor([number - 1])))
    else:
        params["seed"] = as_int64(params["seed"])
    n_new = obj.get("max_new_tokens", defaults["max_new_tokens"])
    if isinstance(n_new, bool) or not isinstance(n_new, numbers.Integral) or n_new < 0:
        raise BadLine(f"line {number}: max_new_tokens must be an int >= 0, got {n_new!r}")
    return {"line": number, "obj": obj, "params": params, "max_new_tokens": int(n_new)}


def read_records(path: str, defaults: dict, skip_bad_lines: bool) -> list[dict]:
    """Every usable record of ``path`` in order; a bad line raises (or is reported and skipped)."""
    records = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            try:
                record = parse_line(text, number, defaults)
            except BadLine as exc:
                if not skip_bad_lines:
                    raise
                print(f"proxykern: skipping {exc}", file=sys.stderr)
                continue
            if record is not None:
                records.append(record)
    return records


def _batches(records: list[dict], lengths: list[int], batch_size: int):
    order = sorted(range(len(records)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


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


def generate_file(args, models, tokenizer, encode_expert, eos_ids, pad_id, device) -> int:
    """Run the file mode of ``proxykern generate``; returns the number of lines written."""
    from tqdm.auto import tqdm

    from .generate import fused_proxy_generate

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.num_return_sequences < 1:
        raise ValueError(f"--num-return-sequences must be >= 1, got {args.num_return_sequences}")
    defaults = {name: getattr(args, name) for name in ROW_FIELDS}
    defaults["max_new_tokens"] = args.max_new_tokens
    records = read_records(args.input, defaults, args.skip_bad_lines)
    n = args.num_return_sequences

    base_rows = [tokenizer(r["obj"]["prompt"])["input_ids"] for r in records]
    expert_rows = [encode_expert(r["obj"]) for r in records]
    results: list = [None] * len(records)

    out_dir = os.path.dirname(os.path.abspath(args.output))
    fd, tmp_path = tempfile.mkstemp(prefix=".proxykern-", suffix=".jsonl.tmp", dir=out_dir)
    os.close(fd)
    try:
        bar = tqdm(total=len(records), unit="prompt", file=sys.stderr, dynamic_ncols=True,
                   disable=None)
        new_tokens, started = 0, time.perf_counter()
        for index in _batches(records, [len(r) for r in base_rows], args.batch_size):
            ids, mask = left_pad([base_rows[i] for i in index], pad_id)
            own = [expert_rows[i] for i in index]
            e_ids = e_mask = None
            if any(row is not None for row in own):  # else the expert reads the base prompt
                e_ids, e_mask = (t.to(device) for t in left_pad(
                    [row if row is not None else base_rows[i] for row, i in zip(own, index)],
                    pad_id))
            params = {name: torch.tensor([records[i]["params"][name] for i in index],
                                         dtype=PARAM_DTYPES[name], device=device)
                      for name in ROW_FIELDS}
            limits = [records[i]["max_new_tokens"] for i in index]
            out = fused_proxy_generate(
                *models, ids.to(device), mask.to(device), max_new_tokens=max(limits),
                **params, eos_token_id=eos_ids or None, pad_token_id=pad_id,
                expert_input_ids=e_ids, expert_attention_mask=e_mask,
                return_logprobs=args.logprobs, num_return_sequences=n, backend=args.backend,
                num_draft_tokens=args.num_draft_tokens)
            tokens, lengths = out.tokens.cpu(), out.lengths.cpu()
            logprobs = out.logprobs.cpu() if out.logprobs is not None else None
            for k, i in enumerate(index):
                rows = [_row_result(tokens[k * n + j], lengths[k * n + j], limits[k],
                                    logprobs[k * n + j] if logprobs is not None else None,
                                    eos_ids, tokenizer) for j in range(n)]
                new_tokens += sum(r["num_tokens"] for r in rows)
                results[i] = rows[0] if n == 1 else {
                    ("completions" if key == "completion" else key): [r[key] for r in rows]
                    for key in rows[0]}
            bar.update(len(index))
            bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - started, 1e-9):.1f} tok/s")
        bar.close()
        with open(tmp_path, "w", encoding="utf-8") as f:
            for record, result in zip(records, results):
                f.write(json.dumps({**record["obj"], **result}, ensure_ascii=False) + "\n")
        os.replace(tmp_path, args.output)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return len(records)
