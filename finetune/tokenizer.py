"""The real CLIP BPE tokenizer, built offline from the merge list shipped in finetune/assets."""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

# CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, then 2 special tokens.
_NUM_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins for raw bytes, in the GPT-2 order CLIP uses."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Return (vocab, merges) of OpenAI's CLIP tokenizer (49,408 tokens)."""
    raw = resources.files("finetune.assets").joinpath("bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + _NUM_MERGES]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def build_clip_tokenizer(max_length: int = 77, pad_token: str = EOS):
    """A CLIPTokenizer identical to openai/clip-vit-large-patch14's, with no download.

    pad_token: SDXL's second tokenizer (OpenCLIP bigG's) pads with "!" instead of the end token."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    # transformers 5: `vocab=`/`merges=` (not vocab_file=) and an explicit model_max_length,
    # otherwise the pipeline pads prompts to ~1e30 tokens.
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        model_max_length=max_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=pad_token,
    )


def words_past_the_window(tokenizer, text: str) -> str:
    """The end of `text` that a CLIP window (77 tokens with start and end) cuts off, as words; '' if it fits."""
    ids = tokenizer(text, add_special_tokens=False, truncation=False, verbose=False).input_ids
    limit = tokenizer.model_max_length - 2
    return tokenizer.decode(ids[limit:]).strip() if len(ids) > limit else ""
