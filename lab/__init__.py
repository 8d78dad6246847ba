"""The sdft lab: the toy world, its base's pretraining, the quality bench and the benchmarks.

Not installed with sdft. It imports the product (`finetune`); nothing in `finetune` imports it.
Run from the repository root: `python -m lab --help`.
"""
