"""The lm-evaluation-harness model ``proxykern`` (proxykern.integrations.lm_eval_model), CPU.

Through lm-eval's Python API on the local trio tasks (examples/trio/lm_eval): the proxy-tuned
base beats the base alone and the expert alone in both forms. Measured when written (first
90 held-out items): multiple choice acc base 32/90, expert 48/90, proxy 68/90; generation
exact match base 30/90, expert 20/90, proxy 57/90 (the same answers as tests/test_trio.py).
"""
from __future__ import annotations

import functools
import os
import re
import shlex

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from proxykern import fused_proxy_generate, proxy_logprobs  # noqa: E402
from proxykern.apps.demo import DEFAULT_TRIO  # noqa: E402
from proxykern.integrations.lm_eval_model import (MODEL_ARGS, TRIO_EXAMPLE, ProxyKernLM,  # noqa: E402
                                     _StopWatch, _StopWhenDone, cli_main)
from proxykern.reference import row_seeds  # noqa: E402

from gen_fixtures import save_tiny_checkpoints  # noqa: E402

TASKS_DIR = os.path.join(os.path.dirname(DEFAULT_TRIO), "lm_eval")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What lm-eval 0.4.13's command line passes beside model_args when --device and
# --batch_size are not given (its EvaluatorConfig defaults).
CLI_DEFAULTS = {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"}
ITEMS = 90
MARGIN = 0.1
QUESTION = "question : where does gus wren live ? answer :"

pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")


def trio_args(mode="proxy"):
    p = {n: os.path.join(DEFAULT_TRIO, n) for n in ("base", "expert", "anti_expert")}
    if mode == "base":
        return f"mode=base,base={p['base']}"
    if mode == "expert":
        return f"mode=expert,expert={p['expert']}"
    return f"base={p['base']},expert={p['expert']},anti_expert={p['anti_expert']},alpha=1.0"


@pytest.fixture(scope="module")
def proxy_lm():
    return get_model("proxykern").create_from_arg_string(trio_args() + ",batch_size=4,device=cpu")


def req(kind, *args):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=0)


# --------------------------------------------------------------------------- the local task

@pytest.fixture(scope="module")
def trio_results():
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=TASKS_DIR)
    results = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and fight other jobs)
    try:
        for mode in ("base", "expert", "proxy"):
            results[mode] = lm_eval.simple_evaluate(
                model="proxykern", model_args=trio_args(mode) + ",batch_size=64,device=cpu",
                tasks=["trio_qa_mc", "trio_qa_gen"], task_manager=manager, limit=ITEMS,
                log_samples=True, verbosity="ERROR")
    finally:
        torch.set_num_threads(threads)
    return results


def test_registered_by_name_and_entry_point():
    from importlib.metadata import entry_points

    assert get_model("proxykern") is ProxyKernLM
    eps = [ep for ep in entry_points(group="lm_eval.models") if ep.name == "proxykern"]
    assert eps and eps[0].value == "proxykern.integrations.lm_eval_model:ProxyKernLM"


def test_trio_tasks_show_the_proxy_tuning_effect(trio_results):
    for task, metric in (("trio_qa_mc", "acc,none"), ("trio_qa_gen", "exact_match,none")):
        score = {m: r["results"][task][metric] for m, r in trio_results.items()}
        assert all(r["results"][task]["sample_len"] == ITEMS for r in trio_results.values())
        assert score["proxy"] >= score["base"] + MARGIN, (task, score)
        assert score["proxy"] >= score["expert"] + MARGIN, (task, score)
    # Generation stops at the task's stop string "." and answers in the tuned format.
    samples = trio_results["proxy"]["samples"]["trio_qa_gen"]
    answers = [s["resps"][0][0] for s in samples]
    assert len(answers) == ITEMS and not any("." in a for a in answers)
    assert answers[0] == "gus wren lives in emberly"


# --------------------------------------------------------------------------- requests

def test_loglikelihood_is_proxy_logprobs(proxy_lm):
    conts = [" gus wren lives in emberly .", " gus wren lives in tesk .", " gus wren keeps a bat ."]
    got = proxy_lm.loglikelihood([req("loglikelihood", QUESTION, c) for c in conts])
    tok = proxy_lm.tokenizer
    ctx = tok(QUESTION).input_ids
    out = proxy_logprobs(*proxy_lm.models, [ctx] * 3, [tok(c).input_ids for c in conts])
    totals, greedy = out.logprobs.sum(1).tolist(), out.greedy.all(1).tolist()
    for (ll, is_greedy), total, g in zip(got, totals, greedy):
        assert ll == pytest.approx(total, abs=1e-4) and is_greedy == g
    assert got[0][0] > got[1][0] and got[0][1]  # the right, greedy answer is likelier


