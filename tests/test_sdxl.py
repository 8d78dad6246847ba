"""SDXL as a base family: kohya's key names at SDXL's real shapes, diffusers' single-file loader, size
conditioning from crops and flips, learning on the tiny SDXL, and the CLI end to end."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ddim_pipeline, make_config, render

# SDXL base's transformer depth per original (ldm) block that holds attention; every other block has none.
SDXL_TRANSFORMER_DEPTHS = {"input_blocks_4_1": 2, "input_blocks_5_1": 2, "input_blocks_7_1": 10,
                           "input_blocks_8_1": 10, "middle_block_1": 10, "output_blocks_0_1": 10,
                           "output_blocks_1_1": 10, "output_blocks_2_1": 10, "output_blocks_3_1": 2,
                           "output_blocks_4_1": 2, "output_blocks_5_1": 2}
# Inside each transformer block, the Linear layers kohya's LoRA targets.
BLOCK_LINEARS = [f"{attn}_{leaf}" for attn in ("attn1", "attn2") for leaf in ("to_q", "to_k", "to_v", "to_out_0")] \
    + ["ff_net_0_proj", "ff_net_2"]
CLIP_LINEARS = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1",
                "mlp_fc2"]


def kohya_sdxl_module_names() -> set[str]:
    """The LoRA modules kohya's sd-scripts creates for SDXL (networks/lora.py, default target set), written out
    from the architecture: proj_in/proj_out and 10 Linears per transformer block in every attention block, and
    6 Linears per layer of CLIP-L (12 layers) and OpenCLIP-G (32 layers)."""
    names = set()
    for block, depth in SDXL_TRANSFORMER_DEPTHS.items():
        names |= {f"lora_unet_{block}_proj_in", f"lora_unet_{block}_proj_out"}
        names |= {f"lora_unet_{block}_transformer_blocks_{k}_{leaf}" for k in range(depth) for leaf in BLOCK_LINEARS}
    for prefix, layers in (("lora_te1", 12), ("lora_te2", 32)):
        names |= {f"{prefix}_text_model_encoder_layers_{i}_{leaf}" for i in range(layers) for leaf in CLIP_LINEARS}
    return names


@pytest.fixture(scope="module")
def sdxl_meta_parts():
    """SDXL's real UNet and both text encoders on the meta device (names and shapes, no memory)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from lab.random_bases import sdxl_configs

    cfg = sdxl_configs()
    with torch.device("meta"):
        return (UNet2DConditionModel(**cfg["unet"]), CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])),
                CLIPTextModelWithProjection(CLIPTextConfig(**cfg["text_encoder_2"])))


def _kohya_file_tensors(sdxl_meta_parts, rank: int = 1) -> dict[str, torch.Tensor]:
    """What the kohya exporter writes for LoRA on the kohya target set of SDXL's real shapes (tiny random factors)."""
    from finetune.families import family_named
    from finetune.formats.kohya_lora import peft_to_kohya
    from finetune.strategies.lora import text_encoder_targets, unet_target_modules

    unet, te1, te2 = sdxl_meta_parts
    family = family_named("sdxl")

    def peft_state(model, names):
        state = {}
        for name in names:
            module = model.get_submodule(name)
            fan_in, fan_out = module.weight.shape[1], module.weight.shape[0]
            state[f"{name}.lora_A.weight"] = torch.zeros(rank, fan_in)
            state[f"{name}.lora_B.weight"] = torch.zeros(fan_out, rank)
        return state

    suffixes = text_encoder_targets("kohya")
    tensors = peft_to_kohya(peft_state(unet, unet_target_modules(unet, "kohya")), "unet", 1.0, family, unet.config)
    for part, model in (("text_encoder", te1), ("text_encoder_2", te2)):
        names = [n for n, _ in model.named_modules() if any(n.endswith("." + s) for s in suffixes)]
        tensors.update(peft_to_kohya(peft_state(model, names), part, 1.0, family))
    return tensors


