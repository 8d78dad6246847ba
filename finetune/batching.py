"""Deterministic batches: which example, noise, timestep and flip each sample of each step gets.

Everything random is drawn from generators seeded by (seed, micro-step, position in the global
batch). That makes a resumed run, or a run split over N processes, see exactly the same samples as
one uninterrupted single-process run, without saving or restoring any data-loader state.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Example, centre_crop_size_condition, crop_box, size_condition, to_training_tensor
from .families import SizeCondition


def sample_generator(seed: int, micro_step: int, position: int) -> torch.Generator:
    """A CPU generator unique to one sample of one micro-step."""
    return torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 10_007 + position)


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> tuple[int, ...]:
    """A shuffled order of the n draws of one epoch (cached: consecutive steps walk the same epoch)."""
    return tuple(torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7_919 + epoch)).tolist())


def global_indices(seed: int, micro_step: int, global_batch: int, pool: list[int]) -> list[int]:
    """The example indices of one micro-step's global batch: epochs walk shuffled orders of `pool`, the example
    indices one epoch draws (each example once, or as often as its data set's repeats)."""
    out = []
    n = len(pool)
    for j in range(global_batch):
        position = micro_step * global_batch + j
        out.append(pool[epoch_order(seed, position // n, n)[position % n]])
    return out


def bucket_indices(seed: int, micro_step: int, global_batch: int, groups: list[list[int]]) -> list[int]:
    """One micro-step's global batch, all from one bucket: the bucket is drawn in proportion to its size,
    its members in a shuffled order (repeated when the bucket is smaller than the batch)."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + micro_step) * 10_007 - 1)
    weights = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    group = groups[int(torch.multinomial(weights, 1, generator=gen))]
    order = torch.randperm(len(group), generator=gen).tolist()
    return [group[order[j % len(group)]] for j in range(global_batch)]


@dataclass
class CaptionOptions:
    """Per-sample caption augmentation (kohya-style): dropout to empty, tag shuffling."""

    dropout: float = 0.0
    shuffle: bool = False
    keep_tokens: int = 1

    def apply(self, caption: str, generator: torch.Generator) -> str:
        """The caption as trained on this time; draws from the sample's own generator (exact resume)."""
        if self.shuffle:
            tags = [t.strip() for t in caption.split(",") if t.strip()]
            fixed, rest = tags[: self.keep_tokens], tags[self.keep_tokens:]
            order = torch.randperm(len(rest), generator=generator).tolist()
            caption = ", ".join(fixed + [rest[i] for i in order])
        if self.dropout > 0 and float(torch.rand(1, generator=generator)) < self.dropout:
            return ""
        return caption


@dataclass
class SampleSpec:
    index: int  # example index
    flip: bool
    generator: torch.Generator
    size: SizeCondition | None = None  # where its crop came from (SDXL's conditioning); set with its latents


class InstanceBatches:
    """Builds (latents, captions) batches for one process, with an optional VAE latent cache."""

    def __init__(self, examples: list[Example], vae, vae_scale: float, resolution: int, *, center_crop: bool,
                 random_flip: bool, cache_latents: bool, device, dtype, disk_cache=None,
                 sizes: list[tuple[int, int]] | None = None, sample_posterior: bool = True,
                 pool: list[int] | None = None):
        self.examples = examples
        # The example indices one epoch draws: each once, or as often as its data set's repeats (concepts.draw_pool).
        self.pool = pool if pool is not None else list(range(len(examples)))
        self.vae, self.vae_scale = vae, vae_scale
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip
        # A random crop differs each time, so only center crops can be cached.
        self.cache_enabled = cache_latents and center_crop
        self.sample_posterior = sample_posterior  # False: train on posterior means (what toy bases learned from)
        self.device, self.dtype = device, dtype
        self._cache: dict[tuple[int, bool], tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.vae_encodes = 0  # counted so tests and benchmarks can see the cache working
        self.disk_cache = disk_cache if self.cache_enabled else None  # a DiskLatentCache shared across runs
        # Aspect-ratio bucketing: each example's (width, height); None trains every image as a square.
        self.sizes = sizes
        self.groups: list[list[int]] = []
        if sizes is not None:
            by_size: dict[tuple[int, int], list[int]] = {}
            for index in self.pool:
                by_size.setdefault(sizes[index], []).append(index)
            self.groups = [by_size[size] for size in sorted(by_size)]

    def draws(self, seed: int, micro_step: int, global_batch: int) -> list[int]:
        """The example indices of one micro-step's global batch (every process computes the same)."""
        if self.groups:
            return bucket_indices(seed, micro_step, global_batch, self.groups)
        return global_indices(seed, micro_step, global_batch, self.pool)

    def specs(self, seed: int, micro_step: int, batch_size: int, process_index: int, num_processes: int):
        """The samples this process trains on at `micro_step`."""
        indices = self.draws(seed, micro_step, batch_size * num_processes)
        specs = []
        for j in range(process_index * batch_size, (process_index + 1) * batch_size):
            gen = sample_generator(seed, micro_step, j)
            flip = bool(torch.rand(1, generator=gen) < 0.5) if self.random_flip else False
            specs.append(SampleSpec(indices[j], flip, gen))
        return specs

    def _bucket(self, index: int) -> tuple[int, int] | None:
        """The (width, height) bucket of an example under --buckets, else None (square crops)."""
        return self.sizes[index] if self.sizes is not None else None

    @torch.no_grad()
    def _encode(self, spec: SampleSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Posterior mean and std of one sample, and its loss mask (None unless the image carries alpha)."""
        example = self.examples[spec.index]
        target = self._bucket(spec.index) or self.resolution
        box = crop_box(example.image.size, target, self.center_crop, spec.generator)
        spec.size = size_condition(example.image.size, target, box, spec.flip)
        pixels = to_training_tensor(example.image, target, flip=spec.flip, box=box)
        alpha = None
        if pixels.shape[0] == 4:  # RGBA from --alpha-mask: the alpha channel becomes a loss mask
            pixels, alpha = pixels[:3], (pixels[3:] + 1.0) / 2.0
        dist = self.vae.encode(pixels[None].to(self.device, self.dtype)).latent_dist
        self.vae_encodes += 1
        mask = None
        if alpha is not None:
            # Area-average to the latent grid: a latent cell half covered by the subject counts half.
            mask = F.interpolate(alpha[None], size=dist.mean.shape[-2:], mode="area")[0].to(dist.mean.device)
        return dist.mean[0].float(), dist.std[0].float(), mask

    def fill_cache(self, desc: str = "caching latents") -> None:
        """Encode every image (and its mirror when flipping) before training, so no step pays for a VAE
        encode. Draws no random numbers: the run stays identical to one that fills the cache lazily."""
        if not self.cache_enabled:
            return
        from tqdm.auto import tqdm

        flips = (False, True) if self.random_flip else (False,)
        keys = [(i, f) for i in range(len(self.examples)) for f in flips if (i, f) not in self._cache]
        for index, flip in tqdm(keys, desc=desc, disable=len(keys) < 2):
            self._cache[(index, flip)] = self._cached_encode(SampleSpec(index, flip, torch.Generator()))

    def _cached_encode(self, spec: SampleSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """_encode, read from / written to the disk cache when there is one (only for cacheable crops)."""
        if self.disk_cache is None:
            return self._encode(spec)
        key = self.disk_cache.key(self.examples[spec.index].image, spec.flip, self._bucket(spec.index))
        found = self.disk_cache.get(key, self.device)
        if found is None:
            found = self._encode(spec)
            self.disk_cache.put(key, *found)
        return found

    def latents(self, specs: list[SampleSpec]) -> torch.Tensor:
        """Scaled latents of each image: a fresh sample of its (cached) VAE posterior, or its mean."""
        return self.latents_and_masks(specs)[0]

    def latents_and_masks(self, specs: list[SampleSpec]) -> tuple[torch.Tensor, torch.Tensor]:
        """Latents as in latents(), and a (B, 1, h, w) loss mask: alpha where images have it, else ones."""
        out, masks = [], []
        for spec in specs:
            key = (spec.index, spec.flip)
            if self.cache_enabled and key in self._cache:
                mean, std, mask = self._cache[key]
            else:
                mean, std, mask = self._cached_encode(spec)
                if self.cache_enabled:
                    self._cache[key] = (mean, std, mask)
            if spec.size is None:  # read from a cache: a centre crop, whose geometry follows from the image size
                image_size, target = self.examples[spec.index].image.size, self._bucket(spec.index) or self.resolution
                spec.size = centre_crop_size_condition(image_size, target, spec.flip)
            # Drawn in both modes, so the noise and timesteps that follow from this generator do not change.
            eps = torch.randn(mean.shape, generator=spec.generator).to(mean.device)
            out.append((mean + std * eps if self.sample_posterior else mean) * self.vae_scale)
            masks.append(mask if mask is not None else torch.ones((1, *mean.shape[-2:]), device=mean.device))
        return torch.stack(out), torch.stack(masks)

    def captions(self, specs: list[SampleSpec], templates: list[str] | None = None, token: str = "",
                 class_word: str = "", options: CaptionOptions | list[CaptionOptions] | None = None) -> list[str]:
        """Each sample's caption; without a caption file, a random template when `templates` is given (filled with
        the example's own token and class when its data set names them); then the optional augmentation (one
        CaptionOptions, or one per data set)."""
        from .data import format_prompt

        out = []
        for spec in specs:
            example = self.examples[spec.index]
            if templates and not example.from_caption_file:
                choice = int(torch.randint(0, len(templates), (1,), generator=spec.generator))
                caption = format_prompt(templates[choice], token if example.token is None else example.token,
                                        class_word if example.class_word is None else example.class_word)
            else:
                caption = example.caption
            chosen = options[example.concept] if isinstance(options, list) else options
            out.append(chosen.apply(caption, spec.generator) if chosen else caption)
        return out
