"""`sdft convert`, `sdft merge` and `sdft resize-lora`: working with LoRA files after training."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import UserError


def add_commands(sub) -> None:
    """The LoRA tools' subcommands on the sdft parser."""
    p = sub.add_parser("convert", help="convert a LoRA between diffusers' format and kohya's (A1111, ComfyUI)",
                       allow_abbrev=False)
    p.add_argument("lora", help="a LoRA .safetensors file (either format: the other one is written)")
    p.add_argument("--output", required=True, help="kohya: a .safetensors file; diffusers: a folder")
    p.add_argument("--base", default="tiny", help="base whose module names a kohya file is read against, and for "
                   "SDXL the base whose UNet names a kohya file uses (as --model)")
    p = sub.add_parser("merge", help="fuse one or more LoRAs (plain, or LyCORIS: LoHa, LoKr, DoRA) into a base and "
                       "save it (diffusers folder or single file)", allow_abbrev=False)
    p.add_argument("--base", required=True, help="base model (as --model)")
    p.add_argument("--lora", action="append", required=True, metavar="FILE[:SCALE]",
                   help="a LoRA file and its scale (default 1.0); repeat for several")
    p.add_argument("--output", required=True, help="a folder (diffusers) or a .safetensors file (original "
                   "single-file layout)")
    p = sub.add_parser("resize-lora", help="re-factorise a kohya LoRA at a lower rank (SVD), reporting the "
                       "energy each module keeps", allow_abbrev=False)
    p.add_argument("lora", help="a kohya-format LoRA .safetensors file")
    p.add_argument("--rank", type=int, required=True, help="new rank (modules below it keep theirs)")
    p.add_argument("--output", required=True, help="the resized .safetensors file")


