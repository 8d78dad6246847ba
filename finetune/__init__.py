"""sdft: fine-tune Stable Diffusion with Textual Inversion, Hypernetworks, LoRA and DreamBooth.

Heavy libraries (torch, diffusers, ...) are imported lazily inside functions so that
``sdft --help`` stays fast.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line, without a traceback."""


def is_disk_full(exc: BaseException) -> bool:
    """Whether an error from any writer means the disk is full: an OSError, torch's stream writer
    ("file write failed") or safetensors ("No space left" / StorageFull) each say it their own way."""
    if isinstance(exc, OSError) and exc.errno == 28:  # ENOSPC
        return True
    text = str(exc)
    return any(sign in text for sign in ("No space left", "StorageFull", "file write failed", "os error 28"))
