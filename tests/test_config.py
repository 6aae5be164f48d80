"""Config dataclasses <-> flags, files and presets."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field

import pytest

from monofast.common import config
from monofast.common.errors import UserError


@dataclass
class Toy:
    n_embd: int = 64
    """Width of the model."""
    lr: float = 1e-3
    """Learning rate, peak."""
    compile: bool = False
    """Use torch.compile."""
    name: str = "toy"
    """A name with 100% coverage."""
    widths: tuple[int, ...] = (1, 2)
    """Several widths."""
    limit: int | None = None
    """Optional limit."""
    tags: tuple[str, ...] = field(default=("a",), metadata={"flag": "--tag", "repeat": True})
    """Repeatable tag."""

    def __post_init__(self):
        if self.n_embd <= 0:
            raise ValueError("n_embd must be positive; use e.g. --n-embd 64")


def parse(argv):
    parser = argparse.ArgumentParser()
    config.add_arguments(parser, Toy)
    return parser.parse_args(argv)


def test_field_docs_are_help():
    docs = config.field_docs(Toy)
    assert docs["n_embd"] == "Width of the model."
    assert docs["tags"] == "Repeatable tag."


def test_flags_parse_every_type():
    args = parse(["--n-embd", "128", "--lr", "3e-4", "--compile", "--widths", "4,8",
                  "--limit", "none", "--tag", "x", "--tag", "y"])
    over = config.cli_overrides(Toy, args)
    assert over == {"n_embd": 128, "lr": 3e-4, "compile": True, "widths": (4, 8), "limit": None,
                    "tags": ("x", "y")}


def test_unset_flags_do_not_override():
    assert config.cli_overrides(Toy, parse([])) == {}
    assert config.cli_overrides(Toy, parse(["--no-compile"])) == {"compile": False}


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


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        parse(["--n-embd", "wide"])
    assert err.value.code == 2


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
