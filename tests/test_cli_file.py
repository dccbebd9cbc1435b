"""``proxykern generate`` file mode (--input/--output) on the shipped trio, and live streaming."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from proxykern import cli, fused_proxy_generate
from proxykern.reference import row_seeds

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


def test_single_prompt_streams_before_the_process_ends(tmp_path):
    """The text reaches stdout while generation is still running."""
    from transformers import LlamaConfig, LlamaForCausalLM, AutoTokenizer
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=161, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=4096, bos_token_id=2, eos_token_id=None,
                         pad_token_id=0)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # never stops early: 3000 tokens to stream
    path = str(tmp_path / "model")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(os.path.join(TRIO, "base")).save_pretrained(path)
    cmd = [sys.executable, "-m", "proxykern.cli", "generate", "--base", path, "--expert", path,
           "--anti-expert", path, "--prompt", QUESTIONS[0], "--device", "cpu",
           "--temperature", "1.0", "--max-new-tokens", "3000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        first = proc.stdout.read1(64) if hasattr(proc.stdout, "read1") else proc.stdout.read(8)
        still_running = proc.poll() is None
        assert first.strip(), "nothing was streamed"
        assert still_running, "the text arrived only when the process ended"
    finally:
        proc.kill()
        proc.wait(timeout=30)
