"""sdft: fine-tune Stable Diffusion with Textual Inversion, Hypernetworks, LoRA and DreamBooth.

Heavy libraries (torch, diffusers, ...) are imported lazily inside functions so that
``sdft --help`` stays fast.
"""

__version__ = "0.1.0"


class UserError(Exception):
    """A problem with the user's input: the CLI prints it as one line, without a traceback."""
