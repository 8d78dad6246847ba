"""Extract a kohya-format LoRA from a full fine-tune (DreamBooth): low-rank SVD of each weight difference.

For every nn.Linear / nn.Conv2d whose weight changed, delta = tuned - base is flattened to 2-D
([out, in*kh*kw]), factorised delta = U S V^T, and the best rank-r approximation (Eckart-Young) is split
evenly: lora_up = U[:, :r] sqrt(S_r), lora_down = sqrt(S_r) V^T[:r]. Conv factors are reshaped back to
down [r, in, kh, kw] and up [out, r, 1, 1], the shapes kohya/LyCORIS "LoCon" files use, so that
conv(x, up) after conv(x, down) equals conv(x, up @ down). alpha is the requested rank (the largest layer
rank when every layer is smaller), so the applied scale alpha/r is 1; layers whose rank is capped below it
get compensated factors (see shared_alpha_tensors).
This is what kohya's sd-scripts networks/extract_lora_from_models.py does (it extracts 3x3 convs only
with --conv_dim, and can clamp outliers with a quantile, which we do not).

What a LoRA cannot carry (biases, GroupNorm/LayerNorm weights, embeddings) is measured and reported in
ExtractStats, so a user sees how much of the fine-tune is lost.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .kohya_lora import base_model_version, kohya_metadata, kohya_stem

log = logging.getLogger(__name__)


@dataclass
class ExtractStats:
    """What an extraction kept and what it could not express."""

    extracted: int = 0  # modules written as LoRA pairs
    identical: int = 0  # Linear/Conv2d weights equal in both models (nothing to extract)
    skipped_convs: int = 0  # changed kxk convs left out because conv_rank == 0
    lost: dict[str, float] = field(default_factory=dict)  # parameter -> max |tuned - base| a LoRA cannot carry
    relative_error: dict[str, float] = field(default_factory=dict)  # kohya stem -> ||delta - up@down|| / ||delta||

    @property
    def max_lost(self) -> tuple[str | None, float]:
        """The parameter with the largest difference that the LoRA drops, and that difference."""
        if not self.lost:
            return None, 0.0
        name = max(self.lost, key=self.lost.get)
        return name, self.lost[name]

    @property
    def max_relative_error(self) -> float:
        """The worst rank-truncation error over the extracted modules (0 at full rank)."""
        return max(self.relative_error.values(), default=0.0)

    def summary(self) -> str:
        name, value = self.max_lost
        text = (f"extracted {self.extracted} modules, {self.identical} unchanged weights skipped, "
                f"worst relative truncation error {self.max_relative_error:.3g}")
        if self.skipped_convs:
            text += f", {self.skipped_convs} changed kxk convs left out (conv_rank=0)"
        if self.lost:
            text += (f"; {len(self.lost)} changed parameters cannot be expressed as LoRA "
                     f"(largest: {name}, max |diff| {value:.3g})")
        return text

    def as_metadata(self) -> dict[str, str]:
        """String metadata for the safetensors header (so the loss travels with the file)."""
        name, value = self.max_lost
        return {
            "sdft_extract_modules": str(self.extracted),
            "sdft_extract_identical": str(self.identical),
            "sdft_extract_lost_params": str(len(self.lost)),
            "sdft_extract_lost_max_abs": f"{value:.6g}",
            "sdft_extract_lost_max_param": name or "",
            "sdft_extract_max_relative_error": f"{self.max_relative_error:.6g}",
        }


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up, down, relative_error) of the best rank-`rank` approximation of a Linear or Conv2d weight delta.

    rank is capped at min(out, in*kh*kw), the largest rank the flattened matrix can have.
    """
    out_dim = delta.shape[0]
    matrix = delta.reshape(out_dim, -1).to(torch.float32)
    r = max(1, min(rank, *matrix.shape))
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    up = u[:, :r] * root  # [out, r]
    down = root[:, None] * vh[:r]  # [r, in*kh*kw]
    norm = matrix.norm()
    error = float((matrix - up @ down).norm() / norm) if norm > 0 else 0.0
    if delta.ndim == 4:
        down = down.reshape(r, *delta.shape[1:])  # [r, in, kh, kw]: the down conv keeps the kernel
        up = up.reshape(out_dim, r, 1, 1)  # [out, r, 1, 1]: a pointwise conv mixes the r channels
    return up.contiguous(), down.contiguous(), error


def _lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Every Linear and (ungrouped) Conv2d by module path: the layers a kohya LoRA can patch."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)}


