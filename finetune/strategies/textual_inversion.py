"""Textual inversion: learn the embedding row(s) of a new word; every other weight stays frozen.

The placeholder `data.token` joins the tokenizer as an added token (with `tok_1 ... tok_{n-1}` for
n vectors, named exactly as diffusers' load_textual_inversion names them), the text encoder's token
embedding grows to match, and only those rows train: gradients of the other rows are masked, and
after each optimizer step every other row is copied back from a frozen snapshot, because AdamW's
weight decay touches every row of a parameter whatever its gradient.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..formats import embeddings
from .base import StrategyDefaults, register, register_loader

log = logging.getLogger(__name__)

# Prompts drawn per sample for images without a caption file ({token} is the placeholder).
OBJECT_TEMPLATES = [
    "a photo of a {token}",
    "a rendering of a {token}",
    "a cropped photo of the {token}",
    "a photo of the {token}",
    "a picture of a {token}",
    "an image of the {token}",
    "a close-up photo of a {token}",
    "a close-up photo of the {token}",
    "a bright photo of a {token}",
    "a dark photo of the {token}",
    "a blurry photo of a {token}",
    "a sharp photo of the {token}",
    "a good photo of a {token}",
    "a nice photo of the {token}",
    "a photo of one {token}",
    "a photo of my {token}",
    "a photo of the small {token}",
    "a photo of a large {token}",
    "a photo of a clean {token}",
    "a photo of a dirty {token}",
    "a snapshot of the {token}",
    "a detailed photo of a {token}",
    "a low-resolution photo of the {token}",
    "a centered photo of a {token}",
    "a rendition of the {token}",
]
STYLE_TEMPLATES = [
    "a painting in the style of {token}",
    "a rendering in the style of {token}",
    "an illustration in the style of {token}",
    "a picture in the style of {token}",
    "an image in the style of {token}",
    "artwork in the style of {token}",
    "a drawing in the style of {token}",
    "a sketch in the style of {token}",
    "a cropped painting in the style of {token}",
    "a close-up painting in the style of {token}",
    "a bright painting in the style of {token}",
    "a dark painting in the style of {token}",
    "a small painting in the style of {token}",
    "a large painting in the style of {token}",
    "a detailed painting in the style of {token}",
    "a nice painting in the style of {token}",
    "a good rendition in the style of {token}",
    "a clean picture in the style of {token}",
    "a work of art in the style of {token}",
    "a {token} style painting",
]


def _user_error(message: str):
    from .. import UserError

    return UserError(message)


def placeholder_names(token: str, vectors: int) -> list[str]:
    """The tokens of an n-vector placeholder: `tok`, `tok_1`, ..., `tok_{n-1}` (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def expand_placeholder(prompt: str, names: list[str]) -> str:
    """Replace each `tok` in `prompt` by `tok tok_1 ... tok_{n-1}`, as diffusers' maybe_convert_prompt does.

    Like diffusers (and like the tokenizer, whose added tokens match inside words too), the match is
    case-sensitive and not limited to whole words: 'sksx' becomes 'sks sks_1 sks_2x'. Unlike diffusers'
    plain str.replace, `tok_1`... already in the prompt are left alone (the tokenizer reads them as their
    own tokens), so expanding twice changes nothing.
    """
    if len(names) < 2 or not names[0]:
        return prompt
    token, expansion = names[0], " ".join(names)
    longer = sorted(names[1:], key=len, reverse=True)
    out, pos = [], 0
    while (hit := prompt.find(token, pos)) != -1:
        out.append(prompt[pos:hit])
        if prompt.startswith(expansion, hit):
            kept = expansion
        else:
            kept = next((n for n in longer if prompt.startswith(n, hit)), None)
        out.append(kept or expansion)
        pos = hit + len(kept or token)
    out.append(prompt[pos:])
    return "".join(out)


def check_token(tokenizer, names: list[str], reuse: bool) -> None:
    """Refuse placeholders that cannot work, with the fix in the message."""
    token = names[0]
    if not token or any(c.isspace() for c in token):
        raise _user_error(f"data.token={token!r}: a textual-inversion token must be one word without spaces "
                          "(A1111/ComfyUI type the embedding's file name as that word), e.g. '<my-concept>'")
    if token in tokenizer.all_special_tokens:
        raise _user_error(f"data.token={token!r} is a special token of the tokenizer; choose a new word")
    if len(names) > 1 and token != token.lower():
        # The CLIP tokenizer lowercases prompts, and diffusers only expands a multi-vector token it
        # finds by its exact spelling among the lowercased tokens: an uppercase one gets 1 vector.
        raise _user_error(f"data.token={token!r}: with textual_inversion.vectors > 1 the token must be "
                          f"lowercase (diffusers cannot expand it otherwise); use {token.lower()!r}")
    vocab = tokenizer.get_vocab()
    # Prompts are lowercased before added tokens are matched, so 'Cat' would take over every 'cat'.
    taken = [n for n in names if n in vocab or n.lower() in vocab]
    if taken and not reuse:
        raise _user_error(
            f"data.token={token!r}: the tokenizer already has {', '.join(repr(t) for t in taken)}, so training "
            f"would overwrite an existing word and diffusers' load_textual_inversion would refuse the result. "
            f"Pick a new word such as '<{token}-concept>', or set textual_inversion.reuse_token=true "
            "(--reuse-token) to overwrite its embedding on purpose")


def check_file_stem(token: str, formats: list[str]) -> None:
    """Refuse a token the A1111 files cannot be named after (checked before training, not at export)."""
    if "a1111" not in formats:
        return
    try:
        stem = embeddings.file_stem(token)
    except ValueError as exc:
        raise _user_error(f"data.token={token!r}: {exc}; the A1111 files are named after the token") from exc
    if stem == Path(embeddings.DIFFUSERS_FILE).stem:
        raise _user_error(f"data.token={token!r} would give the A1111 file the name of diffusers' "
                          f"{embeddings.DIFFUSERS_FILE}; choose another word")


def add_placeholder_tokens(tokenizer, text_encoder, names: list[str]) -> list[int]:
    """Add `names` to the tokenizer (existing ones keep their id) and grow the token embedding; return ids."""
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if len(tokenizer) > text_encoder.get_input_embeddings().weight.shape[0]:
        # The new rows are overwritten by the caller: skip transformers' mean/covariance initialisation.
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return list(ids)


def train_rows_only(text_encoder, ids: list[int]) -> None:
    """Freeze the text encoder except its token embedding, whose gradient is masked to the rows `ids`."""
    text_encoder.requires_grad_(False)
    embedding = text_encoder.get_input_embeddings()
    weight = embedding.weight
    weight.requires_grad_(True)
    mask = torch.zeros(weight.shape[0], 1, device=weight.device)
    mask[ids] = 1.0
    # Only the placeholder rows get a gradient: the clipping norm and Adam's moments then see them alone
    # (otherwise the padding/EOS row, repeated ~70 times per prompt, dominates the clipped norm).
    weight.register_hook(lambda grad: grad * mask.to(grad.device, grad.dtype))
    # The trainer keeps trained weights in float32 while frozen ones may be fp16/bf16: hand the rest of
    # the text encoder the embeddings in its own dtype (CPU layer norms refuse mixed dtypes).
    compute_dtype = next(p.dtype for p in text_encoder.parameters() if p is not weight)
    embedding.register_forward_hook(lambda module, args, output: output.to(compute_dtype))


def initial_vectors(weight: torch.Tensor, init_ids: list[int], vectors: int) -> torch.Tensor:
    """Start vectors from the init phrase: one token per vector if the counts match, else their mean."""
    rows = weight.detach()[init_ids].float()
    if len(init_ids) == vectors:
        return rows.clone()
    return rows.mean(0, keepdim=True).repeat(vectors, 1)


@register("textual_inversion")
class TextualInversionStrategy(StrategyDefaults):
    """Train the embedding rows of `data.token`; export diffusers and A1111 embeddings."""

    name = "textual_inversion"
    formats = ("diffusers", "a1111")
    default_formats = formats

    def __init__(self, config):
        self.config = config
        self.token = config.data.token
        self.vectors = int(config.textual_inversion.vectors)
        if self.vectors < 1:
            raise _user_error(f"textual_inversion.vectors={self.vectors}: need at least 1 vector")
        self.names = placeholder_names(self.token, self.vectors)
        self.components = None
        self.ids: list[int] = []
        self._frozen_rows: torch.Tensor | None = None

    def _init_phrase(self) -> str:
        phrase = self.config.textual_inversion.init_word.strip() or self.config.data.class_word.strip()
        if not phrase:
            raise _user_error("textual_inversion.init_word is empty and data.class_word is not set: pass "
                              "--init-word WORD, a word close to the concept (e.g. 'toy' or 'painting')")
        return phrase

    def _encoders(self) -> list:
        return list(self.components.text_encoders)

    def _weights(self) -> list[torch.nn.Parameter]:
        """The token-embedding matrix of each text encoder (SDXL: CLIP-L's, then OpenCLIP-G's)."""
        return [encoder.get_input_embeddings().weight for encoder in self._encoders()]

    def _state_keys(self) -> list[str]:
        """One vector set per text encoder: `{token}` on SD 1.x/2.x, SDXL's `clip_l` / `clip_g`."""
        return [self.token] if len(self._encoders()) == 1 else list(self.components.family.embedding_keys())

    def prepare(self, components) -> None:
        """Add the placeholder token(s) to every tokenizer, initialise their rows in every text encoder, and
        make those embeddings the only trained weights."""
        check_file_stem(self.token, self.config.output.formats or list(self.formats))
        phrase = self._init_phrase()
        self.components = components
        self.ids, self._frozen_rows = [], []
        for tokenizer, text_encoder in zip(components.tokenizers, components.text_encoders):
            check_token(tokenizer, self.names, self.config.textual_inversion.reuse_token)
            # Tokenised before the placeholder exists, so the phrase means what it meant in the base.
            init_ids = tokenizer(phrase, add_special_tokens=False).input_ids
            if not init_ids:
                raise _user_error(f"textual_inversion.init_word={phrase!r} tokenizes to nothing; use a real word")
            ids = add_placeholder_tokens(tokenizer, text_encoder, self.names)
            weight = text_encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = initial_vectors(weight, init_ids, self.vectors).to(weight.dtype)
            self.ids.append(ids)
            # A full snapshot: restoring it with one copy_ is simpler and faster than masked indexing.
            self._frozen_rows.append(weight.detach().clone())
            train_rows_only(text_encoder, ids)
            log.info("textual inversion: %s -> ids %s, initialised from %r (%d tokens)", self.names, ids,
                     phrase, len(init_ids))

    def trainable_modules(self):
        return self._encoders()

    def trains_text_encoder(self) -> bool:
        return True

    def param_groups(self):
        return [{"params": self._weights(), "lr": self.config.train.lr}]

    def prompt_templates(self):
        return STYLE_TEMPLATES if self.config.textual_inversion.property == "style" else OBJECT_TEMPLATES

    def expand_prompt(self, prompt: str) -> str:
        """`tok` -> `tok tok_1 ...` before the trainer tokenises (diffusers pipelines do this themselves)."""
        return expand_placeholder(prompt, self.names)

    def after_optimizer_step(self) -> None:
        """Copy every non-placeholder row back bit for bit (weight decay moved them all)."""
        with torch.no_grad():
            for weight, ids, frozen in zip(self._weights(), self.ids, self._frozen_rows):
                trained = weight[ids].clone()
                weight.copy_(frozen)
                weight[ids] = trained

    def state_dict(self):
        """{token: float32 [n_vectors, dim]} (SDXL: {clip_l: ..., clip_g: ...}): the learned rows, in
        placeholder order."""
        return {key: weight.detach()[ids].float().clone()
                for key, weight, ids in zip(self._state_keys(), self._weights(), self.ids)}

    def load_state_dict(self, state) -> None:
        """Write rows saved by state_dict() back into the embeddings (after prepare())."""
        keys = self._state_keys()
        if set(state) != set(keys):
            raise ValueError(f"textual-inversion state has keys {sorted(state)}, expected {sorted(keys)}")
        for key, weight, ids in zip(keys, self._weights(), self.ids):
            vectors = state[key]
            if tuple(vectors.shape) != (len(ids), weight.shape[1]):
                raise ValueError(f"textual-inversion state {key!r} has shape {tuple(vectors.shape)}, "
                                 f"expected {(len(ids), weight.shape[1])}")
            with torch.no_grad():
                weight[ids] = vectors.to(weight.device, weight.dtype)

    def export(self, out_dir: Path, formats, metadata):
        """diffusers: learned_embeds.safetensors; a1111: <stem>.pt and <stem>.safetensors named after the token.
        SDXL: both are the {clip_l, clip_g} file A1111, ComfyUI and diffusers (per encoder) read."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        meta = dict(metadata)
        meta.setdefault("vectors", str(self.vectors))
        written: dict[str, list[str]] = {}
        stem = embeddings.file_stem(self.token)
        if len(state) > 1:
            paths = {"diffusers": out_dir / embeddings.DIFFUSERS_FILE, "a1111": out_dir / f"{stem}.safetensors"}
            for fmt in formats:
                written[fmt] = [str(embeddings.save_per_encoder(paths[fmt], self.token, state, meta))]
            return written
        vectors = state[self.token]
        if "diffusers" in formats:
            path = embeddings.save_diffusers(out_dir / embeddings.DIFFUSERS_FILE, self.token, vectors, meta)
            written["diffusers"] = [str(path)]
        if "a1111" in formats:
            pt = embeddings.save_a1111_pt(out_dir / f"{stem}.pt", self.token, vectors,
                                          step=int(metadata.get("steps", 0) or 0))
            st = embeddings.save_a1111_safetensors(out_dir / f"{stem}.safetensors", self.token, vectors, meta)
            written["a1111"] = [str(pt), str(st)]
        return written


def can_load(path: Path) -> bool:
    """A diffusers learned_embeds file/folder, an A1111 .pt, or an {emb_params}/{token: tensor} safetensors."""
    return embeddings.is_embedding_file(path)


def _install(pipe, token: str, vectors: torch.Tensor, tokenizer=None, text_encoder=None) -> None:
    """Load one vector set into one tokenizer + text encoder of `pipe` (default: the first)."""
    tokenizer, text_encoder = tokenizer or pipe.tokenizer, text_encoder or pipe.text_encoder
    names = placeholder_names(token, vectors.shape[0])
    if not any(n in tokenizer.get_vocab() for n in names):
        pipe.load_textual_inversion(vectors, token=token, tokenizer=tokenizer, text_encoder=text_encoder)
        return
    # diffusers refuses a token the tokenizer has: an embedding trained with reuse_token, or a reload.
    # Overwrite its rows the way training did (add_tokens keeps the existing id).
    stale = f"{token}_{vectors.shape[0]}"
    if stale in tokenizer.added_tokens_encoder:
        raise _user_error(f"the pipeline already holds a longer embedding {token!r} ({stale!r} exists); "
                          "load this one into a fresh pipeline")
    log.warning("embedding %r overwrites a token the pipeline already has", token)
    ids = add_placeholder_tokens(tokenizer, text_encoder, names)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[ids] = vectors.to(weight.device, weight.dtype)


def _load_per_encoder(pipe, path: str, found: tuple[str, dict[str, torch.Tensor]], scale: float) -> str:
    """An SDXL embedding ({clip_l, clip_g}): each vector set into its own tokenizer and text encoder."""
    from ..families import family_of_pipeline

    token, state = found
    family = family_of_pipeline(pipe)
    if set(state) != set(family.embedding_keys()):
        raise _user_error(f"--adapter {path}: an SDXL embedding ({', '.join(sorted(state))}) needs an SDXL base")
    for key, tok_part, enc_part in zip(family.embedding_keys(), family.tokenizer_parts, family.text_encoder_parts):
        _install(pipe, token, state[key].float() * scale, getattr(pipe, tok_part), getattr(pipe, enc_part))
    return token


def load_into(pipe, path: str, scale: float = 1.0) -> str:
    """Load an embedding file into `pipe` through diffusers' load_textual_inversion; return its token(s).

    The prompt word is the token stored in the file ({token: tensor} keys, or the A1111 .pt `name` /
    sdft metadata while the file still carries that token's name) or else the file stem, as in A1111.
    `scale` multiplies the vectors: a rough strength knob (not A1111's attention emphasis), 1.0 = as trained.
    The file is read here (pickles only with weights_only=True) and handed over as tensors.
    """
    per_encoder = embeddings.read_per_encoder(path)
    if per_encoder is not None:
        return _load_per_encoder(pipe, path, per_encoder, scale)
    if hasattr(pipe, "text_encoder_2"):
        raise _user_error(f"--adapter {path}: an SD 1.x/2.x embedding (one vector set) cannot drive an SDXL base's "
                          "two text encoders; train one on SDXL")
    try:
        found = embeddings.read_embeddings(path)
    except ValueError as exc:
        raise _user_error(f"--adapter {path}: {exc}") from exc
    width = pipe.text_encoder.get_input_embeddings().weight.shape[1]
    for token, vectors in found.items():
        if vectors.shape[-1] != width:
            raise _user_error(f"--adapter {path}: its vectors are {vectors.shape[-1]} wide, this base's text encoder "
                              f"takes {width} (it was trained on a base of another size)")
        vectors = vectors.float()
        if scale != 1.0:
            vectors = vectors * scale
        _install(pipe, token, vectors)
    return ", ".join(found)


register_loader("textual_inversion", can_load, load_into)
