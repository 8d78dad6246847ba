"""sdft against diffusers' reference training scripts, side by side on the same random real-shape base.

    python -m lab.benchmarks.versus_reference --examples DIFFUSERS/examples --pairs lora-256 ti-256 --repeats 3

`--examples` is the examples folder of a diffusers source checkout matching the installed diffusers (nothing is
downloaded). Each pair trains the same images (data_examples/photos), resolution, batch 1, precision, steps and
threads, as three rows: the reference script, sdft doing the same work (no latent cache: a VAE encode every step,
as the reference does) and sdft with its defaults (latents cached). Rows run interleaved, in turn, `--repeats`
times (the order reversed every other round), each in its own process under lab.benchmarks.step_timer, which
stamps every training step (the lr scheduler's step) for all three alike. Per row: median s/step (the first two
steps left out), time to the end of the first step (set-up), tail (last step to exit: exports), wall time and peak
RSS; per sdft row its ratio to the reference of the same round, as median and range.

The base is the random SD1.5-shaped pipeline of lab.benchmarks.real_size (built once when missing; SDXL-shaped
for sdxl-lora-1024). The reference scripts need torchvision; where none loads, a stand-in with the same PIL
transforms is used (lab.benchmarks.torchvision_standin).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.benchmarks.real_size import PHOTOS, REPO, ensure_base

PAIRS = {
    "lora-256": {"script": "dreambooth/train_dreambooth_lora.py", "method": "lora", "resolution": 256},
    "lora-512": {"script": "dreambooth/train_dreambooth_lora.py", "method": "lora", "resolution": 512},
    "ti-256": {"script": "textual_inversion/textual_inversion.py", "method": "textual-inversion", "resolution": 256},
    "dreambooth-256": {"script": "dreambooth/train_dreambooth.py", "method": "dreambooth", "resolution": 256},
    "dreambooth-256-ckpt": {"script": "dreambooth/train_dreambooth.py", "method": "dreambooth", "resolution": 256,
                            "checkpointing": True},
    "sdxl-lora-1024": {"script": "dreambooth/train_dreambooth_lora_sdxl.py", "method": "lora", "resolution": 1024,
                       "shape": "sdxl"},
}
KINDS = ("reference", "sdft-same-work", "sdft-defaults")
LR = {"lora": 1e-4, "textual-inversion": 5e-4, "dreambooth": 5e-6}


def reference_argv(pair: dict, script: Path, base: Path, out: Path, steps: int, precision: str) -> list[str]:
    """The reference script's command for a pair (center crop: the pixels sdft trains on by default)."""
    argv = [str(script), "--pretrained_model_name_or_path", str(base), "--output_dir", str(out),
            "--resolution", str(pair["resolution"]), "--train_batch_size", "1", "--max_train_steps", str(steps),
            "--learning_rate", str(LR[pair["method"]]), "--seed", "0", "--mixed_precision", precision,
            "--center_crop"]
    if pair["method"] == "textual-inversion":
        argv += ["--train_data_dir", str(PHOTOS), "--learnable_property", "object", "--placeholder_token", "<sks>",
                 "--initializer_token", "dog", "--num_vectors", "1", "--checkpointing_steps", "100000",
                 "--save_steps", "100000"]
    else:
        argv += ["--instance_data_dir", str(PHOTOS), "--instance_prompt", "a photo of sks dog",
                 "--checkpointing_steps", "100000"]
    if pair["method"] == "lora":
        argv += ["--rank", "4"]
    if pair.get("checkpointing"):
        argv += ["--gradient_checkpointing"]
    return argv


def sdft_argv(pair: dict, base: Path, out: Path, steps: int, precision: str, cache: bool) -> list[str]:
    """The equivalent sdft command: one export of the reference's kind, no sample images."""
    method = pair["method"]
    argv = ["-m", "finetune", method, "--model", str(base), "--images", str(PHOTOS), "--class-word", "dog",
            "--resolution", str(pair["resolution"]), "--steps", str(steps), "--batch-size", "1",
            "--lr", str(LR[method]), "--mixed-precision", precision, "--output", str(out), "--sample-seeds", "",
            "--no-cache-latents" if not cache else "--cache-latents"]
    if method == "lora":
        argv += ["--token", "sks", "--rank", "4", "--targets", "attn", "--formats", "diffusers"]
    elif method == "textual-inversion":
        argv += ["--token", "<sks>", "--init-word", "dog", "--vectors", "1", "--formats", "diffusers"]
    else:
        argv += ["--token", "sks", "--no-prior", "--formats", "diffusers"]
    if pair.get("checkpointing"):
        argv += ["--gradient-checkpointing"]
    return argv


