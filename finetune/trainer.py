"""The one training loop every strategy runs through (accelerate handles devices and precision)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from . import UserError, backward_pass, offload, pivotal
from .batching import CaptionOptions, InstanceBatches
from .checkpoint import ADAPTER_FILE, load_trainer_state, save_checkpoint
from .concepts import (concepts_of, describe, draw_pool, draws_per_concept, load_concept_examples,
                       refuse_several_new_words)
from .config import RunConfig, save_config, shareable_config_dict, shareable_config_yaml, shareable_name
from .data import format_prompt, load_examples, warn_long_captions, warn_small_images
from .ema import TrainedWeightsEMA
from .formats.file_modes import apply_umask
from .interrupt import StopOnInterrupt, TrainingInterrupted
from .diffusion_step import StepMaths, sample_losses
from .families import PromptEmbeds
from .models import Components, apply_model_options, load_components, resolve_base
from .optimizers import averaged_weights, make_optimizer, set_training_mode
from .prior import class_image_configs, ensure_class_images
from .run_folder import check_output_folder, claim_output_folder
from .strategies import build_strategy
from .strategies.base import check_formats
from .validation import ValidationSet, split_validation

log = logging.getLogger(__name__)
# Class samples draw from their own random stream, apart from the instance samples'.
CLASS_SEED_OFFSET = 7_777_777


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
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    config.validate()
    started = time.time()
    # Only reads: a folder holding another run, a resume that does not fit, a bad --model, unreadable images or
    # an unknown export format fail in a second, before anything is written or loaded.
    resume_from = check_output_folder(config)
    resolve_base(config.model.name)
    formats = check_formats(config)
    tracker(config.output.report_to)
    check_attention(config.train)
    # The launcher's world size, read without starting accelerate's state (which must start later, once).
    backward_pass.check_fused_backward(config.train, int(os.environ.get("WORLD_SIZE", "1")))
    concepts = concepts_of(config.data)
    if config.method == "textual_inversion" or pivotal.enabled(config):
        refuse_several_new_words(concepts, config.data.token,
                                 "pivotal tuning" if pivotal.enabled(config) else "textual inversion")
    class_image_sets = class_image_configs(config, concepts) if config.prior.enabled else []
    examples = load_concept_examples(concepts, keep_alpha=config.data.alpha_mask)
    if len(concepts) > 1:
        log.info("data sets: %s", describe(concepts, examples))
    examples, held_out = split_validation(examples, config.data.validation_share)
    if config.data.validation_images:
        held_out = load_examples(config.data.validation_images, config.data.prompt, config.data.token,
                                 config.data.class_word, flag="--validation-images")
    word = None
    if pivotal.enabled(config):
        # Phase 1 is a whole run of its own (own accelerator state) inside this run's folder: it must finish
        # before this run's starts, so the folder is claimed (an older run cleared with --overwrite) first.
        claim_output_folder(config, PartialState().is_main_process)
        word = pivotal.learn_word(config, run_training, components)
    # accelerate keeps its state in a process-wide singleton; a second run in the same process (library use,
    # tests) with another mixed-precision setting must start from a clean one. The process group is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    out = Path(config.output.output)
    tcfg = config.train
    accelerator = Accelerator(
        mixed_precision=tcfg.mixed_precision, gradient_accumulation_steps=tcfg.grad_accum,
        log_with=tracker(config.output.report_to),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    refuse_sharded_backends(accelerator.distributed_type)
    # Frozen weights may live in half precision; trained ones stay float32 (adapters: set after prepare()). A
    # model whose own weights train is never rounded to half precision on the way.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    strategy = build_strategy(config)
    fully_trained = strategy.fully_trained_parts()
    if components is None:
        components = load_components(config.model.name, config.model.single_file_config, config.model.family,
                                     dtypes=load_dtypes(weight_dtype, fully_trained))
    apply_model_options(components, config.model)
    family = components.family
    if word is not None:
        word.install(components)
    resolution = config.data.resolution or components.resolution
    for own in {resolution, *(c.resolution for c in concepts if c.resolution)}:
        if own % components.vae_factor:
            raise UserError(f"data.resolution={own}: use a multiple of {components.vae_factor}, this base's VAE "
                            "factor")
    warn_small_images(examples, resolution)
    warn_long_captions(examples, components.tokenizer)
    prediction_type = components.noise_scheduler.config.prediction_type

    for part, module in [*(("text_encoder", e) for e in components.text_encoders), ("unet", components.unet)]:
        module.to(accelerator.device, dtype=torch.float32 if part in fully_trained else weight_dtype)
    # SDXL's own VAE overflows in fp16: it stays float32 unless --vae replaced it (e.g. by an fp16-safe one).
    vae_dtype = torch.float32 if family.vae_needs_float32 and not config.model.vae else weight_dtype
    components.vae.to(accelerator.device, dtype=vae_dtype)
    sample_posterior = config.data.vae_posterior == "sample"
    class_batches, class_generated, class_folders = None, 0, []
    if class_image_sets:
        # Generated by the untouched base, before the strategy changes anything; one set per class named.
        class_examples = []
        for own in class_image_sets:
            folder, generated = ensure_class_images(own, components, resolution, accelerator)
            class_folders.append(str(folder))
            class_generated += generated
            class_examples += load_examples(str(folder), own.prior.class_prompt, own.data.token, own.data.class_word,
                                            flag="--class-images")[: config.prior.num_class_images]
        class_batches = InstanceBatches(class_examples, components.vae, components.vae_scale, resolution,
                                        center_crop=config.data.center_crop, random_flip=config.data.random_flip,
                                        cache_latents=config.data.cache_latents, device=accelerator.device,
                                        dtype=vae_dtype, sample_posterior=sample_posterior)
    torch.manual_seed(tcfg.seed)  # adapter initialisation (e.g. LoRA's A matrices) depends on --seed only
    strategy.prepare(components)
    family.freeze_unused(components.text_encoders)
    trainable = strategy.trainable_modules()
    for module in trainable:
        for param in module.parameters():
            if param.requires_grad:
                param.data = param.data.float()
        module.train()
    if tcfg.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        if strategy.trains_text_encoder():
            for encoder in components.text_encoders:
                encoder.gradient_checkpointing_enable()
    apply_unet_options(components.unet, tcfg)

    disk_cache = None
    if config.data.latent_cache_dir and config.data.cache_latents:
        from .latent_cache import DiskLatentCache

        disk_cache = DiskLatentCache(config.data.latent_cache_dir, components.vae, resolution, config.data.center_crop,
                                     vae_dtype)
    batches = InstanceBatches(examples, components.vae, components.vae_scale, resolution,
                              center_crop=config.data.center_crop, random_flip=config.data.random_flip,
                              cache_latents=config.data.cache_latents, device=accelerator.device, dtype=vae_dtype,
                              disk_cache=disk_cache, sizes=training_sizes(config, concepts, examples, resolution),
                              sample_posterior=sample_posterior, pool=draw_pool(examples, concepts))
    fill_started = time.perf_counter()
    batches.fill_cache()
    if class_batches is not None:
        class_batches.fill_cache("caching class latents")
    cache_fill_s = time.perf_counter() - fill_started
    # prompt -> (hidden states, pooled embedding or None), in CPU memory: a long run meets thousands of prompts,
    # which would pile up in GPU memory. Shuffled tags make nearly every prompt new: nothing is kept then.
    text_cache: dict[str, tuple] = {}
    class_caption_options = CaptionOptions(dropout=config.prior.caption_dropout)
    caption_options = [concept.caption_options for concept in concepts]
    keep_prompts = not any(options.shuffle for options in caption_options)
    # The offloaded VAE / text encoders during the steps (train.offload_frozen); they leave when the loop starts.
    frozen_away = offload.frozen_offload(
        tcfg, components, accelerator.device, latents_cached=batches.cache_enabled and (
            class_batches is None or class_batches.cache_enabled), text_encoders_train=strategy.trains_text_encoder(),
        prompts_vary=not keep_prompts)
    sample_prompts = _sample_prompts(config, concepts)

    optimizer = make_optimizer(tcfg, strategy.param_groups(), accelerator.device)
    # accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(tcfg.lr_scheduler, optimizer,
                                 num_warmup_steps=tcfg.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=tcfg.steps * accelerator.num_processes)
    prepared = accelerator.prepare(*trainable, optimizer, lr_scheduler)
    wrapped, optimizer, lr_scheduler = list(prepared[: len(trainable)]), prepared[-2], prepared[-1]
    unet = wrapped[0] if trainable[0] is components.unet else components.unet
    text_encoders = [next((w for w, m in zip(wrapped, trainable) if m is encoder), encoder)
                     for encoder in components.text_encoders]
    trained_params = [p for group in optimizer.param_groups for p in group["params"]]
    updates_in_backward = backward_pass.install(tcfg, optimizer, trained_params, accelerator.num_processes,
                                                full_fine_tune=bool(fully_trained))
    ema = TrainedWeightsEMA(trained_params, tcfg.ema_decay, tcfg.ema_on_cpu) if tcfg.ema_decay > 0 else None
    _register_adapter_hooks(accelerator, strategy, ema)
    # Parameters reached through hooks (e.g. hypernetworks inside attention processors) never pass through
    # DDP's forward, so DDP does not average their gradients: do it by hand.
    unsynced = [p for m in trainable if m is not components.unet and all(m is not e for e in components.text_encoders)
                for p in m.parameters() if p.requires_grad] if accelerator.num_processes > 1 else []

    start_step, history = 0, {"steps": [], "losses": []}
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        state = load_trainer_state(resume_from)
        start_step, history = int(state["step"]), state.get("history", history)
        log.info("resumed from %s at step %d", resume_from, start_step)
    if not pivotal.enabled(config):  # (a pivotal run claimed its folder before phase 1 wrote into it)
        # Everything is loaded and checked: the run's first write into its folder.
        claim_output_folder(config, accelerator.is_main_process)
    if accelerator.is_main_process:
        save_config(config, out / "config.yaml")
        accelerator.init_trackers("sdft", config=_flat_hparams(config), init_kwargs=tracker_options(config, out))
    accelerator.wait_for_everyone()

    def encode_text(captions: list[str], encoders=None) -> PromptEmbeds:
        """The family's text conditioning of the captions; cached per prompt while the encoders are frozen."""
        prompts = [strategy.expand_prompt(word.expand(c) if word else c) for c in captions]
        if strategy.trains_text_encoder():
            return family.encode_prompts(components.tokenizers, encoders or text_encoders, prompts,
                                         accelerator.device)
        unique = dict.fromkeys(prompts)
        found = {p: text_cache[p] for p in unique if p in text_cache}
        missing = [p for p in unique if p not in found]
        if missing:
            with torch.no_grad(), frozen_away.present(components.text_encoders):
                embeds = family.encode_prompts(components.tokenizers, components.text_encoders, missing,
                                               accelerator.device)
            fresh = dict(zip(missing, embeds.to("cpu").rows()))
            found.update(fresh)
            if keep_prompts:
                text_cache.update(fresh)
        return PromptEmbeds.stack([found[p] for p in prompts]).to(accelerator.device)

    maths = StepMaths(components.noise_scheduler, prediction_type, tcfg,
                      config.data.unmasked_weight if config.data.alpha_mask else None, accelerator.device)
    scheduler, num_timesteps = maths.scheduler, maths.num_timesteps

    def _sample_losses(latents: torch.Tensor, masks: torch.Tensor, specs, captions: list[str]) -> torch.Tensor:
        def predict(noisy, timesteps):
            with accelerator.autocast():
                return family.predict(unet, noisy, timesteps, encode_text(captions), [s.size for s in specs],
                                      weight_dtype)

        return sample_losses(maths, latents, masks, specs, predict)
    validation = None
    if held_out and accelerator.is_main_process:
        validation = ValidationSet(held_out, components.vae, components.vae_scale, resolution, num_timesteps,
                                   config.output.validation_timesteps, accelerator.device, vae_dtype)

    def validate(step: int) -> None:
        """The held-out loss on the main process, through the unwrapped models (no collective operation)."""
        if validation is None:
            return
        plain_unet = accelerator.unwrap_model(unet)
        plain_text = [accelerator.unwrap_model(encoder) for encoder in text_encoders]

        def predict(noisy, t, captions, sizes):
            return family.predict(plain_unet, noisy, t, encode_text(captions, plain_text), sizes, weight_dtype)

        modes = [(m, m.training) for m in trainable]
        for module, _ in modes:
            module.eval()  # no adapter dropout: the number depends on the weights alone
        with accelerator.autocast():
            value = validation.loss(predict, scheduler, prediction_type)
        for module, mode in modes:
            module.train(mode)
        history.setdefault("val_steps", []).append(step)
        history.setdefault("val_losses", []).append(value)
        accelerator.log({"val_loss": value}, step=step)

    if start_step == 0:
        validate(0)  # the base's own loss on the held-out images: where the curve starts
    progress = tqdm(total=tcfg.steps, initial=start_step, desc=f"sdft {config.method}",
                    disable=not accelerator.is_local_main_process)
    step_times: list[float] = []
    # Ctrl-C stops after the current step with a checkpoint of it (a second Ctrl-C stops at once).
    # On any way out: the bar closes (its line ends), the fused backward pass's hooks come off and offloaded
    # models come back.
    with (StopOnInterrupt() as interrupt, progress, updates_in_backward or contextlib.nullcontext(),
          frozen_away):
        for step in range(start_step, tcfg.steps):
            step_start = time.perf_counter()
            step_loss, step_parts = 0.0, {"instance": 0.0, "prior": 0.0}
            for micro in range(tcfg.grad_accum):
                micro_step = step * tcfg.grad_accum + micro
                torch.manual_seed(tcfg.seed * 1_000_003 + micro_step)  # dropout inside adapters
                batch = gather_micro_batch(config, batches, class_batches, micro_step, accelerator.process_index,
                                           accelerator.num_processes, strategy.prompt_templates(),
                                           caption_options, class_caption_options)
                with accelerator.accumulate(*wrapped):
                    # One UNet call per latent size (usually one); per-sample losses come back in batch order.
                    losses = torch.cat([_sample_losses(latents.to(accelerator.device), masks, specs, captions)
                                        for latents, masks, specs, captions in batch.parts()])
                    instance_loss = losses[: tcfg.batch_size].mean()
                    loss = instance_loss
                    if class_batches is not None:
                        prior_loss = losses[tcfg.batch_size:].mean()
                        loss = instance_loss + config.prior.weight * prior_loss
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        for param in unsynced:
                            grad = param.grad if param.grad is not None else torch.zeros_like(param)
                            param.grad = accelerator.reduce(grad, "mean")
                    if updates_in_backward is None:  # (else each weight was clipped and updated in backward)
                        if accelerator.sync_gradients and tcfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(trained_params, tcfg.max_grad_norm)
                        optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    if ema is not None and accelerator.sync_gradients:
                        ema.step()
                step_loss += accelerator.reduce(loss.detach(), "mean").item() / tcfg.grad_accum
                step_parts["instance"] += accelerator.reduce(instance_loss.detach(), "mean").item() / tcfg.grad_accum
                if class_batches is not None:
                    step_parts["prior"] += accelerator.reduce(prior_loss.detach(), "mean").item() / tcfg.grad_accum
            strategy.after_optimizer_step()
            step_times.append(time.perf_counter() - step_start)
            done = step + 1
            history["steps"].append(done)
            history["losses"].append(step_loss)
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            if done % max(1, config.output.log_every) == 0:
                logged = {"loss": step_loss, "lr": lr, "loss_instance": step_parts["instance"]}
                if class_batches is not None:
                    logged["loss_prior"] = step_parts["prior"]
                accelerator.log(logged, step=done)
            def checkpoint() -> Path:
                return save_checkpoint(accelerator, out, done, {"history": history, "config": config.to_dict()},
                                       config.output.keep_checkpoints)

            saved = None
            if config.output.checkpoint_every and done % config.output.checkpoint_every == 0:
                saved = checkpoint()
            if _stop_requested(accelerator, interrupt):
                saved = saved or checkpoint()
                accelerator.end_training()
                raise TrainingInterrupted(f"interrupted at step {done} of {tcfg.steps}; checkpoint saved in "
                                          f"{saved}; continue with --resume latest")
            if done % config.output.validation_every == 0 or done == tcfg.steps:
                validate(done)
            if config.output.sample_every and done % config.output.sample_every == 0 and done < tcfg.steps:
                # Schedule-free optimizers sample their averaged point; offloaded models come back for the grid.
                with averaged_weights(optimizer, trained_params), frozen_away.present():
                    _write_samples(accelerator, config, components, strategy, text_encoders, unet, out, done,
                                   resolution, sample_prompts)

    summary = {}
    set_training_mode(optimizer, False)  # schedule-free: samples and exports use the averaged weights
    if ema is not None:
        ema.copy_to_params()  # every rank, so all of them end on the same weights
    if accelerator.is_main_process:
        from .plots import loss_plot

        # Exports first: nothing that can still fail at the end of a run (a sample grid) may cost them.
        exports = strategy.export(out, formats, export_metadata(config, resolution, len(examples)))
        if word is not None:
            exports["embedding"] = word.export(components, out, {"steps": str(tcfg.steps),
                                                                 "base_model": shareable_name(config.model.name)})
        apply_umask(path for paths in exports.values() for path in paths)
        loss_plot(history["steps"], history["losses"], out / "loss.png", f"sdft {config.method} loss",
                  validation=(history.get("val_steps", []), history.get("val_losses", [])))
        try:
            samples = _write_samples(accelerator, config, components, strategy, text_encoders, unet, out,
                                     tcfg.steps, resolution, sample_prompts)
        except Exception as exc:  # noqa: BLE001 - any failure of the final grid; the exports above are written
            log.warning("the final sample grid failed (%s: %s); the exports are written", type(exc).__name__, exc)
            samples = None
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
            "train_loop_s": round(sum(step_times), 3),  # the steps of this call (after a resume: only those)
            "first_step_s": round(step_times[0], 4) if step_times else None,  # warm-up: allocations, first kernels
            "cache_fill_s": round(cache_fill_s, 3),  # VAE encodes before step 1 (latent cache)
            "fused_backward_pass": updates_in_backward is not None,
            "offloaded": [type(p.module).__name__ for p in frozen_away.parts],
            "config": str(out / "config.yaml"),
            "samples": samples,
            "loss_plot": str(out / "loss.png"),
            "vae_encodes": batches.vae_encodes,
            "vae_posterior": "sample" if sample_posterior else "mean",
            "class_images": class_folders,
            "class_images_generated": class_generated,
            "datasets": dataset_summary(batches, concepts, tcfg, accelerator.num_processes),
            "sample_prompts": sample_prompts,
            "validation_images": len(held_out),
            "validation_loss": history["val_losses"][-1] if history.get("val_losses") else None,
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    # Every rank leaves together. A rank that returned straight after its last loss all-reduce could free the
    # process group while gloo's worker thread still releases that reduce's tensors: the destructor joins the
    # worker while holding the GIL, the worker waits for the GIL, and the process hangs at exit (seen in CI).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return TrainOutcome(summary, strategy, components)


