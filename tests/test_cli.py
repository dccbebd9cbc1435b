"""The ``proxykern`` console script end to end on tiny saved checkpoints."""
from __future__ import annotations

import copy
import sys
import types

import pytest
import torch

from proxykern import cli, fused_proxy_generate

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
    assert exc.value.code == 1 and "top_p" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--prompt", "x"])  # argparse: missing models
    assert exc.value.code == 2
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as exc:
            cli.main(_argv(checkpoints)[:-2] + ["--device", "cuda"])
        assert exc.value.code == 1 and "--device" in capsys.readouterr().err


def test_bench_subcommand_dispatches_lazily(monkeypatch):
    seen = []
    fake = types.ModuleType("proxykern.bench")
    fake.main = lambda argv: seen.append(argv) or 0
    monkeypatch.setitem(sys.modules, "proxykern.bench", fake)
    import proxykern
    monkeypatch.setattr(proxykern, "bench", fake, raising=False)
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
    paths[{"--base": "base", "--expert": "expert", "--anti-expert": "anti"}[flag]] = empty
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv(paths))
    err = capsys.readouterr().err
    assert exc.value.code == 1
    assert f"proxykern: error: {flag} {empty!r} does not load: " in err
    assert "Traceback" not in err
    missing = "/nonexistent/proxykern-model"
    with pytest.raises(SystemExit) as exc:
        cli.main(_argv({**checkpoints, "base": missing}))
    assert exc.value.code == 1 and f"--base {missing!r}" in capsys.readouterr().err