def _module_rank(module: nn.Module, rank: int, conv_rank: int | None) -> int:
    """The requested rank for a module: kxk convs (k > 1) use conv_rank when given, everything else rank."""
    if isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1) and conv_rank is not None:
        return conv_rank
    return rank


def _extract_part(base: nn.Module, tuned: nn.Module, part: str, rank: int, conv_rank: int | None,
                  stats: ExtractStats, family) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The (up, down) factors of every changed layer of one model (part 'unet' or a text encoder's pipeline
    name) by kohya stem; also accounts for unchanged layers and for what a LoRA cannot carry."""
    base_targets, tuned_targets = _lora_targets(base), _lora_targets(tuned)
    if base_targets.keys() != tuned_targets.keys():
        raise ValueError(f"{part}: base and tuned models have different layers")
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    covered = set()
    for name, module in base_targets.items():
        base_w, tuned_w = module.weight.detach(), tuned_targets[name].weight.detach()
        if base_w.shape != tuned_w.shape:
            raise ValueError(f"{part}.{name}: shape {tuple(base_w.shape)} vs {tuple(tuned_w.shape)}")
        if torch.equal(base_w, tuned_w):
            stats.identical += 1
            covered.add(f"{name}.weight")
            continue
        want = _module_rank(module, rank, conv_rank)
        if want <= 0:  # conv_rank=0: the user chose to leave kxk convs out; _account_lost records the loss
            stats.skipped_convs += 1
            continue
        covered.add(f"{name}.weight")
        delta = tuned_w.to("cpu", torch.float32) - base_w.to("cpu", torch.float32)
        up, down, error = low_rank_factors(delta, want)
        stem = kohya_stem(name, part, family, base.config if part == "unet" else None)
        factors[stem] = (up, down)
        stats.relative_error[stem] = error
        stats.extracted += 1
    _account_lost(base, tuned, part, covered, stats)
    return factors


def shared_alpha_tensors(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """kohya tensors with ONE alpha for every module: alpha = the largest module rank R.

    Loaders apply up @ down * alpha / r per module, so a module whose rank r was capped below R has its
    factors multiplied by sqrt(r / R) to keep the product exact. Why not alpha = r per module: diffusers'
    kohya converter (0.42.1, lora_conversion_utils._get_alpha_name) loses the alphas of attention and CLIP
    modules (their converted names have no `.lora.`), and peft then scales those modules by the most
    common alpha over r; one shared alpha is read correctly by diffusers, A1111 and ComfyUI alike.
    """
    top = max((down.shape[0] for _, down in factors.values()), default=0)
    out: dict[str, torch.Tensor] = {}
    for stem, (up, down) in factors.items():
        r = down.shape[0]
        fix = (r / top) ** 0.5
        out[f"{stem}.lora_down.weight"] = (down * fix).contiguous()
        out[f"{stem}.lora_up.weight"] = (up * fix).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(top))
    return out


def _account_lost(base: nn.Module, tuned: nn.Module, part: str, covered: set[str], stats: ExtractStats) -> None:
    """Record every changed parameter the LoRA does not carry (biases, norms, embeddings, skipped convs)."""
    tuned_params = dict(tuned.named_parameters())
    for name, param in base.named_parameters():
        if name in covered:
            continue
        diff = (tuned_params[name].detach().float() - param.detach().float()).abs().max().item()
        if diff > 0:
            stats.lost[f"{part}.{name}"] = diff


def extract_lora_with_stats(base_unet, tuned_unet, rank: int, base_te=None, tuned_te=None,
                            conv_rank: int | None = None, family=None) -> tuple[dict[str, torch.Tensor], ExtractStats]:
    """Like extract_lora, also returning the ExtractStats. base_te/tuned_te: one text encoder each, or a list
    per family encoder (SDXL: [CLIP-L, OpenCLIP-G]); `family` (default SD 1.x/2.x) names the kohya keys."""
    from ..families import family_named

    if rank < 1:
        raise ValueError("rank must be >= 1")
    if (base_te is None) != (tuned_te is None):
        raise ValueError("pass both base_te and tuned_te, or neither")
    family = family or family_named("sd")
    as_list = (lambda te: [] if te is None else list(te) if isinstance(te, (list, tuple)) else [te])
    stats = ExtractStats()
    with torch.no_grad():
        factors = _extract_part(base_unet, tuned_unet, "unet", rank, conv_rank, stats, family)
        for part, base, tuned in zip(family.text_encoder_parts, as_list(base_te), as_list(tuned_te)):
            factors.update(_extract_part(base, tuned, part, rank, conv_rank, stats, family))
    return shared_alpha_tensors(factors), stats


def extract_lora(base_unet, tuned_unet, rank: int, base_te=None, tuned_te=None,
                 conv_rank: int | None = None) -> dict[str, torch.Tensor]:
    """kohya-keyed LoRA tensors approximating tuned - base for every changed Linear/Conv2d weight.

    rank: rank for Linear layers and 1x1 convs (capped per layer at min(out, in*kh*kw)).
    conv_rank: rank for kxk convs (resnet conv1/conv2, samplers, conv_in/out); None = same as rank,
    0 = leave them out (kohya's extract default; their change is then reported as lost).
    base_te/tuned_te: CLIP text encoders, extracted under `lora_te_text_model_*` when both are given.
    The stats (unchanged weights skipped; biases/norms that a LoRA cannot carry) are logged;
    use extract_lora_with_stats to get them.
    """
    tensors, stats = extract_lora_with_stats(base_unet, tuned_unet, rank, base_te, tuned_te, conv_rank)
    log.info("LoRA extraction: %s", stats.summary())
    return tensors


def _ranks(tensors: dict[str, torch.Tensor]) -> tuple[int, int | None]:
    """(largest rank of Linear/1x1 modules, largest rank of kxk conv modules or None), for ss_network_* metadata."""
    dim, conv_dim = 0, None
    for key, tensor in tensors.items():
        if key.endswith(".lora_down.weight"):
            if tensor.ndim == 4 and tuple(tensor.shape[2:]) != (1, 1):
                conv_dim = max(conv_dim or 0, tensor.shape[0])
            else:
                dim = max(dim, tensor.shape[0])
    return dim, conv_dim


def save_extracted_lora(path, tensors: dict[str, torch.Tensor], metadata: dict | None = None, *,
                        base_version: str = "sd_v1", resolution: int = 512, prediction_type: str = "epsilon",
                        title: str | None = None, stats: ExtractStats | None = None,
                        dtype: torch.dtype = torch.float32) -> Path:
    """Write extracted tensors as a kohya LoRA `.safetensors` with ss_*/modelspec metadata.

    metadata: extra string keys, merged last (they win). stats: adds sdft_extract_* keys describing the loss.
    """
    from safetensors.torch import save_file

    path = Path(path)
    dim, conv_dim = _ranks(tensors)
    alpha = max((float(v) for k, v in tensors.items() if k.endswith(".alpha")), default=0.0)
    extra = {"ss_training_comment": "extracted from a full fine-tune by sdft (SVD of weight differences)"}
    if conv_dim is not None:  # kohya records LoCon conv ranks in ss_network_args
        extra["ss_network_args"] = json.dumps({"conv_dim": str(conv_dim), "conv_alpha": str(alpha)})
    extra.update(stats.as_metadata() if stats else {})
    extra.update({str(k): str(v) for k, v in (metadata or {}).items()})
    meta = kohya_metadata(rank=dim or (conv_dim or 0), alpha=alpha, base_version=base_version,
                          resolution=resolution, steps=0, lr=0.0, title=title or path.stem,
                          prediction_type=prediction_type, extra=extra)
    # alpha stays float32 whatever dtype: it is a scalar and rounding it would change the scale.
    out = {k: (v if k.endswith(".alpha") else v.to(dtype)).contiguous() for k, v in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=meta)
    return path


def extract_from_pipelines(base_pipe, tuned_pipe, path, rank: int, conv_rank: int | None = None,
                           text_encoder: bool = True, metadata: dict | None = None) -> tuple[Path, ExtractStats]:
    """Extract base -> tuned (UNet, and the text encoders where they changed) and save with metadata from the
    configs; SD 1.x/2.x and SDXL pipelines alike."""
    from ..families import family_of_pipeline

    family = family_of_pipeline(base_pipe)
    te = ([getattr(base_pipe, p) for p in family.text_encoder_parts],
          [getattr(tuned_pipe, p) for p in family.text_encoder_parts]) if text_encoder else (None, None)
    tensors, stats = extract_lora_with_stats(base_pipe.unet, tuned_pipe.unet, rank, *te, conv_rank=conv_rank,
                                             family=family)
    log.info("LoRA extraction: %s", stats.summary())
    prediction = str(base_pipe.scheduler.config.get("prediction_type", "epsilon"))
    resolution = int(base_pipe.unet.config.sample_size) * base_pipe.vae_scale_factor
    version = base_model_version(base_pipe.unet.config, prediction)
    saved = save_extracted_lora(path, tensors, metadata, base_version=version, resolution=resolution,
                                prediction_type=prediction, stats=stats)
    return saved, stats
