"""Write the trio's held-out questions as local lm-eval data (``trio_qa.jsonl`` and more).

One line per held-out item of ``../models/heldout.json`` (600: three questions about each
of 200 people no model was tuned on)::

    prompt      "question : where does gus wren live ? answer :"
    attribute   "city";  answer: "emberly";  person: "gus wren"
    choices     6 answer sentences for the multiple-choice form, in a per-item shuffled order:
                the asked fact with its true value, the asked fact with 3 false values,
                and the person's 2 other true facts (true, but not what was asked)
    gold        the index of the right choice

and ``trio_values.json``: the 20 values of each attribute (a generated answer is read as
the first of them named in its first sentence, as ``proxykern demo`` scores answers).

The choices test what proxy tuning changes here: answering the asked question (the
tuned expert's contribution) with the right value (the base's knowledge).

    python examples/trio/lm_eval/make_data.py      # deterministic; rewrites both files
"""
from __future__ import annotations

import json
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
HELDOUT = os.path.join(HERE, "..", "models", "heldout.json")
OUT = os.path.join(HERE, "trio_qa.jsonl")
VALUES = os.path.join(HERE, "trio_values.json")

# The task's question and answer templates (examples/trio/world.py, ATTRIBUTES).
QUESTIONS = {"city": "where does {n} live ?", "job": "what does {n} do for work ?",
             "pet": "which animal does {n} keep ?"}
ANSWERS = {"city": "{n} lives in {v} .", "job": "{n} works as a {v} .", "pet": "{n} keeps a {v} ."}


def person_of(prompt: str, attribute: str) -> str:
    body = prompt[len("question : "):-len(" answer :")]
    before, after = QUESTIONS[attribute].split("{n}")
    assert body.startswith(before) and body.endswith(after), prompt
    return body[len(before):len(body) - len(after)]


def make_docs(heldout: dict) -> list[dict]:
    facts = {}
    for it in heldout["items"]:
        person = person_of(it["prompt"], it["attribute"])
        facts.setdefault(person, {})[it["attribute"]] = it["answer"]
    docs = []
    for i, it in enumerate(heldout["items"]):
        attr, answer = it["attribute"], it["answer"]
        n = person_of(it["prompt"], attr)
        rng = random.Random(i)
        wrong = rng.sample([v for v in heldout["values"][attr] if v != answer], 3)
        right = ANSWERS[attr].format(n=n, v=answer)
        choices = ([right] + [ANSWERS[attr].format(n=n, v=v) for v in wrong]
                   + [ANSWERS[b].format(n=n, v=facts[n][b]) for b in ANSWERS if b != attr])
        rng.shuffle(choices)
        docs.append(dict(prompt=it["prompt"], attribute=attr, answer=answer, person=n,
                         choices=choices,
                         gold=choices.index(right)))
    return docs


def main() -> None:
    with open(HELDOUT) as f:
        heldout = json.load(f)
    docs = make_docs(heldout)
    with open(VALUES, "w") as f:
        json.dump(heldout["values"], f, indent=1)
        f.write("\n")
    with open(OUT, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")
    print(f"wrote {len(docs)} items to {OUT} and the values to {VALUES}")


if __name__ == "__main__":
    main()
