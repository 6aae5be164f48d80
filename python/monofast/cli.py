"""The `monofast` command line.

Commands are looked up lazily: `monofast --help` imports nothing heavy, and each
command's module (and torch, where it needs it) loads only when that command runs.
User errors print one line and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Sequence

from monofast import __version__
from monofast.errors import UserError

PROG = "monofast"


@dataclass(frozen=True)
class Command:
    """A CLI command: either a pipeline stage (`stage` set) or a module with
    `add_arguments(parser)` and `main(args)`."""

    help: str
    module: str | None = None
    stage: str | None = None


COMMANDS: dict[str, Command] = {
    "run": Command("run every stage of a preset into one run directory", module="monofast.cli:RunCommand"),
    "presets": Command("list the presets, what each sets, and its estimated time and disk use here",
                       module="monofast.cli:PresetsCommand"),
    "report": Command("write a run's results table, purity figure and feature-page screenshots",
                      module="monofast.report:ReportCommand"),
    "data": Command("stage 1: build the corpus and train the tokenizer", stage="data"),
    "gpt train": Command("stage 2: train the tiny GPT (resumable with --resume)", stage="gpt"),
    "gpt sample": Command("continue a prompt with the trained GPT", module="monofast.gpt:SampleCommand"),
    "harvest": Command("stage 3: store the GPT's MLP activations as shards (resumable)", stage="activations"),
    "activations verify": Command("check every activation shard's checksum; name the first bad one",
                                  module="monofast.activations:VerifyCommand"),
    "sae train": Command("stage 4: train sparse autoencoders on the activations", stage="sae"),
    "analyze": Command("stage 5: feature statistics, top and quantile examples, ablation effects",
                       stage="analysis"),
    "site": Command("stage 6: build the static feature browser (opens from file://)", stage="site"),
}


# ---------------------------------------------------------------------------------------
# Shared options of every stage command

class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (usage lines of stage commands run to dozens of
    flags): `monofast data: error: unrecognized arguments: --nope; see `monofast data --help``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """`--preset`, `--run` / `--name`, `--config`, `--force`: the options every stage command shares."""
    from monofast import presets

    group = parser.add_argument_group("run options")
    group.add_argument("--preset", default="quick", choices=presets.names(),
                       help="preset whose values are the starting point (default: quick)")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--run", type=Path, default=None, metavar="DIR",
                       help="run directory holding one folder per stage (default: runs/<preset>)")
    where.add_argument("--name", default=None, metavar="NAME",
                       help="run directory runs/NAME ($MONOFAST_RUNS/NAME where set)")
    group.add_argument("--config", type=Path, default=None, metavar="FILE",
                       help="TOML or JSON file of option values, flat or grouped by stage")
    group.add_argument("--force", action="store_true",
                       help="redo from scratch, even when the outputs are up to date (an interrupted "
                            "GPT or SAE stage starts over instead of continuing from its checkpoint)")


def run_dir(args: argparse.Namespace):
    from monofast.pipeline import RunDir, default_run_dir

    name = getattr(args, "name", None)  # commands with their own run options may lack --name
    if args.run is not None:
        return RunDir(args.run)
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise UserError(f"--name {name!r}: give a plain folder name such as quick-2; "
                            f"use --run DIR for a path")
        return RunDir(default_run_dir(name))
    return RunDir(default_run_dir(args.preset))


def file_layer(path: Path | None, stage: str, fields: set[str]) -> dict[str, Any]:
    """The part of a config file that applies to `stage`: its `[stage]` table, plus the
    top-level keys that are fields of the stage's config."""
    if path is None:
        return {}
    from monofast import config, pipeline

    data = config.load_config_file(path)
    stage_names = {s.name for s in pipeline.STAGES}
    layer = {k: v for k, v in data.items() if not isinstance(v, dict) and k.replace("-", "_") in fields}
    unknown_top = [k for k, v in data.items()
                   if not isinstance(v, dict) and k.replace("-", "_") not in _all_fields()]
    if unknown_top:
        raise UserError(f"{path}: unknown option(s) {', '.join(unknown_top)}")
    bad_tables = [k for k, v in data.items() if isinstance(v, dict) and k not in stage_names]
    if bad_tables:
        raise UserError(f"{path}: unknown stage table(s) {', '.join(bad_tables)}; "
                        f"stages are {', '.join(sorted(stage_names))}")
    layer.update(data.get(stage, {}))
    return layer


