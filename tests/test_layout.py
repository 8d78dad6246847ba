"""The product and its lab stay apart: the installed package never imports the lab, and each CLI lists its own."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from finetune.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PRODUCT_COMMANDS = {"lora", "textual-inversion", "hypernetwork", "dreambooth", "train", "generate", "extract-lora",
                    "convert", "merge", "resize-lora"}


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_product_module_imports_the_lab():
    offenders = {str(p.relative_to(REPO)): sorted(m for m in _imported_modules(p) if m.split(".")[0] == "lab")
                 for p in (REPO / "finetune").rglob("*.py")}
    assert not {k: v for k, v in offenders.items() if v}


def test_sdft_help_lists_product_commands_only():
    subcommands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert set(subcommands) == PRODUCT_COMMANDS


def test_lab_commands_document_every_flag_and_run_from_any_folder(tmp_path):
    """Every lab flag has a help text of its own (not only its default); `python path/to/lab CMD --help` works
    from an unrelated folder, and the bench finds the repository's recipes from there."""
    from lab.cli import build_parser as lab_parser
    from lab.toyworld.settings import BENCH_METHODS, REPO_RECIPES

    commands = next(a for a in lab_parser()._actions if a.dest == "command").choices
    assert {"toy-base", "score-base", "bench-quality"} <= set(commands)
    for name, sub in commands.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help and not action.help.startswith("(default"), f"{name} {action.option_strings}"
    assert all((REPO_RECIPES / recipe).is_file() for _, recipe, _ in BENCH_METHODS.values())
    done = subprocess.run([sys.executable, str(REPO / "lab"), "bench-quality", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "--overrides" in done.stdout, done.stderr
