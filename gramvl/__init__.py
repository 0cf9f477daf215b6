"""gramvl: gradient-regulated meta-prompt learning (GRAM) for CLIP-style vision-language models."""

__version__ = "0.1.0"

from gramvl.errors import GramvlError  # noqa: E402

__all__ = ["GramvlError", "__version__"]