def export_metadata(config: RunConfig, resolution: int, image_count: int) -> dict[str, str]:
    """What every export carries about its run, free of local paths (files users share)."""
    return {"config": shareable_config_yaml(config, image_count), "resolution": str(resolution),
            "steps": str(config.train.steps), "base_model": shareable_name(config.model.name)}


@dataclass
class MicroBatch:
    """One micro-step's samples on this process: instance samples first, then class samples (prior
    preservation), with their captions; latents and masks grouped by latent size (one UNet call each)."""

    specs: list
    captions: list[str]
    latents: list[torch.Tensor]
    masks: list[torch.Tensor]

    def parts(self):
        """(latents, masks, specs, captions) per UNet call, in sample order."""
        first = 0
        for latents, masks in zip(self.latents, self.masks):
            end = first + len(latents)
            yield latents, masks, self.specs[first:end], self.captions[first:end]
            first = end


def gather_micro_batch(config: RunConfig, batches: InstanceBatches, class_batches: InstanceBatches | None,
                       micro_step: int, process_index: int, num_processes: int, templates,
                       caption_options: list[CaptionOptions], class_caption_options: CaptionOptions) -> MicroBatch:
    """The samples, captions, latents and masks of one micro-step, drawn deterministically (finetune.batching)."""
    tcfg = config.train
    specs = batches.specs(tcfg.seed, micro_step, tcfg.batch_size, process_index, num_processes)
    captions = batches.captions(specs, templates, config.data.token, config.data.class_word, caption_options)
    latents, masks = batches.latents_and_masks(specs)
    if class_batches is None:
        return MicroBatch(specs, captions, [latents], [masks])
    class_specs = class_batches.specs(tcfg.seed + CLASS_SEED_OFFSET, micro_step,
                                      config.prior.batch_size or tcfg.batch_size, process_index, num_processes)
    class_captions = class_batches.captions(class_specs, options=class_caption_options)
    class_latents, class_masks = class_batches.latents_and_masks(class_specs)
    if class_latents.shape[1:] == latents.shape[1:]:
        latents, masks = [torch.cat([latents, class_latents])], [torch.cat([masks, class_masks])]
    else:  # --buckets: a non-square instance bucket next to square class images
        latents, masks = [latents, class_latents], [masks, class_masks]
    return MicroBatch(specs + class_specs, captions + class_captions, latents, masks)


