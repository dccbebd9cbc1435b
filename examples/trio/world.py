"""A synthetic world of people and facts, its pretraining corpus and its question/answer task.

Everything is generated from a seed (no downloaded data). The design mirrors the proxy-tuning
paper at small scale:

* the *corpus* states facts ("nora vell lives in tesk .") in several declarative templates,
  grouped into short biographies; a large model memorises more of them than a small one
  (capacity), and only a model with two or more layers learns to repeat a name from its
  context;
* the *task* asks for a fact in a question/answer format that the corpus never uses (its
  interviews answer "question : tell me about nora vell . answer :" with a whole
  biography in random order):
  "question : where does nora vell live ? answer : nora vell lives in tesk ." -- only
  tuning teaches the format, and the answer restates the fact in the corpus' own words so
  that a model that knows the fact can complete it once the format is set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = ["ada", "bo", "cai", "dara", "eli", "fen", "gus", "hana", "ivo", "juno", "kai", "lena",
         "milo", "nora", "otto", "pia", "quin", "rosa", "sami", "tova", "ugo", "vera", "wim",
         "xena", "yuri", "zoe", "arlo", "bea", "cyra", "dov"]
LAST = ["vell", "marr", "tosk", "quill", "brant", "sorrel", "hale", "ivers", "jorn", "kest",
        "lund", "mott", "nadir", "orlo", "pruett", "rask", "sable", "thorne", "umber", "vance",
        "wren", "yarrow", "zell", "abbot", "crane", "dunmore", "elm", "frost", "grove", "holt"]
CITIES = ["tesk", "varno", "ulmere", "dakka", "porrin", "seld", "quarth", "nimbe", "osk", "fallow",
          "brisk", "calder", "emberly", "gant", "hollin", "irk", "jessup", "kell", "lorn", "mirren"]
JOBS = ["baker", "pilot", "tailor", "mason", "cooper", "weaver", "farmer", "sailor", "miner",
        "potter", "smith", "scribe", "fisher", "glazier", "herald", "joiner", "chandler",
        "tanner", "carter", "brewer"]
PETS = ["cat", "dog", "owl", "goat", "hare", "crow", "newt", "pony", "frog", "toad", "lynx",
        "bat", "mole", "vole", "ram", "yak", "emu", "seal", "boar", "moth"]

ATTRIBUTES = {
    # attribute: (values, declarative templates, task question, task answer prefix,
    #             a reverse question: unused by the corpus since its interviews replaced
    #             quiz lines, but its words stay in the vocabulary of the shipped tokenizer)
    "city": (CITIES,
             ["{n} lives in {v} .", "the home of {n} is in {v} .", "{n} has a house in {v} ."],
             "where does {n} live ?", "{n} lives in", "who lives in {v} ?"),
    "job": (JOBS,
            ["{n} works as a {v} .", "by trade {n} is a {v} .", "{n} earns a living as a {v} ."],
            "what does {n} do for work ?", "{n} works as a", "who works as a {v} ?"),
    "pet": (PETS,
            ["{n} keeps a {v} .", "the pet of {n} is a {v} .", "{n} takes care of a {v} ."],
            "which animal does {n} keep ?", "{n} keeps a", "who keeps a {v} ?"),
}
SPECIAL_TOKENS = ["<pad>", "<unk>", "<eos>"]


@dataclass(frozen=True)
class QAItem:
    person: str
    attribute: str
    answer: str
    prompt: str      # "question : ... ? answer :"
    target: str      # " nora vell lives in tesk ." (what a tuned model should say)


def make_people(n_people: int, seed: int) -> dict[str, dict[str, str]]:
    """``n_people`` distinct two-word names, each with a random value per attribute."""
    rng = random.Random(seed)
    names = [f"{f} {l}" for f in FIRST for l in LAST]
    rng.shuffle(names)
    if n_people > len(names):
        raise ValueError(f"n_people must be <= {len(names)}")
    return {name: {attr: rng.choice(values) for attr, (values, *_rest) in ATTRIBUTES.items()}
            for name in names[:n_people]}


def corpus_sentences(people, seed: int, docs_per_person: int = 3) -> list[str]:
    """Short biographies: each person's facts, one sentence each, in shuffled order.

    Document ``i`` of a person uses template ``i`` of each fact (so every fact is seen in
    every template), and a biography names its person in every sentence -- which is
    how the models learn to repeat a name from their context.
    """
    rng = random.Random(seed)
    docs = []
    for name, facts in people.items():
        for i in range(docs_per_person):
            sentences = [templates[(i + j) % len(templates)].format(n=name, v=facts[attr])
                         for j, (attr, (_values, templates, *_rest)) in enumerate(ATTRIBUTES.items())]
            rng.shuffle(sentences)
            docs.append(" ".join(sentences))
    # Interviews in the corpus' own style answer "tell me about X" with X's biography, in
    # random order: the base learns that "answer :" restates the name and then some fact,
    # but not which fact a given question asks for -- that is what tuning teaches.
    for name, facts in people.items():
        sentences = [templates[0].format(n=name, v=facts[attr])
                     for attr, (_values, templates, *_rest) in ATTRIBUTES.items()]
        rng.shuffle(sentences)
        docs.append(f"question : tell me about {name} . answer : " + " ".join(sentences))
    rng.shuffle(docs)
    return docs


def qa_item(name: str, attr: str, value: str) -> QAItem:
    _values, _templates, question, answer_prefix, _quiz = ATTRIBUTES[attr]
    prompt = f"question : {question.format(n=name)} answer :"
    return QAItem(name, attr, value, prompt, f" {answer_prefix.format(n=name)} {value} .")


def qa_split(people, seed: int, train_fraction: float = 0.5):
    """Task items for tuning (half of the people) and held-out items (the other half)."""
    rng = random.Random(seed + 1)
    names = sorted(people)
    rng.shuffle(names)
    cut = int(len(names) * train_fraction)
    def items(group):
        return [qa_item(n, a, people[n][a]) for n in group for a in ATTRIBUTES]
    return items(names[:cut]), items(names[cut:])


def all_words() -> list[str]:
    """Every word the world can produce: the tokenizer's vocabulary."""
    words = set(FIRST + LAST + CITIES + JOBS + PETS
                + ["question", "answer", ":", "?", ".", "tell", "me", "about"])
    for _values, templates, question, prefix, quiz in ATTRIBUTES.values():
        for text in templates + [question, prefix, quiz]:
            words.update(w for w in text.split() if w not in ("{n}", "{v}"))
    return sorted(words)