def _all_fields() -> set[str]:
    from monofast import pipeline

    names: set[str] = set()
    for stage in pipeline.STAGES:
        names.update(pipeline.stage_fields(stage))
    return names


class StageCommand:
    """`monofast <stage>`: resolve the stage's config and run it (skipped when up to date)."""

    def __init__(self, stage: str):
        from monofast import pipeline

        self.stage = pipeline.stage_named(stage)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from monofast import config

        add_run_options(parser)
        config.add_arguments(parser, self.stage.config_cls(), f"{self.stage.name} options")

    def main(self, args: argparse.Namespace) -> int:
        from monofast import config, pipeline

        cls = self.stage.config_cls()
        fields = set(pipeline.stage_fields(self.stage))
        cfg = pipeline.resolve_config(self.stage, args.preset, file_layer(args.config, self.stage.name, fields),
                                      config.cli_overrides(cls, args))
        pipeline.run_stage(self.stage, cfg, run_dir(args), force=args.force)
        return 0


class RunCommand:
    """`monofast run`: every stage in order."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from monofast import pipeline

        add_run_options(parser)
        parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                            help="override one option of one stage, e.g. --set data.vocab_size=2048 "
                                 "(repeatable)")
        parser.add_argument("--from", dest="start", default=None,
                            choices=[s.name for s in pipeline.STAGES],
                            help="re-run this stage and every later one")
        parser.add_argument("--to", dest="stop", default=None,
                            choices=[s.name for s in pipeline.STAGES],
                            help="stop after this stage")

    def main(self, args: argparse.Namespace) -> int:
        from monofast import pipeline, results

        layers: dict[str, list[dict[str, Any]]] = {}
        for stage in pipeline.STAGES:
            fields = set(pipeline.stage_fields(stage))
            layers[stage.name] = [file_layer(args.config, stage.name, fields)]
        for item in args.set:
            key, eq, value = item.partition("=")
            stage, dot, name = key.partition(".")
            if not eq or not dot:
                raise UserError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. data.vocab_size=2048")
            if stage not in layers:
                raise UserError(f"--set {item!r}: no stage {stage!r}; stages are {', '.join(layers)}")
            layers[stage].append({name: value})
        run = run_dir(args)
        pipeline.run_all(args.preset, run, layers, force=args.force, start=args.start, stop=args.stop)
        print(results.text(results.collect(run.root)), flush=True)
        return 0


class PresetsCommand:
    """`monofast presets`: every preset with its estimated time and disk use on this machine,
    then the values each sets."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--device", default="auto", metavar="DEVICE",
                            help="device the estimates are for: auto (cuda, then mps, then cpu), cpu, "
                                 "cuda or mps (default: auto)")
        parser.add_argument("--gflops", type=float, default=None, metavar="X",
                            help="assume this matrix-product rate (GFLOP/s) instead of measuring it")

    def main(self, args: argparse.Namespace) -> int:
        from monofast import estimate, pipeline
        from monofast.presets import PRESETS

        if args.gflops is not None and args.gflops <= 0:
            raise UserError(f"--gflops {args.gflops}: give a positive rate, e.g. --gflops 500")
        device = estimate.measure_device(args.device)
        if args.gflops is not None:
            device = device._replace(gflops=args.gflops, measured=False)
        how = "measured just now" if device.measured else "assumed"
        print(textwrap.fill(
            f"Estimated time and disk use of each preset on this machine ({device.name}, matrix "
            f"products at {device.gflops:,.0f} GFLOP/s, {how}). These are rough estimates from the "
            f"presets' sizes: expect the real numbers within about 2x, and more time on a busy machine.",
            width=92))
        print()
        table = []
        for name in PRESETS:
            configs = {s.name: pipeline.resolve_config(s, name) for s in pipeline.STAGES}
            table.append((name, estimate.estimate(configs, device)))
        print(f"  {'preset':8s} {'time (est.)':>13s} {'disk (est.)':>12s}  for")
        for name, stages in table:
            seconds = sum(e.seconds for e in stages.values())
            disk = sum(e.disk_bytes for e in stages.values())
            print(f"  {name:8s} {estimate.duration(seconds):>13s} {estimate.size(disk):>12s}  "
                  f"{PRESETS[name].get('about', '')}")
        for name, stages in table:
            print()
            print(f"{name}: {PRESETS[name].get('about', '')}")
            for stage, values in PRESETS[name].items():
                if isinstance(values, dict):
                    shown = ", ".join(f"{k}={v}" for k, v in values.items())
                    print(f"  {stage}: {shown}")
            shown = ", ".join(f"{stage} {estimate.duration(e.seconds)} / {estimate.size(e.disk_bytes)}"
                              for stage, e in stages.items())
            print(f"  estimated: {shown}")
        return 0


