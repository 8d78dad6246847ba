"""LoRA extraction from a full fine-tune: SVD factors, kohya keys, and reproduction through diffusers'
load_lora_weights."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from torch import nn

# A mix of every layer kind a fine-tune changes: attention Linears (self and cross), feed-forward,
# 1x1 conv projections, 3x3 resnet convs, a sampler conv, time-embedding Linears, conv_in/conv_out.
UNET_CHANGED = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
    "down_blocks.2.attentions.0.proj_in",
    "mid_block.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.2.resnets.1.conv2",
    "up_blocks.1.upsamplers.0.conv",
    "mid_block.resnets.0.time_emb_proj",
    "time_embedding.linear_1",
    "conv_in",
    "conv_out",
]
TE_CHANGED = ["encoder.layers.0.self_attn.q_proj", "encoder.layers.1.self_attn.out_proj", "encoder.layers.2.mlp.fc1"]


def _fine_tune(model: nn.Module, names: list[str], seed: int) -> None:
    """Move the weights of `names` the way a fine-tune does: a dominant rank-2 change plus small full-rank noise."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name in names:
            weight = modules[name].weight
            out_dim, in_dim = weight.shape[0], weight[0].numel()
            low = torch.randn(out_dim, 2, generator=gen) @ torch.randn(2, in_dim, generator=gen) / in_dim ** 0.5
            noise = torch.randn(out_dim, in_dim, generator=gen) * 0.02 / in_dim ** 0.5
            weight.add_(((low + noise) * 0.5).reshape(weight.shape))


@pytest.fixture(scope="module")
def models():
    """(base pipeline, fine-tuned UNet, fine-tuned text encoder)."""
    from finetune.models import load_pipeline

    base = load_pipeline("tiny")
    unet, text = copy.deepcopy(base.unet), copy.deepcopy(base.text_encoder)
    _fine_tune(unet, UNET_CHANGED, 0)
    _fine_tune(text, TE_CHANGED, 1)
    return base, unet, text


def _outputs(unet, text_encoder, tokenizer):
    """Text-encoder hidden states and the UNet's prediction on them, for a fixed prompt, latent and timestep."""
    ids = tokenizer(["a photo of sks"], padding="max_length", return_tensors="pt").input_ids
    sample = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        return hidden, unet(sample, torch.tensor([400]), hidden).sample


def _loaded_outputs(path, tokenizer):
    """Outputs of a fresh base pipeline after diffusers' load_lora_weights(path)."""
    from finetune.models import load_pipeline

    pipe = load_pipeline("tiny")
    pipe.load_lora_weights(str(path))
    return _outputs(pipe.unet, pipe.text_encoder, tokenizer)


