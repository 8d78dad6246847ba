"""The few torchvision transforms diffusers' example scripts use, for machines where torchvision cannot load.

The reference scripts import `torchvision.transforms` only to resize, crop, flip and normalise the training
images. Where no torchvision build matches the installed torch (this project's CPU machines), `install()` puts
this stand-in in its place: the same operations on PIL images (torchvision's own path for PIL inputs), so the
reference trains on the same pixels. With a working torchvision installed, nothing is replaced.
"""

from __future__ import annotations

import enum
import random
import sys
import types


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    LANCZOS = "lanczos"
    BOX = "box"
    HAMMING = "hamming"


def _pil_filter(mode: InterpolationMode):
    from PIL import Image

    return {InterpolationMode.NEAREST: Image.Resampling.NEAREST, InterpolationMode.BILINEAR: Image.Resampling.BILINEAR,
            InterpolationMode.BICUBIC: Image.Resampling.BICUBIC, InterpolationMode.LANCZOS: Image.Resampling.LANCZOS,
            InterpolationMode.BOX: Image.Resampling.BOX, InterpolationMode.HAMMING: Image.Resampling.HAMMING}[mode]


def _pair(size) -> tuple[int, int]:
    """(height, width) from an int or a sequence, as torchvision reads sizes."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def crop(image, top: int, left: int, height: int, width: int):
    return image.crop((left, top, left + width, top + height))


class Compose:
    def __init__(self, transforms):
        self.transforms = list(transforms)

    def __call__(self, image):
        for transform in self.transforms:
            image = transform(image)
        return image


class Resize:
    """An int resizes the shorter side to it (aspect kept, the longer side truncated as torchvision does)."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size, self.interpolation = size, interpolation or InterpolationMode.BILINEAR

    def __call__(self, image):
        w, h = image.size
        if isinstance(self.size, int):
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = self.size, int(self.size * long / short)
            new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
        else:
            new_h, new_w = _pair(self.size)
        return image.resize((new_w, new_h), _pil_filter(self.interpolation))


class CenterCrop:
    def __init__(self, size):
        self.size = _pair(size)

    def __call__(self, image):
        h, w = self.size
        top, left = int(round((image.size[1] - h) / 2.0)), int(round((image.size[0] - w) / 2.0))
        return crop(image, top, left, h, w)


class RandomCrop:
    def __init__(self, size):
        self.size = _pair(size)

    @staticmethod
    def get_params(image, output_size):
        h, w = _pair(output_size)
        top, left = random.randint(0, image.size[1] - h), random.randint(0, image.size[0] - w)
        return top, left, h, w

    def __call__(self, image):
        return crop(image, *self.get_params(image, self.size))


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image):
        from PIL import Image

        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else image


class ToTensor:
    def __call__(self, image):
        import numpy as np
        import torch

        array = np.asarray(image, dtype=np.float32) / 255.0
        if array.ndim == 2:
            array = array[:, :, None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class Normalize:
    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    def __call__(self, tensor):
        import torch

        mean = torch.as_tensor(self.mean, dtype=tensor.dtype).reshape(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=tensor.dtype).reshape(-1, 1, 1)
        return (tensor - mean) / std


def install() -> bool:
    """Make `import torchvision.transforms` work; True when the stand-in was needed."""
    try:
        import torchvision.transforms  # noqa: F401
        return False
    except Exception:  # noqa: BLE001 - a missing package, or a build for another torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
    package = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    for name in ("InterpolationMode", "Compose", "Resize", "CenterCrop", "RandomCrop", "RandomHorizontalFlip",
                 "ToTensor", "Normalize"):
        setattr(transforms, name, globals()[name])
    functional.crop = crop
    transforms.functional = functional
    package.transforms = transforms
    package.__version__ = "0.0-standin"
    import importlib.machinery

    for module in (package, transforms, functional):  # find_spec() must not fail on a module without a spec
        module.__spec__ = importlib.machinery.ModuleSpec(module.__name__, None)
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms,
                        "torchvision.transforms.functional": functional})
    return True