def test_loglikelihood_rolling_windows(proxy_lm):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    text = "gus wren lives in emberly . gus wren works as a farmer . gus wren keeps a bat ."
    ids = proxy_lm.tokenizer(text).input_ids
    eot = proxy_lm.eot_token_id
    whole = proxy_logprobs(*proxy_lm.models, [[eot]], [ids]).logprobs.sum().item()
    (got,) = proxy_lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert got == pytest.approx(whole, abs=1e-4)

    saved, proxy_lm._max_length = proxy_lm._max_length, 8  # windows of 7 predictions each
    try:
        (short,) = proxy_lm.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    finally:
        proxy_lm._max_length = saved
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, eot, 7, 1)]
    assert len(windows) > 2
    expect = sum(proxy_logprobs(*proxy_lm.models, [c], [x]).logprobs.sum().item()
                 for c, x in windows)
    assert short == pytest.approx(expect, abs=1e-4)


def test_generate_until_honours_stops_and_per_request_kwargs(proxy_lm):
    tok = proxy_lm.tokenizer
    questions = [QUESTION, "question : what does gus wren do for work ? answer :",
                 "question : which animal does gus wren keep ? answer :"]
    enc = tok(questions, return_tensors="pt", padding=True)
    full = fused_proxy_generate(*proxy_lm.models, enc.input_ids, enc.attention_mask,
                                max_new_tokens=12, alpha=1.0, eos_token_id=proxy_lm.eos_ids,
                                pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(full.tokens, skip_special_tokens=True)
    assert all("." in t for t in texts) and "lives" in texts[0]

    kwargs = [{"until": ["."], "max_gen_toks": 12}, {"until": "lives", "max_gen_toks": 12},
              {"until": [], "max_gen_toks": 12}, {"until": ["."], "max_gen_toks": 2},
              {"until": ["works", "."], "max_gen_toks": 12, "do_sample": False}]
    requests = [req("generate_until", q, kw) for kw in kwargs for q in questions]
    got = proxy_lm.generate_until(requests)
    n = len(questions)
    assert got[:n] == [t.split(".")[0] for t in texts]
    assert got[n:2 * n] == [t.split("lives")[0] for t in texts]
    assert got[2 * n:3 * n] == texts
    two = tok.batch_decode(full.tokens[:, :2], skip_special_tokens=True)
    assert got[3 * n:4 * n] == [t.split(".")[0] for t in two]
    assert got[4 * n:] == [t.split("works")[0].split(".")[0] for t in texts]
    with pytest.raises(ValueError, match="num_beams"):
        proxy_lm.generate_until([req("generate_until", QUESTION, {"num_beams": 4})])
    with pytest.raises(ValueError, match="top_p"):
        proxy_lm.generate_until([req("generate_until", QUESTION, {"top_p": "high"})])


def test_stop_strings_end_the_decode_early(proxy_lm, monkeypatch):
    base = proxy_lm.models[0]
    forwards = []
    forward = type(base).forward

    @functools.wraps(forward)  # keeps the signature the decode engine inspects
    def counting(self, *args, **kwargs):
        if self is base:
            forwards.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(base), "forward", counting)
    (text,) = proxy_lm.generate_until([req("generate_until", QUESTION,
                                           {"until": ["."], "max_gen_toks": 40})])
    assert text == "gus wren lives in emberly"
    assert len(forwards) <= 8  # prefill + a step per token up to the ".", not 40


def test_stop_watch_ends_generation_once_every_row_stopped(proxy_lm):
    tok = proxy_lm.tokenizer
    watch = _StopWatch(tok, ["."], [tok.eos_token_id], 2)
    ids = tok(["gus wren lives in emberly . gus", "a b"]).input_ids
    watch.put(torch.zeros(2, 3, dtype=torch.long))  # the prompt is skipped
    for step in range(5):
        watch.put(torch.tensor([ids[0][step], tok.eos_token_id if step == 1 else 7]))
    assert watch.done == [False, True]
    with pytest.raises(_StopWhenDone):
        watch.put(torch.tensor([ids[0][5], 9]))  # "." ends row 0: all rows done
    assert watch.rows[1] == [7]