# ---------------------------------------------------------------------------------------
# Dispatch

def _overview() -> str:
    width = max(len(name) for name in COMMANDS) + 2
    lines = [
        f"usage: {PROG} [--version] COMMAND [options]",
        "",
        "Towards Monosemanticity, reproducible and fast: tiny GPT -> MLP activations -> sparse",
        "autoencoders -> feature browser.",
        "",
        "commands:",
    ]
    lines += [f"  {name.ljust(width)}{cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", f"Run `{PROG} COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _find(argv: Sequence[str]) -> tuple[str | None, int]:
    """The longest command name that prefixes argv, and how many words it took."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and name in COMMANDS:
            return name, words
    return None, 0


def _instantiate(name: str, command: Command) -> Any:
    if command.stage is not None:
        return StageCommand(command.stage)
    assert command.module is not None
    module, _, attr = command.module.partition(":")
    return getattr(importlib.import_module(module), attr)()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m monofast -- COMMAND`: the `--` keeps torchrun off --run
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_overview())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"{PROG} {__version__}")
        return 0
    name, used = _find(argv)
    if name is None:
        group = [n for n in COMMANDS if n.startswith(argv[0] + " ")]
        if group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(f"usage: {PROG} {argv[0]} {{{','.join(n.split()[1] for n in group)}}} ...")
            for n in group:
                print(f"  {n.ljust(20)}{COMMANDS[n].help}")
            return 0 if len(argv) > 1 else 2
        print(f"{PROG}: error: unknown command {' '.join(argv[:2])!r}; see `{PROG} --help`", file=sys.stderr)
        return 2

    # OpenMP threads that spin while waiting make torch up to 10x slower whenever another
    # process shares the cores (measured on a loaded 2-core machine: 1,300 ms against
    # 126 ms per GPT step); sleeping waits cost nothing measurable on an idle one. It must
    # be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from monofast import log

    log.setup()
    from monofast import distributed

    command = COMMANDS[name]
    try:
        followed = distributed.join()  # under torchrun: ranks > 0 follow rank 0 (see monofast.distributed)
        if followed is not None:
            return followed
        impl = _instantiate(name, command)
        parser = Parser(prog=f"{PROG} {name}", description=command.help)
        impl.add_arguments(parser)
        args = parser.parse_args(argv[used:])
        return int(impl.main(args) or 0)
    except UserError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `monofast presets | head` stopped reading: nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {err.filename}" if err.filename else ""
        print(f"{PROG}: error: the disk is full{where}; free some space (or pass --run on another "
              f"disk) and run the same command again: finished stages are kept", file=sys.stderr)
        return 2
    finally:
        distributed.leave()


