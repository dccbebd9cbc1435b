"""``proxykern generate --program NAME``: logit programs from the command line, on tiny
saved checkpoints (prompt and file mode against program_generate; every misuse refused
with one line before any model loads)."""
from __future__ import annotations

import json

import pytest
import torch

from proxykern import fused_proxy_generate, programs
from proxykern.apps import cli
from proxykern.program_generate import program_generate
from proxykern.reference import row_seeds

from gen_fixtures import llama_trio, save_tiny_checkpoints, tiny_tokenizer

PROMPT = "the cat sat on the mat"
PROMPTS = ["the cat sat on the mat", "a dog ran to the house", "user : the cat ?",
           "the mat and the dog sat"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _models():
    base, expert, anti = llama_trio()
    return {"base": base, "expert": expert, "anti": anti}


def _text(out, row=0):
    n = int(out.lengths[row])
    return tiny_tokenizer().decode(out.tokens[row, :n].tolist(), skip_special_tokens=True).strip()


def _ids(text):
    return torch.tensor([tiny_tokenizer()(text)["input_ids"]])


def _run(argv, capsys):
    assert cli.main(["generate", *argv, "--device", "cpu"]) == 0
    return capsys.readouterr().out.strip()


@pytest.fixture
def spy(monkeypatch):
    """Which generator the CLI called."""
    import sys

    import proxykern.generate
    pg = sys.modules["proxykern.program_generate"]  # the package's attribute is the function
    calls = []
    real_program, real_fused = pg.program_generate, proxykern.generate.fused_proxy_generate
    monkeypatch.setattr(pg, "program_generate",
                        lambda *a, **k: calls.append("program") or real_program(*a, **k))
    monkeypatch.setattr(proxykern.generate, "fused_proxy_generate",
                        lambda *a, **k: calls.append("fused") or real_fused(*a, **k))
    return calls


# (program flags with model keys in {}, the program, role -> model key)
CASES = {
    "contrastive": (["--program", "contrastive", "--expert", "{expert}", "--role",
                     "amateur={anti}", "--beta", "0.7", "--plausibility", "0.2"],
                    programs.contrastive(0.7, plausibility=0.2),
                    {"expert": "expert", "amateur": "anti"}),
    "contrastive-li": (["--program", "contrastive-li", "--role", "expert={expert}", "--role",
                        "amateur={base}"],
                       programs.contrastive(variant="li"), {"expert": "expert", "amateur": "base"}),
    "dexperts": (["--program", "dexperts", "--base", "{base}", "--expert", "{expert}",
                  "--anti-expert", "{anti}"],
                 programs.dexperts(), {"base": "base", "expert": "expert", "anti_expert": "anti"}),
    "dexperts-flags": (["--program", "dexperts", "--role", "base={base}", "--expert", "{expert}",
                        "--anti-expert", "{anti}", "--alpha", "1.5", "--base-top-p", "0.8"],
                       programs.dexperts(1.5, base_top_p=0.8),
                       {"base": "base", "expert": "expert", "anti_expert": "anti"}),
    "ensemble": (["--program", "ensemble", "--weight", "b=0.6", "--weight", "a=0.4", "--role",
                  "a={base}", "--role", "b={expert}"],
                 programs.ensemble({"b": 0.6, "a": 0.4}), {"b": "expert", "a": "base"}),
}


def _flags(case, ckpt):
    return [f.format(**ckpt) for f in CASES[case][0]]


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_mode_text_is_program_generate_s(ckpt, capsys, spy, case):
    flags, program, role_models = CASES[case]
    models = _models()
    sampled = case == "dexperts-flags"  # one case samples: seed and filters reach it
    sampling = dict(temperature=0.9, top_k=50, seed=3) if sampled else {}
    ref = program_generate(program, {r: models[k] for r, k in role_models.items()},
                           _ids(PROMPT), max_new_tokens=10, **sampling)
    assert int(ref.lengths[0]) > 0
    extra = ["--temperature", "0.9", "--top-k", "50", "--seed", "3"] if sampled else []
    out = _run(_flags(case, ckpt) + ["--prompt", PROMPT, "--max-new-tokens", "10", *extra],
               capsys)
    assert out == _text(ref)
    assert spy == ["program"]


def test_programs_change_the_text(ckpt, capsys):
    """The routing is real: the programs do not all produce the proxy-tuning text."""
    texts = {_run(_flags(case, ckpt) + ["--prompt", PROMPT, "--max-new-tokens", "8"], capsys)
             for case in ("contrastive", "dexperts", "ensemble")}
    texts.add(_run(["--base", ckpt["base"], "--expert", ckpt["expert"], "--anti-expert",
                    ckpt["anti"], "--prompt", PROMPT, "--max-new-tokens", "8"], capsys))
    assert len(texts) > 1


def test_speculative_programs_give_the_same_text(ckpt, capsys):
    """--num-draft-tokens with a program other than proxy tuning: the plain text."""
    for case in ("contrastive", "ensemble"):
        flags = _flags(case, ckpt) + ["--prompt", PROMPT, "--max-new-tokens", "8"]
        assert _run(flags + ["--num-draft-tokens", "3"], capsys) == _run(flags, capsys)


def test_several_sequences_and_a_chat_expert(ckpt, capsys):
    models, tok = _models(), tiny_tokenizer()
    program = programs.contrastive()
    role_models = {"expert": models["expert"], "amateur": models["anti"]}
    ref = program_generate(program, role_models, _ids(PROMPT), max_new_tokens=6,
                           temperature=1.2, seed=4, num_return_sequences=2, eos_token_id=[])
    out = _run(["--program", "contrastive", "--expert", ckpt["expert"], "--role",
                f"amateur={ckpt['anti']}", "--prompt", PROMPT, "--max-new-tokens", "6",
                "--temperature", "1.2", "--seed", "4", "--num-return-sequences", "2"], capsys)
    assert out.split("\n") == ["--- sequence 1 of 2 ---", _text(ref, 0),
                               "--- sequence 2 of 2 ---", _text(ref, 1)]
    # --chat-expert: the role expert reads its chat template, the amateur the plain prompt
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    e_ids = tok(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]
    ref = program_generate(program, role_models, _ids(PROMPT), max_new_tokens=8,
                           role_input_ids={"expert": e_ids})
    out = _run(["--program", "contrastive", "--expert", ckpt["expert"], "--role",
                f"amateur={ckpt['anti']}", "--prompt", PROMPT, "--max-new-tokens", "8",
                "--chat-expert"], capsys)
    assert out == _text(ref)


@pytest.mark.parametrize("flags", [
    ["--program", "proxy_tuning", "--base", "{base}", "--expert", "{expert}",
     "--anti-expert", "{anti}"],
    ["--program", "proxy-tuning", "--role", "base={base}", "--role", "expert={expert}",
     "--role", "anti_expert={anti}"],
])
def test_proxy_tuning_keeps_the_fused_path(ckpt, capsys, spy, flags):
    m = _models()
    ref = fused_proxy_generate(m["base"], m["expert"], m["anti"], _ids(PROMPT),
                               max_new_tokens=10, alpha=0.8)
    out = _run([f.format(**ckpt) for f in flags]
               + ["--prompt", PROMPT, "--max-new-tokens", "10", "--alpha", "0.8"], capsys)
    assert out == _text(ref) and spy == ["fused"]


# --------------------------------------------------------------------------- file mode

def _file_run(tmp_path, flags, records, *extra):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in records))
    dst = tmp_path / "out.jsonl"
    assert cli.main(["generate", *flags, "--input", str(src), "--output", str(dst),
                     "--device", "cpu", "--max-new-tokens", "8", *extra]) == 0
    return [json.loads(line) for line in dst.read_text().splitlines()]


