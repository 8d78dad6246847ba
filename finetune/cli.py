"""The `sdft` command line: parse, build a config, call the library. Heavy imports happen late."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import sys
from pathlib import Path

from . import UserError, __version__, is_disk_full
from . import lora_tools
from .interrupt import TrainingInterrupted
from .config import METHOD_SECTIONS, RunConfig, coerce, field_flag, field_kind, load_recipe

METHOD_HELP = {
    "lora": "train a LoRA (peft) on the UNet, optionally the text encoder",
    "textual_inversion": "learn the embedding of a new word; everything else frozen",
    "hypernetwork": "train A1111-style hypernetworks on the attention context",
    "dreambooth": "fine-tune the whole UNet (optionally the text encoder) with prior preservation",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdft", description="Fine-tune Stable Diffusion: textual inversion, "
                                     "hypernetworks, LoRA and DreamBooth behind one trainer.", allow_abbrev=False)
    parser.add_argument("--version", action="version", version=f"sdft {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also SDFT_DEBUG=1), for bug reports")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for method in METHOD_SECTIONS:
        p = sub.add_parser(method.replace("_", "-"), help=METHOD_HELP.get(method, method), allow_abbrev=False)
        p.set_defaults(method=method)
        _add_config_flags(p, RunConfig.for_method(method))
    p = sub.add_parser("train", help="run a recipe: sdft train RECIPE.yaml [section.key=value ...]", allow_abbrev=False)
    p.add_argument("recipe", help="recipe YAML (or a run's config.yaml)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. train.steps=100")
    p = sub.add_parser("extract-lora", help="turn a full fine-tune into a small kohya-format LoRA (SVD of the "
                       "weight differences)", allow_abbrev=False)
    p.add_argument("--base", required=True, help="the base the fine-tune started from (as --model)")
    p.add_argument("--tuned", required=True, help="the fine-tuned model: a diffusers folder or a single-file "
                   ".safetensors (read with --base's configs)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--conv-rank", type=int, default=None,
                   help="rank for 3x3 convs (default: --rank; 0 leaves them out as kohya's tool does)")
    p.add_argument("--output", default="extracted_lora.safetensors", help="output .safetensors")
    lora_tools.add_commands(sub)
    p = sub.add_parser("generate", help="generate images with a base model and adapters", allow_abbrev=False)
    p.add_argument("--model", default="tiny", help="base model (as for training)")
    p.add_argument("--model-config", default=None, help="configs for a single-file --model")
    p.add_argument("--adapter", action="append", default=[], help="adapter file or folder (repeatable)")
    p.add_argument("--adapter-scale", action="append", type=float, default=[],
                   help="scale per --adapter, in the same order (default 1.0)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="denoising steps")
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--output", default="sdft-sample.png", help="PNG path (a grid when --num-images > 1)")
    return parser


def _add_config_flags(parser: argparse.ArgumentParser, config: RunConfig) -> None:
    """One flag per config field of the method's sections; defaults come from the config, not argparse."""
    for section in config.sections():
        group = parser.add_argument_group(section)
        obj = getattr(config, section)
        for f in dataclasses.fields(obj):
            if not f.metadata.get("cli", True):
                continue  # a recipe-only setting (a list of mappings)
            scalar, is_list, _ = field_kind(f)
            default = getattr(obj, f.name)
            help_text = f"{f.metadata.get('help', '')} (default: {default})"
            dest = f"cfg:{section}.{f.name}"
            if scalar is bool and not is_list:
                group.add_argument(field_flag(f), dest=dest, action=argparse.BooleanOptionalAction,
                                   default=argparse.SUPPRESS, help=help_text)
            else:
                group.add_argument(field_flag(f), dest=dest, default=argparse.SUPPRESS, metavar=f.name.upper(),
                                   choices=f.metadata.get("choices"), help=help_text)


def config_from_args(args: argparse.Namespace) -> RunConfig:
    config = RunConfig.for_method(args.method)
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            dotted = key[4:]
            section, _, name = dotted.partition(".")
            f = {g.name: g for g in dataclasses.fields(getattr(config, section))}[name]
            setattr(getattr(config, section), name, coerce(value, f, field_flag(f)))
    return config


