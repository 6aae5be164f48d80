"""What every stage command shares: one-line argparse errors, the run options (`--preset`,
`--run` / `--name`, `--config`, `--force`), and the stage command itself, whose `--help`
shows the value each option will take with the preset (and config file) given."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path
from typing import Any, NoReturn, Sequence

from monofast.cli.flags import add_arguments, cli_overrides
from monofast.run import presets
from monofast.run.manifest import run_stage
from monofast.run.resolve import explain, file_layer, resolve_config
from monofast.run.stages import RunDir, Stage, run_dir, stage_named

DEFAULT_PRESET = "quick"


NEGATIVE_NUMBER = re.compile(r"^-(\.?\d|inf|nan)", re.IGNORECASE)
r"""What argparse must read as a (negative) value, not an option: argparse's own pattern
(`^-\d+$|^-\d*\.\d+$` in Python 3.11) takes `-1e6` and `-inf` for unknown options and
answers `expected one argument`; with these read as values, the option's check names the
range instead."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage lines of stage commands run to dozens of
    flags): `monofast data: error: unrecognized arguments: --nope; see `monofast data --help``.
    Negative numbers in any spelling are values (`NEGATIVE_NUMBER`): no option of monofast
    looks like one."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = NEGATIVE_NUMBER  # argparse's own attribute, read when parsing

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def add_run_options(parser: argparse.ArgumentParser, fields: Sequence[str] = ()) -> None:
    """`--preset`, `--run` / `--name`, `--config`, `--model`, `--allow-download`, `--force`:
    the options every stage command shares. A stage with a field of the same name (the gpt
    stage's `model`) has its own flag instead, under the same name."""
    group = parser.add_argument_group("run options")
    group.add_argument("--preset", default=DEFAULT_PRESET, choices=presets.names(),
                       help=f"preset whose values are the starting point (default: {DEFAULT_PRESET})")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--run", type=Path, default=None, metavar="DIR",
                       help="run directory holding one folder per stage (default: runs/<preset>)")
    where.add_argument("--name", default=None, metavar="NAME",
                       help="run directory runs/NAME ($MONOFAST_RUNS/NAME where set)")
    group.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="TOML or JSON file of option values, flat or grouped by stage")
    if "model" not in fields:
        group.add_argument("--model", default=None, metavar="PATH_OR_ID",
                           help="a Hugging Face causal LM (local folder, or hub id in the local cache) in the "
                                "tiny GPT's place: the data stage uses its tokenizer, the gpt stage records it "
                                "instead of training (pip install 'monofast[hf]'); pick where to read with "
                                "--hook (`monofast hooks --model ...` lists them)")
    if "allow_download" not in fields:
        group.add_argument("--allow-download", action="store_true",
                           help="with --model: let the model and its tokenizer download from the hub")
    group.add_argument("--force", action="store_true",
                       help="redo from scratch, even when the outputs are up to date (an interrupted "
                            "GPT or SAE stage starts over instead of continuing from its checkpoint)")


def model_layers(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The stage options `--model` and `--allow-download` set: the data stage's tokenizer and
    the gpt stage's model."""
    out: dict[str, dict[str, Any]] = {}
    model = getattr(args, "model", None)  # a stage's own flag is unset until given
    if isinstance(model, str) and model:
        out["data"] = {"tokenizer": model}
        out["gpt"] = {"model": model}
    if getattr(args, "allow_download", None) is True:
        for stage in ("data", "gpt"):
            out.setdefault(stage, {})["allow_download"] = True
    return out


def args_run_dir(args: argparse.Namespace) -> RunDir:
    """The run directory the parsed run options name."""
    return run_dir(args.run, getattr(args, "name", None), args.preset)


def peek_run_options(argv: Sequence[str]) -> tuple[str, Path | None]:
    """The `--preset` and `--config` of a command line before it is parsed: the help of
    every option shows the value they give it. An unknown preset reads as the default (the
    parser then names it)."""
    peek = argparse.ArgumentParser(add_help=False)
    peek.add_argument("--preset", default=DEFAULT_PRESET)
    peek.add_argument("--config", type=Path, default=None)
    known, _ = peek.parse_known_args(list(argv))
    preset = known.preset if known.preset in presets.names() else DEFAULT_PRESET
    return preset, known.config


class StageCommand:
    """`monofast <stage>`: resolve the stage's config and run it (skipped when up to date)."""

    def __init__(self, stage: str, argv: Sequence[str] = ()):
        self.stage: Stage = stage_named(stage)
        self.preset, self.config_file = peek_run_options(argv)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_run_options(parser, [f.name for f in dataclasses.fields(self.stage.config_cls())])
        origins = explain(self.stage, self.preset, self.config_file)
        add_arguments(parser, self.stage.config_cls(), f"{self.stage.name} options", origins)

    def main(self, args: argparse.Namespace) -> int:
        cli = cli_overrides(self.stage.config_cls(), args)
        by_model = model_layers(args)
        if by_model:  # with --model, the stages before this one run first where they are not up to date
            from monofast.run.pipeline import run_all

            layers = {name: [file_layer(args.config, name), values] for name, values in by_model.items()}
            layers.setdefault(self.stage.name, [file_layer(args.config, self.stage.name)]).append(cli)
            run_all(args.preset, args_run_dir(args), layers, start=self.stage.name if args.force else None,
                    stop=self.stage.name)
            return 0
        cfg = resolve_config(self.stage, args.preset, file_layer(args.config, self.stage.name), cli)
        run_stage(self.stage, cfg, args_run_dir(args), force=args.force)
        return 0
