"""`monofast activations verify RUN`: check every shard of an activation store."""

from __future__ import annotations

import argparse
from pathlib import Path

from monofast._native import CorruptFileError
from monofast.activations.store import find_store, verify
from monofast.common.errors import UserError


class VerifyCommand:
    """`monofast activations verify RUN`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", type=Path, metavar="RUN",
                            help="a run directory (its activations/ folder is checked) or a store folder")

    def main(self, args: argparse.Namespace) -> int:
        folder = find_store(args.run)
        try:
            report = verify(folder)
        except CorruptFileError as err:
            print(f"activations verify: FAILED: {err}")
            return 1
        except OSError as err:
            raise UserError(f"cannot verify {folder}: {err}") from None
        print(f"activations verify: OK: {report.shards} shards, {report.rows} rows, "
              f"{report.bytes / 2**20:.1f} MiB in {folder}")
        return 0
