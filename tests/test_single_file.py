"""Single-file (original ldm layout) checkpoints: key layout for the tiny and SD1.5 shapes, and an exact
round trip through diffusers' from_single_file."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import render


def _perturb(model, seed: int) -> None:
    """Stand-in for a fine-tune: move every parameter, so nothing can come back from the base folder unnoticed."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * 0.01)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(fine-tuned tiny pipeline, its single file, the tiny base folder used as config)."""
    from finetune.formats.single_file import save_single_file
    from finetune.models import load_pipeline, tiny_base_folder

    pipe = load_pipeline("tiny")
    for i, part in enumerate((pipe.unet, pipe.vae, pipe.text_encoder)):
        _perturb(part, i)
    path = save_single_file(pipe, tmp_path_factory.mktemp("single") / "tuned.safetensors",
                            metadata={"modelspec.title": "star"})
    return pipe, path, tiny_base_folder()


@pytest.fixture(scope="module")
def loaded(tuned):
    """The fine-tuned file read back with diffusers' from_single_file, the base folder giving the configs."""
    from finetune.formats.single_file import load_single_file

    _, path, folder = tuned
    return load_single_file(path, folder)


def test_tiny_layout(tuned):
    """The indices the ldm layout implies for 3 blocks x 1 layer (DownBlock2D + 2 CrossAttn, up mirrored)."""
    pipe, path, _ = tuned
    state = load_file(str(path))
    prefixes = ("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.text_model.")
    assert all(k.startswith(prefixes) for k in state)
    counts = [sum(k.startswith(p) for k in state) for p in prefixes]
    assert counts == [len(pipe.unet.state_dict()), len(pipe.vae.state_dict()), len(pipe.text_encoder.state_dict())]
    unet = {k.removeprefix("model.diffusion_model.") for k in state if k.startswith("model.diffusion_model.")}
    # input_blocks: 0 conv_in, 1 resnet (block 0, no attention), 2 its downsampler, 3 resnet+attention,
    # 4 downsampler, 5 resnet+attention (last block: no downsampler).
    for key in ("input_blocks.0.0.weight", "input_blocks.1.0.in_layers.2.weight", "input_blocks.2.0.op.weight",
                "input_blocks.3.1.proj_in.weight", "input_blocks.4.0.op.weight",
                "input_blocks.5.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.1.proj_out.weight",
                "middle_block.2.emb_layers.1.weight", "time_embed.2.weight", "out.2.weight",
                # output_blocks: 2 per up block; upsampler after the attention (.2) in CrossAttn blocks.
                "output_blocks.1.2.conv.weight", "output_blocks.3.2.conv.weight",
                "output_blocks.5.0.skip_connection.weight"):
        assert key in unet, key
    absent = ("input_blocks.6.", "output_blocks.6.", "input_blocks.1.1.", "output_blocks.5.1.")
    assert not any(k.startswith(absent) for k in unet)
    assert tuple(state["first_stage_model.encoder.mid.attn_1.q.weight"].shape) == (64, 64, 1, 1)
    assert tuple(state["first_stage_model.decoder.mid.attn_1.proj_out.weight"].shape) == (64, 64, 1, 1)
    # decoder blocks are numbered in reverse: diffusers up_blocks.0 (first to run) is ldm up.2.
    assert torch.equal(state["first_stage_model.decoder.up.2.upsample.conv.weight"],
                       pipe.vae.decoder.up_blocks[0].upsamplers[0].conv.weight)
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in state
    assert "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight" in state
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.title"] == "star" and meta["modelspec.architecture"] == "stable-diffusion-v1"


