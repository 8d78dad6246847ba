"""Pivotal tuning: learn the new word's embedding first, then let LoRA or DreamBooth train on top of it.

Phase 1 is an ordinary textual-inversion run (the same strategy, trainer and exports) into `<output>/pivotal`,
on its own copy of the base. Its vectors, optionally rescaled to `pivotal.norm`, then join the main run's
tokenizer and text encoder before the method's strategy is prepared, so the UNet (or its LoRA) learns the
concept under a word that already means something close to it instead of under an unknown one. The word
ships next to the method's files as an embedding (diffusers `learned_embeds.safetensors` and an A1111/kohya
`{emb_params}` file; on SDXL the `{clip_l, clip_g}` file) read from the final text encoders, so a DreamBooth run
that also trained the text encoders exports the rows it ended with.

With `--resume`, a finished phase 1 whose settings match (output and reporting settings may differ) is reused,
so the word is not trained again; an unfinished phase 1 starts over (it is the short phase).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from . import UserError
from .config import RunConfig, saved_config_dict
from .formats import embeddings
from .interrupt import TrainingInterrupted
from .run_folder import config_differences
from .strategies.textual_inversion import add_placeholder_tokens, expand_placeholder, placeholder_names

log = logging.getLogger(__name__)

PHASE_FOLDER = "pivotal"


@dataclass
class LearnedWord:
    """The word phase 1 learned: its placeholder token, the token names of its vectors, and the vectors (one
    float32 [n_vectors, dim] set per text encoder, keyed as textual inversion's state: the token, or SDXL's
    clip_l / clip_g), already rescaled."""

    token: str
    names: list[str]
    vectors: dict[str, torch.Tensor]

    def expand(self, prompt: str) -> str:
        """`<sks>` -> `<sks> <sks>_1 ...` before the trainer tokenises (diffusers pipelines do it themselves)."""
        return expand_placeholder(prompt, self.names)

    def _pairs(self, components):
        return zip(self.vectors, components.tokenizers, components.text_encoders)

    def install(self, components) -> None:
        """Add the word's tokens to every tokenizer and write its rows into each text encoder's embedding."""
        for key, tokenizer, encoder in self._pairs(components):
            ids = add_placeholder_tokens(tokenizer, encoder, self.names)
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = self.vectors[key].to(weight.device, weight.dtype)

    def export(self, components, out_dir: Path, metadata: dict[str, str]) -> list[str]:
        """Write the word as it stands in `components` now: diffusers and A1111/kohya safetensors files."""
        state = {key: encoder.get_input_embeddings().weight.detach()[tokenizer.convert_tokens_to_ids(self.names)]
                 .float().cpu() for key, tokenizer, encoder in self._pairs(components)}
        meta = {**metadata, "vectors": str(len(self.names))}
        a1111_path = out_dir / f"{embeddings.file_stem(self.token)}.safetensors"
        if len(state) > 1:
            return [str(embeddings.save_per_encoder(path, self.token, state, meta))
                    for path in (out_dir / embeddings.DIFFUSERS_FILE, a1111_path)]
        vectors = state[self.token]
        diffusers_file = embeddings.save_diffusers(out_dir / embeddings.DIFFUSERS_FILE, self.token, vectors, meta)
        a1111_file = embeddings.save_a1111_safetensors(a1111_path, self.token, vectors, meta)
        return [str(diffusers_file), str(a1111_file)]


def enabled(config: RunConfig) -> bool:
    """Whether this run starts with an embedding phase."""
    return "pivotal" in config.sections() and config.pivotal.steps > 0


def phase_config(config: RunConfig) -> RunConfig:
    """The textual-inversion run of phase 1: the main run's model, data and training settings, the pivotal
    section's steps/lr/vectors/init word, no prior preservation (the word is learned from the instance images
    alone; the base's other words cannot drift), output in <output>/pivotal."""
    phase = RunConfig.for_method("textual_inversion")
    phase.model = copy.deepcopy(config.model)
    phase.data = copy.deepcopy(config.data)
    phase.train = copy.deepcopy(config.train)
    phase.train.steps = config.pivotal.steps
    phase.train.lr = config.pivotal.lr
    phase.train.weight_decay = 0.0
    phase.train.ema_decay = 0.0
    phase.train.lr_warmup_steps = min(config.train.lr_warmup_steps, config.pivotal.steps)
    phase.textual_inversion.vectors = config.pivotal.vectors
    phase.textual_inversion.init_word = config.pivotal.init_word
    phase.output = copy.deepcopy(config.output)
    phase.output.output = str(Path(config.output.output) / PHASE_FOLDER)
    phase.output.formats = ["diffusers"]
    phase.output.resume = None
    phase.output.overwrite = True  # the folder belongs to this run: an unfinished or outdated phase 1 starts over
    phase.output.sample_every = 0
    return phase