# --------------------------------------------------------------------------- chat expert

def test_chat_expert_reads_its_chat_formatted_context(tmp_path):
    paths = save_tiny_checkpoints(tmp_path)
    lm = ProxyKernLM(base=paths["base"], expert=paths["expert"], anti_expert=paths["anti"],
                     alpha=0.7, chat_expert=True, device="cpu", batch_size=2)
    tok = lm.tokenizer
    context = "hello world the cat sat"
    conts = [" on the mat", " and ran to house", " ."]
    chat = tok.apply_chat_template([{"role": "user", "content": context}], tokenize=False,
                                   add_generation_prompt=True)
    e_ctx = tok(chat, add_special_tokens=False).input_ids
    got = lm.loglikelihood([req("loglikelihood", context, c) for c in conts])
    out = proxy_logprobs(*lm.models, [tok(context).input_ids] * 3,
                         [tok(c).input_ids for c in conts], expert_context=[e_ctx] * 3,
                         alpha=0.7)
    for (ll, _g), total in zip(got, out.logprobs.sum(1).tolist()):
        assert ll == pytest.approx(total, abs=1e-4)

    (text,) = lm.generate_until([req("generate_until", context, {"until": [], "max_gen_toks": 6})])
    gen = fused_proxy_generate(*lm.models, torch.tensor([tok(context).input_ids]),
                               max_new_tokens=6, alpha=0.7, eos_token_id=lm.eos_ids,
                               expert_input_ids=torch.tensor([e_ctx]))
    assert text == tok.decode(gen.tokens[0, :int(gen.lengths[0])], skip_special_tokens=True)


# --------------------------------------------------------------------------- bad model_args

@pytest.mark.parametrize("args, name", [
    ("alpha=abc", "alpha"),
    ("alpha=nan", "alpha"),
    ("alpha=1e39", "alpha must be finite and within float32"),  # was taken; every call failed
    ("batch_size=100000000000000000000", "batch_size"),  # beyond int64: was taken
    ("seed=18446744073709551616", "seed"),  # 2**64: was taken, refused at the first sample
    ("mode=teacher", "mode"),
    ("dtype=int8", "dtype"),
    ("batch_size=0", "batch_size"),
    ("batch_size=auto", "batch_size"),
    ("max_length=1", "max_length"),
    ("max_gen_toks=-3", "max_gen_toks"),
    ("chat_expert=maybe", "chat_expert"),
    ("device=tpu9", "device"),
    ("temperature=0.5", "temperature"),
    ("backend=nope", "backend"),
    ("base=/no/such/folder", "base: no such folder: /no/such/folder"),
    ("expert=./no/such/folder", "expert: no such folder: ./no/such/folder"),
])
def test_bad_model_args_name_the_argument(args, name):
    base_args = dict(part.split("=", 1) for part in trio_args().split(","))
    key = args.split("=", 1)[0]
    base_args[key] = args.split("=", 1)[1]
    arg_string = ",".join(f"{k}={v}" for k, v in base_args.items())
    with pytest.raises(ValueError, match=name):
        get_model("proxykern").create_from_arg_string(arg_string)


def test_missing_folder_is_named_before_any_model_loads(monkeypatch):
    import proxykern.integrations.lm_eval_model as lm_eval_model

    def no_load(*args, **kwargs):
        raise AssertionError("a model loaded before the paths were checked")

    monkeypatch.setattr(lm_eval_model, "load_causal_lm", no_load)
    with pytest.raises(ValueError, match="^model_args anti_expert: no such folder: /nonexistent"):
        get_model("proxykern").create_from_arg_string(
            trio_args().replace(os.path.join(DEFAULT_TRIO, "anti_expert"), "/nonexistent"))


def test_missing_model_is_named():
    base, expert = (os.path.join(DEFAULT_TRIO, n) for n in ("base", "expert"))
    with pytest.raises(ValueError, match="anti_expert"):
        get_model("proxykern").create_from_arg_string(f"base={base},expert={expert}")


def test_unknown_model_arg_lists_the_table():
    with pytest.raises(ValueError, match="unknown argument.*pretrained") as err:
        get_model("proxykern").create_from_arg_string(trio_args() + ",pretrained=gpt2")
    listed = str(err.value).split("proxykern takes ")[1].rstrip(")").split(", ")
    assert listed == [a.name for a in MODEL_ARGS]


