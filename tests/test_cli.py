"""The ``proxykern`` console script end to end on tiny saved checkpoints."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from proxykern import fused_proxy_generate
from proxykern.apps import cli

from gen_fixtures import llama_trio, save_tiny_checkpoints, tiny_tokenizer

PROMPT = "the cat sat on the mat"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return save_tiny_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _argv(paths, *extra):
    return ["generate", "--base", paths["base"], "--expert", paths["expert"], "--anti-expert",
            paths["anti"], "--prompt", PROMPT, "--device", "cpu", *extra]


def test_generate_streams_the_fused_text(checkpoints, capsys):
    base, expert, anti = llama_trio()
    tok = tiny_tokenizer()
    enc = tok(PROMPT, return_tensors="pt")
    ref = fused_proxy_generate(base, expert, anti, enc["input_ids"], enc["attention_mask"],
                               max_new_tokens=10, alpha=0.8, temperature=0.7, top_k=30,
                               top_p=0.9, seed=11)
    assert cli.main(_argv(checkpoints, "--max-new-tokens", "10", "--alpha", "0.8",
                          "--temperature", "0.7", "--top-k", "30", "--top-p", "0.9",
                          "--seed", "11", "--backend", "torch")) == 0
    out = capsys.readouterr().out
    text = tok.decode(ref.tokens[0], skip_special_tokens=True)
    assert text and out.strip() == text.strip()


def test_chat_expert_uses_the_template(checkpoints, capsys):
    base, expert, anti = llama_trio()
    tok = tiny_tokenizer()
    enc = tok(PROMPT, return_tensors="pt")
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    e_ids = tok(chat, return_tensors="pt", add_special_tokens=False)["input_ids"]
    assert e_ids.shape[1] > enc["input_ids"].shape[1]
    ref = fused_proxy_generate(base, expert, anti, enc["input_ids"], max_new_tokens=8,
                               expert_input_ids=e_ids)
    plain = fused_proxy_generate(base, expert, anti, enc["input_ids"], max_new_tokens=8)
    assert not torch.equal(ref.tokens, plain.tokens)  # the template changes the expert's view
    assert cli.main(_argv(checkpoints, "--chat-expert", "--max-new-tokens", "8")) == 0
    text = tok.decode(ref.tokens[0], skip_special_tokens=True)
    assert capsys.readouterr().out.strip() == text.strip()


def test_bad_values_exit_with_a_message(checkpoints, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(checkpoints, "--top-p", "0"))
    assert exc.value.code == 1 and "--top-p must be" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "x"])  # argparse: missing models
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            cli.main(_argv(checkpoints)[:-2] + ["--device", "cuda"])
        assert exc.value.code == 1 and "--device" in capsys.readouterr().err


def test_bench_subcommand_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("proxykern.apps.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "proxykern.apps.bench", fake)
    import proxykern.apps
    monkeypatch.setattr(proxykern.apps, "bench", fake, raising=False)
    assert cli.main(["bench", "--quick", "--device", "cpu"]) == 0
    assert seen == [["--quick", "--device", "cpu"]]


# --------------------------------------------------------------------------- flags

def _text(tokens):
    return tiny_tokenizer().decode(tokens[0], skip_special_tokens=True).strip()


def test_min_p_flag_reaches_generation(checkpoints, capsys):
    """--min-p changes the draws: the CLI's text is the min_p one, not the unfiltered one."""
    base, expert, anti = llama_trio()
    enc = tiny_tokenizer()(PROMPT, return_tensors="pt")
    kw = dict(max_new_tokens=12, temperature=1.5, eos_token_id=[])
    for seed in range(20):  # a seed where min_p matters (found here, whatever the seed mixing)
        with_min_p = fused_proxy_generate(base, expert, anti, enc["input_ids"], min_p=0.3,
                                          seed=seed, **kw)
        without = fused_proxy_generate(base, expert, anti, enc["input_ids"], seed=seed, **kw)
        if _text(with_min_p.tokens) != _text(without.tokens):
            break
    else:
        pytest.fail("min_p=0.3 never changed the text: the test needs other settings")
    assert cli.main(_argv(checkpoints, "--max-new-tokens", "12", "--temperature", "1.5",
                          "--min-p", "0.3", "--seed", str(seed))) == 0
    assert capsys.readouterr().out.strip() == _text(with_min_p.tokens)


