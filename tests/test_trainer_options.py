"""Shared trainer options: prediction targets, min-SNR weights, mixed precision, periodic samples."""

from __future__ import annotations

import torch
from PIL import Image

from conftest import make_config


def test_targets_and_min_snr_weights(tiny_components):
    from finetune.losses import min_snr_weights, prediction_target, snr

    scheduler = tiny_components.noise_scheduler
    latents, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 900])
    assert torch.equal(prediction_target(scheduler, latents, noise, t, "epsilon"), noise)
    alpha_bar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    velocity = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    torch.testing.assert_close(prediction_target(scheduler, latents, noise, t, "v_prediction"), velocity)
    ratio = snr(scheduler, t)
    assert ratio[0] > 5 > ratio[1]  # t=10 is nearly clean, t=900 nearly pure noise
    eps_w = min_snr_weights(scheduler, t, 5.0, "epsilon")
    torch.testing.assert_close(eps_w, torch.stack([5.0 / ratio[0], torch.tensor(1.0)]))
    v_w = min_snr_weights(scheduler, t, 5.0, "v_prediction")
    torch.testing.assert_close(v_w, torch.stack([5.0 / (ratio[0] + 1), ratio[1] / (ratio[1] + 1)]))


def test_bf16_v_prediction_min_snr_run(tmp_path, tiny_components):
    """bf16 autocast on CPU, v-prediction override, min-SNR, Huber loss and caption augmentation together: frozen weights in bf16, trained
    LoRA weights kept in float32, finite loss, and periodic sample grids written."""
    from finetune.trainer import run_training

    config = make_config("lora", tmp_path, **{
        "train.mixed_precision": "bf16", "model.prediction_type": "v_prediction", "train.snr_gamma": 5.0,
        "train.noise_offset": 0.05, "train.loss": "huber", "data.caption_dropout": 0.5,
        "data.shuffle_captions": True, "train.steps": 4, "output.sample_every": 2, "output.formats": ["kohya"],
        "output.sample_prompts": ["a photo of sks", "a photo of sks on a black background"],
        "output.sample_seeds": [0, 1, 2]})
    outcome = run_training(config, tiny_components)
    unet = outcome.components.unet
    dtypes = {name: p.dtype for name, p in unet.named_parameters()}
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if "lora_" not in n)
    assert torch.isfinite(torch.tensor(outcome.summary["final_loss"]))
    grid = Image.open(tmp_path / "samples" / "step-2.png")
    assert grid.size == (3 * 64, 2 * 64)  # one row per prompt, one column per seed
    assert (tmp_path / "samples" / "step-4.png").is_file()


def test_sample_prompts_follow_the_token(tmp_path, tiny_components, monkeypatch):
    """A recipe's sample prompts written with {token}/{class} use the token the run was given (e.g. an override)."""
    import finetune.inference
    from finetune.trainer import run_training

    seen = []
    real_generate = finetune.inference.generate

    def recording_generate(pipe, prompts, *args, **kwargs):
        seen.append(list(prompts))
        return real_generate(pipe, prompts, *args, **kwargs)

    monkeypatch.setattr(finetune.inference, "generate", recording_generate)
    config = make_config("lora", tmp_path, **{
        "train.steps": 1, "output.formats": ["kohya"], "data.token": "zwx", "data.class_word": "shape",
        "output.sample_prompts": ["a photo of {token} on a black background", "a {class}, plain"],
        "output.sample_seeds": [0]})
    run_training(config, tiny_components)
    assert seen == [["a photo of zwx on a black background", "a shape, plain"]]


def test_zero_terminal_snr_and_input_perturbation_change_training(tmp_path, tiny_components):
    """Both options reach the loss: the same seeded run gives a different first-step loss with each."""
    from finetune.models import load_components
    from finetune.trainer import run_training

    def first_loss(name, **options):
        config = make_config("lora", tmp_path / name, **{"train.steps": 1, "output.formats": ["kohya"],
                                                          "model.prediction_type": "v_prediction", **options})
        return run_training(config, load_components("tiny")).summary["final_loss"]

    plain = first_loss("plain")
    assert first_loss("plain_again") == plain
    assert first_loss("ztsnr", **{"model.zero_terminal_snr": True}) != plain
    assert first_loss("perturbed", **{"train.input_perturbation": 0.1}) != plain