def _finished_phase(phase: RunConfig) -> dict[str, torch.Tensor] | None:
    """The vectors of an earlier phase 1 with this very config, or None."""
    import yaml

    folder = Path(phase.output.output)
    done, saved = folder / "summary.json", folder / "config.yaml"
    learned = folder / embeddings.DIFFUSERS_FILE
    if not (done.is_file() and saved.is_file() and learned.is_file()):
        return None
    # Settings a resume may change (output and reporting) do not make the word stale; its own steps do.
    earlier = yaml.safe_load(saved.read_text())
    if earlier.get("train", {}).get("steps") != phase.train.steps or config_differences(earlier,
                                                                                      saved_config_dict(phase)):
        return None
    per_encoder = embeddings.read_per_encoder(learned)
    if per_encoder is not None:
        return per_encoder[1]
    found = embeddings.read_embeddings(learned)
    return {phase.data.token: found[phase.data.token]} if phase.data.token in found else None


def check_new_word(tokenizer, token: str, vectors: int) -> None:
    """Refuse a token the base already knows: pivotal tuning learns a new word."""
    names = placeholder_names(token, vectors)
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab or n.lower() in vocab or f"{n.lower()}</w>" in vocab]
    if taken or not token or any(c.isspace() for c in token):
        raise UserError(f"data.token={token!r}: pivotal tuning (pivotal.steps > 0) learns a new word, one word the "
                        f"tokenizer does not know yet; use e.g. '<{token.strip() or 'sks'}>'")


def learn_word(config: RunConfig, run_training: Callable, components=None) -> LearnedWord:
    """Run (or reuse) phase 1 through `run_training` (the trainer's entry point, passed in so this module
    does not import the trainer back) and return the learned word, rescaled to pivotal.norm if set.

    `components` (already loaded, e.g. by a benchmark) are copied, never changed; without them phase 1 loads
    its own copy of the base (the main run loads another after it, so two never sit in memory at once).
    """
    phase = phase_config(config)
    token, vectors = config.data.token, None
    if config.output.resume:
        vectors = _finished_phase(phase)
    if vectors is None:
        if components is None:  # (the trainer checked the model name and the images before calling)
            from .models import load_components

            components = load_components(config.model.name, config.model.single_file_config, config.model.family)
        else:
            components = copy.deepcopy(components)
        check_new_word(components.tokenizer, token, config.pivotal.vectors)
        log.info("pivotal tuning, phase 1: %d steps of textual inversion into %s", phase.train.steps,
                 phase.output.output)
        try:
            outcome = run_training(phase, components)
        except TrainingInterrupted as exc:
            # Phase 1 is short and always starts over: its checkpoint is not what --resume continues.
            raise TrainingInterrupted("interrupted while learning the new word (pivotal tuning's first phase); "
                                      "run the command again with --overwrite to start over") from exc
        vectors = outcome.strategy.state_dict()
        del outcome
    else:
        log.info("pivotal tuning: reusing the word learned in %s", phase.output.output)
    rescaled = {}
    for key, rows in vectors.items():
        rows = rows.float().cpu()
        lengths = rows.norm(dim=1, keepdim=True)
        if config.pivotal.norm is not None:
            rows = rows / lengths * config.pivotal.norm
        log.info("pivotal word %s (%s): vector lengths %s -> %s", token, key,
                 [round(float(x), 3) for x in lengths.flatten()], [round(float(x), 3) for x in rows.norm(dim=1)])
        rescaled[key] = rows
    count = next(iter(rescaled.values())).shape[0]
    return LearnedWord(token, placeholder_names(token, count), rescaled)