def _alone(case, record, number, **build):
    """One line's completion: its prompt alone through program_generate."""
    _flags_, program, role_models = CASES[case]
    if "alpha" in record:
        program = programs.dexperts(record["alpha"], **build)
    models = _models()
    own = {"expert": _ids(record["expert_prompt"])} if "expert_prompt" in record else None
    seed = record.get("seed", int(row_seeds(0, torch.tensor([number - 1]))))
    out = program_generate(program, {r: models[k] for r, k in role_models.items()},
                           _ids(record["prompt"]), max_new_tokens=record.get("max_new_tokens", 8),
                           role_input_ids=own, temperature=record.get("temperature", 0.0),
                           top_p=record.get("top_p", 1.0), seed=torch.tensor([seed]),
                           return_logprobs=True)
    n = int(out.lengths[0])
    return _text(out), n, out.logprobs[0, :n].tolist()


@pytest.mark.parametrize("case", ["dexperts", "contrastive"])
def test_file_mode_lines_match_program_generate_alone(ckpt, tmp_path, case):
    records = [{"prompt": PROMPTS[0], "id": "a"},
               {"prompt": PROMPTS[1], "temperature": 0.9, "top_p": 0.9, "seed": 5},
               {"prompt": PROMPTS[2], "max_new_tokens": 3},
               {"prompt": PROMPTS[3], "expert_prompt": PROMPTS[0]}]
    if case == "dexperts":
        records[0]["alpha"] = 0.5  # a per-line alpha: dexperts takes one
    got = _file_run(tmp_path, _flags(case, ckpt), records, "--batch-size", "3", "--logprobs")
    assert len(got) == len(records)
    for number, (record, line) in enumerate(zip(records, got), 1):
        assert {k: line[k] for k in record} == record
        text, n, logprobs = _alone(case, record, number)
        assert (line["completion"], line["num_tokens"]) == (text, n), number
        assert line["logprobs"] == pytest.approx(logprobs, abs=1e-4)
    assert got[2]["num_tokens"] <= 3