def test_kohya_sdxl_lora_names_match_sd_scripts(sdxl_meta_parts):
    """The kohya-target LoRA on SDXL's real shapes has exactly kohya's module set (986 modules: 722 UNet,
    72 CLIP-L, 192 OpenCLIP-G), each with lora_down, lora_up and alpha."""
    tensors = _kohya_file_tensors(sdxl_meta_parts)
    modules = {key.split(".")[0] for key in tensors}
    expected = kohya_sdxl_module_names()
    assert len(expected) == 986
    assert modules == expected, (sorted(modules - expected)[:5], sorted(expected - modules)[:5])
    assert len(tensors) == 3 * len(expected)


def test_diffusers_reads_every_kohya_sdxl_name(sdxl_meta_parts):
    """diffusers' SDXL LoRA loader (lora_state_dict, then the peft conversion load_lora_weights applies) puts
    every key of the file on an existing module of SDXL's UNet and encoders: nothing unmatched, nothing dropped."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import (convert_state_dict_to_diffusers, convert_state_dict_to_peft,
                                 convert_unet_state_dict_to_peft)

    unet, te1, te2 = sdxl_meta_parts
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(_kohya_file_tensors(sdxl_meta_parts),
                                                             unet_config=unet.config)
    unmatched, arrived = [], 0
    for part, model in (("unet", unet), ("text_encoder", te1), ("text_encoder_2", te2)):
        sub = {k[len(part) + 1:]: v for k, v in converted.items() if k.startswith(part + ".")}
        peft = convert_unet_state_dict_to_peft(sub) if part == "unet" else \
            convert_state_dict_to_peft(convert_state_dict_to_diffusers(sub))
        names = {n for n, _ in model.named_modules()}
        names |= {f"text_model.{n}" for n in names}  # diffusers' files keep CLIP's text_model. level
        for key in peft:
            if key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight") not in names:
                unmatched.append(f"{part}.{key}")
        arrived += sum(k.endswith(".lora_A.weight") for k in peft)
    assert not unmatched, unmatched[:5]
    assert arrived == 986


def test_size_conditioning_follows_crops_and_flips(tmp_path):
    """SDXL's time ids: the image's own size, the crop's corner in the resized image (mirrored under a flip),
    and the target size."""
    from PIL import Image

    from finetune.batching import InstanceBatches
    from finetune.data import load_examples

    Image.new("RGB", (200, 100), "white").save(tmp_path / "wide.png")
    examples = load_examples(str(tmp_path), "x", "sks", "")

    class FakeVAE:
        def encode(self, pixels):
            latent = torch.zeros(1, 4, pixels.shape[2] // 8, pixels.shape[3] // 8)
            return type("Out", (), {"latent_dist": type("Dist", (), {"mean": latent, "std": latent})()})()

    def sizes(center_crop: bool, flip: bool):
        batches = InstanceBatches(examples, FakeVAE(), 1.0, 64, center_crop=center_crop, random_flip=flip,
                                  cache_latents=False, device="cpu", dtype=torch.float32)
        found = set()
        for step in range(12):
            specs = batches.specs(0, step, 1, 0, 1)
            batches.latents_and_masks(specs)
            found.add((specs[0].flip, specs[0].size))
        return found

    # 200x100 resized to cover 64x64 is 128x64: the centre crop starts 32 px in.
    (flip, size), = sizes(True, False)
    assert size.original_size == (100, 200) and size.crop_top_left == (0, 32) and size.target_size == (64, 64)
    random = sizes(False, False)
    assert len({s.crop_top_left for _, s in random}) > 1 and all(0 <= s.crop_top_left[1] <= 64 for _, s in random)
    flipped = sizes(True, True)
    assert {f for f, _ in flipped} == {False, True}
    assert all(s.crop_top_left == (0, 32) for _, s in flipped)  # a centred crop mirrors onto itself


def test_tiny_sdxl_learns_one_image(tmp_path, tiny_sdxl_folder, star_images):
    """A few dozen DreamBooth steps on one image bring that image's loss (fixed noise and timesteps) well down."""
    import shutil

    from finetune.models import load_components
    from finetune.trainer import run_training
    from finetune.validation import ValidationSet
    from finetune.data import load_examples

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(sorted(star_images.glob("*.png"))[0], one)
    components = load_components(str(tiny_sdxl_folder))
    examples = load_examples(str(one), "a photo of sks star", "sks", "star")
    fixed = ValidationSet(examples, components.vae, components.vae_scale, 64, 1000, 4, "cpu", torch.float32)

    def loss():
        def predict(noisy, t, captions, sizes):
            embeds = components.family.encode_prompts(components.tokenizers, components.text_encoders, captions, "cpu")
            return components.family.predict(components.unet, noisy, t, embeds, sizes, torch.float32)

        return fixed.loss(predict, components.noise_scheduler, "epsilon")

    before = loss()
    config = make_config("dreambooth", tmp_path / "run", images=one,
                         **{"train.steps": 40, "train.lr": 1e-3, "prior.enabled": False, "output.sample_seeds": []})
    run_training(config, components)
    components.unet.eval()
    after = loss()
    assert after < 0.5 * before, (before, after)


