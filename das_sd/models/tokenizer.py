"""The CLIP tokenizer of a single-file checkpoint, found offline.

A single-file checkpoint holds no tokenizer, and das-sd does not ship the CLIP BPE vocabulary. It is
taken, in order, from the folder given (``$DAS_SD_TOKENIZER``; used as it is), the config folder given
for the checkpoint, or the Hugging Face cache (``local_files_only``); else a ModelError says which
one-time download provides it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ModelError

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TOKENIZER_ENV = "DAS_SD_TOKENIZER"
CLIP_VOCAB_SIZE = 49408
# The CLIP BPE vocabulary is the same in all of these; SD 2.x pads with "!" (OpenCLIP's 0), SD 1.x with
# <|endoftext|>: the pad token is set per family when the tokenizer comes from the cache.
_CACHED_TOKENIZERS = {"sd1": [("openai/clip-vit-large-patch14", None), ("stabilityai/stable-diffusion-2-1", "tokenizer")],
                      "sd2": [("stabilityai/stable-diffusion-2-1", "tokenizer"),
                              ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None), ("openai/clip-vit-large-patch14", None)]}
_PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!"}
_TOKENIZER_FILES = "vocab.json merges.txt tokenizer.json tokenizer_config.json special_tokens_map.json"


def resolve_tokenizer(family: str, tokenizer: str | Path | None = None, config: Path | None = None,
                      path: Path | None = None, vocab_size: int = CLIP_VOCAB_SIZE) -> CLIPTokenizer:
    """The CLIP tokenizer of a single-file checkpoint, found offline.

    Args:
        family: "sd1" or "sd2".
        tokenizer: A folder with a CLIPTokenizer (or a pipeline folder with ``tokenizer/``); None:
            ``$DAS_SD_TOKENIZER``, then ``config``'s ``tokenizer/``, then the Hugging Face cache.
        config: The config folder given for the checkpoint, if any.
        path: The checkpoint, named in the errors.
        vocab_size: The text encoder's vocabulary size, which the tokenizer must have.

    Returns:
        The tokenizer; from the cache, with the family's pad token.

    Raises:
        ModelError: When a given folder holds no tokenizer of ``vocab_size`` tokens, or none is given
            and the cache has none (the message says which download provides it).
    """
    from transformers import CLIPTokenizer

    where = f"{path}: " if path else ""
    explicit = tokenizer or os.environ.get(TOKENIZER_ENV) or None
    if explicit is None and config is not None and (config / "tokenizer").is_dir():
        explicit = config / "tokenizer"
    if explicit is not None:
        folder = Path(explicit).expanduser()
        folder = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
        found = _load_tokenizer(CLIPTokenizer, str(folder), None)
        if found is None or len(found) != vocab_size:
            what = "no CLIP tokenizer there" if found is None or len(found) < 10 else f"a tokenizer of {len(found)} tokens"
            raise ModelError(f"{where}{folder}: {what}; the text encoder takes {vocab_size} tokens")
        return found
    for repo, subfolder in _CACHED_TOKENIZERS[family]:
        found = _load_tokenizer(CLIPTokenizer, repo, subfolder)
        if found is not None and len(found) == vocab_size:
            found.pad_token = _PAD_TOKEN[family]
            return found
    repo = _CACHED_TOKENIZERS[family][0][0]
    sub = " --include 'tokenizer/*'" if family == "sd2" else f" {_TOKENIZER_FILES}"
    raise ModelError(f"{where}the checkpoint needs the CLIP tokenizer, which das-sd does not ship and did not find "
                     f"in the Hugging Face cache; fetch it once (on a machine with access to the hub) with "
                     f"`hf download {repo}{sub}` (older huggingface_hub: `huggingface-cli download ...`), "
                     f"or point {TOKENIZER_ENV} at a folder holding a CLIPTokenizer (e.g. the tokenizer/ "
                     "folder of a diffusers SD pipeline)")


def _load_tokenizer(cls, name: str, subfolder: str | None):
    # transformers 5 builds an empty tokenizer (2 tokens) from a folder or repo without vocabulary
    # files rather than failing: callers check the size
    try:
        return cls.from_pretrained(name, subfolder=subfolder or "", local_files_only=True)
    except (OSError, ValueError, TypeError):
        return None
