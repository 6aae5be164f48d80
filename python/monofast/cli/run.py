"""`monofast run` (every stage of a preset) and `monofast presets` (what each sets, and its
estimated time and disk use here)."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any

from monofast.cli.options import add_run_options, args_run_dir, model_layers
from monofast.common.errors import UserError
from monofast.run import estimate, results
from monofast.run.pipeline import run_all
from monofast.run.presets import PRESETS
from monofast.run.resolve import file_layer, resolve_config
from monofast.run.stages import EXTRAS, STAGES, TWIN_STAGES


class RunCommand:
    """`monofast run`: every stage in order."""

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_run_options(parser)
        parser.add_argument("--set", action="append", default=[], metavar="STAGE.KEY=VALUE",
                            help="override one option of one stage, e.g. --set data.vocab_size=2048 "
                                 "(repeatable)")
        parser.add_argument("--hook", default=None, metavar="NAME",
                            help="where the activations stage reads (e.g. blocks.6.mlp.hook_post; the same "
                                 "as --set activations.hook=NAME)")
        parser.add_argument("--from", dest="start", default=None,
                            choices=[s.name for s in STAGES],
                            help="re-run this stage and every later one")
        parser.add_argument("--to", dest="stop", default=None,
                            choices=[s.name for s in STAGES],
                            help="stop after this stage")
        parser.add_argument("--with", dest="extras", action="append", default=[], choices=EXTRAS,
                            help="add the stages of an extra: findings (the paper's feature splitting, "
                                 "universality, specificity and steering: a family of SAEs and a second "
                                 "model, about 1.5x the run's time)")

    def main(self, args: argparse.Namespace) -> int:
        layers: dict[str, list[dict[str, Any]]] = {}
        by_model = model_layers(args)
        for stage in STAGES:
            layers[stage.name] = [file_layer(args.config, stage.name)]
            if stage.name in by_model:
                layers[stage.name].append(by_model[stage.name])
        if args.hook:
            layers["activations"].append({"hook": args.hook})
        for item in args.set:
            key, eq, value = item.partition("=")
            stage, dot, name = key.partition(".")
            if not eq or not dot:
                raise UserError(f"--set {item!r}: expected STAGE.KEY=VALUE, e.g. data.vocab_size=2048")
            if stage not in layers:
                raise UserError(f"--set {item!r}: no stage {stage!r}; stages are {', '.join(layers)}")
            layers[stage].append({name: value})
        run = args_run_dir(args)
        run_all(args.preset, run, layers, force=args.force, start=args.start, stop=args.stop,
                extras=args.extras)
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
                            help="assume this fp32 matrix-product rate (GFLOP/s) instead of measuring it")

    def main(self, args: argparse.Namespace) -> int:
        if args.gflops is not None and args.gflops <= 0:
            raise UserError(f"--gflops {args.gflops}: give a positive rate, e.g. --gflops 500")
        device = estimate.measure_device(args.device)
        if args.gflops is not None:
            device = device._replace(gflops=args.gflops, measured=False, precision="fp32")
        how = "measured just now" if device.measured else "assumed"
        print(textwrap.fill(
            f"Estimated time and disk use of each preset on this machine ({device.name}, matrix "
            f"products at {device.gflops:,.0f} GFLOP/s, {how}). These are rough estimates from the "
            f"presets' sizes: expect the real numbers within about 2x, and more time on a busy machine.",
            width=92))
        print()
        table = []
        for name in PRESETS:
            configs = {s.name: resolve_config(s, name) for s in STAGES}
            table.append((name, estimate.estimate(configs, device)))
        print(f"  {'preset':8s} {'time (est.)':>13s} {'disk (est.)':>12s}  for  (time and disk of `monofast run`; "
              f"--with findings adds the rest)")
        extras = {s.name for s in STAGES if s.extra}
        for name, stages in table:
            seconds = sum(e.seconds for stage, e in stages.items() if stage not in extras)
            disk = sum(e.disk_bytes for stage, e in stages.items() if stage not in extras)
            # --with findings: the family and the findings, and the second model's GPT, harvest and SAE
            more = sum(e.seconds for stage, e in stages.items() if stage in extras or stage in TWIN_STAGES)
            print(f"  {name:8s} {estimate.duration(seconds):>13s} {estimate.size(disk):>12s}  "
                  f"{PRESETS[name].get('about', '')} (+{estimate.duration(more)} with findings)")
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