def _check_unknown(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flags = [s for a in _all_actions(parser) for s in a.option_strings]
        word = next((u for u in unknown if u.startswith("-")), unknown[0])
        close = difflib.get_close_matches(word.split("=")[0], flags, n=1, cutoff=0.6)
        hint = f" (did you mean {close[0]}?)" if close else "; see sdft COMMAND --help"
        raise UserError(f"unknown argument {word}{hint}")
    return args


def _all_actions(parser: argparse.ArgumentParser):
    for action in parser._actions:
        yield action
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from sub._actions


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for name in ("accelerate", "torch", "PIL", "tensorboard"):
        logging.getLogger(name).setLevel(logging.WARNING)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def check_generate_args(args: argparse.Namespace) -> None:
    """Everything about a generate call that can be wrong, checked before a model loads."""
    if args.num_images < 1 or args.steps < 1:
        raise UserError("--num-images and --steps must be >= 1")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UserError(f"--resolution {args.resolution}: use a multiple of 8 (e.g. 512)")
    output = Path(args.output)
    if output.suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--output {output}: name an image file ({', '.join(IMAGE_SUFFIXES)})")
    if output.is_dir() or not output.parent.resolve().is_dir():
        raise UserError(f"--output {output}: its folder does not exist (or it is a folder itself)")
    missing = [a for a in args.adapter if not Path(a).exists()]
    if missing:
        raise UserError(f"--adapter {missing[0]}: not found")


def run_generate(args: argparse.Namespace) -> str:
    from .inference import generate, load_adapter
    from .models import load_pipeline
    from .plots import image_grid
    from .tokenizer import words_past_the_window

    check_generate_args(args)
    pipe = load_pipeline(args.model, single_file_config=args.model_config)
    pipe.set_progress_bar_config(disable=True)
    lost = words_past_the_window(pipe.tokenizer, args.prompt)
    if lost:
        logging.getLogger("sdft").warning("the prompt is longer than the text encoder's %d tokens; these words "
                                          "are cut: %s", pipe.tokenizer.model_max_length, lost)
    scales = args.adapter_scale + [1.0] * (len(args.adapter) - len(args.adapter_scale))
    for path, scale in zip(args.adapter, scales):
        load_adapter(pipe, path, scale)
    images = generate(pipe, [args.prompt], list(range(args.seed, args.seed + args.num_images)), steps=args.steps,
                      guidance=args.guidance, negative_prompt=args.negative_prompt, resolution=args.resolution)
    image_grid(images, min(4, len(images))).save(args.output)
    return args.output


def run_extract_lora(args: argparse.Namespace) -> str:
    from .formats.file_modes import apply_umask
    from .formats.lora_extract import extract_from_pipelines
    from .models import load_pipeline, resolve_base

    if args.rank < 1:
        raise UserError("--rank must be >= 1")
    base = load_pipeline(args.base)
    tuned = load_pipeline(args.tuned, single_file_config=resolve_base(args.base))
    path, stats = extract_from_pipelines(base, tuned, args.output, args.rank, args.conv_rank)
    apply_umask([path])
    print(stats.summary())
    return str(path)


def describe_error(exc: BaseException) -> str:
    """One line for an error sdft did not foresee as a UserError: what failed and on which file."""
    if is_disk_full(exc):
        where = getattr(exc, "filename", None) or "a file"
        return f"no space left on the device while writing {where}; free some space and rerun"
    if isinstance(exc, PermissionError):
        return f"permission denied: {exc.filename or exc}"
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]} (unexpected: rerun with --debug and report the traceback)"


def main(argv: list[str] | None = None) -> int:
    """Run one sdft command; the exit code: 0 done, 2 a user error, 130 interrupted, 1 anything else."""
    argv = sys.argv[1:] if argv is None else argv
    # Wherever it stands on the command line: `--debug` lets errors raise with their traceback.
    debug = "--debug" in argv or os.environ.get("SDFT_DEBUG", "") not in ("", "0")
    code = _run([a for a in argv if a != "--debug"], debug)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Under a multi-process launch, freeing the DDP-wrapped models at exit would run ~ProcessGroupGloo, which
        # joins gloo's worker thread while holding the GIL the worker waits for: the process hangs (py-spy showed
        # Reducer dealloc -> ~ProcessGroupGloo -> thread::join). Leave without running destructors, whatever the
        # outcome (a library caller of run_training() under such a launch still frees them normally).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(argv: list[str], debug: bool) -> int:
    parser = build_parser()
    try:
        args = _check_unknown(parser, argv)
        if not args.command:
            parser.print_help()
            return 0
        quiet_libraries()
        tool = {"generate": run_generate, "extract-lora": run_extract_lora, "convert": lora_tools.run_convert,
                "merge": lora_tools.run_merge, "resize-lora": lora_tools.run_resize}.get(args.command)
        if tool:
            print(f"wrote {tool(args)}")
            return 0
        config = load_recipe(args.recipe, args.overrides) if args.command == "train" else config_from_args(args)
        from .trainer import run_training

        _print_summary(run_training(config).summary)
        return 0
    except UserError as exc:
        if debug:
            raise
        print(f"sdft: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"sdft: {exc}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("sdft: interrupted at once: no checkpoint of the current step was saved", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, never a traceback
        if debug:
            raise
        print(f"sdft: error: {describe_error(exc)}", file=sys.stderr)
        return 1


def _print_summary(summary: dict) -> None:
    if not summary:
        return
    print(f"\nsdft {summary['method']}: {summary['steps']} steps in {summary['wall_time_s']:.1f} s, "
          f"final loss {summary['final_loss_avg10']:.4f} (mean of last 10)")
    for fmt, paths in summary["exports"].items():
        for path in paths:
            print(f"  export ({fmt}): {path}")
    if len(summary.get("datasets") or []) > 1:
        print("  data sets: " + ", ".join(f"{d['name']} {d['samples']} samples ({d['images']} images x {d['repeats']})"
                                          for d in summary["datasets"]))
    print(f"  samples: {summary['samples']}")
    print(f"  loss plot: {summary['loss_plot']}")
    print(f"  summary: {os.path.join(os.path.dirname(summary['config']), 'summary.json')}")


if __name__ == "__main__":
    sys.exit(main())