def load_dtypes(weight_dtype, fully_trained: tuple[str, ...]) -> dict | None:
    """Per-component load dtypes under mixed precision: frozen models straight in half precision, the VAE and
    every model whose own weights train in float32 (the VAE is cast after loading, as its family allows)."""
    if weight_dtype == torch.float32:
        return None
    float32_parts = ["vae", *(["unet"] if "unet" in fully_trained else []),
                     *(["text_encoder", "text_encoder_2"] if "text_encoder" in fully_trained else [])]
    return {"default": weight_dtype, **{part: torch.float32 for part in float32_parts}}


def check_attention(tcfg) -> None:
    """A missing xformers is a one-line error before anything loads."""
    import importlib.util

    if tcfg.attention != "xformers":
        return
    if importlib.util.find_spec("xformers") is None:
        raise UserError("train.attention=xformers needs the xformers package (pip install xformers, CUDA)")
    if not torch.cuda.is_available():
        raise UserError("train.attention=xformers runs on CUDA GPUs only; use sdpa here")


def apply_unet_options(unet, tcfg) -> None:
    """The UNet's speed levers: attention kernel, memory layout and torch.compile (train section)."""
    if tcfg.attention == "xformers":
        unet.enable_xformers_memory_efficient_attention()
    if tcfg.channels_last:
        unet.to(memory_format=torch.channels_last)
    if tcfg.compile_unet:
        unet.compile()  # in place: module names (and so every export) stay as they are


