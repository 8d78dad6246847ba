"""The one training loop every strategy runs through (accelerate handles devices and precision)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import UserError
from .batching import InstanceBatches
from .checkpoint import ADAPTER_FILE, load_trainer_state, resolve_resume, save_checkpoint
from .config import RunConfig, save_config
from .data import format_prompt, load_examples
from .losses import min_snr_weights, per_sample_loss, prediction_target
from .models import Components, load_components, resolve_base
from .strategies import build_strategy

log = logging.getLogger(__name__)


@dataclass
class TrainOutcome:
    """What a run leaves behind in memory: its summary and the trained strategy and components."""

    summary: dict
    strategy: object
    components: Components


def train(config: RunConfig) -> dict:
    """Run one fine-tune end to end and return the summary written to <output>/summary.json."""
    return run_training(config).summary


def run_training(config: RunConfig, components: Components | None = None) -> TrainOutcome:
    """Like train(), on already loaded components if given (tests and benchmarks reuse one base)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config.validate()
    started = time.time()
    out = Path(config.output.output)
    tcfg = config.train
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.grad_accum,
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    resume_from = resolve_resume(out, config.output.resume)
    resolve_base(config.model.name)  # a bad --model fails here, before any work

    # Check the user's input before the slow model load, so mistakes fail in a second.
    examples = load_examples(config.data.images, config.data.prompt, config.data.token, config.data.class_word)
    if components is None:
        components = load_components(config.model.name, config.model.single_file_config)
    resolution = config.data.resolution or components.resolution
    prediction_type = config.model.prediction_type or components.noise_scheduler.config.prediction_type
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    # Frozen weights may live in half precision; trained ones stay float32 (set after prepare()).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (components.vae, components.text_encoder, components.unet):
        module.to(accelerator.device, dtype=weight_dtype)
    strategy = build_strategy(config)
    torch.manual_seed(tcfg.seed)  # adapter initialisation (e.g. LoRA's A matrices) depends on --seed only
    strategy.prepare(components)
    trainable = strategy.trainable_modules()
    for module in trainable:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        module.train()
    if tcfg.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if strategy.trains_text_encoder():
            components.text_encoder.gradient_checkpointing_enable()

    batches = InstanceBatches(examples, components.vae, components.vae_scale, resolution,
                              center_crop=config.data.center_crop, random_flip=config.data.random_flip,
                              cache_latents=config.data.cache_latents, device=accelerator.device, dtype=weight_dtype)
    text_cache: dict[str, torch.Tensor] = {}

    optimizer = torch.optim.AdamW(strategy.param_groups(), lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2),
                                  eps=tcfg.adam_epsilon, weight_decay=tcfg.weight_decay)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer,
                                 num_warmup_steps=tcfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=tcfg.steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    wrapped, optimizer, lr_scheduler = list(prepared[: len(trainable)]), prepared[-2], prepared[-1]
    unet = wrapped[0] if trainable[0] is components.unet else components.unet
    text_encoder = next((w for w, m in zip(wrapped, trainable) if m is components.text_encoder),
                        components.text_encoder)
    _register_adapter_hooks(accelerator, strategy)

    start_step, history = 0, {"steps": [], "losses": []}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = load_trainer_state(resume_from)
        start_step, history = int(state["step"]), state.get("history", history)
        log.info("resumed from %s at step %d", resume_from, start_step)
    if accelerator.is_main_process:
        accelerator.init_trackers("sdft", config=_flat_hparams(config))

    def encode_text(captions: list[str]) -> torch.Tensor:
        prompts = [strategy.expand_prompt(c) for c in captions]
        if strategy.trains_text_encoder():
            return text_encoder(_tokenize(components.tokenizer, prompts, accelerator.device))[0]
        missing = [p for p in dict.fromkeys(prompts) if p not in text_cache]
        if missing:
            with torch.no_grad():
                hidden = components.text_encoder(_tokenize(components.tokenizer, missing, accelerator.device))[0]
            text_cache.update(zip(missing, hidden))
        return torch.stack([text_cache[p] for p in prompts])

    scheduler = components.noise_scheduler
    num_timesteps = scheduler.config.num_train_timesteps
    progress = tqdm(total=tcfg.steps, initial=start_step, desc=f"sdft {config.method}",
                    disable=not accelerator.is_local_main_process)
    step_times: list[float] = []
    for step in range(start_step, tcfg.steps):
        step_start = time.perf_counter()
        step_loss = 0.0
        for micro in range(tcfg.grad_accum):
            micro_step = step * tcfg.grad_accum + micro
            torch.manual_seed(tcfg.seed * 1_000_003 + micro_step)  # dropout inside adapters
            specs = batches.specs(tcfg.seed, micro_step, tcfg.batch_size, accelerator.process_index,
                                  accelerator.num_processes)
            with accelerator.accumulate(*wrapped):
                latents = batches.latents(specs).to(accelerator.device)
                noise = torch.stack([torch.randn(latents.shape[1:], generator=s.generator) for s in specs])
                if tcfg.noise_offset:
                    offset = torch.stack([torch.randn(latents.shape[1], 1, 1, generator=s.generator) for s in specs])
                    noise = noise + tcfg.noise_offset * offset
                noise = noise.to(accelerator.device)
                timesteps = torch.cat([torch.randint(0, num_timesteps, (1,), generator=s.generator)
                                       for s in specs]).to(accelerator.device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                with accelerator.autocast():
                    hidden = encode_text(batches.captions(specs, strategy.prompt_templates(),
                                                          config.data.token, config.data.class_word))
                    pred = unet(noisy.to(weight_dtype), timesteps, hidden.to(weight_dtype)).sample
                target = prediction_target(scheduler, latents, noise, timesteps, prediction_type)
                losses = per_sample_loss(pred, target)
                if tcfg.snr_gamma:
                    losses = losses * min_snr_weights(scheduler, timesteps, tcfg.snr_gamma, prediction_type)
                loss = losses.mean()
                accelerator.backward(loss)
                if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                    accelerator.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                                tcfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += accelerator.reduce(loss.detach(), "mean").item() / tcfg.grad_accum
        strategy.after_optimizer_step()
        step_times.append(time.perf_counter() - step_start)
        done = step + 1
        history["steps"].append(done)
        history["losses"].append(step_loss)
        lr = lr_scheduler.get_last_lr()[0]
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
        if done % max(1, config.output.log_every) == 0:
            accelerator.log({"loss": step_loss, "lr": lr}, step=done)
        if config.output.checkpoint_every and done % config.output.checkpoint_every == 0:
            save_checkpoint(accelerator, out, done, {"history": history}, config.output.keep_checkpoints)
        if config.output.sample_every and done % config.output.sample_every == 0 and done < tcfg.steps:
            _write_samples(accelerator, config, components, strategy, text_encoder, unet, out, done, resolution)
    progress.close()

    summary = {}
    if accelerator.is_main_process:
        from .plots import loss_plot

        samples = _write_samples(accelerator, config, components, strategy, text_encoder, unet, out,
                                 tcfg.steps, resolution)
        loss_plot(history["steps"], history["losses"], out / "loss.png", f"sdft {config.method} loss")
        formats = config.output.formats or list(strategy.formats)
        unknown = [f for f in formats if f not in strategy.formats]
        if unknown:
            raise UserError(f"output.formats: {', '.join(unknown)} not written by {config.method} "
                            f"(choose from {', '.join(strategy.formats)})")
        exports = strategy.export(out, formats, {
            "config": (out / "config.yaml").read_text(), "resolution": str(resolution), "steps": str(tcfg.steps)})
        losses = history["losses"]
        summary = {
            "method": config.method,
            "exports": exports,
            "base_model": components.source,
            "steps": tcfg.steps,
            "final_loss": losses[-1] if losses else None,
            "final_loss_avg10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
            "wall_time_s": round(time.time() - started, 2),
            "median_step_s": round(sorted(step_times)[len(step_times) // 2], 4) if step_times else None,
            "config": str(out / "config.yaml"),
            "samples": samples,
            "loss_plot": str(out / "loss.png"),
            "vae_encodes": batches.vae_encodes,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.end_training()
    return TrainOutcome(summary, strategy, components)


def _tokenize(tokenizer, prompts: list[str], device) -> torch.Tensor:
    return tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids.to(device)


def _register_adapter_hooks(accelerator, strategy) -> None:
    """Make accelerate's save_state/load_state store only the strategy's trained state."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu").contiguous() for k, v in strategy.state_dict().items()}
            save_file(state, str(Path(output_dir) / ADAPTER_FILE))
        weights.clear()  # the frozen base is not part of a checkpoint

    def load_hook(models, input_dir):
        models.clear()
        strategy.load_state_dict(load_file(str(Path(input_dir) / ADAPTER_FILE)))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _write_samples(accelerator, config, components, strategy, text_encoder, unet, out: Path, step: int,
                   resolution: int) -> str | None:
    """Generate the sample prompts on fixed seeds and save them as one grid PNG."""
    if not accelerator.is_main_process:
        return None
    from .inference import generate, pipeline_from_components
    from .plots import image_grid

    prompts = config.output.sample_prompts or [
        format_prompt(config.data.prompt, config.data.token, config.data.class_word)]
    pipe = pipeline_from_components(components, accelerator.unwrap_model(text_encoder),
                                    accelerator.unwrap_model(unet))
    pipe.set_progress_bar_config(disable=True)
    modules = [pipe.unet, pipe.text_encoder]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad(), accelerator.autocast():
            images = generate(pipe, [strategy.expand_prompt(p) for p in prompts], config.output.sample_seeds,
                              steps=config.output.sample_steps, guidance=config.output.guidance,
                              resolution=resolution)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    path = out / "samples" / f"step-{step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images, len(config.output.sample_seeds)).save(path)
    return str(path)


def _flat_hparams(config: RunConfig) -> dict:
    flat = {}
    for section, values in config.to_dict().items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    return flat

