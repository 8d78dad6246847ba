"""Readers and writers for the adapter file formats other tools use (diffusers, kohya/A1111/ComfyUI)."""

import re


def file_stem(token: str, fallback: str | None = None) -> str:
    """A file-name-safe spelling of `token` that still reads as one word ('<cat-toy>' -> 'cat-toy').

    A1111/ComfyUI show an adapter's file name as its name (for embeddings: the prompt word), so keep as much
    of the token as is safe on every OS: letters (any script), digits, '_', '.', '-'; runs of anything else
    (<>:"/\\|?*, spaces) become '_', and leading/trailing '_', '.', '-' drop. An empty result gives `fallback`,
    or a ValueError when there is none.
    """
    stem = re.sub(r"[^\w.-]+", "_", token).strip("_.-")
    if stem:
        return stem
    if fallback is None:
        raise ValueError(f"token {token!r} has no characters usable in a file name")
    return fallback


def clip_module_path(name: str) -> str:
    """A CLIP text-encoder module path without the `text_model.` level: transformers 4 has that level,
    transformers 5 has not, and every exporter writes the same keys under both."""
    return name.removeprefix("text_model.")