def test_sdxl_single_file_opens_in_diffusers(tmp_path, tiny_sdxl_folder):
    """DreamBooth with both encoders trained: diffusers' StableDiffusionXLPipeline.from_single_file reads the file
    (CLIP-L under conditioner.embedders.0, OpenCLIP-G under .1) and draws what the trained model draws."""
    from finetune.formats.single_file import load_single_file
    from finetune.inference import pipeline_from_components
    from finetune.trainer import run_training

    config = make_config("dreambooth", tmp_path / "run", **{
        "model.name": str(tiny_sdxl_folder), "dreambooth.train_text_encoder": True, "train.lr": 1e-3,
        "prior.enabled": False, "output.formats": ["single_file"]})
    outcome = run_training(config)
    path = outcome.summary["exports"]["single_file"][0]
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-base"
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight" in keys
    loaded = load_single_file(path, tiny_sdxl_folder, torch_dtype=torch.float32)
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    assert isinstance(loaded, StableDiffusionXLPipeline)
    loaded.scheduler = DDIMScheduler.from_config(loaded.scheduler.config)
    trained = render(pipeline_from_components(outcome.components), "a photo of sks star")
    base = render(ddim_pipeline(str(tiny_sdxl_folder)), "a photo of sks star")
    assert np.abs(trained - base).max() > 1e-3
    assert np.abs(render(loaded, "a photo of sks star") - trained).max() < 1e-4