def tracker(report_to: str) -> str | None:
    """accelerate's log_with for output.report_to; a missing wandb is a one-line error naming the extra."""
    if report_to == "none":
        return None
    if report_to == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError('output.report_to=wandb needs the wandb package: pip install "sdft[wandb]"')
    return report_to


def tracker_options(config: RunConfig, out: Path) -> dict:
    """Per-tracker init options: wandb writes into the run folder, offline unless an account is configured."""
    if config.output.report_to != "wandb":
        return {}
    import os

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    return {"wandb": {"dir": str(out), "mode": mode, "name": out.name}}


def _stop_requested(accelerator, interrupt: StopOnInterrupt) -> bool:
    """Whether any process saw Ctrl-C: all of them stop after the same step, so they checkpoint together."""
    if accelerator.num_processes == 1:
        return interrupt.requested
    flag = torch.tensor([1.0 if interrupt.requested else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, "sum").item() > 0)


def refuse_sharded_backends(distributed_type) -> None:
    """Fail in a second, with the way out, when accelerate is configured for FSDP or DeepSpeed.

    The loop prepares several models without a data loader and reduces some gradients by hand (hook-held
    adapters), which neither backend supports as is; plain data parallel (DDP) covers every method here."""
    from accelerate.utils import DistributedType

    if distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        raise UserError(f"accelerate is configured for {distributed_type.value}, which sdft does not support yet; "
                        "run `accelerate config` again and choose multi-GPU without FSDP/DeepSpeed (data "
                        "parallel), which every sdft method uses (README: Multi-process)")


