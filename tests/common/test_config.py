"""Config dataclasses from layers of values: parsing, coercion, files, checks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import pytest
from conftest import Toy
from monofast.common import config
from monofast.common.errors import UserError


def test_field_docs_are_help():
    docs = config.field_docs(Toy)
    assert docs["n_embd"] == "Width of the model."
    assert docs["tags"] == "Repeatable tag."


def test_layers_later_wins_and_coerce():
    cfg = config.build(Toy, {"n_embd": 32, "lr": 1}, {"n_embd": "256", "widths": [3, 5]})
    assert cfg.n_embd == 256 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.widths == (3, 5)


def test_unknown_key_suggests():
    with pytest.raises(UserError, match="unknown option 'n_emb'.*n_embd"):
        config.build(Toy, {"n_emb": 3})


def test_post_init_error_becomes_user_error():
    with pytest.raises(UserError, match="--n-embd 64"):
        config.build(Toy, {"n_embd": 0})


def test_bad_value_in_file_layer():
    with pytest.raises(UserError, match="n_embd"):
        config.build(Toy, {"n_embd": "wide"})


def test_load_toml_and_json(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('vocab_size = 2048\n[gpt]\nn_embd = 96\n')
    assert config.load_config_file(toml) == {"vocab_size": 2048, "gpt": {"n_embd": 96}}
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"data": {"vocab_size": 512}}))
    assert config.load_config_file(js) == {"data": {"vocab_size": 512}}
    bad = tmp_path / "bad.toml"
    bad.write_text("vocab_size = = 3")
    with pytest.raises(UserError, match="cannot parse"):
        config.load_config_file(bad)
    with pytest.raises(UserError, match="not found"):
        config.load_config_file(tmp_path / "missing.toml")


def test_to_dict_is_json_ready():
    assert config.to_dict(Toy()) == {"n_embd": 64, "lr": 1e-3, "compile": False, "name": "toy",
                                     "widths": [1, 2], "limit": None, "tags": ["a"]}


@dataclass
class Runtimed:
    RUNTIME: ClassVar[frozenset[str]] = frozenset({"device", "dtype"})

    width: int = 4
    """Decides the results."""
    device: str = "auto"
    """Does not."""
    dtype: str = "auto"
    """Compute precision: runtime, like the device."""


def test_identity_leaves_out_runtime_fields():
    assert config.identity(Runtimed(dtype="float32")) == config.identity(Runtimed(dtype="bfloat16")) == {"width": 4}
    assert config.same_identity({"width": 4}, Runtimed(device="cpu"))
    assert not config.same_identity({"width": 5}, Runtimed())
    assert not config.same_identity(None, Runtimed())


def test_a_record_from_before_a_field_became_runtime_still_matches():
    # written when dtype still counted as config
    assert config.same_identity({"width": 4, "dtype": "float32"}, Runtimed(dtype="bfloat16"))
    assert not config.same_identity({"width": 4, "dtype": "float32", "extra": 1}, Runtimed())
