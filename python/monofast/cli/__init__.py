"""The `monofast` command line: argparse and printing only. Nothing in the package imports it.

One module per command group (`options` for the stage commands, `run`, `gpt`,
`activations`, `report`). Commands are looked up lazily: `monofast --help` imports nothing
heavy, and each command's module (and torch, where it needs it) loads only when that
command runs. User errors print one line and exit with code 2; bugs keep their traceback.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from monofast import __version__
from monofast.common.errors import UserError
from monofast.run.stages import STAGES

PROG = "monofast"


@dataclass(frozen=True)
class Command:
    """A CLI command: either a pipeline stage (`stage` set) or a module with
    `add_arguments(parser)` and `main(args)`."""

    help: str
    module: str | None = None
    stage: str | None = None


def _commands() -> dict[str, Command]:
    """Every command in the order `monofast --help` lists them: the run-wide ones, then each
    stage's (named and described by `monofast.run.stages`) with the tools of its group."""
    commands = {
        "run": Command("run every stage of a preset into one run directory", module="monofast.cli.run:RunCommand"),
        "presets": Command("list the presets, what each sets, and its estimated time and disk use here",
                           module="monofast.cli.run:PresetsCommand"),
        "hooks": Command("list a Hugging Face model's hooks (--model) with their widths",
                         module="monofast.cli.hf:HooksCommand"),
        "report": Command("write a run's results table, purity figure and feature-page screenshots",
                          module="monofast.cli.report:ReportCommand"),
    }
    tools = {
        "gpt": ("gpt sample", Command("continue a prompt with the trained GPT", module="monofast.cli.gpt:SampleCommand")),
        "activations": ("activations verify", Command("check every activation shard's checksum; name the first bad one",
                                                      module="monofast.cli.activations:VerifyCommand")),
    }
    number, extra = 0, ""
    for stage in STAGES:
        if stage.extra and stage.extra != extra:  # an extra's stages share a number (`--with findings`)
            number += 1
        elif not stage.extra:
            number += 1
        extra = stage.extra
        label = f"stage {number} (--with {extra})" if extra else f"stage {number}"
        commands[stage.command or stage.name] = Command(f"{label}: {stage.about}", stage=stage.name)
        if stage.name in tools:
            name, command = tools[stage.name]
            commands[name] = command
    return commands


COMMANDS = _commands()
ALIASES = {alias: stage.command or stage.name for stage in STAGES for alias in stage.aliases}
"""Other names of commands: `harvest`, the seed recipe's word for stage 3."""
RENAMED = {"analyze": "analysis"}
"""Commands that were renamed: they end with one line naming the new one."""
NATIVE_FILE_ERRORS = ("CorruptFileError",)
"""Exception classes of `monofast._native` whose cause is a file (its message names it): a
user error, one line and exit code 2. Its other errors (bad arguments) are bugs."""


# ---------------------------------------------------------------------------------------
# Dispatch

def _native_file_error(err: BaseException) -> str | None:
    """The one-line message of an error of the native module whose cause is a file, with
    the fix where the native message names none; None for any other error. `_native` is
    looked up, never imported: a command that did not load it cannot have raised one."""
    _native = sys.modules.get("monofast._native")
    if _native is None:
        return None
    classes = tuple(getattr(_native, name) for name in NATIVE_FILE_ERRORS if hasattr(_native, name))
    if not classes or not isinstance(err, classes):
        return None
    message = " ".join(str(err).split())
    if f"{PROG} " not in message:  # no command to run named yet
        message += f"; the file is damaged: {_rewrite_hint(message)}"
    return message