def test_every_model_arg_of_the_table_is_accepted():
    """The table is the constructor's signature: each name, at its default, is taken."""
    given = {a.name: a.default for a in MODEL_ARGS if a.default is not None}
    given.update((n, os.path.join(DEFAULT_TRIO, n)) for n in ("base", "expert", "anti_expert"))
    lm = ProxyKernLM(**given, device="cpu")
    assert lm.batch_size == 1 and lm.alpha == 1.0 and lm.mode == "proxy"


# --------------------------------------------------------------------------- device, batch_size

def lm_with(model_args: str, additional: dict):
    return get_model("proxykern").create_from_arg_string(trio_args() + model_args, additional)


@pytest.mark.parametrize("model_args, additional, batch_size", [
    (",device=cpu,batch_size=2", CLI_DEFAULTS, 2),  # model_args win over the CLI's defaults
    ("", {**CLI_DEFAULTS, "device": "cpu", "batch_size": "8"}, 8),  # the flags alone
    (",device=cpu,batch_size=2", {"device": "cpu", "batch_size": "2"}, 2),  # both, agreeing
    (",device=cpu,batch_size=3", {"device": None, "batch_size": None}, 3),  # simple_evaluate
    (",batch_size=4", CLI_DEFAULTS, 4),  # device: proxykern's default, not the CLI's cuda:0
])
def test_device_and_batch_size_from_model_args_or_lm_eval(model_args, additional, batch_size):
    lm = lm_with(model_args, additional)
    assert lm.batch_size == batch_size
    expect = "cpu" if "cpu" in model_args + str(additional) else (
        "cuda" if torch.cuda.is_available() else "cpu")
    assert lm.device.type == expect


@pytest.mark.parametrize("model_args, additional, message", [
    (",batch_size=2", {"batch_size": "8"}, r"batch_size: model_args batch_size=2 but "
                                           r"lm-eval's --batch_size .* is '8'"),
    (",device=cpu", {"device": "cuda:1"}, r"device: model_args device='cpu' but lm-eval's "
                                          r"--device .* is 'cuda:1'"),
    ("", {"batch_size": "auto"}, r"batch_size: 'auto' is not supported"),
])
def test_conflicting_or_bad_device_and_batch_size_are_named(model_args, additional, message):
    with pytest.raises(ValueError, match=message):
        lm_with(model_args, additional)


def test_create_from_arg_obj_merges_like_the_string_form():
    args = dict(part.split("=", 1) for part in trio_args().split(","))
    lm = get_model("proxykern").create_from_arg_obj({**args, "device": "cpu", "batch_size": 5},
                                                    CLI_DEFAULTS)
    assert lm.batch_size == 5 and lm.device.type == "cpu"
    with pytest.raises(ValueError, match="batch_size=5 but"):
        get_model("proxykern").create_from_arg_obj({**args, "batch_size": 5}, {"batch_size": 6})


def run_cli(argv, capsys) -> str:
    """``proxykern-lm-eval argv`` in this process; its stdout (the results table)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead
    try:
        with pytest.raises(SystemExit) as done:
            cli_main(argv)
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert done.value.code in (0, None), out
    return out


def table_row(out: str, task: str) -> list[str]:
    return next(line for line in out.splitlines() if line.startswith(f"|{task}")).split("|")


def test_cli_takes_device_and_batch_size_in_model_args(capsys, monkeypatch):
    """lm-eval's command line always passes device and batch_size beside model_args."""
    monkeypatch.chdir(REPO)
    out = run_cli(["--model", "proxykern", "--model_args",
                   trio_args() + ",device=cpu,batch_size=2", "--include_path", TASKS_DIR,
                   "--tasks", "trio_qa_gen", "--limit", "2"], capsys)
    assert "exact_match" in table_row(out, "trio_qa_gen")[5]


def readme_trio_command() -> list[str]:
    """The README's ``proxykern-lm-eval ... --include_path examples/trio/lm_eval`` command
    (its ``T=`` line substituted, continuation lines joined) as an argv."""
    with open(os.path.join(REPO, "README.md")) as f:
        blocks = re.findall(r"```bash\n(.*?)```", f.read(), re.S)
    block = next(b for b in blocks if "--include_path examples/trio/lm_eval" in b)
    lines = block.replace("\\\n", " ").splitlines()
    assign = next(line for line in lines if line.startswith("T="))
    command = next(line for line in lines if line.startswith("proxykern-lm-eval"))
    return shlex.split(command.replace("$T", assign[2:]))[1:]


