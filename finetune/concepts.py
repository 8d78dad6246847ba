"""The instance data sets of a run ("concepts"): one --images folder, kohya-style `N_token class/` sub-folders
inside it, or a recipe's data.datasets list. Each becomes a Concept with its own trigger word, class, prompt,
repeats and caption options; every Example remembers the concept it came from."""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import UserError
from .batching import CaptionOptions
from .data import IMAGE_SUFFIXES, Example, load_examples

log = logging.getLogger(__name__)

# kohya's folder convention: "10_sks dog" = 10 repeats of images whose prompt is "sks dog".
KOHYA_FOLDER = re.compile(r"^(\d+)_(\S.*)$")


@dataclass
class Concept:
    """One data set of a run and how it is trained."""

    name: str  # how summaries and errors call it (the folder's name)
    images: str
    token: str
    class_word: str
    prompt: str
    repeats: int = 1
    resolution: int | None = None  # None: the run's resolution
    caption_options: CaptionOptions = field(default_factory=CaptionOptions)
    flag: str = "--images"  # the setting that named its folder, for error messages


def concepts_of(data) -> list[Concept]:
    """The run's concepts from its DataConfig: data.datasets entries (unset keys from the data section), else
    the kohya-style sub-folders of data.images when it has them, else data.images as one concept."""
    shared = CaptionOptions(data.caption_dropout, data.shuffle_captions, data.keep_tokens)
    if data.datasets:
        concepts = [_concept_of_entry(data, entry, index, shared) for index, entry in enumerate(data.datasets)]
        names = Counter(c.name for c in concepts)
        for index, concept in enumerate(concepts):
            if names[concept.name] > 1:  # two folders of one name: the summary tells them apart by position
                concept.name = f"{concept.name}[{index}]"
        return concepts
    folders = kohya_folders(data.images)
    if folders:
        return [Concept(path.name, str(path), token, class_word, data.prompt, repeats, None, shared,
                        flag=f"--images {Path(data.images).name}/{path.name}")
                for repeats, token, class_word, path in folders]
    return [Concept(Path(data.images).name if data.images else "images", data.images, data.token,
                    data.class_word, data.prompt, 1, None, shared)]


def _concept_of_entry(data, entry, index: int, shared: CaptionOptions) -> Concept:
    flag = f"data.datasets[{index}].images"
    if not entry.images:
        raise UserError(f"{flag} is required: a folder of training images")
    options = CaptionOptions(
        shared.dropout if entry.caption_dropout is None else entry.caption_dropout,
        shared.shuffle if entry.shuffle_captions is None else entry.shuffle_captions,
        shared.keep_tokens if entry.keep_tokens is None else entry.keep_tokens)
    pick = lambda own, default: default if own is None else own  # noqa: E731 - unset keys follow the data section
    return Concept(Path(entry.images).name, entry.images, pick(entry.token, data.token),
                   pick(entry.class_word, data.class_word), pick(entry.prompt, data.prompt), entry.repeats,
                   entry.resolution, options, flag=flag)


def kohya_folders(images: str | None) -> list[tuple[int, str, str, Path]]:
    """(repeats, token, class word, folder) of each `N_token class` sub-folder of a folder that holds no images
    of its own (kohya's train_data_dir); empty for an ordinary image folder. The first word after the repeats
    is the token, the rest the class ("10_sks dog": token sks, class dog)."""
    if not images:
        return []
    root = Path(images).expanduser()
    if not root.is_dir():
        return []
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []  # load_examples reports the unreadable folder
    if any(p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() for p in entries):
        return []
    found, ignored = [], []
    for path in entries:
        match = KOHYA_FOLDER.match(path.name) if path.is_dir() else None
        if match is None:
            if path.is_dir():
                ignored.append(path.name)
            continue
        token, _, class_word = match.group(2).strip().partition(" ")
        found.append((int(match.group(1)), token, class_word.strip(), path))
    if found and ignored:
        log.warning("--images %s: read the kohya-style folders %s; ignored sub-folders without a repeats prefix "
                    "(N_token class): %s", root.name, ", ".join(p.name for *_, p in found), ", ".join(ignored))
    for repeats, _, _, path in found:
        if repeats < 1:
            raise UserError(f"--images {root.name}/{path.name}: the repeats prefix must be >= 1")
    return found


def load_concept_examples(concepts: list[Concept], keep_alpha: bool = False) -> list[Example]:
    """Every concept's examples, in concept order, each tagged with its concept's index, token and class."""
    examples = []
    for index, concept in enumerate(concepts):
        found = load_examples(concept.images, concept.prompt, concept.token, concept.class_word,
                              flag=concept.flag, keep_alpha=keep_alpha)
        for example in found:
            example.concept, example.token, example.class_word = index, concept.token, concept.class_word
        examples.extend(found)
    return examples


def draw_pool(examples: list[Example], concepts: list[Concept]) -> list[int]:
    """Example indices as one epoch draws them: each image as often as its concept's repeats (kohya's meaning:
    a concept's share of the samples is repeats x images)."""
    return [index for index, example in enumerate(examples) for _ in range(concepts[example.concept].repeats)]


def refuse_several_new_words(concepts: list[Concept], token: str, what: str) -> None:
    """Textual inversion and pivotal tuning learn one new word (data.token): every concept must use it."""
    other = next((c for c in concepts if c.token != token), None)
    if other is not None:
        raise UserError(f"{what} learns one new word (data.token={token}); data set {other.name} uses "
                        f"'{other.token}': give every data set that token")


def draws_per_concept(indices, examples: list[Example], concepts: list[Concept]) -> dict[str, int]:
    """How many samples of each concept a sequence of example indices holds (for the run summary)."""
    counts = Counter(examples[i].concept for i in indices)
    return {concept.name: counts.get(index, 0) for index, concept in enumerate(concepts)}


def describe(concepts: list[Concept], examples: list[Example]) -> str:
    """One line per run: each concept's images, repeats and trigger words."""
    counts = Counter(e.concept for e in examples)
    return "; ".join(f"{c.name}: {counts[i]} images x {c.repeats} repeats, "
                     f"'{' '.join(filter(None, (c.token, c.class_word)))}'" for i, c in enumerate(concepts))