def _read(path: str):
    from safetensors import safe_open

    from .inference import check_safetensors_file

    check_safetensors_file(Path(path), "LoRA")
    with safe_open(path, framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata() or {}


def _is_kohya(tensors: dict) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te")) for k in tensors)


def _refuse_lycoris(path: str, tensors: dict, command: str) -> None:
    from .formats.lycoris import is_lycoris

    if is_lycoris(tensors):
        raise UserError(f"{path}: a LyCORIS file (LoHa, LoKr or DoRA); sdft {command} handles plain LoRA files "
                        "(sdft merge and sdft generate apply LyCORIS files)")


def _refuse_existing(output: Path) -> None:
    if output.exists():
        raise UserError(f"--output {output} exists; choose a new name (sdft never overwrites your files)")


def run_convert(args: argparse.Namespace) -> str:
    from safetensors.torch import save_file

    from .formats.file_modes import apply_umask
    from .formats.lora_convert import diffusers_to_kohya, is_sdxl_lora, kohya_to_diffusers_pipeline
    from .models import load_pipeline

    output = Path(args.output)
    _refuse_existing(output)
    tensors, metadata = _read(args.lora)
    _refuse_lycoris(args.lora, tensors, "convert")
    family, unet_config = _base_naming(args.base)
    _check_fits(args.lora, tensors, unet_config)
    if _is_kohya(tensors):
        written = kohya_to_diffusers_pipeline(load_pipeline(args.base), Path(args.lora), output)
        apply_umask([output])
        return str(written)
    if output.suffix != ".safetensors":
        raise UserError("--output: a kohya LoRA is a .safetensors file")
    if is_sdxl_lora(tensors) and family.name != "sdxl":
        raise UserError(f"{args.lora} is an SDXL LoRA: pass --base with the SDXL model it belongs to (kohya's SDXL "
                        "names follow that model's UNet layout)")
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_", "modelspec.", "sdft_"))}
    save_file(diffusers_to_kohya(tensors, metadata, family, unet_config), str(output), metadata=kept or None)
    apply_umask([output])
    return str(output)


def _base_naming(base: str):
    """(family, UNet config) of --base: read from a diffusers folder's files (no weights loaded), else from the
    loaded pipeline (a hub id or a single file)."""
    import json

    from .families import family_named, family_of_pipeline
    from .models import detect_family_name, load_pipeline, resolve_base

    source = resolve_base(base)
    name, config_file = detect_family_name(source), Path(source) / "unet" / "config.json"
    if name is not None and config_file.is_file():
        return family_named(name), json.loads(config_file.read_text())
    pipe = load_pipeline(base)
    return family_of_pipeline(pipe), dict(pipe.unet.config)


def _check_fits(path: str, tensors: dict, unet_config: dict) -> None:
    """Refuse a LoRA made for a base of another size (SD 1.5 vs SDXL vs the toy base): its cross-attention key
    projections read context of another width than the base's UNet."""
    width = next((t.shape[1] for k, t in tensors.items()
                  if k.endswith(("attn2.to_k.lora_A.weight", "attn2_to_k.lora_down.weight"))), None)
    base_width = unet_config.get("cross_attention_dim")
    if width is not None and isinstance(base_width, int) and width != base_width:
        raise UserError(f"{path} reads {width}-wide text context, --base's UNet {base_width}-wide: pass --base with "
                        "the model the LoRA was trained for")


def parse_lora_scale(item: str) -> tuple[str, float]:
    """'file.safetensors:0.8' -> (file, 0.8); no scale: 1.0 (a ':' inside a path is kept)."""
    path, sep, scale = item.rpartition(":")
    if sep and path:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return item, 1.0


def run_merge(args: argparse.Namespace) -> str:
    from .formats.file_modes import apply_umask
    from .formats.single_file import save_single_file
    from .inference import check_safetensors_file
    from .models import load_pipeline
    from .strategies.lora import can_load_lycoris, merge_lycoris_into

    output = Path(args.output)
    _refuse_existing(output)
    loras = [parse_lora_scale(item) for item in args.lora]
    for path, _ in loras:
        check_safetensors_file(Path(path), "--lora")  # a damaged or missing file fails before the base loads
    pipe = load_pipeline(args.base)
    lycoris = [(path, scale) for path, scale in loras if can_load_lycoris(Path(path))]
    plain = [(path, scale) for path, scale in loras if (path, scale) not in lycoris]
    names = [f"merge_{index}" for index in range(len(plain))]
    for name, (path, _) in zip(names, plain):
        pipe.load_lora_weights(path, adapter_name=name)
    if names:
        # All at once: fusing one adapter and then loading the next would unmerge the first.
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in plain])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()  # the fused weights stay; the LoRA layers go
    for path, scale in lycoris:  # LoHa, LoKr, DoRA: added into the weights as A1111 and ComfyUI apply them
        merge_lycoris_into(pipe, path, scale)
    if output.suffix == ".safetensors":
        save_single_file(pipe, output)
    else:
        pipe.save_pretrained(output, safe_serialization=True)
    apply_umask([output])
    return str(output)


def run_resize(args: argparse.Namespace) -> str:
    from .formats.file_modes import apply_umask
    from .formats.lora_extract import save_extracted_lora
    from .formats.lora_resize import resize_kohya

    output = Path(args.output)
    _refuse_existing(output)
    if args.rank < 1:
        raise UserError("--rank must be >= 1")
    tensors, metadata = _read(args.lora)
    _refuse_lycoris(args.lora, tensors, "resize-lora")
    if not _is_kohya(tensors):
        raise UserError(f"{args.lora}: not a kohya LoRA; convert it first (sdft convert)")
    resized, report = resize_kohya(tensors, args.rank)
    print(report.summary())
    kept = {k: v for k, v in metadata.items() if k.startswith(("ss_base_model", "modelspec.architecture"))}
    save_extracted_lora(output, resized, {**kept, "ss_training_comment": f"resized to rank {args.rank} by sdft"},
                        title=output.stem)
    apply_umask([output])
    return str(output)
