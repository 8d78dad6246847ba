"""Start-up costs a user feels: `sdft --help`, and launching `sdft lora --model tiny` until its first step.

    python -m lab.benchmarks.startup --repeats 5

The first-step time is read live from the trainer's progress bar (stderr): the moment "1/N" appears.
Runs use a temporary SDFT_HOME that is warmed once (the tiny base materialised), so the figure is the
cost of every later run; the cold first run is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def help_time() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "finetune", "--help"], check=True, capture_output=True)
    return time.perf_counter() - started


def first_step_time(home: Path, output: Path) -> float:
    """Seconds from launching a 3-step tiny LoRA run to its progress bar showing step 1."""
    env = {**os.environ, "SDFT_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "finetune", "lora", "--images", str(REPO / "data_examples" / "star"),
               "--model", "tiny", "--steps", "3", "--output", str(output), "--sample-steps", "1",
               "--sample-seeds", "0"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen, first = b"", None
    while True:
        chunk = process.stderr.read1(4096)
        if not chunk:
            break
        seen = (seen + chunk)[-4096:]
        if first is None and b"sdft lora:" in seen and b" 1/3 " in seen:
            first = time.perf_counter() - started
    if process.wait() != 0 or first is None:
        raise RuntimeError(f"run failed or showed no progress: {seen[-1000:]!r}")
    return first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    helps = [help_time() for _ in range(args.repeats)]
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        cold = first_step_time(home, Path(tmp) / "cold")
        warm = [first_step_time(home, Path(tmp) / f"warm-{i}") for i in range(args.repeats)]
    result = {"help_s": [round(t, 2) for t in helps], "help_median_s": round(statistics.median(helps), 2),
              "first_step_cold_s": round(cold, 2), "first_step_s": [round(t, 2) for t in warm],
              "first_step_median_s": round(statistics.median(warm), 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