@pytest.mark.parametrize("case, record, message", [
    ("contrastive", {"prompt": PROMPT, "alpha": 1.0},
     "line 2: field 'alpha': --program contrastive takes no alpha"),
    ("ensemble", {"prompt": PROMPT, "alpha": 1.0},
     "line 2: field 'alpha': --program ensemble takes no alpha"),
    ("ensemble", {"prompt": PROMPT, "expert_prompt": PROMPT},
     "line 2: field 'expert_prompt': --program ensemble has no role 'expert'"),
])
def test_file_mode_refuses_a_field_the_program_cannot_use(ckpt, tmp_path, capsys, no_loading,
                                                          case, record, message):
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": PROMPT}) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", *_flags(case, ckpt), "--input", str(src), "--output",
                  str(tmp_path / "out.jsonl"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert exc.value.code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"proxykern: error: --input {src}: {message}"), err
    assert not (tmp_path / "out.jsonl").exists()


def test_file_mode_skips_a_refused_line_when_asked(ckpt, tmp_path, capsys):
    got = _file_run(tmp_path, _flags("contrastive", ckpt),
                    [{"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "alpha": 2.0}],
                    "--skip-bad-lines")
    assert [line["prompt"] for line in got] == [PROMPTS[0]]
    assert "line 2: field 'alpha'" in capsys.readouterr().err


# --------------------------------------------------------------------------- errors

@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if any model or tokenizer loads: errors come first."""
    import proxykern.loading

    def refuse(*args, **kwargs):
        pytest.fail("a model loaded although the flags were bad")
    monkeypatch.setattr(cli, "_load", refuse)
    monkeypatch.setattr(proxykern.loading, "load_causal_lm", refuse)
    monkeypatch.setattr(proxykern.loading, "load_tokenizer", refuse)


C = ["--program", "contrastive", "--expert", "{expert}", "--role", "amateur={anti}"]
D = ["--program", "dexperts", "--base", "{base}", "--expert", "{expert}", "--anti-expert",
     "{anti}"]
P = ["--base", "{base}", "--expert", "{expert}", "--anti-expert", "{anti}"]
E = ["--program", "ensemble", "--weight", "a=1", "--weight", "b=1", "--role", "a={base}",
     "--role", "b={expert}"]
USAGE_ERRORS = [
    (C + ["--alpha", "1"], "--alpha does not apply to --program contrastive (it takes --beta, "
                           "--plausibility)"),
    (D + ["--beta", "1"], "--beta does not apply to --program dexperts"),
    (P + ["--plausibility", "0.1"], "--plausibility does not apply to --program proxy_tuning"),
    (["--program", "contrastive_li", "--expert", "{expert}", "--role", "amateur={anti}",
      "--beta", "0.5"], "--beta does not apply to --program contrastive_li"),
    (C + ["--base-top-p", "0.9"], "--base-top-p does not apply to --program contrastive"),
    (D + ["--weight", "a=1"], "--weight does not apply to --program dexperts"),
    (E + ["--alpha", "1"], "--alpha does not apply to --program ensemble"),
    (["--program", "contrastive", "--expert", "{expert}"],
     "--program contrastive needs a model for its role 'amateur': give --role amateur=PATH"),
    (["--base", "{base}", "--expert", "{expert}"],
     "--program proxy_tuning needs a model for its role 'anti_expert': give --anti-expert PATH "
     "or --role anti_expert=PATH"),
    ([], "--program proxy_tuning needs a model for its role 'base'"),
    (E[:6] + ["--role", "a={base}"], "--program ensemble needs a model for its role 'b'"),
    (C + ["--role", "judge={base}"], "--role judge: --program contrastive has no role 'judge'"),
    (C + ["--base", "{base}"],
     "--base (the role base): --program contrastive has no role 'base' (its roles: expert, "
     "amateur)"),
    (E + ["--role", "c={anti}"], "--role c: --program ensemble has no role 'c'"),
    (C + ["--role", "amateur"], "--role 'amateur': expected NAME=PATH"),
    (C + ["--role", "=x"], "--role '=x': expected NAME=PATH"),
    (C + ["--role", "amateur="], "--role 'amateur=': expected NAME=PATH"),
    (C + ["--role", "expert={base}"],
     "--role expert: the role 'expert' is given twice (also by --expert)"),
    (C + ["--role", "amateur={base}"],
     "--role amateur: the role 'amateur' is given twice (also by --role amateur)"),
    (E + ["--weight", "a=2"], "--weight a=...: the role 'a' is given a weight twice"),
    (E + ["--weight", "c"], "--weight 'c': expected NAME=W"),
    (["--program", "ensemble", "--weight", "a=x", "--weight", "b=1"],
     "--weight a=x: expected NAME=W with W a number"),
    (["--program", "ensemble", "--weight", "a=1", "--role", "a={base}"],
     "--weight: --program ensemble needs 2 to 8 roles (--weight NAME=W each), got 1"),
    (E + ["--chat-expert"], "--chat-expert: --program ensemble has no role 'expert'"),
]


@pytest.mark.parametrize("flags, message", USAGE_ERRORS)
@pytest.mark.parametrize("mode", ["prompt", "file"])
def test_a_program_misuse_exits_2_with_one_line_before_loading(ckpt, tmp_path, capsys,
                                                               no_loading, flags, message, mode):
    src = ["--prompt", PROMPT] if mode == "prompt" else [
        "--input", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out.jsonl")]
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", *[f.format(**ckpt) for f in flags], *src, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"proxykern: error: {message}"), err
    assert not list(tmp_path.iterdir())  # no output, no temporary file


@pytest.mark.parametrize("flags, message", [
    (C + ["--beta", "nan"], "--beta must be finite"),
    (C + ["--plausibility", "0"], "--plausibility must be in (0, 1]"),
    (D + ["--base-top-p", "1.5"], "--base-top-p must be in (0, 1]"),
    (D + ["--alpha", "1e39"], "--alpha must be"),
    (E[:4] + ["--weight", "b=inf"] + E[6:], "--weight b must be finite"),
    (["--program", "contrastive", "--expert", "/nonexistent/pk-model", "--role",
      "amateur={anti}"], "--expert: no such folder: /nonexistent/pk-model"),
    (C[:4] + ["--role", "amateur=/nonexistent/pk-model"],
     "--role amateur: no such folder: /nonexistent/pk-model"),
])
def test_a_bad_program_value_exits_1_before_loading(ckpt, capsys, no_loading, flags, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", *[f.format(**ckpt) for f in flags], "--prompt", PROMPT,
                  "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"proxykern: error: {message}"), err


def test_a_model_that_does_not_load_names_its_role_flag(ckpt, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--program", "contrastive", "--expert", ckpt["expert"], "--role",
                  f"amateur={tmp_path}", "--prompt", PROMPT, "--device", "cpu"])
    err = capsys.readouterr().err
    assert exc.value.code == 1 and f"proxykern: error: --role amateur: cannot load {tmp_path}" \
        in err and "Traceback" not in err


def test_help_documents_the_programs(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for text in ("--program NAME", "--role NAME=PATH", "--weight NAME=W", "--beta B",
                 "--plausibility A", "--base-top-p P", "proxy_tuning", "dexperts",
                 "contrastive_li", "ensemble", "Liu et al. 2021", "Li et al. 2022",
                 "O'Brien & Lewis 2023", "roles expert, amateur", "(default 2.0)",
                 "(default 0.5)", "(default 0.9)", "The tokenizer is the first role's folder"):
        assert text in out, text