def test_readme_trio_command_runs(capsys, monkeypatch):
    argv = readme_trio_command()
    assert " ".join(shlex.split(TRIO_EXAMPLE.replace("\\\n", " ").split("\n", 1)[1])[1:]) \
        == " ".join(argv).replace("examples/trio/models", "$T"), "README and --help differ"
    argv[argv.index("--limit") + 1] = "3"
    monkeypatch.chdir(REPO)  # the command's paths are relative to the repository root
    out = run_cli(argv, capsys)
    assert table_row(out, "trio_qa_mc")[5].strip() == "acc"
    assert table_row(out, "trio_qa_gen")[5].strip() == "exact_match"


# --------------------------------------------------------------------------- --help

@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["-h"]])
def test_help_lists_model_args_after_lm_evals_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        cli_main(argv)
    assert done.value.code == 0
    out = capsys.readouterr().out
    lm_eval_part, _, ours = out.partition("proxykern model (--model proxykern")
    assert "--model" in lm_eval_part and "usage:" in lm_eval_part  # lm-eval's own help first
    rows = [line.split()[0] for line in ours.splitlines() if line.startswith("  ")
            and not line.lstrip().startswith(("proxykern-lm-eval", "--", "T="))]
    assert [r.split("=")[0] for r in rows] == [a.name for a in MODEL_ARGS]
    assert "alpha=1.0" in rows and "batch_size=1" in rows and "seed=0" in rows
    assert TRIO_EXAMPLE in ours


# --------------------------------------------------------------------------- seeds

SAMPLED = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}


def test_sampled_request_i_draws_with_row_seeds(proxy_lm):
    """Request i of a sampled run is fused_proxy_generate with the per-row seed
    row_seeds(seed, i) (docs/api.md, one seed rule), whatever the batch size."""
    tok = proxy_lm.tokenizer
    questions = [QUESTION, "question : what does gus wren do for work ? answer :",
                 QUESTION, "question : which animal does gus wren keep ? answer :", QUESTION]
    requests = [req("generate_until", q, dict(SAMPLED)) for q in questions]
    requests.append(req("generate_until", QUESTION, {**SAMPLED, "seed": 11}))
    saved = proxy_lm.batch_size
    try:
        got = {}
        for proxy_lm.batch_size in (4, 1, 3):
            got[proxy_lm.batch_size] = proxy_lm.generate_until(requests)
    finally:
        proxy_lm.batch_size = saved
    assert got[1] == got[3] == got[4]
    texts = got[4]
    assert len({texts[0], texts[2], texts[4]}) > 1  # the same question, different draws

    for i, r in enumerate(requests):
        context, kwargs = r.args
        seed = kwargs.get("seed", proxy_lm.seed)
        one = fused_proxy_generate(
            *proxy_lm.models, torch.tensor([proxy_lm.tok_encode(context)]), max_new_tokens=8,
            alpha=1.0, temperature=1.0, seed=row_seeds(seed, torch.tensor([i])),
            eos_token_id=proxy_lm.eos_ids)
        assert texts[i] == tok.decode(one.tokens[0, :int(one.lengths[0])],
                                      skip_special_tokens=True), i


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": float("nan"), "do_sample": True}, "temperature"),  # was silently greedy
    ({"temperature": "nan"}, "temperature"),
    ({"temperature": 1.0, "top_k": 3.7}, "top_k"),  # was truncated to 3
    ({"temperature": 1.0, "seed": 1.5}, "seed"),  # was truncated to 1
    ({"temperature": 1.0, "top_k": 2 ** 64}, "top_k"),
    ({"temperature": 1e39}, "temperature"),
    ({"max_gen_toks": 2 ** 63}, "max_gen_toks"),
])
def test_bad_generation_kwargs_are_refused_naming_them_before_generating(proxy_lm, kwargs,
                                                                         name, monkeypatch):
    calls = []
    monkeypatch.setattr("proxykern.integrations.lm_eval_model.fused_proxy_generate",
                        lambda *a, **k: calls.append(1))
    kwargs = {"max_gen_toks": 5, **kwargs}  # room for the context: only `name` is wrong
    with pytest.raises(ValueError, match=f"generation kwarg {name}"):
        proxy_lm.generate_until([req("generate_until", QUESTION, kwargs)])
    assert not calls
