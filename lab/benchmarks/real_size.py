"""Seconds per step and peak memory of every method on an SD1.5- or SDXL-shaped random pipeline (no download).

    python -m lab.benchmarks.real_size --resolutions 256 512 --steps 4
    python -m lab.benchmarks.real_size --methods lora --resolutions 256 --precisions bf16 --checkpointing on
    python -m lab.benchmarks.real_size --shape sdxl --methods lora --resolutions 512 --precisions fp32
    python -m lab.benchmarks.real_size --methods lora --resolutions 256 --precisions fp32 --checkpointing off \
        --optimizers adamw prodigy adafactor lion adamw_schedulefree

The random pipeline (SD1.5: UNet 860M, SD VAE, CLIP-L-shaped text encoder; SDXL: UNet 2.6B, CLIP-L and
OpenCLIP-bigG-shaped encoders; real tokenizers) is built once from code and saved to `--base-dir` (fp32
safetensors, ~4 GB for SD1.5, ~14 GB for SDXL), so each configuration loads it in seconds
instead of re-initialising 860M parameters. Every configuration (method x resolution x precision x
gradient checkpointing, batch 1, prior preservation off) runs in its own process, so its peak RSS is
its own and an out-of-memory kill costs only that row. Prints one JSON line per configuration.

Step time: the trainer's median over `--steps` steps (the slow first step is the largest, so with 3+
steps it never sets the median). Peak RSS: the child's `ru_maxrss` (loading the base included: what a
user's machine must hold). On CUDA (`--device cuda`) the peak VRAM (`torch.cuda.max_memory_allocated`)
is reported too.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPTIMIZERS = ("adamw", "prodigy", "adafactor", "lion", "adamw_schedulefree")  # adamw8bit needs CUDA
PHOTOS = REPO / "data_examples" / "photos"  # the example photos; any folder works (--images)
METHODS = ("lora", "dreambooth", "textual_inversion", "hypernetwork")
FIRST_FORMAT = {"lora": "kohya", "dreambooth": "diffusers", "textual_inversion": "a1111", "hypernetwork": "a1111"}


def ensure_base(folder: Path, shape: str = "sd15") -> Path:
    """Build and save the random SD1.5- or SDXL-shaped pipeline once."""
    if (folder / "model_index.json").exists():
        return folder
    from lab.random_bases import build_random_pipeline, build_random_sdxl_pipeline

    pipe = build_random_sdxl_pipeline(tiny=False) if shape == "sdxl" else build_random_pipeline("sd15")
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def child(args) -> None:
    """One configuration in this process; prints its JSON line."""
    if args.device == "cpu":
        os.environ["ACCELERATE_USE_CPU"] = "true"
    import torch

    from finetune.config import RunConfig
    from finetune.trainer import run_training

    config = RunConfig.for_method(args.method)
    config.model.name = str(args.base_dir)
    config.data.images = str(args.images)
    config.data.class_word = "dog"
    if args.method == "textual_inversion":
        config.data.init_word = "dog"
    config.data.resolution = args.resolution
    config.train.steps = args.steps
    config.train.batch_size = 1
    config.train.lr = 1e-6
    config.train.optimizer = args.optimizer
    if args.optimizer == "prodigy":
        config.train.lr = 1.0  # Prodigy's lr is a multiplier of its own step size
    config.train.mixed_precision = "no" if args.precision == "fp32" else args.precision
    config.train.gradient_checkpointing = args.checkpointing == "on"
    config.prior.enabled = False
    config.output.output = tempfile.mkdtemp(prefix="sdft-realsize-")
    config.output.sample_seeds = []
    config.output.formats = [FIRST_FORMAT[args.method]]  # one export: the step time is what is measured
    try:
        summary = run_training(config).summary
    finally:
        shutil.rmtree(config.output.output, ignore_errors=True)  # a DreamBooth export is 4 GB: never keep it
    row = {"shape": args.shape, "method": args.method, "resolution": args.resolution, "precision": args.precision,
           "checkpointing": args.checkpointing, "optimizer": args.optimizer, "steps": args.steps, "s_per_step": summary["median_step_s"],
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "wall_s": summary["wall_time_s"], "device": "cuda" if torch.cuda.is_available() and args.device != "cpu"
           else "cpu"}
    if row["device"] == "cuda":
        row["peak_vram_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=("off", "on"))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizers", nargs="+", default=["adamw"], choices=OPTIMIZERS,
                        help="train.optimizer values to time (the optional ones need sdft[optimizers])")
    parser.add_argument("--images", type=Path, default=PHOTOS)
    parser.add_argument("--shape", default="sd15", choices=("sd15", "sdxl"), help="the random base's architecture")
    parser.add_argument("--base-dir", type=Path, default=None,
                        help="where the random base is saved (default: sdft-random-SHAPE in the temp folder)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: what accelerate picks)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per configuration")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--resolution", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="adamw", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.base_dir = args.base_dir or Path(tempfile.gettempdir()) / f"sdft-random-{args.shape}"
    if args.child:
        args.checkpointing = args.checkpointing[0]
        child(args)
        return
    ensure_base(args.base_dir, args.shape)
    for method, resolution, precision, ckpt, optimizer in itertools.product(
            args.methods, args.resolutions, args.precisions, args.checkpointing, args.optimizers):
        command = [sys.executable, "-m", "lab.benchmarks.real_size", "--child", "--method", method,
                   "--resolution", str(resolution), "--precision", precision, "--checkpointing", ckpt,
                   "--steps", str(args.steps), "--optimizer", optimizer,
                   "--images", str(args.images), "--base-dir", str(args.base_dir), "--shape", args.shape]
        if args.device:
            command += ["--device", args.device]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, cwd=REPO)
        except subprocess.TimeoutExpired:
            print(json.dumps({"method": method, "resolution": resolution, "precision": precision,
                              "checkpointing": ckpt, "error": f"timeout after {args.timeout} s"}), flush=True)
            continue
        rows = [line[4:] for line in done.stdout.splitlines() if line.startswith("ROW ")]
        if rows:
            print(rows[-1], flush=True)
        else:  # e.g. killed for memory (returncode -9): say so instead of dropping the row
            print(json.dumps({"method": method, "resolution": resolution, "precision": precision,
                              "checkpointing": ckpt, "error": f"exit {done.returncode}",
                              "stderr_tail": done.stderr[-300:]}), flush=True)


if __name__ == "__main__":
    main()