def test_sd2_single_file_writes_open_clip(tmp_path):
    """An SD2-style base (OpenCLIP text encoder: gelu MLPs) exports its single file in OpenCLIP's layout, which
    diffusers reads back into the same weights."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from finetune.formats.single_file import load_single_file, save_single_file
    from finetune.models import load_pipeline

    pipe = load_pipeline("tiny")
    config = pipe.text_encoder.config.to_dict()
    config["hidden_act"] = "gelu"
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    pipe.register_modules(text_encoder=pipe.text_encoder)
    folder = tmp_path / "sd2ish"
    pipe.save_pretrained(folder)
    path = save_single_file(pipe, tmp_path / "sd2.safetensors")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)
    loaded = load_single_file(path, folder, torch_dtype=torch.float32)
    for name, tensor in pipe.text_encoder.state_dict().items():
        if not name.endswith("position_ids"):
            assert torch.equal(loaded.text_encoder.state_dict()[name], tensor), name


@pytest.mark.parametrize("method", ["lora", "textual-inversion", "hypernetwork", "dreambooth"])
def test_cli_trains_and_generates_on_sdxl(method, tmp_path, tiny_sdxl_folder, star_images):
    """`sdft <method>` on the tiny SDXL, then `sdft generate` with what it exported."""
    out = tmp_path / "run"
    token = "<sks>" if method == "textual-inversion" else "sks"
    extra = ["--class-word", "star", "--num-class-images", "2", "--generation-steps", "2"] \
        if method == "dreambooth" else ["--init-word", "star"] if method == "textual-inversion" else []
    train = subprocess.run([sys.executable, "-m", "finetune", method, "--model", str(tiny_sdxl_folder), "--images",
                            str(star_images), "--token", token, "--output", str(out), "--steps", "4",
                            "--sample-steps", "2", *extra], capture_output=True, text=True, timeout=300)
    assert train.returncode == 0, train.stderr[-2000:]
    import json

    exports = json.loads((out / "summary.json").read_text())["exports"]
    adapter = next(iter(exports.values()))[0]
    image = tmp_path / "out.png"
    generate = subprocess.run([sys.executable, "-m", "finetune", "generate", "--model", str(tiny_sdxl_folder),
                               "--adapter", adapter, "--prompt", f"a photo of {token}", "--steps", "2",
                               "--output", str(image)], capture_output=True, text=True, timeout=300)
    assert generate.returncode == 0, generate.stderr[-2000:]
    from PIL import Image

    assert Image.open(image).size == (64, 64)


def test_pivotal_lora_on_sdxl(tmp_path, tiny_sdxl_folder):
    """Pivotal tuning on SDXL: the new word is learned in both encoders, ships as the {clip_l, clip_g} file, and
    the word + LoRA loaded into a fresh pipeline draw what the trained model draws."""
    from safetensors import safe_open

    from finetune.inference import load_adapter, pipeline_from_components
    from finetune.trainer import run_training

    config = make_config("lora", tmp_path / "run", **{
        "model.name": str(tiny_sdxl_folder), "data.token": "<sks>", "pivotal.steps": 2, "pivotal.init_word": "star",
        "train.lr": 1e-2, "output.formats": ["diffusers"]})
    outcome = run_training(config)
    embedding = outcome.summary["exports"]["embedding"][0]
    with safe_open(embedding, framework="pt") as handle:
        assert {k: handle.get_slice(k).get_shape() for k in handle.keys()} == {"clip_l": [2, 32], "clip_g": [2, 48]}
    prompt = "a photo of <sks> star"
    trained = render(pipeline_from_components(outcome.components), prompt)
    pipe = ddim_pipeline(str(tiny_sdxl_folder))
    load_adapter(pipe, embedding)
    load_adapter(pipe, outcome.summary["exports"]["diffusers"][0])
    assert np.abs(render(pipe, prompt) - trained).max() < 1e-4


def test_extract_lora_from_an_sdxl_fine_tune(tiny_sdxl_folder, tmp_path):
    """`extract-lora` on SDXL: changes to UNet Linears and convs and to both encoders, extracted at full rank
    into kohya's SDXL names, load with diffusers' load_lora_weights and give the fine-tune's prediction."""
    from finetune.formats.lora_extract import extract_from_pipelines
    from finetune.models import load_pipeline

    base, tuned = load_pipeline(str(tiny_sdxl_folder)), load_pipeline(str(tiny_sdxl_folder))
    gen = torch.Generator().manual_seed(0)
    changed = {"unet": ["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "up_blocks.0.resnets.1.conv1",
                        "mid_block.attentions.0.proj_out"],
               "text_encoder": ["text_model.encoder.layers.1.mlp.fc1"],
               # (all four projections: diffusers infers the file's flavour from a changed out_proj among them)
               "text_encoder_2": [f"text_model.encoder.layers.0.self_attn.{p}_proj" for p in ("q", "k", "v", "out")]}
    with torch.no_grad():
        for part, names in changed.items():
            for name in names:
                name = name if part == "unet" or hasattr(getattr(tuned, part), "text_model") else \
                    name.removeprefix("text_model.")
                weight = getattr(tuned, part).get_submodule(name).weight
                weight += 0.05 * torch.randn(weight.shape, generator=gen)
    path, stats = extract_from_pipelines(base, tuned, tmp_path / "extracted.safetensors", rank=10_000)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        stems = {k.split(".")[0] for k in handle.keys()}
        assert handle.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    # (the tiny SDXL has one layer per block: its second down block starts at input_blocks.3)
    assert stems == {"lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k",
                     "lora_unet_output_blocks_1_0_in_layers_2",
                     "lora_unet_middle_block_1_proj_out", "lora_te1_text_model_encoder_layers_1_mlp_fc1"} | \
        {f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")}
    assert stats.lost == {}
    fresh = ddim_pipeline(str(tiny_sdxl_folder))
    fresh.load_lora_weights(str(path))
    tuned_ref = ddim_pipeline(str(tiny_sdxl_folder))
    for part in ("unet", "text_encoder", "text_encoder_2"):
        getattr(tuned_ref, part).load_state_dict(getattr(tuned, part).state_dict())
    want, got = render(tuned_ref, "a photo of sks"), render(fresh, "a photo of sks")
    assert np.abs(render(ddim_pipeline(str(tiny_sdxl_folder)), "a photo of sks") - want).max() > 1e-3
    assert np.abs(got - want).max() < 1e-3


def test_convert_and_merge_sdxl_loras(tmp_path, tiny_sdxl_folder):
    """`sdft convert` turns the diffusers SDXL LoRA into exactly the kohya file training wrote (and refuses to
    guess SD names for it), converts that back to a diffusers file that draws the same, and `sdft merge` fuses
    it into an SDXL single file equal to load_lora_weights + fuse_lora."""
    from safetensors.torch import load_file

    from finetune.cli import main
    from finetune.formats.single_file import load_single_file
    from finetune.trainer import run_training

    config = make_config("lora", tmp_path / "run", **{"model.name": str(tiny_sdxl_folder), "train.lr": 1e-2,
                                                      "lora.train_text_encoder": True, "lora.alpha": 2})
    exports = run_training(config).summary["exports"]
    diffusers_file, kohya_file = exports["diffusers"][0], exports["kohya"][0]
    assert main(["convert", diffusers_file, "--output", str(tmp_path / "refused.safetensors")]) != 0
    assert main(["convert", diffusers_file, "--base", str(tiny_sdxl_folder),
                 "--output", str(tmp_path / "k.safetensors")]) == 0
    ours, written = load_file(str(tmp_path / "k.safetensors")), load_file(kohya_file)
    assert ours.keys() == written.keys() and all(torch.equal(ours[k], written[k]) for k in ours)
    assert main(["convert", kohya_file, "--base", str(tiny_sdxl_folder), "--output", str(tmp_path / "back")]) == 0
    prompt = "a photo of sks star"
    want = ddim_pipeline(str(tiny_sdxl_folder))
    want.load_lora_weights(diffusers_file)
    back = ddim_pipeline(str(tiny_sdxl_folder))
    back.load_lora_weights(str(tmp_path / "back" / "pytorch_lora_weights.safetensors"))
    reference = render(want, prompt)
    assert np.abs(render(back, prompt) - reference).max() < 1e-4
    assert main(["merge", "--base", str(tiny_sdxl_folder), "--lora", kohya_file,
                 "--output", str(tmp_path / "merged.safetensors")]) == 0
    merged = load_single_file(tmp_path / "merged.safetensors", tiny_sdxl_folder, torch_dtype=torch.float32)
    from diffusers import DDIMScheduler

    merged.scheduler = DDIMScheduler.from_config(merged.scheduler.config)
    assert np.abs(render(merged, prompt) - reference).max() < 1e-3