def test_vae_posterior_mean_or_sample(tmp_path, tiny_components):
    """`sample` (default) draws a new latent from each image's VAE posterior every step; `mean` always trains on
    the posterior mean (how the toy bases were pretrained)."""
    from finetune.batching import InstanceBatches, SampleSpec, sample_generator
    from finetune.data import load_examples
    from finetune.models import load_components
    from finetune.trainer import run_training
    from conftest import STAR_IMAGES

    examples = load_examples(str(STAR_IMAGES), "a photo of {token}", "sks", "star")
    c = tiny_components

    def two_draws(sample: bool):
        batches = InstanceBatches(examples, c.vae, c.vae_scale, 64, center_crop=True, random_flip=False,
                                  cache_latents=True, device="cpu", dtype=torch.float32, sample_posterior=sample)
        return [batches.latents([SampleSpec(0, False, sample_generator(0, step, 0))]) for step in (0, 1)]

    first, second = two_draws(sample=False)
    assert torch.equal(first, second)  # the mean: the same latent every step
    first_sampled, second_sampled = two_draws(sample=True)
    assert not torch.equal(first_sampled, second_sampled)
    assert (first_sampled - first).abs().mean() > 0.01  # the toy VAE's posterior is wide: sampling matters here

    summaries = {mode: run_training(make_config("lora", tmp_path / mode, **{
        "train.steps": 1, "output.formats": ["kohya"], "data.vae_posterior": mode}), load_components("tiny")).summary
        for mode in ("mean", "sample")}
    assert summaries["mean"]["vae_posterior"] == "mean" and summaries["sample"]["vae_posterior"] == "sample"
    assert summaries["mean"]["final_loss"] != summaries["sample"]["final_loss"]
    from finetune.config import RunConfig

    assert RunConfig.for_method("lora").data.vae_posterior == "sample"


def test_prediction_type_reaches_samples_and_exports(tmp_path):
    """--prediction-type and --zero-terminal-snr change the base's schedule everywhere: the training target,
    the sampler of the sample grids, the exported pipeline's scheduler and the LoRA file's metadata."""
    import json

    from safetensors import safe_open

    from finetune.trainer import run_training

    options = {"model.prediction_type": "v_prediction", "model.zero_terminal_snr": True}
    lora = run_training(make_config("lora", tmp_path / "lora", **options, **{"output.formats": ["kohya"]}))
    schedule = lora.components.noise_scheduler.config
    assert schedule.prediction_type == "v_prediction" and schedule.rescale_betas_zero_snr
    with safe_open(lora.summary["exports"]["kohya"][0], framework="pt") as handle:
        assert handle.metadata()["modelspec.prediction_type"] == "v"
    dreambooth = run_training(make_config("dreambooth", tmp_path / "db", **options, **{
        "output.formats": ["diffusers"], "prior.enabled": False}))
    saved = json.loads((tmp_path / "db" / "pipeline" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction" and saved["rescale_betas_zero_snr"] is True
    assert saved["timestep_spacing"] == "trailing"


def test_speed_levers_leave_the_trained_weights_as_they_were(tmp_path):
    """channels-last memory layout and the fused AdamW kernel change how the step runs, not what it learns: the
    LoRA equals the plain run's up to float rounding (fused AdamW orders its arithmetic differently)."""
    from finetune.trainer import run_training

    def trained(name: str, **options) -> dict:
        # 'all' targets put adapters on 3x3 convs, whose weights channels-last leaves strided: the export must
        # still write them.
        config = make_config("lora", tmp_path / name, **{"train.steps": 3, "train.lr": 1e-3, "lora.targets": "all",
                                                         "output.formats": ["diffusers", "kohya"], **options})
        return {k: v.clone() for k, v in run_training(config).strategy.state_dict().items()}

    plain = trained("plain", **{"train.fused_optimizer": "off"})
    levers = trained("levers", **{"train.fused_optimizer": "on", "train.channels_last": True})
    assert plain.keys() == levers.keys()
    assert any(v.abs().max() > 0 for k, v in plain.items() if "lora_B" in k)
    for key in plain:
        torch.testing.assert_close(levers[key], plain[key], atol=2e-5, rtol=1e-4, msg=key)


def test_missing_xformers_is_a_one_line_error(tmp_path):
    import importlib.util

    import pytest

    from finetune import UserError
    from finetune.trainer import run_training

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers is installed here: nothing to refuse")
    with pytest.raises(UserError, match="pip install xformers"):
        run_training(make_config("lora", tmp_path / "x", **{"train.attention": "xformers"}))


def test_mixed_precision_loads_frozen_models_straight_in_half_precision(tiny_sdxl_folder):
    """No float32 copy of a frozen model is made under bf16: a diffusers folder loads each part in its dtype;
    the VAE and every model whose own weights train load in float32."""
    from finetune.models import load_components
    from finetune.trainer import load_dtypes

    assert load_dtypes(torch.float32, ("unet",)) is None
    adapters = load_components(str(tiny_sdxl_folder), dtypes=load_dtypes(torch.bfloat16, ()))
    assert adapters.unet.dtype == torch.bfloat16 and adapters.vae.dtype == torch.float32
    assert all(next(e.parameters()).dtype == torch.bfloat16 for e in adapters.text_encoders)
    full = load_components(str(tiny_sdxl_folder), dtypes=load_dtypes(torch.bfloat16, ("unet", "text_encoder")))
    assert full.unet.dtype == torch.float32
    assert all(next(e.parameters()).dtype == torch.float32 for e in full.text_encoders)
