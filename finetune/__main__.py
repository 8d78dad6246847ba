"""`python -m finetune` (and `accelerate launch -m finetune ...`) runs the sdft CLI."""

import sys

from .cli import main

sys.exit(main())
