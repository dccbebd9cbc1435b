"""proxykern.loading: model / tokenizer loading whose errors name the argument and the path.

A mistyped local folder must say "no such folder" (Hugging Face alone says "Repo id must
use alphanumeric chars" or tries the hub); nothing here touches the network: hub-shaped
names run against a stubbed ``from_pretrained``.
"""
from __future__ import annotations

import os

import pytest
import torch
import transformers

from proxykern.loading import (can_be_hub_name, load_causal_lm, load_tokenizer,
                               resolve_model_path)

from gen_fixtures import save_tiny_checkpoints


@pytest.fixture
def no_hub(monkeypatch):
    """from_pretrained stubbed: records its paths and fails like a missing hub repo."""
    calls = []

    def fail(path, *args, **kwargs):
        calls.append(path)
        raise OSError(f"{path} is not a local folder and is not a valid model identifier")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fail)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fail)
    return calls


@pytest.mark.parametrize("name, expect", [
    ("gpt2", True), ("Qwen/Qwen2.5-0.5B", True), ("org/model.v1_x", True),
    ("/abs/path", False), ("./model", False), ("../model", False), ("a/b/c", False),
    ("~/model", False), ("with space", False), ("dir\\model", False), ("org/..", False),
])
def test_hub_name_shape(name, expect):
    assert can_be_hub_name(name) is expect


@pytest.mark.parametrize("path", ["/nonexistent", "/no/such/folder", "./no_such_model",
                                  "../no_such_model", "examples/trio/models/bse",
                                  "~/no_such_model_here"])
def test_missing_local_folder_is_named_before_hugging_face(path, no_hub):
    for load in (lambda: load_causal_lm("--base", path, torch.float32, "cpu"),
                 lambda: load_tokenizer("model_args tokenizer", path)):
        with pytest.raises(ValueError, match=r"^(--base|model_args tokenizer): no such "
                                             r"folder: ") as err:
            load()
        assert os.path.expanduser(path) in str(err.value)
    assert no_hub == []  # decided from the path alone


def test_a_file_is_not_a_folder(tmp_path, no_hub):
    f = tmp_path / "model.safetensors"
    f.write_text("")
    with pytest.raises(ValueError, match=f"^base: not a folder: {f}$"):
        load_causal_lm("base", str(f), torch.float32, "cpu")
    assert no_hub == []


def test_hub_shaped_name_with_a_local_parent(tmp_path, monkeypatch, no_hub):
    """``models/bse`` beside an existing ``models/``: tried as a hub name (it may be one),
    then reported as the missing folder it most likely is."""
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"^--expert: no such folder: models/bse \(nor a "
                                         r"loadable hub name: .*not a valid model"):
        load_causal_lm("--expert", "models/bse", torch.float32, "cpu")
    assert no_hub == ["models/bse"]


def test_hub_name_that_does_not_load_names_argument_and_path(no_hub):
    with pytest.raises(ValueError, match=r"^--anti-expert: cannot load org/missing: .*not "
                                         r"a valid model identifier"):
        load_causal_lm("--anti-expert", "org/missing", torch.float32, "cpu")
    assert no_hub == ["org/missing"]


@pytest.mark.parametrize("path", [None, "", "  ", 3])
def test_empty_or_non_text_path(path, no_hub):
    with pytest.raises(ValueError, match="^base: expected a model folder or hub name"):
        load_tokenizer("base", path)


def test_folder_without_a_model_names_argument_and_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"^--base: cannot load {empty}: "):
        load_causal_lm("--base", str(empty), torch.float32, "cpu")
    with pytest.raises(ValueError, match=f"^--base: cannot load {empty}: "):
        load_tokenizer("--base", str(empty))


def test_loads_a_saved_model_and_tokenizer(tmp_path):
    paths = save_tiny_checkpoints(tmp_path)
    model = load_causal_lm("--base", paths["base"] + "/", torch.float16, "cpu")
    assert not model.training and model.dtype == torch.float16
    assert model.device == torch.device("cpu")
    tok = load_tokenizer("--base", paths["base"])
    assert tok("hello world").input_ids
    assert resolve_model_path("--base", f"  {paths['base']} ") == (paths["base"], False)
