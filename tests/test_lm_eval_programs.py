"""The lm-eval model ``proxykern`` with logit programs and sweeps (CPU, the shipped trio).

* model_args for each program (``program=dexperts|contrastive|contrastive_li|ensemble``) and
  the errors that name the model_arg;
* a program's loglikelihood / generate_until are ``program_logprobs`` / ``program_generate``;
* a sweep (``alpha=0.5;1;2``) scores K values from one forward per model, each equal to a
  model built with that one value; ``sweep_output`` and ``sweep_accuracy``.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval", reason="needs the eval extra (lm-eval)")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from proxykern import program_generate, program_logprobs, programs  # noqa: E402
from proxykern.apps.demo import DEFAULT_TRIO  # noqa: E402
from proxykern.integrations.lm_eval_model import (MODEL_ARGS, model_args_help,  # noqa: E402
                                                  program_spec, sweep_accuracy, sweep_summary)

pytestmark = pytest.mark.skipif(not os.path.isdir(DEFAULT_TRIO), reason="no shipped trio")

TASKS_DIR = os.path.join(os.path.dirname(DEFAULT_TRIO), "lm_eval")
P = {n: os.path.join(DEFAULT_TRIO, n) for n in ("base", "expert", "anti_expert", "tuned_base")}
QUESTION = "question : where does gus wren live ? answer :"
# The trio's first held-out doc: the gold answer first, then distractors.
CHOICES = [" gus wren lives in emberly .", " gus wren keeps a bat .", " gus wren lives in gant .",
           " gus wren works as a farmer ."]
PROXY = f"base={P['base']},expert={P['expert']},anti_expert={P['anti_expert']}"
CONTRASTIVE = f"program=contrastive,expert={P['expert']},amateur={P['anti_expert']}"
DEXPERTS = f"program=dexperts,{PROXY}"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add overhead (and fight other jobs)
    yield
    torch.set_num_threads(threads)


def make(args: str, **extra):
    extra = ",".join(f"{k}={v}" for k, v in {"device": "cpu", "batch_size": 16, **extra}.items())
    return get_model("proxykern").create_from_arg_string(f"{args},{extra}")


def req(kind, *args, task=None, doc_id=None, idx=0):
    return Instance(request_type=kind, doc={}, arguments=tuple(args), idx=idx,
                    metadata=(task, doc_id, 1))


def mc_requests():
    return [req("loglikelihood", QUESTION, c, task="t", doc_id=0, idx=i)
            for i, c in enumerate(CHOICES)]


def encoded(lm, requests):
    pairs = [lm._encode_pair(*r.args) for r in requests]
    return [c for c, _x in pairs], [x for _c, x in pairs]


class ForwardCount:
    """Counts the forwards of each of ``models`` (forward hooks)."""

    def __init__(self, models):
        self.counts = {id(m): 0 for m in models}
        self.handles = [m.register_forward_hook(self._hook) for m in models]

    def _hook(self, module, _args, _out):
        self.counts[id(module)] += 1

    def close(self):
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------- model_args


def spec(args: str, mode="proxy"):
    from lm_eval.utils import simple_parse_args_string

    return program_spec(simple_parse_args_string(args), mode)


def test_program_model_args_are_in_the_one_table_and_the_help():
    names = [a.name for a in MODEL_ARGS]
    for name in ("program", "amateur", "roles", "beta", "plausibility", "base_top_p",
                 "weights", "sweep_output"):
        assert name in names
    help_text = model_args_help()
    assert "roles=a:PATH1;b:PATH2 weights=a:0.5;b:0.5" in help_text
    assert "alpha=0.5;1.0;2.0" in help_text


@pytest.mark.parametrize("args, name, roles, params", [
    (PROXY, "proxy_tuning", ("base", "expert", "anti_expert"), {"alpha": 1.0}),
    (PROXY + ",alpha=0.7", "proxy_tuning", ("base", "expert", "anti_expert"), {"alpha": 0.7}),
    (DEXPERTS, "dexperts", ("base", "expert", "anti_expert"),
     {"alpha": 2.0, "base_top_p": 0.9}),  # the preset's alpha when alpha is not given
    (DEXPERTS + ",alpha=1,base_top_p=0.5", "dexperts", ("base", "expert", "anti_expert"),
     {"alpha": 1.0, "base_top_p": 0.5}),
    (CONTRASTIVE, "contrastive", ("expert", "amateur"), {"beta": 0.5, "plausibility": 0.1}),
    (CONTRASTIVE + ",beta=1.5,plausibility=0.2", "contrastive", ("expert", "amateur"),
     {"beta": 1.5, "plausibility": 0.2}),
    (CONTRASTIVE.replace("contrastive", "contrastive_li"), "contrastive_li",
     ("expert", "amateur"), {"plausibility": 0.1}),
    ("program=ensemble,roles=a:/x/a;b:/x/b", "ensemble", ("a", "b"),
     {"weights": {"a": 0.5, "b": 0.5}}),
    ("program=ensemble,roles=a:/x/a; b:/x/b;c:org/c,weights=a:0.5;b:0.25;c:1", "ensemble",
     ("a", "b", "c"), {"weights": {"a": 0.5, "b": 0.25, "c": 1.0}}),
])
def test_each_program_from_model_args(args, name, roles, params):
    s = spec(args)
    assert s.name == name and s.programs[0].roles == roles and s.sweep is None
    assert s.programs[0].name == name
    for key, value in params.items():
        assert s.params[key] == pytest.approx(value)
    if name == "ensemble":
        assert s.paths == dict(zip(roles, ["/x/a", "/x/b", "org/c"][:len(roles)]))
        assert s.programs[0].coefficients == pytest.approx(tuple(params["weights"].values()))


@pytest.mark.parametrize("value", ["0.5;1;2", [0.5, 1, 2], (0.5, 1.0, 2.0), " 0.5 ; 1;2 "])
def test_alpha_sweep_from_a_string_or_a_list(value):
    s = program_spec({"base": "b", "expert": "e", "anti_expert": "a", "alpha": value})
    assert s.sweep == ("alpha", [0.5, 1.0, 2.0])
    assert [p.difference[3] for p in s.programs] == [0.5, 1.0, 2.0]


def test_model_args_survive_lm_evals_parsers():
    """The command line (key_val_to_dict) and simple_evaluate (simple_parse_args_string)
    both keep ';' and ':' values as text."""
    from lm_eval._cli.utils import key_val_to_dict
    from lm_eval.utils import simple_parse_args_string

    text = "program=ensemble,roles=a:/m/a;b:org/b,weights=a:0.5;b:0.5,alpha=0.5;1;2"
    for parse in (key_val_to_dict, simple_parse_args_string):
        got = parse(text)
        assert got["roles"] == "a:/m/a;b:org/b" and got["weights"] == "a:0.5;b:0.5"
        assert got["alpha"] == "0.5;1;2"


@pytest.mark.parametrize("args, message", [
    ("program=beam", "model_args program must be one of proxy_tuning, dexperts"),
    (DEXPERTS + ",beta=0.5", "model_args beta does not apply to program=dexperts"),
    (PROXY + ",amateur=/x", "model_args amateur does not apply to program=proxy_tuning"),
    (PROXY + ",plausibility=0.1", "plausibility does not apply to program=proxy_tuning"),
    (CONTRASTIVE + ",alpha=1", "model_args alpha does not apply to program=contrastive"),
    (CONTRASTIVE + f",base={P['base']}", "model_args base does not apply to program=contrastive"),
    (CONTRASTIVE.replace("contrastive", "contrastive_li") + ",beta=0.5",
     "beta does not apply to program=contrastive_li"),
    ("program=ensemble,roles=a:/x;b:/y,expert=/z", "expert does not apply to program=ensemble"),
    ("program=ensemble", "model_args roles is required"),
    ("program=ensemble,roles=a/x;b:/y", "model_args roles: expected ROLE:PATH"),
    ("program=ensemble,roles=a:/x", "model_args roles: an ensemble reads 2 to 8 models, got 1"),
    ("program=ensemble,roles=a:/x;a:/y", "model_args roles: a role is named twice"),
    ("program=ensemble,roles=a:/x;b:/y,weights=a:1;c:1", "model_args weights: role 'c'"),
    ("program=ensemble,roles=a:/x;b:/y,weights=a:1", "model_args weights: no weight for role"),
    ("program=ensemble,roles=a:/x;b:/y,weights=a:1;b:nan", "model_args weights b"),
    (CONTRASTIVE + ",plausibility=0", r"model_args plausibility must be in \(0, 1\]"),
    (DEXPERTS + ",base_top_p=1.5", r"model_args base_top_p must be in \(0, 1\]"),
    (CONTRASTIVE + ",beta=1e39", "model_args beta must be finite"),
    (PROXY + ",alpha=0.5;x", r"alpha must be a finite number.*item 1 of alpha"),
    (DEXPERTS + ",alpha=1;2,base_top_p=0.5;0.9", "model_args base_top_p: only one model_arg "
                                                "may be a list"),
])
def test_wrong_program_model_args_name_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        spec(args)


@pytest.mark.parametrize("args, message", [
    ("mode=base," + CONTRASTIVE, "model_args mode=base applies to program=proxy_tuning only"),
    (f"mode=base,base={P['base']},alpha=0.5;1", "model_args alpha: a sweep needs mode=proxy"),
    (PROXY + ",sweep_output=/tmp/x.json", "model_args sweep_output: there is no sweep"),
    (PROXY + ",alpha=1;2,sweep_output=/no/such/dir/x.json", "sweep_output: no such folder"),
    (f"program=contrastive,expert={P['expert']}", r"model_args amateur is required "
                                                   r"\(program=contrastive\)"),
    (CONTRASTIVE.replace(P["anti_expert"], "/no/such"), "model_args amateur: no such folder"),
    (f"program=ensemble,roles=a:{P['base']};b:/no/such", r"model_args roles \(b\): no such"),
    (f"program=ensemble,roles=a:{P['base']};b:{P['tuned_base']},chat_expert=true",
     "model_args chat_expert: program=ensemble has no role named expert"),
])
def test_wrong_combinations_are_refused_before_loading(args, message, monkeypatch):
    import proxykern.integrations.lm_eval_model as lm_eval_model

    def no_load(*a, **k):
        raise AssertionError("a model loaded before the model_args were checked")

    monkeypatch.setattr(lm_eval_model, "load_causal_lm", no_load)
    with pytest.raises(ValueError, match=message):
        make(args)


def test_mode_base_still_ignores_a_single_alpha():
    lm = make(f"mode=base,base={P['base']},alpha=3")
    assert lm.mode == "base" and lm.alpha == 0.0 and lm.sweep is None


# --------------------------------------------------------------------------- programs


@pytest.fixture(scope="module")
def contrastive_lm():
    return make(CONTRASTIVE)


@pytest.fixture(scope="module")
def dexperts_lm():
    return make(DEXPERTS)


def check_loglikelihood(lm, program, role_context=None):
    requests = mc_requests()
    got = lm.loglikelihood(requests)
    ctx, cont = encoded(lm, requests)
    out = program_logprobs(program, lm.role_models, ctx, cont, role_context=role_context)
    for (ll, greedy), total, g in zip(got, out.logprobs.sum(1).tolist(),
                                      out.greedy.all(1).tolist()):
        assert ll == pytest.approx(total, abs=1e-4) or ll == total == -math.inf
        assert greedy == g
    return got


@pytest.mark.parametrize("which", ["contrastive", "dexperts"])
def test_program_loglikelihood_is_program_logprobs(which, contrastive_lm, dexperts_lm):
    lm, program = {"contrastive": (contrastive_lm, programs.contrastive()),
                   "dexperts": (dexperts_lm, programs.dexperts())}[which]
    assert lm.tokenizer.name_or_path.endswith("expert" if which == "contrastive" else "base")
    got = check_loglikelihood(lm, program)
    if which == "contrastive":  # the gold answer is plausible to the expert
        assert math.isfinite(got[0][0])
    # (DExperts' base top-p 0.9 set holds none of the names the base does not know: -inf)


def test_contrastive_li_and_ensemble_loglikelihood():
    lm = make(CONTRASTIVE.replace("contrastive", "contrastive_li") + ",plausibility=0.05")
    check_loglikelihood(lm, programs.contrastive(variant="li", plausibility=0.05))
    lm = make(f"program=ensemble,roles=b:{P['base']};t:{P['tuned_base']},weights=b:0.3;t:0.7")
    got = check_loglikelihood(lm, programs.ensemble({"b": 0.3, "t": 0.7}))
    assert all(math.isfinite(ll) for ll, _g in got)


@pytest.mark.parametrize("which", ["contrastive", "dexperts"])
def test_program_generate_until_is_program_generate(which, contrastive_lm, dexperts_lm):
    lm, program = {"contrastive": (contrastive_lm, programs.contrastive()),
                   "dexperts": (dexperts_lm, programs.dexperts())}[which]
    prompts = [QUESTION, "question : what does gus wren do for work ? answer :"]
    texts = lm.generate_until([req("generate_until", p, {"until": ["."], "max_gen_toks": 10})
                               for p in prompts])
    tok = lm.tokenizer
    for prompt, text in zip(prompts, texts):
        ids = torch.tensor([tok(prompt).input_ids])
        gen = program_generate(program, lm.role_models, ids, max_new_tokens=10,
                               eos_token_id=lm.eos_ids)
        full = tok.decode(gen.tokens[0, :int(gen.lengths[0])], skip_special_tokens=True)
        assert text == full.split(".")[0]
        assert text.strip()


def test_chat_expert_formats_the_expert_roles_context():
    lm = make(CONTRASTIVE + ",chat_expert=true")
    tok = lm.expert_tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                   add_generation_prompt=True)
    e_ctx = tok(chat, add_special_tokens=False).input_ids
    check_loglikelihood(lm, programs.contrastive(), {"expert": [e_ctx] * len(CHOICES)})


# --------------------------------------------------------------------------- sweeps


def same_results(got, expect):
    """Equal (log-likelihood, greedy) lists: greedy flags exactly, -inf exactly, the rest
    up to float rounding."""
    assert [g for _ll, g in got] == [g for _ll, g in expect]
    for (ll, _g), (want, _w) in zip(got, expect):
        assert ll == want == -math.inf or ll == pytest.approx(want, abs=1e-5)


def test_alpha_sweep_equals_single_alpha_models_from_one_forward_per_model(tmp_path):
    alphas = [0.5, 1.0, 2.0]
    out = tmp_path / "sweep.json"
    lm = make(PROXY + ",alpha=0.5;1;2", sweep_output=str(out))
    assert lm.sweep == ("alpha", alphas) and lm.alpha == 0.5
    requests = mc_requests()
    count = ForwardCount(lm.models)
    try:
        sweep = lm.loglikelihood_sweep(requests)
        assert sorted(count.counts.values()) == [1, 1, 1]  # one forward per model, K = 3
        reported = lm.loglikelihood(requests)
        assert sorted(count.counts.values()) == [2, 2, 2]
    finally:
        count.close()
    assert len(sweep) == 3 and reported == sweep[0]
    for a, got in zip(alphas, sweep):
        same_results(got, make(PROXY + f",alpha={a}").loglikelihood(requests))
    # sweep_output: every request's K values, per-task sums
    report = json.loads(out.read_text())
    assert report["program"] == "proxy_tuning" and report["sweep"] == "alpha"
    assert report["values"] == alphas and report["reported"] == 0.5
    assert [r["idx"] for r in report["requests"]] == list(range(len(CHOICES)))
    for i, r in enumerate(report["requests"]):
        assert r["task"] == "t" and r["doc_id"] == 0 and r["type"] == "loglikelihood"
        assert r["loglikelihood"] == pytest.approx([sweep[k][i][0] for k in range(3)])
        assert r["greedy"] == [sweep[k][i][1] for k in range(3)]
    summary = report["tasks"]["t"]["loglikelihood"]
    assert summary["requests"] == len(CHOICES) and summary["docs"] == 1
    assert summary["loglikelihood"] == pytest.approx(
        [sum(ll for ll, _g in sweep[k]) for k in range(3)])
    # generation needs one alpha
    with pytest.raises(ValueError, match=r"generate_until: model_args alpha is a sweep "
                                         r"\(0.5;1;2\)"):
        lm.generate_until([req("generate_until", QUESTION, {"until": ["."]})])


def test_program_sweep_equals_single_value_models(contrastive_lm):
    lm = make(CONTRASTIVE + ",beta=0.25;0.5;1")
    requests = mc_requests()
    count = ForwardCount(lm.models)
    try:
        sweep = lm.loglikelihood_sweep(requests)
    finally:
        count.close()
    assert list(count.counts.values()) == [1, 1]  # one forward per model, K = 3
    for beta, got in zip((0.25, 0.5, 1.0), sweep):
        single = (contrastive_lm if beta == 0.5 else make(CONTRASTIVE + f",beta={beta}")
                  ).loglikelihood(requests)
        same_results(got, single)


def test_rolling_loglikelihood_under_a_sweep_records_every_value():
    lm = make(PROXY + ",alpha=0;1")
    text = "gus wren lives in emberly . gus wren works as a farmer ."
    (total,) = lm.loglikelihood_rolling([req("loglikelihood_rolling", text, task="ppl")])
    (record,) = [r for r in lm.sweep_report()["requests"] if r["type"] == "loglikelihood_rolling"]
    assert record["loglikelihood"][0] == total and record["task"] == "ppl"
    base_alone = make(f"mode=base,base={P['base']}")
    (base_total,) = base_alone.loglikelihood_rolling([req("loglikelihood_rolling", text)])
    assert total == pytest.approx(base_total, abs=1e-4)  # alpha 0 is the base alone
    assert record["loglikelihood"][1] != pytest.approx(total)


def test_sweep_accuracy_is_lm_evals_acc():
    """A tiny report: doc 0 right at value 0 only, doc 1 right at both (a tie goes to
    the first choice, as lm-eval's argmax)."""
    records = [dict(type="loglikelihood", task="t", doc_id=0, idx=i, loglikelihood=ll,
                    greedy=[False, False]) for i, ll in enumerate([[-1, -3], [-2, -1]])]
    records += [dict(type="loglikelihood", task="t", doc_id=1, idx=i, loglikelihood=ll,
                     greedy=[True, False]) for i, ll in enumerate([[-5, -math.inf],
                                                                   [-5, -math.inf]])]
    report = dict(values=[0.5, 1.0], requests=records)
    assert sweep_accuracy(report, {0: 0, 1: 0}) == [1.0, 0.5]
    assert sweep_accuracy(report, {0: 1}, task="t") == [0.0, 1.0]
    assert sweep_summary(records, 2)["t"]["loglikelihood"]["greedy"] == [2, 0]
    with pytest.raises(ValueError, match="no log-likelihood request"):
        sweep_accuracy(report, {7: 0})


def test_sweep_through_simple_evaluate_matches_lm_evals_acc(tmp_path):
    """lm-eval's own run of a sweep: it reports the first alpha, and sweep_output (with the
    gold choices of the logged samples) gives the same acc for that alpha."""
    from lm_eval.tasks import TaskManager

    out = tmp_path / "sweep.json"
    res = lm_eval.simple_evaluate(
        model="proxykern", model_args=f"{PROXY},alpha=1;0,sweep_output={out},batch_size=64,"
                                      f"device=cpu",
        tasks=["trio_qa_mc"], task_manager=TaskManager(include_path=TASKS_DIR), limit=6,
        log_samples=True, verbosity="ERROR")
    gold = {s["doc_id"]: int(s["target"]) for s in res["samples"]["trio_qa_mc"]}
    acc = sweep_accuracy(str(out), gold, task="trio_qa_mc")
    assert acc[0] == pytest.approx(res["results"]["trio_qa_mc"]["acc,none"])
    report = json.loads(out.read_text())
    assert report["tasks"]["trio_qa_mc"]["loglikelihood"]["docs"] == 6