def test_dtype_flag_loads_the_models_in_that_dtype(checkpoints, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM
    loaded_dtypes = []
    real = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded_dtypes.append(next(model.parameters()).dtype)
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    assert cli.main(_argv(checkpoints, "--max-new-tokens", "8", "--dtype", "bfloat16")) == 0
    assert loaded_dtypes == [torch.bfloat16] * 3
    base, expert, anti = (m.to(torch.bfloat16) for m in map(copy.deepcopy, llama_trio()))
    enc = tiny_tokenizer()(PROMPT, return_tensors="pt")
    ref = fused_proxy_generate(base, expert, anti, enc["input_ids"], enc["attention_mask"],
                               max_new_tokens=8)
    assert capsys.readouterr().out.strip() == _text(ref.tokens)
    loaded_dtypes.clear()
    assert cli.main(_argv(checkpoints, "--max-new-tokens", "2", "--dtype", "auto")) == 0
    assert loaded_dtypes == [torch.float32] * 3  # auto on CPU


@pytest.mark.parametrize("flag", ["--base", "--expert", "--anti-expert"])
def test_a_model_that_does_not_load_exits_1_naming_it(checkpoints, capsys, tmp_path, flag):
    empty = str(tmp_path)  # a folder without a model
    paths = dict(checkpoints)
    key = {"--base": "base", "--expert": "expert", "--anti-expert": "anti"}[flag]
    paths[key] = empty
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(paths))
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert f"proxykern: error: {flag}: cannot load {empty}: " in err
    assert "Traceback" not in err
    # A local-looking path that is not there: said so, not Hugging Face's hub-name error.
    missing = "/nonexistent/proxykern-model"
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv({**checkpoints, key: missing}))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and f"{flag}: no such folder: {missing}" in err
    assert "Repo id" not in err and len(err.splitlines()) == 1


# --------------------------------------------------------------------------- limits