def _os_error_message(err: OSError) -> str:
    """One line for a file-system error: what happened to which path, and the fix. Stages
    write every file atomically and a manifest last, so running again after the fix is safe."""
    path = err.filename or ""
    again = "then run the same command again: finished stages are kept"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {path}" if path else ""
        return f"the disk is full{where}; free some space (or write to another disk: --run, or --out for a report) and {again}"
    if not path:  # the message (a native one) names the file itself
        return f"{err.strerror or err}; {again}"
    if err.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied: {path}; give this user access to it (or use another folder: --run, --out), {again}"
    if err.errno == errno.EROFS:
        return f"{path} is on a read-only file system; write to a writable folder with --run (or --out for a report)"
    if err.errno == errno.ENOTDIR or (err.errno == errno.EEXIST and not Path(path).is_dir()):
        return f"{path} is a file where monofast needs a folder (or a part of that path is one); move it away or choose another path"
    if err.errno == errno.EISDIR:
        return f"{path} is a folder where monofast needs a file; remove it and {again}"
    if err.errno == errno.ENOENT:
        return f"{path} does not exist; check the path (a stage that wrote it may need running again: `{PROG} run --run DIR`)"
    reason = err.strerror or str(err)
    return f"{reason} ({path}); check the path and the disk, {again}" if path not in reason else f"{reason}; {again}"


def _rewrite_hint(message: str) -> str:
    """How to write again the file a native message starts with (`PATH: reason`): the stage
    whose folder holds it, run again from there. Only the activations stage writes the
    files the native module reads."""
    stage = "activations"
    folder = next((p for p in Path(message.split(": ", 1)[0]).parents if p.name == stage), None)
    where = f" --run {folder.parent}" if folder is not None else ""
    return f"re-run the stage that wrote it: `{PROG} run{where} --from {stage}`"


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
    aliases = {target: alias for alias, target in ALIASES.items()}
    lines += [f"  {name.ljust(width)}{cmd.help}" + (f" (alias: {aliases[name]})" if name in aliases else "")
              for name, cmd in COMMANDS.items()]
    lines += ["", f"Run `{PROG} COMMAND --help` for a command's options."]
    return "\n".join(lines)


def _find(argv: Sequence[str]) -> tuple[str | None, int]:
    """The longest command name (or alias) that prefixes argv, and how many words it took."""
    for words in (2, 1):
        name = " ".join(argv[:words])
        if len(argv) >= words and (name in COMMANDS or name in ALIASES):
            return ALIASES.get(name, name), words
    return None, 0


def _instantiate(command: Command, argv: Sequence[str]) -> Any:
    if command.stage is not None:
        from monofast.cli.options import StageCommand

        return StageCommand(command.stage, argv)
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
    if name is None and argv[0] in RENAMED:
        print(f"{PROG}: error: `{PROG} {argv[0]}` is now `{PROG} {RENAMED[argv[0]]}`", file=sys.stderr)
        return 2
    if name is None:
        group = [n for n in COMMANDS if n.startswith(argv[0] + " ")]
        if group and (len(argv) == 1 or argv[1] in ("-h", "--help")):
            print(f"usage: {PROG} {argv[0]} {{{','.join(n.split()[1] for n in group)}}} ...")
            width = max(len(n) for n in group) + 2
            for n in group:
                print(f"  {n.ljust(width)}{COMMANDS[n].help}")
            return 0 if len(argv) > 1 else 2
        print(f"{PROG}: error: unknown command {' '.join(argv[:2])!r}; see `{PROG} --help`", file=sys.stderr)
        return 2

    # OpenMP threads that spin while waiting make torch up to 10x slower whenever another
    # process shares the cores (measured on a loaded 2-core machine: 1,300 ms against
    # 126 ms per GPT step); sleeping waits cost nothing measurable on an idle one. It must
    # be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from monofast.cli.options import Parser
    from monofast.common import distributed, log
    from monofast.run.pipeline import follow

    log.setup()
    command = COMMANDS[name]
    try:
        followed = distributed.join(follow)  # under torchrun: ranks > 0 follow rank 0 (monofast.common.distributed)
        if followed is not None:
            return followed
        impl = _instantiate(command, argv[used:])
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
    except OSError as err:  # the file system refused: one line naming the path and the fix
        print(f"{PROG}: error: {_os_error_message(err)}", file=sys.stderr)
        return 2
    except Exception as err:  # the native module's file errors; anything else is a bug
        message = _native_file_error(err)
        if message is None:
            raise
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    finally:
        distributed.leave()


