"""Run a training script or module in this process and record when each training step ends.

    python -m lab.benchmarks.step_timer OUT.json -- path/to/train_dreambooth_lora.py --resolution 256 ...
    python -m lab.benchmarks.step_timer OUT.json -- -m finetune lora --images ...

The same clock for sdft and for any reference script: the learning-rate scheduler's step, which every one of
them calls once per training step after the update, stamps the wall time, so a step's time is the gap between
two stamps (data, forward, backward and update alike). (The optimizer's own step would not do: a fused backward
pass calls it once per weight tensor.) OUT.json gets the stamps, the launch and exit times (launch from
STEP_TIMER_LAUNCHED when the parent set it, so interpreter start-up counts as set-up), the exit code and this
process's peak RSS.
"""

from __future__ import annotations

import json
import os
import resource
import runpy
import sys
import time


def main() -> None:
    launched = float(os.environ.get("STEP_TIMER_LAUNCHED") or time.time())
    out, separator, *target = sys.argv[1:]
    if separator != "--" or not target:
        raise SystemExit(__doc__)
    from torch.optim.lr_scheduler import LRScheduler

    from lab.benchmarks.torchvision_standin import install

    stamps: list[float] = []
    scheduler_step = LRScheduler.step

    def stamped_step(scheduler, *args, **kwargs):
        counted = getattr(scheduler, "_step_count", 0) >= 1  # not the step a scheduler takes when it is built
        scheduler_step(scheduler, *args, **kwargs)
        if counted:
            stamps.append(time.time())

    LRScheduler.step = stamped_step
    standin = False
    if target[0] != "-m":  # a reference script: it imports torchvision.transforms
        # transformers and diffusers decide once whether torchvision is usable; let them see the real answer
        # before the stand-in (which only the script's own import is meant to find) goes in.
        from diffusers.utils import is_torchvision_available as diffusers_sees
        from transformers.utils import is_torchvision_available as transformers_sees

        diffusers_sees(), transformers_sees()
        standin = install()
    code = 0
    try:
        if target[0] == "-m":
            sys.argv = [target[1], *target[2:]]
            runpy.run_module(target[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(target)
            sys.path.insert(0, os.path.dirname(os.path.abspath(target[0])))
            runpy.run_path(target[0], run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        code = 1  # a crash is a failed row, whatever it reached
        raise
    finally:
        record = {"launched": launched, "stamps": stamps, "ended": time.time(), "exit": code,
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
                  "torchvision_standin": standin}
        with open(out, "w") as fh:
            json.dump(record, fh)
    sys.exit(code)


if __name__ == "__main__":
    main()
