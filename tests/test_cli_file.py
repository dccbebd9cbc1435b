"""``proxykern generate`` file mode (--input/--output) on the shipped trio, and live streaming."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from proxykern import fused_proxy_generate
from proxykern.apps import cli
from proxykern.reference import row_seeds
from transformers import AutoTokenizer

TRIO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                    "trio", "models")
QUESTIONS = ["question : where does gus wren live ? answer :",
             "question : what does sami frost do for work ? answer :",
             "question : which animal does gus wren keep ? answer :",
             "question : where does sami frost live ?",
             "question : what does gus wren do for work ? answer :"]


@pytest.fixture(scope="module")
def trio():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(os.path.join(TRIO, "base"))
    models = [AutoModelForCausalLM.from_pretrained(os.path.join(TRIO, n)).eval()
              for n in ("base", "expert", "anti_expert")]
    return tok, models


def _argv(*extra):
    return ["generate", "--base", os.path.join(TRIO, "base"), "--expert",
            os.path.join(TRIO, "expert"), "--anti-expert", os.path.join(TRIO, "anti_expert"),
            "--device", "cpu", "--backend", "cpu", *extra]


def _write(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


def _records():
    return [
        {"prompt": QUESTIONS[0], "id": "a", "meta": {"k": [1, 2]}},
        {"prompt": QUESTIONS[1], "temperature": 0.9, "top_p": 0.9, "seed": 5},
        {"prompt": QUESTIONS[2], "max_new_tokens": 3, "alpha": 0.0},
        {"prompt": QUESTIONS[3], "expert_prompt": QUESTIONS[0], "top_k": 5, "temperature": 1.3},
        {"prompt": QUESTIONS[4], "min_p": 0.2, "temperature": 2.0},
    ]


def _alone(trio, record, number, **flags):
    """What one line should produce: the prompt alone through fused_proxy_generate."""
    tok, (base, expert, anti) = trio
    ids = torch.tensor([tok(record["prompt"])["input_ids"]])
    e_ids = torch.tensor([tok(record["expert_prompt"])["input_ids"]]) \
        if "expert_prompt" in record else None
    seed = record["seed"] if "seed" in record else int(row_seeds(flags.get("seed", 0),
                                                                 torch.tensor([number - 1])))
    limit = record.get("max_new_tokens", flags.get("max_new_tokens", 12))
    out = fused_proxy_generate(
        base, expert, anti, ids, max_new_tokens=limit, alpha=record.get("alpha", 1.0),
        temperature=record.get("temperature", 0.0), top_k=record.get("top_k", 0),
        top_p=record.get("top_p", 1.0), min_p=record.get("min_p", 0.0),
        seed=torch.tensor([seed]), expert_input_ids=e_ids, return_logprobs=True,
        eos_token_id=base.generation_config.eos_token_id,
        pad_token_id=base.generation_config.pad_token_id)
    n = int(out.lengths[0])
    return tok.decode(out.tokens[0, :n].tolist(), skip_special_tokens=True), n, \
        out.logprobs[0, :n].tolist()


def test_file_mode_keeps_fields_order_and_matches_single_prompts(trio, tmp_path):
    records = _records()
    src = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in records[:2]] + [""]
                 + [json.dumps(r) for r in records[2:]])  # a blank line: ignored, still counted
    outputs = {}
    for batch_size in (1, 3):
        dst = str(tmp_path / f"out{batch_size}.jsonl")
        assert cli.main(_argv("--input", src, "--output", dst, "--batch-size", str(batch_size),
                              "--max-new-tokens", "12", "--logprobs")) == 0
        with open(dst) as f:
            outputs[batch_size] = [json.loads(line) for line in f]
    # Per-row seeds: the batching does not change a row (logprobs up to batched-matmul rounding).
    for one, three in zip(outputs[1], outputs[3]):
        assert one.pop("logprobs") == pytest.approx(three.pop("logprobs"), abs=1e-4)
        assert one == three
    outputs[3] = [json.loads(line) for line in open(str(tmp_path / "out3.jsonl"))]
    got = outputs[3]
    assert len(got) == len(records)
    numbers = [1, 2, 4, 5, 6]
    for record, line, number in zip(records, got, numbers):
        assert {k: line[k] for k in record} == record  # every input field kept, in order
        text, n, logprobs = _alone(trio, record, number)
        assert line["completion"] == text and line["num_tokens"] == n
        assert line["finish_reason"] in ("stop", "length")
        assert line["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    assert got[2]["num_tokens"] <= 3
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".proxykern-")]


def test_file_mode_num_return_sequences(tmp_path):
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": q}) for q in QUESTIONS[:2]])
    dst = str(tmp_path / "out.jsonl")
    assert cli.main(_argv("--input", src, "--output", dst, "--num-return-sequences", "3",
                          "--temperature", "1.5", "--max-new-tokens", "8")) == 0
    with open(dst) as f:
        lines = [json.loads(line) for line in f]
    assert [line["prompt"] for line in lines] == QUESTIONS[:2]
    for line in lines:
        assert len(line["completions"]) == 3 and len(line["num_tokens"]) == 3
        assert len(line["finish_reason"]) == 3 and "completion" not in line
        assert len(set(line["completions"])) > 1  # independent samples, not one sample 3 times


def test_bad_line_is_reported_by_number_and_leaves_no_file(tmp_path, capsys):
    lines = [json.dumps({"prompt": QUESTIONS[0]}), json.dumps({"prompt": QUESTIONS[1]}),
             '{"prompt": "unterminated', json.dumps({"prompt": QUESTIONS[2], "top_p": 0})]
    src = _write(tmp_path / "in.jsonl", lines)
    dst = tmp_path / "out.jsonl"
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv("--input", src, "--output", str(dst)))
    assert exc.value.code == 1
    assert "line 3" in capsys.readouterr().err
    assert not dst.exists() and os.listdir(tmp_path) == ["in.jsonl"]
    # --skip-bad-lines: lines 3 and 4 (top_p out of range) are reported and left out.
    assert cli.main(_argv("--input", src, "--output", str(dst), "--skip-bad-lines",
                          "--max-new-tokens", "4")) == 0
    err = capsys.readouterr().err
    assert "line 3" in err and "line 4" in err and "top_p" in err
    with open(dst) as f:
        assert [json.loads(x)["prompt"] for x in f] == QUESTIONS[:2]
    for bad, word in (("[1, 2]", "JSON object"), ('{"text": "x"}', "prompt"),
                      ('{"prompt": "x", "seed": 1.5}', "seed"),
                      ('{"prompt": "x", "max_new_tokens": -1}', "max_new_tokens")):
        src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]}), bad])
        with pytest.raises(SystemExit):
            cli.main(_argv("--input", src, "--output", str(tmp_path / "x.jsonl")))
        err = capsys.readouterr().err
        assert "line 2" in err and word in err, err
        assert not (tmp_path / "x.jsonl").exists()


def test_failure_during_generation_leaves_no_file(tmp_path, monkeypatch, capsys):
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": q}) for q in QUESTIONS])
    dst = tmp_path / "out.jsonl"
    dst.write_text("old results\n")  # an earlier result survives a failed run untouched
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure in the second batch")
        return fused_proxy_generate(*args, **kwargs)
    monkeypatch.setattr("proxykern.generate.fused_proxy_generate", failing)
    with pytest.raises(SystemExit):
        cli.main(_argv("--input", src, "--output", str(dst), "--batch-size", "2",
                       "--max-new-tokens", "3"))
    assert "simulated failure" in capsys.readouterr().err
    assert dst.read_text() == "old results\n"
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_input_without_output_is_an_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv("--input", "x.jsonl"))
    assert exc.value.code == 1 and "--output" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv("--prompt", "x", "--input", "y.jsonl"))
    assert exc.value.code == 2  # argparse: one or the other


def test_num_draft_tokens_flag_gives_the_same_text(capsys, monkeypatch):
    seen = []

    def spy(*args, **kwargs):
        seen.append(kwargs["num_draft_tokens"])
        return fused_proxy_generate(*args, **kwargs)
    monkeypatch.setattr("proxykern.generate.fused_proxy_generate", spy)
    plain = cli.main(_argv("--prompt", QUESTIONS[0], "--max-new-tokens", "10")), \
        capsys.readouterr().out
    spec = cli.main(_argv("--prompt", QUESTIONS[0], "--max-new-tokens", "10",
                          "--num-draft-tokens", "3")), capsys.readouterr().out
    assert plain[0] == spec[0] == 0 and plain[1].strip() and plain[1] == spec[1]
    assert seen == [0, 3]


def test_single_prompt_num_return_sequences_prints_each(capsys):
    assert cli.main(_argv("--prompt", QUESTIONS[0], "--num-return-sequences", "2",
                          "--temperature", "1.0", "--max-new-tokens", "5")) == 0
    out = capsys.readouterr().out
    assert "--- sequence 1 of 2 ---" in out and "--- sequence 2 of 2 ---" in out


@pytest.fixture(scope="module")
def long_model(tmp_path_factory):
    """A random model with 4096 positions that never stops early (no EOS), saved with the
    trio's tokenizer: a job long enough to watch or interrupt."""
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=161, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, bos_token_id=2, eos_token_id=None,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None
    path = str(tmp_path_factory.mktemp("long") / "model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(TRIO, "base")).save_pretrained(path)
    return path


def _long_job(path, *extra):
    return [sys.executable, "-m", "proxykern.apps.cli", "generate", "--base", path, "--expert", path,
            "--anti-expert", path, "--device", "cpu", "--temperature", "1.0",
            "--max-new-tokens", "3000", *extra]


def test_single_prompt_streams_before_the_process_ends(long_model):
    """The text reaches stdout while generation is still running."""
    proc = subprocess.Popen(_long_job(long_model, "--prompt", QUESTIONS[0]),
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        first = proc.stdout.read1(64) if hasattr(proc.stdout, "read1") else proc.stdout.read(8)
        still_running = proc.poll() is None
        assert first.strip(), "nothing was streamed"
        assert still_running, "the text arrived only when the process ended"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _wait_for(predicate, proc, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the process ended (status {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(0.05)


def _default_sigint():
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # even if this test runs with SIGINT ignored


@pytest.mark.parametrize("mode", ["prompt", "file"])
@pytest.mark.parametrize("signum, status, message", [
    (signal.SIGTERM, 143, "proxykern: terminated by SIGTERM"),
    (signal.SIGINT, 130, "proxykern: interrupted by SIGINT"),
    # their default action ended the process leaving the temporary file behind
    (signal.SIGHUP, 129, "proxykern: hung up (SIGHUP)"),
    (signal.SIGUSR1, 138, "proxykern: terminated by SIGUSR1")])
def test_a_signal_mid_run_is_one_line_its_status_and_no_file(long_model, tmp_path, mode,
                                                             signum, status, message):
    """SIGTERM / SIGINT while generating: exit 143 / 130 with one line on stderr, no
    traceback; in file mode no temporary file is left and an earlier --output is kept."""
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    work = tmp_path / "work"
    work.mkdir()
    if mode == "prompt":
        cmd = _long_job(long_model, "--prompt", QUESTIONS[0])
        started = lambda: out.stat().st_size > 0  # noqa: E731  the text is streaming
        marker = None
    else:
        src = _write(work / "in.jsonl", [json.dumps({"prompt": q}) for q in QUESTIONS])
        (work / "out.jsonl").write_text("old results\n")
        cmd = _long_job(long_model, "--input", src, "--output", str(work / "out.jsonl"),
                        "--batch-size", "1")
        marker = "proxykern: generating 5 prompt(s)"
        started = lambda: marker in err.read_text()  # noqa: E731
    with open(out, "w") as fout, open(err, "w") as ferr:
        proc = subprocess.Popen(cmd, stdout=fout, stderr=ferr, preexec_fn=_default_sigint)
        try:
            _wait_for(started, proc, "generation")
            if mode == "file":  # the batch has begun: a few tokens in
                time.sleep(0.5)
                assert proc.poll() is None
            proc.send_signal(signum)
            assert proc.wait(timeout=60) == status
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)
    text = err.read_text()
    assert "Traceback" not in text, text
    after = text.split(marker, 1)[1].splitlines()[1:] if marker else \
        [line for line in text.splitlines() if line.startswith("proxykern")]
    assert [line for line in after if line.strip()] == [message], text
    if mode == "file":
        assert sorted(os.listdir(work)) == ["in.jsonl", "out.jsonl"]
        assert (work / "out.jsonl").read_text() == "old results\n"
        assert out.read_text() == ""


# --------------------------------------------------------------------------- limits

LONG = " ".join([QUESTIONS[0]] * 13)  # 130 tokens: beyond the trio's 128 positions


def _lines_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def _fails(capsys, *argv):
    """Run the CLI expecting exit 1; returns stderr's own lines (no Hugging Face bars)."""
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(*argv))
    err = capsys.readouterr().err
    assert exc.value.code == 1, err
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]


@pytest.mark.parametrize("bad, words", [
    ('{"prompt": "%s", "max_new_tokens": 1000000000}' % QUESTIONS[1],
     ["reads at most 128 positions", "--base "]),
    ('{"prompt": "%s", "max_new_tokens": 120}' % QUESTIONS[1], ["reads at most 128 positions"]),
    ('{"prompt": "%s", "max_new_tokens": 1}' % LONG, ["reads at most 128 positions"]),
    ('{"prompt": "%s", "expert_prompt": "%s", "max_new_tokens": 1}' % (QUESTIONS[1], LONG),
     ["--expert ", "reads at most 128 positions"]),
    ('{"prompt": "%s", "max_new_tokens": %d}' % (QUESTIONS[1], 2 ** 63), ["max_new_tokens"]),
    ('{"prompt": "%s", "temperature": 1e39}' % QUESTIONS[1], ["temperature must be"]),
    ('{"prompt": "%s", "temperature": Infinity}' % QUESTIONS[1], ["temperature must be"]),
    ('{"prompt": "%s", "alpha": -1e39}' % QUESTIONS[1], ["alpha must be"]),
    ('{"prompt": "%s", "alpha": NaN}' % QUESTIONS[1], ["alpha must be"]),
    ('{"prompt": "%s", "top_k": %d}' % (QUESTIONS[1], 2 ** 64), ["top_k must be"]),
    ('{"prompt": "%s", "seed": %d}' % (QUESTIONS[1], 2 ** 64), ["seed must fit"]),
    ('{"prompt": "%s", "top_k": 1%s}' % (QUESTIONS[1], "0" * 5000), ["not usable JSON"]),
    ("[" * 100000 + "]" * 100000, ["not usable JSON"]),
    ('{"prompt": "   "}', ['"prompt" tokenizes to no tokens']),
    ('{"prompt": "%s", "expert_prompt": " "}' % QUESTIONS[1],
     ['"expert_prompt" tokenizes to no tokens']),
    ('{"prompt": "a \\ud800 b"}', ["not valid Unicode"]),
    # Python's json reads these, but the output line would not be JSON (was written as is)
    ('{"prompt": "%s", "meta": NaN}' % QUESTIONS[1], ["field 'meta' holds NaN"]),
    ('{"prompt": "%s", "meta": {"x": [1e400]}}' % QUESTIONS[1], ["field 'meta' holds NaN"]),
    # the first value would be lost silently (the last one won)
    ('{"prompt": "%s", "prompt": "%s"}' % (QUESTIONS[1], QUESTIONS[2]),
     ["key 'prompt' appears twice"]),
    # the output line's own field would overwrite the input's
    ('{"prompt": "%s", "completion": "mine"}' % QUESTIONS[1], ["'completion'", "rename it"]),
])
def test_a_line_beyond_a_limit_is_named_before_generating_and_skippable(
        tmp_path, capsys, monkeypatch, bad, words):
    """Every limit (positions, dtype ranges, JSON sizes, empty prompts) is a bad line: named
    by its number before anything is generated, and left out with --skip-bad-lines."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return fused_proxy_generate(*args, **kwargs)
    monkeypatch.setattr("proxykern.generate.fused_proxy_generate", spy)
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]}), bad,
                                         json.dumps({"prompt": QUESTIONS[2]})])
    dst = tmp_path / "out.jsonl"
    lines = _fails(capsys, "--input", src, "--output", str(dst), "--max-new-tokens", "2")
    assert len(lines) == 1 and lines[0].startswith(f"proxykern: error: --input {src}: line 2: ")
    assert all(word in lines[0] for word in words), lines
    assert not calls and sorted(os.listdir(tmp_path)) == ["in.jsonl"]
    assert cli.main(_argv("--input", src, "--output", str(dst), "--max-new-tokens", "2",
                          "--skip-bad-lines")) == 0
    err = capsys.readouterr().err
    assert f"proxykern: skipping --input {src}: line 2: " in err
    assert [line["prompt"] for line in _lines_of(dst)] == [QUESTIONS[0], QUESTIONS[2]]


def test_the_positions_edge_runs_and_one_more_is_refused(tmp_path, capsys):
    """prompt + max_new_tokens - 1 <= 128 runs (the last token is never fed back)."""
    tok = AutoTokenizer.from_pretrained(os.path.join(TRIO, "base"))
    prompt = " ".join([QUESTIONS[0]] * 12)  # 120 tokens: a short run at the edge
    fits = 128 - len(tok(prompt)["input_ids"]) + 1
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": prompt})])
    dst = str(tmp_path / "out.jsonl")
    lines = _fails(capsys, "--input", src, "--output", dst, "--max-new-tokens", str(fits + 1))
    assert "line 1: --base " in lines[0] and f"at most {fits}" in lines[0], lines
    assert cli.main(_argv("--input", src, "--output", dst, "--max-new-tokens", str(fits))) == 0


def test_batches_split_where_two_lines_together_exceed_the_positions(tmp_path, capsys):
    """A long prompt with few new tokens and a short one with many each fit alone; in one
    batch (padded to the long prompt, run to the larger max_new_tokens) they would not."""
    records = [{"prompt": " ".join([QUESTIONS[0]] * 11), "max_new_tokens": 4},  # 110 tokens
               {"prompt": QUESTIONS[1], "max_new_tokens": 30}]
    src = _write(tmp_path / "in.jsonl", [json.dumps(r) for r in records])
    got = {}
    for batch_size in (1, 2):
        dst = str(tmp_path / f"out{batch_size}.jsonl")
        assert cli.main(_argv("--input", src, "--output", dst, "--batch-size",
                              str(batch_size))) == 0
        got[batch_size] = _lines_of(dst)
    assert got[1] == got[2] and got[2][1]["num_tokens"] > 4


def test_non_utf8_input_names_the_file_and_line(tmp_path, capsys):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'\xef\xbb\xbf{"prompt": "%s"}\n{"prompt": "caf\xe9"}\n{"prompt": "%s"}\n'
                    % (QUESTIONS[0].encode(), QUESTIONS[1].encode()))  # a BOM, then Latin-1
    dst = tmp_path / "out.jsonl"
    lines = _fails(capsys, "--input", str(src), "--output", str(dst), "--max-new-tokens", "2")
    assert lines == [f"proxykern: error: --input {src}: line 2: not valid UTF-8 (byte 0xe9 "
                     f"at byte 16)"]
    assert cli.main(_argv("--input", str(src), "--output", str(dst), "--max-new-tokens", "2",
                          "--skip-bad-lines")) == 0
    assert [line["prompt"] for line in _lines_of(dst)] == [QUESTIONS[0], QUESTIONS[1]]


# --------------------------------------------------------------------------- output

@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        pytest.fail("models loaded although --input or --output was bad")
    monkeypatch.setattr(cli, "_load", refuse)


def test_bad_output_or_input_is_refused_before_the_models_load(tmp_path, capsys, no_loading):
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]})])
    (tmp_path / "folder").mkdir()
    for output, message in (
            (str(tmp_path / "folder"), "is a folder"),
            (str(tmp_path / "missing" / "out.jsonl"),
             f"the folder {tmp_path / 'missing'} does not exist"),
            ("/dev/null", "is not a regular file")):
        lines = _fails(capsys, "--input", src, "--output", output)
        assert lines == [f"proxykern: error: --output {output}{'' if message[0] == 't' else ' '}"
                         f"{': ' if message[0] == 't' else ''}{message}"
                         + lines[0].split(message, 1)[1]], lines
        assert ".proxykern-" not in lines[0] and ".tmp" not in lines[0]
    missing = str(tmp_path / "nope.jsonl")
    assert _fails(capsys, "--input", missing, "--output", str(tmp_path / "o.jsonl")) == [
        f"proxykern: error: --input {missing}: cannot read it (No such file or directory)"]
    bad_json = _write(tmp_path / "bad.jsonl", ["{"])
    assert "line 1: not valid JSON" in _fails(capsys, "--input", bad_json, "--output",
                                              str(tmp_path / "o.jsonl"))[0]
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl", "folder", "in.jsonl"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_output_is_refused_before_the_models_load(tmp_path, capsys, no_loading):
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]})])
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert "cannot write in" in _fails(capsys, "--input", src, "--output",
                                       str(locked / "out.jsonl"))[0]
    readonly = tmp_path / "readonly.jsonl"
    readonly.write_text("keep\n")
    readonly.chmod(0o444)
    assert "is not writable" in _fails(capsys, "--input", src, "--output", str(readonly))[0]


def test_output_mode_follows_the_umask_or_the_replaced_file(tmp_path, capsys):
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]})])
    old = os.umask(0o027)
    try:
        new = tmp_path / "new.jsonl"
        assert cli.main(_argv("--input", src, "--output", str(new), "--max-new-tokens", "2")) == 0
        assert stat.S_IMODE(new.stat().st_mode) == 0o640  # 0666 less the umask, as open() gives
        for mode in (0o644, 0o604):
            existing = tmp_path / f"existing{mode:o}.jsonl"
            existing.write_text("old\n")
            existing.chmod(mode)
            assert cli.main(_argv("--input", src, "--output", str(existing),
                                  "--max-new-tokens", "2")) == 0
            assert stat.S_IMODE(existing.stat().st_mode) == mode
            assert _lines_of(existing)[0]["prompt"] == QUESTIONS[0]
    finally:
        os.umask(old)


def test_a_symlinked_output_is_written_through(tmp_path, capsys):
    """The link stays a link; its target (even a not yet existing one) gets the lines."""
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]})])
    (tmp_path / "data").mkdir()
    target = tmp_path / "data" / "results.jsonl"
    target.write_text("old\n")
    link = tmp_path / "latest.jsonl"
    link.symlink_to(target)
    dangling = tmp_path / "next.jsonl"
    dangling.symlink_to(tmp_path / "data" / "next-target.jsonl")
    for path, real in ((link, target), (dangling, tmp_path / "data" / "next-target.jsonl")):
        assert cli.main(_argv("--input", src, "--output", str(path), "--max-new-tokens", "2")) == 0
        assert path.is_symlink() and os.path.realpath(path) == str(real)
        assert _lines_of(real)[0]["prompt"] == QUESTIONS[0]
    assert sorted(os.listdir(tmp_path / "data")) == ["next-target.jsonl", "results.jsonl"]


def test_output_dash_streams_the_lines_to_stdout(tmp_path, capsys):
    lines = [json.dumps({"prompt": q, "i": i}) for i, q in enumerate(QUESTIONS)]
    src = _write(tmp_path / "in.jsonl", lines)
    dst = str(tmp_path / "out.jsonl")
    assert cli.main(_argv("--input", src, "--output", dst, "--max-new-tokens", "4",
                          "--batch-size", "2")) == 0
    capsys.readouterr()
    assert cli.main(_argv("--input", src, "--output", "-", "--max-new-tokens", "4",
                          "--batch-size", "2")) == 0
    captured = capsys.readouterr()
    assert [json.loads(x) for x in captured.out.splitlines()] == _lines_of(dst)
    assert "into standard output" in captured.err
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]  # no file named '-'


def test_lines_are_written_in_input_order_as_soon_as_earlier_ones_are_done():
    """Batches finish in length order; each line goes out once every earlier one is done."""
    from proxykern.apps.jsonl_generate import _InOrder
    written = []
    out = type("Out", (), {"write": lambda self, text: written.append(json.loads(text)["i"])})()
    writer = _InOrder([{"obj": {"i": i}} for i in range(4)], out)
    for index, expected in ((2, []), (0, [0]), (3, [0]), (1, [0, 1, 2, 3])):
        writer.put(index, {})
        assert written == expected


def test_a_line_too_long_or_an_endless_input_stops_without_filling_memory(
        tmp_path, capsys, monkeypatch, no_loading):
    """/dev/zero (no newline, ever) was read into memory until the process died."""
    from proxykern.apps import jsonl_generate
    monkeypatch.setattr(jsonl_generate, "MAX_LINE_BYTES", 4096)
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]}),
                                         json.dumps({"prompt": "x" * 5000})])
    dst = tmp_path / "out.jsonl"
    for path, number in ((src, 2), ("/dev/zero", 1)):
        for skip in ((), ("--skip-bad-lines",)):
            lines = _fails(capsys, "--input", path, "--output", str(dst), *skip)
            assert lines == [f"proxykern: error: --input {path}: line {number} is longer "
                             f"than 0 MiB"], lines
            assert sorted(os.listdir(tmp_path)) == ["in.jsonl"]


def test_too_many_rows_are_refused_before_the_models_load(tmp_path, capsys, no_loading):
    """--num-return-sequences 10**12 loaded the models, then failed allocating 8 TB."""
    from proxykern.generation_args import MAX_ROWS
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": QUESTIONS[0]})])
    for mode in (("--prompt", QUESTIONS[0]), ("--input", src, "--output",
                                              str(tmp_path / "out.jsonl"))):
        lines = _fails(capsys, *mode, "--num-return-sequences", str(MAX_ROWS + 1))
        assert lines == [f"proxykern: error: --num-return-sequences must be an int in "
                         f"[1, {MAX_ROWS}], got {MAX_ROWS + 1}"]


def test_file_batches_are_cut_to_the_rows_one_call_returns(monkeypatch):
    from proxykern.apps import jsonl_generate
    monkeypatch.setattr(jsonl_generate, "MAX_ROWS", 6)
    monkeypatch.setattr(jsonl_generate, "_fits", lambda *args: True)
    rows = [([1] * (i + 1), None) for i in range(7)]
    records = [{"max_new_tokens": 1}] * 7
    batches = list(jsonl_generate._batches(None, records, rows, 100, 3))
    assert [len(b) for b in batches] == [2, 2, 2, 1]


@pytest.mark.parametrize("where", ["write", "commit"])
def test_a_write_error_names_the_output_and_leaves_no_file(tmp_path, capsys, monkeypatch, where):
    """A full disk: the write (or the final flush) fails. The temporary file used to stay
    (closing it failed again before its removal) and the message named no flag."""
    from proxykern.apps import jsonl_generate
    src = _write(tmp_path / "in.jsonl", [json.dumps({"prompt": q}) for q in QUESTIONS[:2]])
    dst = tmp_path / "out.jsonl"
    dst.write_text("old results\n")

    class FullDisk:
        def __init__(self, file):
            self.file = file

        def write(self, text):
            if where == "write":
                raise OSError(28, "No space left on device")
            return self.file.write(text)

        def flush(self):
            raise OSError(28, "No space left on device")

        def close(self):  # the buffered lines cannot be flushed either
            self.file.close()
            raise OSError(28, "No space left on device")

        def fileno(self):
            return self.file.fileno()

    opened = jsonl_generate.Output.__init__

    def init(self, path):
        opened(self, path)
        self._file = FullDisk(self._file)
    monkeypatch.setattr(jsonl_generate.Output, "__init__", init)
    lines = _fails(capsys, "--input", src, "--output", str(dst), "--max-new-tokens", "2")
    assert lines[-1] == (f"proxykern: error: --output {dst}: cannot write it "
                         f"(No space left on device)"), lines
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]
    assert dst.read_text() == "old results\n"
