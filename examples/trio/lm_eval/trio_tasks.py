"""Helpers of the local lm-eval tasks ``trio_qa_mc`` and ``trio_qa_gen`` (no hub access).

The task YAMLs beside this file name these functions with ``!function trio_tasks.<name>``.
"""
from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load_trio_qa(**_kwargs):
    """The questions of ``trio_qa.jsonl`` as a ``datasets.DatasetDict`` (split ``test``)."""
    import datasets

    with open(os.path.join(HERE, "trio_qa.jsonl")) as f:
        docs = [json.loads(line) for line in f if line.strip()]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


_VALUES: dict = {}


def first_value(text: str, values) -> str | None:
    """The first of ``values`` named in the first sentence of ``text`` (as ``proxykern demo``)."""
    for word in text.split(".")[0].split():
        if word in values:
            return word
    return None


def process_generation(doc: dict, results: list) -> dict:
    """exact_match: the generated answer's value (first one named) is exactly the true one."""
    if not _VALUES:
        with open(os.path.join(HERE, "trio_values.json")) as f:
            _VALUES.update(json.load(f))
    value = first_value(results[0], _VALUES[doc["attribute"]])
    return {"exact_match": float(value == doc["answer"])}
