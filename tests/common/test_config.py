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


@pytest.mark.parametrize("name, content, match", [
    ("list.json", b"[1, 2]", "list.json holds a list, not a table of options"),
    ("text.json", b'"x"', "text.json holds a string, not a table of options"),
    ("bytes.toml", b"a = 1\n\xff\xfe\n", r"bytes.toml is not UTF-8 text \(invalid start byte at byte 6\)"),
    ("bytes.json", b'{"a": "\xff"}', "bytes.json is not UTF-8 text"),
], ids=["json-list", "json-string", "toml-bytes", "json-bytes"])
def test_a_config_file_that_is_no_table_of_options_is_a_user_error(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=match):
        config.load_config_file(tmp_path / name)


def test_a_word_for_an_integer_says_it_wants_an_integer():
    with pytest.raises(ValueError, match="expected an integer, got 'abc'"):
        config.parse_value(int, "abc")
    assert config.parse_value(int, "1e4") == 10_000


def test_not_utf8_shows_the_bytes_as_typed():
    import os

    assert config.not_utf8("héllo") is None
    assert config.not_utf8(os.fsdecode(b"ab\xff\xfecd")) == "ab\\xff\\xfecd"
    assert config.not_utf8("x\ud800") == "x\\ud800"  # a surrogate no byte makes


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


@dataclass
class Grown(Runtimed):
    """`Runtimed` after a release added a field."""

    sources: tuple[str, ...] = ("a", "b")
    """Added later."""


def test_a_field_added_since_matches_a_record_without_it_only_at_its_default():
    recorded = config.identity(Runtimed())  # written before `sources` existed
    assert config.same_identity(recorded, Grown())
    assert not config.same_identity(recorded, Grown(sources=("a",)))
    assert not config.same_identity(recorded, Grown(width=5))
    assert not config.same_identity({**recorded, "sources": ["a"]}, Grown())  # a recorded value must match
    assert not config.same_identity({**recorded, "gone": 1}, Grown())  # a field since removed is a change


def test_a_record_from_before_a_field_became_runtime_still_matches():
    # written when dtype still counted as config
    assert config.same_identity({"width": 4, "dtype": "float32"}, Runtimed(dtype="bfloat16"))
    assert not config.same_identity({"width": 4, "dtype": "float32", "extra": 1}, Runtimed())


# ---------------------------------------------------------------------------------------
# Values checked by type, whatever layer they come from

@pytest.mark.parametrize("layer, message", [
    ({"n_embd": [1, 2]}, "n_embd = [1, 2] is a list; expected an integer"),
    ({"n_embd": True}, "n_embd = true is a boolean; expected an integer"),
    ({"n_embd": 1.5}, "n_embd = 1.5 is not a whole number; expected an integer"),
    ({"n_embd": 2**63}, "n_embd = 9223372036854775808 is out of range"),
    ({"n_embd": None}, "n_embd is null; expected an integer"),
    ({"n_embd": "1e400"}, "n_embd = \"1e400\" is not an integer"),
    ({"lr": float("nan")}, "lr = nan is not a finite number; expected a finite number"),
    ({"lr": "-inf"}, "lr = -inf is not a finite number"),
    ({"lr": 10**400}, "lr = <an integer of about 401 digits> is too large"),
    ({"lr": False}, "lr = false is a boolean; expected a finite number"),
    ({"compile": 1}, "compile = 1 is an integer; expected true or false"),
    ({"name": 3}, "name = 3 is an integer; expected a string"),
    ({"name": "a\0b"}, "a string with a NUL character"),
    ({"widths": 3}, "widths = 3 is an integer; expected a list of integers"),
    ({"widths": [1, [2]]}, "widths[1] = [2] is a list; expected an integer"),
    ({"widths": [1, "x"]}, "widths[1] = \"x\" is not an integer"),
    ({"limit": {"a": 1}}, "limit = {\"a\": 1} is a table; expected an integer or none"),
    ({"tags": [None]}, "tags[0] is null; expected a string"),
])
def test_a_value_of_the_wrong_type_names_option_value_and_type(layer, message):
    with pytest.raises(UserError) as err:
        config.build(Toy, layer, where="toy config")
    assert str(err.value).startswith("toy config: ") and message in str(err.value)


def test_coercions_kept():
    cfg = config.build(Toy, {"n_embd": 1e2, "lr": 2, "widths": ["3", 4.0], "limit": "none",
                             "name": True, "tags": ("x",)})
    assert (cfg.n_embd, cfg.lr, cfg.widths, cfg.limit, cfg.name, cfg.tags) == (100, 2.0, (3, 4), None, "true", ("x",))
    assert type(cfg.n_embd) is int and type(cfg.lr) is float
    assert config.build(Toy, {"n_embd": "1e3", "widths": "5,6"}).widths == (5, 6)


@dataclass
class Fragile:
    size: int = 4
    """A size."""
    scale: float = 1.0
    """A scale."""

    def __post_init__(self):
        if self.size > 2**40:
            raise OverflowError("size too large to allocate")


@dataclass
class Buggy:
    size: int = 4
    """A size."""

    def __post_init__(self):
        raise AttributeError("no attribute 'sise'")


def test_other_post_init_errors_name_the_option_that_causes_them():
    with pytest.raises(UserError, match=r"^fragile: size = 2199023255553 cannot be used \(OverflowError: "
                                        r"size too large to allocate\); give another value$"):
        config.build(Fragile, {"scale": 2.0}, {"size": 2**41 + 1}, where="fragile")


def test_a_bug_in_post_init_keeps_its_traceback():
    with pytest.raises(AttributeError):
        config.build(Buggy, {"size": 5})
