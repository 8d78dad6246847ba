"""`python -m lab COMMAND` from the repository root, or `python path/to/lab COMMAND` from any folder."""

import sys
from pathlib import Path

if not __package__:
    # Run as a folder path: make the repository importable so `lab` and the checkout's `finetune` are found.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lab.cli import main  # noqa: E402

sys.exit(main())