def test_round_trip_exact(tuned, loaded):
    """from_single_file with the base folder as config gives back the fine-tuned weights bit for bit,
    the same UNet/VAE/text-encoder outputs and the same image."""
    pipe = tuned[0]
    for name in ("unet", "vae", "text_encoder"):
        want, got = getattr(pipe, name).state_dict(), getattr(loaded, name).state_dict()
        assert want.keys() == got.keys(), name
        assert all(torch.equal(want[k], got[k]) for k in want), name

    ids = pipe.tokenizer(["a photo of sks"], padding="max_length", return_tensors="pt").input_ids
    gen = torch.Generator().manual_seed(3)
    latents, image = torch.randn(1, 4, 16, 16, generator=gen), torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
    with torch.no_grad():
        outs = [(p.text_encoder(ids)[0], p.vae.decode(latents).sample, p.vae.encode(image).latent_dist.mean)
                for p in (pipe, loaded)]
        outs = [o + (p.unet(latents, torch.tensor([500]), o[0]).sample,) for o, p in zip(outs, (pipe, loaded))]
    for want, got in zip(*outs):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    torch.testing.assert_close(render(loaded, "a photo of sks", steps=2), render(pipe, "a photo of sks", steps=2),
                               atol=1e-5, rtol=0)


def test_round_trip_is_not_the_base(tuned, loaded):
    """Guard against a loader that silently takes weights from the config folder (which holds the base)."""
    _, _, folder = tuned
    base = load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))
    got = loaded.unet.state_dict()
    assert all(not torch.equal(got[k], base[k]) for k in base)


def test_half(tuned, tmp_path):
    """half=True stores float16; loading into float32 gives exactly the float16-rounded weights."""
    from finetune.formats.single_file import load_single_file, save_single_file

    pipe, _, folder = tuned
    path = save_single_file(pipe, tmp_path / "half.safetensors", half=True)
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}
    loaded = load_single_file(path, folder, torch_dtype=torch.float32)
    want, got = pipe.unet.state_dict(), loaded.unet.state_dict()
    assert all(got[k].dtype == torch.float32 and torch.equal(got[k], want[k].half().float()) for k in want)


def test_sd15_layout_matches_diffusers_converter():
    """SD1.5 shapes (built on the meta device: no memory, no weights): the file has SD1.5's key counts and
    landmark keys, diffusers detects it as v1, and diffusers' own ldm->diffusers converter maps it back to
    exactly the model's keys and shapes."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     infer_diffusers_model_type)
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.formats.single_file import (TEXT_PREFIX, UNET_PREFIX, VAE_PREFIX, text_encoder_to_ldm,
                                              unet_to_ldm, vae_to_ldm)
    from lab.random_bases import sd15_configs

    cfg = sd15_configs()
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**cfg["unet"]), AutoencoderKL(**cfg["vae"])
        text = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    parts = {UNET_PREFIX: unet_to_ldm(unet.state_dict(), unet.config),
             VAE_PREFIX: vae_to_ldm(vae.state_dict(), vae.config),
             TEXT_PREFIX: text_encoder_to_ldm(text.state_dict())}
    assert [len(p) for p in parts.values()] == [686, 248, 196]  # v1-5-pruned: 686 UNet, 248 VAE, 196 CLIP weights
    state = {prefix + k: t for prefix, part in parts.items() for k, t in part.items()}
    landmarks = {  # key -> shape in the original v1-5 checkpoint
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": (640, 640, 1, 1),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
        "model.diffusion_model.output_blocks.11.0.skip_connection.weight": (320, 640, 1, 1),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.encoder.down.1.downsample.conv.weight": (256, 256, 3, 3),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
    }
    assert {k: tuple(state[k].shape) for k in landmarks if k in state} == landmarks
    assert infer_diffusers_model_type(state) == "v1"
    for model, convert in ((unet, convert_ldm_unet_checkpoint), (vae, convert_ldm_vae_checkpoint)):
        back = convert(dict(state), dict(model.config))
        want = model.state_dict()
        assert back.keys() == want.keys()
        assert all(back[k].shape == want[k].shape for k in want)


def test_refuses_what_it_cannot_write(tuned, tmp_path):
    from finetune.formats.single_file import save_single_file, unet_to_ldm

    pipe, _, _ = tuned
    with pytest.raises(ValueError, match="safetensors"):
        save_single_file(pipe, tmp_path / "model.ckpt")
    state = dict(pipe.unet.state_dict())
    state["class_embedding.weight"] = torch.zeros(1)  # a class-conditioned UNet's layer: no ldm name here
    with pytest.raises(ValueError, match="class_embedding"):
        unet_to_ldm(state, pipe.unet.config)
