"""Flags from config dataclasses, and `--help` that shows the values a command will use."""

from __future__ import annotations

import argparse

import pytest
from conftest import Toy
from monofast import cli
from monofast.cli import flags


def parse(argv):
    parser = argparse.ArgumentParser()
    flags.add_arguments(parser, Toy)
    return parser.parse_args(argv)


def test_flags_parse_every_type():
    args = parse(["--n-embd", "128", "--lr", "3e-4", "--compile", "--widths", "4,8",
                  "--limit", "none", "--tag", "x", "--tag", "y"])
    over = flags.cli_overrides(Toy, args)
    assert over == {"n_embd": 128, "lr": 3e-4, "compile": True, "widths": (4, 8), "limit": None,
                    "tags": ("x", "y")}


def test_unset_flags_do_not_override():
    assert flags.cli_overrides(Toy, parse([])) == {}
    assert flags.cli_overrides(Toy, parse(["--no-compile"])) == {"compile": False}


def test_bad_flag_value_exits_2(capsys):
    with pytest.raises(SystemExit) as err:
        parse(["--n-embd", "wide"])
    assert err.value.code == 2


def _help(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as err:
        cli.main([*argv, "--help"])
    assert err.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines


def test_help_shows_the_preset_values(capsys):
    quick = _help(capsys, "gpt", "train")  # the default preset is quick
    assert "(now: 128, from the quick preset)" in quick  # --n-embd
    assert "(now: 1500, from the quick preset)" in quick  # --max-iters
    assert "(now: 0.1, the default)" in quick  # --weight-decay: no preset sets it
    laptop = _help(capsys, "gpt", "train", "--preset", "laptop")
    assert "(now: 192, from the laptop preset)" in laptop
    assert "(now: 1200, from the laptop preset)" in laptop
    sae = _help(capsys, "sae", "train")
    assert "(now: april2024, from the quick preset)" in sae
    assert "(now: 2.0,2.75,4.0, from the quick preset)" in sae
    smoke = _help(capsys, "sae", "train", "--preset", "smoke")
    assert "(now: 2, from the smoke preset)" in smoke  # --expansion
    assert "(now: anthropic2023, the default)" in smoke  # smoke sets no variant


def test_help_shows_config_file_values(capsys, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[gpt]\nn_embd = 96\n")
    text = _help(capsys, "gpt", "train", "--preset", "laptop", "--config", str(cfg))
    assert f"(now:96,fromtheconfig{cfg})" in text.replace(" ", "")  # argparse breaks long paths
    assert "(now: 1200, from the laptop preset)" in text


@pytest.mark.parametrize("preset", ["smoke", "laptop"])
@pytest.mark.parametrize("command", [["data"], ["gpt", "train"], ["activations", "harvest"], ["harvest"],
                                     ["sae", "train"], ["analysis"], ["site"]],
                         ids=lambda c: "-".join(c) if isinstance(c, list) else c)
def test_every_stage_help_names_its_preset(capsys, command, preset):
    from monofast.run import presets
    from monofast.run.resolve import explain
    from monofast.run.stages import STAGES

    text = _help(capsys, *command, "--preset", preset)
    stage = next(s for s in STAGES if command == s.cli().split()[1:] or command == list(s.aliases[:1]))
    origins = explain(stage, preset)
    for key in presets.stage_values(preset, stage.name):
        value = origins[key].value
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        assert f"(now: {shown}, from the {preset} preset)" in text, key


def test_a_renamed_command_names_the_new_one(capsys):
    assert cli.main(["analyze", "--preset", "smoke"]) == 2
    assert capsys.readouterr().err.strip() == "monofast: error: `monofast analyze` is now `monofast analysis`"


@pytest.mark.parametrize("value", ["-1e6", "-1E+6", "-.5e-3", "-inf"])
def test_negative_numbers_in_any_spelling_are_values(value):
    from monofast.cli.options import Parser

    parser = Parser(prog="toy")
    flags.add_arguments(parser, Toy)
    assert flags.cli_overrides(Toy, parser.parse_args(["--lr", value])) == {"lr": float(value)}


def test_a_word_for_an_integer_says_it_wants_an_integer(capsys):
    with pytest.raises(SystemExit):
        cli.main(["gpt", "train", "--n-layer", "abc"])
    assert "argument --n-layer: expected an integer, got 'abc'" in capsys.readouterr().err
