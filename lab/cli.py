"""The lab's command line: flags come from the settings dataclasses' field help, as the product's do."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing

from finetune import UserError
from finetune.cli import quiet_libraries

from .toyworld.settings import BASE_SCORE_GUIDANCE, PretrainConfig, QualityBenchConfig


def add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per field of a settings dataclass (int/float/str/bool, their lists, or optional), with its help."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        is_list = typing.get_origin(kind) is list
        scalar = args[0] if args else kind
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if scalar is bool and not is_list:
            parser.add_argument(flag, dest=f"dc:{f.name}", action=argparse.BooleanOptionalAction, default=default,
                                help=help_text)
            continue
        convert = (lambda v: v.lower() in ("1", "true", "yes", "on")) if scalar is bool else scalar
        parser.add_argument(flag, dest=f"dc:{f.name}", type=convert, nargs="+" if is_list else None,
                            default=default, metavar=f.name.upper(), choices=f.metadata.get("choices"),
                            help=help_text)


def dataclass_from_args(cls, args: argparse.Namespace):
    """The settings dataclass `cls` filled from flags that add_dataclass_flags made."""
    return cls(**{k[3:]: v for k, v in vars(args).items() if k.startswith("dc:")})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lab", description="The sdft lab: the toy world's base, "
                                     "its scoring and the fine-tuning quality bench (run from the repository).",
                                     allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("toy-base", help="pretrain a toy-world base from a seed (a whole base in one ~30-40 min "
                       "run on 2 cores; lab/TOY_BASE.md)", allow_abbrev=False)
    p.add_argument("--output", required=True, help="folder for the fp16 diffusers parts (loads as --model DIR)")
    add_dataclass_flags(p, PretrainConfig)
    p = sub.add_parser("score-base", help="how well a toy-world base draws its own 96 prompts (colour, shape and "
                       "background by the analytic checker)", allow_abbrev=False)
    p.add_argument("model", nargs="?", default="tiny", help="base folder (default: the built-in tiny base)")
    p.add_argument("--seeds", type=int, nargs="+", default=[7], help="sampling seeds per prompt (default: 7)")
    p.add_argument("--guidance", type=float, default=BASE_SCORE_GUIDANCE,
                   help="guidance scale (default: %(default)s, the one the base's accuracy is quoted at)")
    p.add_argument("--grid", default=None, help="also save every sample as one PNG grid here")
    p.add_argument("--template", default=None,
                   help="phrasing of the 96 prompts, naming {c} colour, {s} shape and {b} background (default: the "
                   "main one, 'a {c} {s} on a {b} background'; e.g. '{c} {s}, {b} background' scores another)")
    p = sub.add_parser("bench-quality", help="how well each method learns a new concept on the toy base "
                       "(trains every method x prior x seed, scores samples with the analytic checker)",
                       allow_abbrev=False)
    add_dataclass_flags(p, QualityBenchConfig)
    sub.add_parser("make-examples", help="redraw data_examples/ (star, world renders, photos); deterministic")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if not args.command:
        parser.print_help()
        return 0
    quiet_libraries()
    try:
        if args.command == "toy-base":
            from .toyworld.pretrain import pretrain

            pretrain(dataclass_from_args(PretrainConfig, args), args.output)
        elif args.command == "score-base":
            from .toyworld.bench import score_base

            phrasing = {"template": args.template} if args.template else {}
            print(json.dumps(score_base(args.model, args.seeds, args.guidance, args.grid, **phrasing)))
        elif args.command == "bench-quality":
            from .toyworld.bench import run_quality_bench

            bench = dataclass_from_args(QualityBenchConfig, args)
            run_quality_bench(bench)
            print(f"wrote {bench.output}/table.md")
        elif args.command == "make-examples":
            from .make_examples import main as make_examples

            make_examples()
        return 0
    except UserError as exc:
        print(f"lab: error: {exc}", file=sys.stderr)
        return 2