def run_timed(argv: list[str], threads: int, timeout: int) -> dict:
    """One row's process under the step timer; its record (or the error)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        record_path = fh.name
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "STEP_TIMER_LAUNCHED": repr(time.time()), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "lab.benchmarks.step_timer", record_path, "--", *argv], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.time() - started
    try:
        record = json.loads(Path(record_path).read_text())
    except (OSError, ValueError):
        record = {"exit": done.returncode, "stamps": []}
    finally:
        Path(record_path).unlink(missing_ok=True)
    stamps = record.get("stamps", [])
    row = {"wall_s": round(wall, 2), "exit": record.get("exit", done.returncode), "steps_seen": len(stamps),
           "peak_rss_gb": record.get("peak_rss_gb")}
    if record.get("exit") or len(stamps) < 3:
        row["error"] = done.stderr[-600:]
        return row
    gaps = [b - a for a, b in zip(stamps, stamps[1:])][1:]  # the first two steps (warm-up) left out
    row.update({"s_per_step": round(statistics.median(gaps), 3), "first_step_end_s": round(stamps[0] - record["launched"], 2),
                "tail_s": round(record["ended"] - stamps[-1], 2), "torchvision_standin": record.get("torchvision_standin")})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=Path, required=True, help="diffusers' examples folder (a checkout's "
                        "examples/, matching the installed diffusers)")
    parser.add_argument("--pairs", nargs="+", default=["lora-256", "ti-256"], choices=list(PAIRS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--precision", default="no", choices=("no", "fp16", "bf16"))
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS, help="rows to run per pair")
    parser.add_argument("--sdft-args", default="", help="extra sdft flags for its rows, e.g. "
                        "'--fused-backward-pass off' (a lever's share)")
    parser.add_argument("--results", type=Path, default=None, help="append every row here as a JSON line")
    args = parser.parse_args()
    rows: dict[tuple[str, str], list[dict]] = {}
    for repeat in range(args.repeats):
        for name in args.pairs:
            pair = PAIRS[name]
            shape = pair.get("shape", "sd15")
            base = ensure_base(Path(tempfile.gettempdir()) / f"sdft-random-{shape}", shape)
            script = args.examples / pair["script"]
            if not script.is_file():
                raise SystemExit(f"{script}: not found (pass diffusers' examples folder as --examples)")
            kinds = [kind for kind in KINDS if kind in args.kinds]
            for kind in kinds if repeat % 2 == 0 else kinds[::-1]:
                out = Path(tempfile.mkdtemp(prefix=f"versus-{name}-{kind}-"))
                argv = (reference_argv(pair, script, base, out, args.steps, args.precision) if kind == "reference"
                        else sdft_argv(pair, base, out / "run", args.steps, args.precision, kind == "sdft-defaults")
                        + shlex.split(args.sdft_args))
                row = {"pair": name, "kind": kind, "round": repeat, "sdft_args": args.sdft_args,
                       **run_timed(argv, args.threads, args.timeout)}
                subprocess.run(["rm", "-rf", str(out)], check=False)
                rows.setdefault((name, kind), []).append(row)
                print(json.dumps(row), flush=True)
                if args.results:
                    with args.results.open("a") as fh:
                        fh.write(json.dumps(row) + "\n")
    print(table(rows, args.pairs))


def table(rows: dict, pairs: list[str]) -> str:
    """Markdown: per pair and row, medians over rounds and sdft / reference ratios (median, range)."""
    lines = ["| pair | row | s/step | first step ends (s) | tail (s) | wall (s) | peak RSS (GB) | s/step ratio | "
             "wall ratio | RSS ratio |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name in pairs:
        reference = {r["round"]: r for r in rows.get((name, "reference"), []) if "s_per_step" in r}
        for kind in KINDS:
            if (name, kind) not in rows:
                continue
            good = [r for r in rows.get((name, kind), []) if "s_per_step" in r]
            if not good:
                lines.append(f"| {name} | {kind} | failed | | | | | | | |")
                continue
            med = {key: statistics.median(r[key] for r in good) for key in ("s_per_step", "first_step_end_s",
                                                                             "tail_s", "wall_s", "peak_rss_gb")}
            ratios = []
            for key in ("s_per_step", "wall_s", "peak_rss_gb"):
                values = [r[key] / reference[r["round"]][key] for r in good if r["round"] in reference]
                ratios.append("" if kind == "reference" or not values else
                              f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})")
            lines.append(f"| {name} | {kind} | {med['s_per_step']:.2f} | {med['first_step_end_s']:.1f} | "
                         f"{med['tail_s']:.1f} | {med['wall_s']:.1f} | {med['peak_rss_gb']:.2f} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