@pytest.mark.parametrize("shape", [(24, 40), (40, 24), (8, 6, 3, 3), (16, 8, 1, 1)])
def test_factors_reproduce_the_delta(shape):
    """At full rank up/down multiply back to the delta; for convs, conv(conv(x, down), up) == conv(x, delta),
    which is how kohya loaders apply conv LoRAs. The rank is capped at min(out, in*kh*kw)."""
    from finetune.formats.lora_extract import low_rank_factors

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(shape, generator=gen)
    up, down, error = low_rank_factors(delta, rank=1000)
    cap = min(shape[0], torch.Size(shape[1:]).numel())
    assert down.shape[0] == cap and error < 1e-5
    if delta.ndim == 2:
        torch.testing.assert_close(up @ down, delta, atol=1e-4, rtol=0)
    else:
        assert down.shape == (cap, *shape[1:]) and up.shape == (shape[0], cap, 1, 1)
        x = torch.randn(2, shape[1], 7, 7, generator=gen)
        pad = shape[2] // 2
        want = nn.functional.conv2d(x, delta, padding=pad)
        torch.testing.assert_close(nn.functional.conv2d(nn.functional.conv2d(x, down, padding=pad), up), want,
                                   atol=1e-4, rtol=0)
    errors = [low_rank_factors(delta, r)[2] for r in (1, 2, cap // 2)]
    assert errors == sorted(errors, reverse=True) and errors[0] > errors[-1] > 1e-3  # more rank, less error


def test_full_rank_extract_reproduces_fine_tune(models, tmp_path):
    """The simulated fine-tune, extracted at full rank and loaded into a fresh base with diffusers'
    load_lora_weights, gives the fine-tuned UNet and text-encoder outputs; the base clearly does not."""
    from finetune.formats.lora_extract import extract_lora_with_stats, save_extracted_lora

    base, unet, text = models
    tensors, stats = extract_lora_with_stats(base.unet, unet, 10_000, base.text_encoder, text)
    stems = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert stems == {"lora_unet_" + n.replace(".", "_") for n in UNET_CHANGED} | \
        {"lora_te_text_model_" + n.replace(".", "_") for n in TE_CHANGED}
    assert all(f"{s}.{part}" in tensors for s in stems for part in ("lora_down.weight", "lora_up.weight", "alpha"))
    n_targets = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for part in (base.unet, base.text_encoder)
                    for m in part.modules())
    assert stats.extracted == len(stems) and stats.identical == n_targets - len(stems)
    assert stats.lost == {} and stats.max_relative_error < 1e-5
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d(32, 32, 3): full rank 32
    assert tensors[f"{conv}.lora_down.weight"].shape == (32, 32, 3, 3)
    assert tensors[f"{conv}.lora_up.weight"].shape == (32, 32, 1, 1)

    path = save_extracted_lora(tmp_path / "extracted.safetensors", tensors, {"modelspec.title": "sks"},
                               resolution=64, stats=stats)
    base_hidden, base_out = _outputs(base.unet, base.text_encoder, base.tokenizer)
    want_hidden, want_out = _outputs(unet, text, base.tokenizer)
    assert (base_out - want_out).abs().max() > 1e-2 and (base_hidden - want_hidden).abs().max() > 1e-2
    got_hidden, got_out = _loaded_outputs(path, base.tokenizer)
    torch.testing.assert_close(got_hidden, want_hidden, atol=1e-4, rtol=0)
    torch.testing.assert_close(got_out, want_out, atol=1e-4, rtol=0)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["modelspec.title"] == "sks" and meta["sdft_extract_modules"] == str(len(stems))
    assert meta["ss_network_alpha"] == str(float(tensors[f"{conv}.alpha"]))


def test_low_rank_extract_is_closer_than_no_lora(models, tmp_path):
    """A rank-2 extract (the fine-tune's dominant rank; the rest is small noise) of the UNet alone recovers
    most of the change: far closer to the fine-tuned output than the base."""
    from finetune.formats.lora_extract import extract_lora, save_extracted_lora

    base, unet, _ = models
    _, want = _outputs(unet, base.text_encoder, base.tokenizer)
    _, base_out = _outputs(base.unet, base.text_encoder, base.tokenizer)
    tensors = extract_lora(base.unet, unet, 2)
    assert {t.shape[0] for k, t in tensors.items() if k.endswith("lora_down.weight")} == {2}
    path = save_extracted_lora(tmp_path / "r2.safetensors", tensors)
    error = (_loaded_outputs(path, base.tokenizer)[1] - want).norm()
    no_lora = (base_out - want).norm()
    assert error < 0.1 * no_lora, (error, no_lora)
    assert error > 1e-4 * no_lora  # not exact: the full-rank noise was dropped


def test_stats_report_what_lora_cannot_carry(models):
    """Biases and norm weights are not expressible as LoRA: they are counted with their largest change;
    conv_rank=0 leaves 3x3 convs out and reports them as lost too; unchanged layers are skipped."""
    from finetune.formats.lora_extract import extract_lora_with_stats

    base, unet, _ = models
    tuned = copy.deepcopy(unet)
    with torch.no_grad():
        tuned.conv_in.bias.add_(0.25)
        tuned.mid_block.resnets[0].norm1.weight[3] += 2.0
    tensors, stats = extract_lora_with_stats(base.unet, tuned, 4, conv_rank=0)
    convs_3x3 = [n for n in UNET_CHANGED if dict(base.unet.named_modules())[n].weight.shape[-1] == 3]
    assert stats.skipped_convs == len(convs_3x3)
    assert stats.extracted == len(UNET_CHANGED) - len(convs_3x3)
    assert not any(k.startswith(tuple(f"lora_unet_{n.replace('.', '_')}." for n in convs_3x3)) for k in tensors)
    assert stats.lost["unet.conv_in.bias"] == pytest.approx(0.25)
    assert stats.lost["unet.mid_block.resnets.0.norm1.weight"] == pytest.approx(2.0)
    assert stats.max_lost == ("unet.mid_block.resnets.0.norm1.weight", pytest.approx(2.0))
    assert all(f"unet.{n}.weight" in stats.lost for n in convs_3x3)
    assert "cannot be expressed as LoRA" in stats.summary()
    n_targets = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in base.unet.modules())
    assert stats.identical == n_targets - len(UNET_CHANGED)


def test_extract_from_pipelines_writes_metadata(models, tmp_path):
    """The pipeline-level helper extracts UNet and text encoder and fills kohya metadata from the configs."""
    from diffusers import StableDiffusionPipeline

    from finetune.formats.lora_extract import extract_from_pipelines

    base, unet, text = models
    tuned = StableDiffusionPipeline(**{**base.components, "unet": unet, "text_encoder": text})
    path, stats = extract_from_pipelines(base, tuned, tmp_path / "dreambooth.safetensors", rank=4, conv_rank=2)
    with safe_open(str(path), "pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert stats.extracted == len(UNET_CHANGED) + len(TE_CHANGED)
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "4.0"
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert '"conv_dim": "2"' in meta["ss_network_args"]
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight" in keys
    assert "lora_te_text_model_encoder_layers_2_mlp_fc1.alpha" in keys