def training_sizes(config: RunConfig, concepts, examples, resolution: int) -> list[tuple[int, int]] | None:
    """Each example's training (width, height): its bucket under --buckets, its data set's own square resolution
    when one names it; None when every image trains as a square at `resolution`."""
    targets = [concepts[e.concept].resolution or resolution for e in examples]
    if not config.data.buckets:
        return [(r, r) for r in targets] if any(r != resolution for r in targets) else None
    from .buckets import assign_bucket, make_buckets

    step = config.data.bucket_step
    sizes = [assign_bucket(e.image.size, make_buckets(target, step), target, step, config.data.bucket_no_upscale)
             for e, target in zip(examples, targets)]
    log.info("aspect-ratio buckets: %s", ", ".join(f"{w}x{h}: {sizes.count((w, h))}" for w, h in sorted(set(sizes))))
    return sizes


def _register_adapter_hooks(accelerator, strategy, ema=None) -> None:
    """Make accelerate's save_state/load_state store only the strategy's trained state (and its EMA)."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            state = {k: v.detach().to("cpu").contiguous() for k, v in strategy.state_dict().items()}
            save_file(state, str(Path(output_dir) / ADAPTER_FILE))
            if ema is not None:
                ema.save(Path(output_dir))
        weights.clear()  # the frozen base is not part of a checkpoint

    def load_hook(models, input_dir):
        models.clear()
        strategy.load_state_dict(load_file(str(Path(input_dir) / ADAPTER_FILE)))
        if ema is not None:
            ema.load(Path(input_dir))

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _sample_prompts(config: RunConfig, concepts) -> list[str]:
    """The sample grid's prompts: output.sample_prompts, else each data set's own prompt ({token} and {class}
    follow --token/--class-word, so a recipe's samples survive an override)."""
    if config.output.sample_prompts:
        return [format_prompt(p, config.data.token, config.data.class_word) for p in config.output.sample_prompts]
    return list(dict.fromkeys(format_prompt(c.prompt, c.token, c.class_word) for c in concepts))


def dataset_summary(batches: InstanceBatches, concepts, tcfg, num_processes: int) -> list[dict]:
    """Per data set: its images, repeats and the samples the whole run drew from it (all processes, every
    step, resumed or not: the draws are a function of the seed and the step)."""
    global_batch = tcfg.batch_size * num_processes
    drawn = [i for micro_step in range(tcfg.steps * tcfg.grad_accum)
             for i in batches.draws(tcfg.seed, micro_step, global_batch)]
    samples = draws_per_concept(drawn, batches.examples, concepts)
    images = Counter(e.concept for e in batches.examples)
    return [{"name": c.name, "images": images[i], "repeats": c.repeats, "samples": samples[c.name]}
            for i, c in enumerate(concepts)]


def _write_samples(accelerator, config, components, strategy, text_encoders, unet, out: Path, step: int,
                   resolution: int, prompts: list[str]) -> str | None:
    """Generate the sample prompts on fixed seeds and save them as one grid PNG (no seeds: no samples)."""
    if not accelerator.is_main_process or not config.output.sample_seeds:
        return None
    from .inference import float32_vae_decode, generate, pipeline_from_components
    from .plots import image_grid

    plain_text = [accelerator.unwrap_model(encoder) for encoder in text_encoders]
    pipe = pipeline_from_components(components, plain_text, accelerator.unwrap_model(unet))
    pipe.set_progress_bar_config(disable=True)
    modules = [pipe.unet, *plain_text, *strategy.trainable_modules()]
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        with torch.no_grad(), accelerator.autocast(), float32_vae_decode(pipe.vae):
            # The pipeline expands multi-vector tokens itself (maybe_convert_prompt): pass prompts as written.
            images = generate(pipe, prompts, config.output.sample_seeds,
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
    """The config as flat `section.key` hyperparameters for the trackers, local paths cut to their names."""
    flat = {}
    for section, values in shareable_config_dict(config).items():
        if isinstance(values, dict):
            for key, value in values.items():
                flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
        else:
            flat[section] = values
    return flat

