"""Library messages that say nothing to a das-sd user, filtered at ``import das_sd`` (stdlib only).

transformers (5.x) warns once per class, on importing diffusers, that its CLIP and SigLIP image
processors fall back to PIL without torchvision. das-sd never uses an image processor (it encodes
images with the VAE), so the warning reads as an error about nothing. Only that message of that
logger is dropped: every other transformers or diffusers warning still reaches the user.
"""

from __future__ import annotations

import logging

# transformers.utils.import_utils: "`CLIPImageProcessor` requires torchvision (not installed);
# falling back to `CLIPImageProcessorPil` ..." (its lazy module's __getattr__)
TORCHVISION_FALLBACK_LOGGER = "transformers.utils.import_utils"
TORCHVISION_FALLBACK = "ImageProcessor` requires torchvision (not installed); falling back to"


class TorchvisionFallbackFilter(logging.Filter):
    """Drops transformers' image-processor torchvision fallback warning, and nothing else."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` is shown.

        Args:
            record: A record of the transformers logger it is attached to.

        Returns:
            False for the torchvision fallback warning, True for any other record.
        """
        return TORCHVISION_FALLBACK not in record.getMessage()


def silence_known_warnings() -> None:
    """Attach the filters (once; calling again adds nothing)."""
    logger = logging.getLogger(TORCHVISION_FALLBACK_LOGGER)
    if not any(isinstance(f, TorchvisionFallbackFilter) for f in logger.filters):
        logger.addFilter(TorchvisionFallbackFilter())
