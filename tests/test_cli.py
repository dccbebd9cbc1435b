"""The ``proxykern`` console script end to end on tiny saved checkpoints."""
from __future__ import annotations

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
