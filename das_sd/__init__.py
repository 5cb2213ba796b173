"""das-sd: which training images made this? Diffusion Attribution Score for Stable Diffusion LoRA fine-tunes."""

__version__ = "0.1.0"
