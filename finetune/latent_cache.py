"""VAE latents kept on disk between runs, keyed so that any change that alters a latent misses the cache.

The key covers the image's pixels, the resolution, crop and flip, the encode dtype and a fingerprint of the
VAE encoder's weights: edit an image, train at another size or swap the VAE, and that entry is recomputed.
Entries are safetensors files written atomically (temporary name, then rename), so a crash or several
processes writing at once never leave a torn entry.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import torch


def vae_fingerprint(vae) -> str:
    """A short hash of the VAE's config and encoder weights (the decoder does not affect latents)."""
    digest = hashlib.sha256(repr(sorted(dict(vae.config).items())).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        if name.startswith(("encoder.", "quant_conv.")):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class DiskLatentCache:
    """Posterior mean/std (and the alpha loss mask) of encoded images, one file per entry."""

    def __init__(self, folder: str | Path, vae, resolution: int, center_crop: bool, dtype):
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.context = f"{vae_fingerprint(vae)}|{resolution}|{center_crop}|{dtype}"

    def key(self, image, flip: bool, size: tuple[int, int] | None = None) -> str:
        """The entry of `image` encoded at the cache's resolution (or at a bucket's `size`)."""
        digest = hashlib.sha256(f"{self.context}|{flip}|{size}|{image.mode}|{image.size}".encode())
        digest.update(image.tobytes())
        return digest.hexdigest()

    def get(self, key: str, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        from safetensors.torch import load_file

        path = self.folder / f"{key}.safetensors"
        if not path.is_file():
            return None
        tensors = load_file(str(path), device=str(device))
        return tensors["mean"], tensors["std"], tensors.get("mask")

    def put(self, key: str, mean: torch.Tensor, std: torch.Tensor, mask: torch.Tensor | None) -> None:
        from safetensors.torch import save_file

        tensors = {"mean": mean, "std": std, **({"mask": mask} if mask is not None else {})}
        handle, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=self.folder)
        os.close(handle)
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, self.folder / f"{key}.safetensors")
