"""`monofast report RUN --out DIR`: the results table, purity figure and feature-page
screenshots of a run (`monofast.run.report` writes them)."""

from __future__ import annotations

import argparse
from pathlib import Path

from monofast.run.report import write_report


class ReportCommand:
    """`monofast report RUN --out DIR`."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("run", type=Path, metavar="RUN", help="a run directory (runs/<name>)")
        parser.add_argument("--out", type=Path, default=Path("docs"), metavar="DIR",
                            help="folder for results.md, purity.svg and the screenshots (default: docs)")
        parser.add_argument("--feature", type=int, action="append", default=None, metavar="N",
                            help="screenshot feature N instead of the most frequent pure one per source "
                                 "(repeatable)")

    def main(self, args: argparse.Namespace) -> int:
        written = write_report(args.run, args.out, args.feature)
        for path in written:
            print(path)
        return 0