def _messages(err: str) -> list:
    """stderr's lines less Hugging Face's weight-loading progress bars."""
    return [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if the models load: the error must come before any work."""
    def refuse(*args, **kwargs):
        pytest.fail("models loaded although a flag was bad")
    monkeypatch.setattr(cli, "_load", refuse)


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "1e39"], "--temperature must be"),
    (["--temperature", "inf"], "--temperature must be"),
    (["--temperature", "-1"], "--temperature must be"),
    (["--alpha=-1e39"], "--alpha must be"),
    (["--alpha", "nan"], "--alpha must be"),
    (["--top-k", str(2 ** 64)], "--top-k must be"),
    (["--top-k", str(2 ** 63)], "--top-k must be"),
    (["--top-p", "nan"], "--top-p must be"),
    (["--min-p", "1"], "--min-p must be"),
    (["--seed", str(2 ** 64)], "--seed must fit in 64 bits"),
    (["--seed", str(-2 ** 63 - 1)], "--seed must fit in 64 bits"),
    (["--max-new-tokens", "-1"], "--max-new-tokens must be"),
    (["--max-new-tokens", str(2 ** 63)], "--max-new-tokens must be"),
    (["--num-return-sequences", "0"], "--num-return-sequences must be"),
    (["--num-draft-tokens", "-1"], "--num-draft-tokens must be"),
    (["--device", "tpu"], "--device tpu"),
    (["--device", "meta"], "--device meta"),
    (["--logprobs"], "--logprobs applies to file mode"),
    (["--batch-size", "4"], "--batch-size applies to file mode"),
    (["--batch-size", "0"], "--batch-size applies to file mode"),
    (["--skip-bad-lines"], "--skip-bad-lines applies to file mode"),
])
def test_a_bad_flag_is_one_line_before_the_models_load(checkpoints, capsys, no_loading,
                                                       flags, message):
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(checkpoints, *flags))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and _messages(err) == [err.strip()], err
    assert err.startswith(f"proxykern: error: {message}"), err


def test_the_largest_values_of_each_type_pass_the_flag_check(checkpoints, no_loading, capsys):
    """The flag rules are the dtypes' ranges: the edge values themselves are accepted."""
    args = cli._parser().parse_args(_argv(checkpoints, "--temperature", "3.4e38",
                                          "--alpha=-3.4e38", "--top-k", str(2 ** 63 - 1), "--seed",
                                          str(2 ** 64 - 1), "--max-new-tokens", "0"))
    assert cli.check_flags(args).type == "cpu"


def test_positions_are_checked_naming_the_model(checkpoints, capsys, monkeypatch):
    """prompt + max_new_tokens - 1 positions must fit max_position_embeddings (256 here):
    the edge runs, one more is refused before generating, naming the model."""
    calls = []
    monkeypatch.setattr("proxykern.generate.fused_proxy_generate",
                        lambda *a, **k: calls.append(k) or fused_proxy_generate(*a, **k))
    long_prompt = " ".join([PROMPT] * 40)  # 240 tokens: a short run at the edge
    fits = 256 - len(tiny_tokenizer()(long_prompt)["input_ids"]) + 1
    for max_new, ok in ((1_000_000_000, False), (fits + 1, False), (fits, True)):
        argv = _argv(checkpoints, "--max-new-tokens", str(max_new))
        argv[argv.index(PROMPT)] = long_prompt
        if ok:
            assert cli.main(argv) == 0
            continue
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 1 and len(_messages(err)) == 1, err
        assert f"--base {checkpoints['base']} reads at most 256 positions" in err
    assert len(calls) == 1  # only the run that fits generated anything
    # A prompt longer than the models' positions, even for one new token.
    argv = _argv(checkpoints, "--max-new-tokens", "1")
    argv[argv.index(PROMPT)] = " ".join([PROMPT] * 50)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 1 and "reads at most 256 positions" in capsys.readouterr().err
    assert len(calls) == 1


def test_a_chat_expert_prompt_is_checked_against_the_expert(checkpoints, capsys):
    """The expert reads its chat prompt (longer than the plain one): its positions count."""
    tok = tiny_tokenizer()
    chat = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                   add_generation_prompt=True)
    n_chat = len(tok(chat, add_special_tokens=False)["input_ids"])
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(checkpoints, "--chat-expert", "--max-new-tokens", str(256 - n_chat + 2)))
    err = capsys.readouterr().err
    assert exc.value.code == 1 and f"--expert {checkpoints['expert']} reads at most" in err


@pytest.mark.parametrize("prompt, message", [("   ", "--prompt tokenizes to no tokens"),
                                             ("", "--prompt tokenizes to no tokens"),
                                             ("a\udcffb", "--prompt is not valid UTF-8")])
def test_a_prompt_that_cannot_be_generated_from_is_one_line(checkpoints, capsys, prompt, message):
    with pytest.raises(SystemExit) as exc:
        argv = _argv(checkpoints)
        argv[argv.index(PROMPT)] = prompt
        cli.main(argv)
    lines = _messages(capsys.readouterr().err)
    assert exc.value.code == 1 and len(lines) == 1 and lines[0].startswith(
        f"proxykern: error: {message}"), lines


# --------------------------------------------------------------------------- help

def test_help_shows_defaults_the_jsonl_fields_and_an_example(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    assert exc.value.code == 0
    for default in ("(default: 128)", "(default: 8)", "(default: 1.0)", "(default: auto)",
                    "(default: 0.0)"):
        assert default in out, default
    for field in ('"prompt"', '"expert_prompt"', '"max_new_tokens"', '"completion"',
                  '"finish_reason"', "examples:", "--output -", "130", "143"):
        assert field in out, field
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and all(c in out for c in ("generate", "bench", "demo"))


def test_version_flag_prints_the_version(capsys):
    import proxykern
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"proxykern {proxykern.__version__}"
