"""Save a toy base with a trained textual-inversion embedding already in its vocabulary (a two-stage "pivotal" start).

    python -m lab.benchmarks.pivotal_base TI_RUN/learned_embeds.safetensors OUT [--base tiny] [--norm 0.33]

OUT is a diffusers pipeline folder whose tokenizer and text encoder know the embedding's token(s) (`<sks>`,
`<sks>_1`, ... as diffusers' load_textual_inversion names them). Any recipe then fine-tunes on top of it with
`model.name=OUT "data.token=<sks> <sks>_1"`, so the UNet (or a LoRA) starts from a word that already carries the
concept instead of an unknown one. `--norm` rescales every learned vector to that length first: a textual
inversion trained at lr 5e-3 ends with vectors ~2.5x longer than the toy world's own words (0.85 against 0.28-0.35
for "shape", "orange", "white", "circle"...) and then overrides the background words of a prompt.
"""

from __future__ import annotations

import argparse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("embeddings", help="a diffusers learned_embeds.safetensors ({token: [n, dim]})")
    parser.add_argument("output", help="folder for the pipeline")
    parser.add_argument("--base", default="tiny", help="tiny or any pipeline folder")
    parser.add_argument("--norm", type=float, default=None, help="rescale each vector to this length")
    args = parser.parse_args()

    from safetensors.torch import load_file

    from finetune.models import load_pipeline

    pipe = load_pipeline(args.base)
    embeddings = load_file(args.embeddings)
    if len(embeddings) != 1:
        raise SystemExit(f"{args.embeddings}: expected one token, found {sorted(embeddings)}")
    (token, vectors), = embeddings.items()
    if args.norm:
        vectors = vectors / vectors.norm(dim=1, keepdim=True) * args.norm
    table = pipe.text_encoder.get_input_embeddings().weight
    known = {w: round(float(table[pipe.tokenizer.convert_tokens_to_ids(w + "</w>")].norm()), 3)
             for w in ("shape", "orange", "white", "circle")}
    print(f"{token}: {vectors.shape[0]} vectors of length {[round(float(n), 3) for n in vectors.norm(dim=1)]}; "
          f"lengths of words the base knows: {known}")
    pipe.load_textual_inversion(vectors, token=token)
    pipe.save_pretrained(args.output, safe_serialization=True)


if __name__ == "__main__":
    main()
