"""CLIP tokenizers: a single-file checkpoint's, found offline; a pipeline folder's under transformers 4.x.

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
# SDXL's first tokenizer is SD 1.x's, its second ("sdxl-2", of the OpenCLIP encoder) pads as SD 2.x's.
_CACHED_TOKENIZERS = {"sd1": [("openai/clip-vit-large-patch14", None), ("stabilityai/stable-diffusion-2-1", "tokenizer")],
                      "sd2": [("stabilityai/stable-diffusion-2-1", "tokenizer"),
                              ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", None), ("openai/clip-vit-large-patch14", None)],
                      "sdxl": [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                               ("openai/clip-vit-large-patch14", None)],
                      "sdxl-2": [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                                 ("stabilityai/stable-diffusion-2-1", "tokenizer"), ("openai/clip-vit-large-patch14", None)]}
_PAD_TOKEN = {"sd1": "<|endoftext|>", "sd2": "!", "sdxl": "<|endoftext|>", "sdxl-2": "!"}
_SUBFOLDER = {"sdxl-2": "tokenizer_2"}  # a pipeline folder's tokenizer of each family
_TOKENIZER_FILES = "vocab.json merges.txt tokenizer.json tokenizer_config.json special_tokens_map.json"


def resolve_tokenizer(family: str, tokenizer: str | Path | None = None, config: Path | None = None,
                      path: Path | None = None, vocab_size: int = CLIP_VOCAB_SIZE) -> CLIPTokenizer:
    """The CLIP tokenizer of a single-file checkpoint, found offline.

    Args:
        family: "sd1", "sd2", "sdxl" or "sdxl-2" (SDXL's second tokenizer: a pipeline or config
            folder's ``tokenizer_2/``; a plain tokenizer folder is given "!" as its pad token, as
            SDXL's second tokenizer pads).
        tokenizer: A folder with a CLIPTokenizer (or a pipeline folder with ``tokenizer/``, and for
            "sdxl-2" ``tokenizer_2/``); None: ``$DAS_SD_TOKENIZER``, then ``config``'s tokenizer
            folder, then the Hugging Face cache.
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
    subfolder = _SUBFOLDER.get(family, "tokenizer")
    explicit = tokenizer or os.environ.get(TOKENIZER_ENV) or None
    if explicit is None and config is not None and (config / subfolder).is_dir():
        explicit = config / subfolder
    if explicit is not None:
        folder = Path(explicit).expanduser()
        own = next((folder / sub for sub in (subfolder, "tokenizer") if (folder / sub).is_dir()), None)
        folder = own or folder
        found = _load_tokenizer(CLIPTokenizer, str(folder), None)
        if found is None or len(found) != vocab_size:
            what = "no CLIP tokenizer there" if found is None or len(found) < 10 else f"a tokenizer of {len(found)} tokens"
            raise ModelError(f"{where}{folder}: {what}; the text encoder takes {vocab_size} tokens")
        if folder.name != subfolder and family in _SUBFOLDER:
            found.pad_token = _PAD_TOKEN[family]  # one tokenizer folder for both of SDXL's: the second pads with "!"
        return found
    for repo, subfolder in _CACHED_TOKENIZERS[family]:
        found = _load_tokenizer(CLIPTokenizer, repo, subfolder)
        if found is not None and len(found) == vocab_size:
            found.pad_token = _PAD_TOKEN[family]
            return found
    repo = _CACHED_TOKENIZERS[family][0][0]
    sub = f" --include '{subfolder}/*'" if _CACHED_TOKENIZERS[family][0][1] else f" {_TOKENIZER_FILES}"
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


def fast_only_tokenizers(folder: Path, names: tuple[str, ...]) -> dict:
    """The pipeline's tokenizers that transformers 4.x cannot load by the class model_index.json names.

    A folder saved by transformers 5 (the embedded tiny models) holds only ``tokenizer.json``. From 5 on
    ``CLIPTokenizer`` reads it; before 5, ``CLIPTokenizer`` is the slow, pure-Python one, which needs
    ``vocab.json`` and ``merges.txt``, while ``CLIPTokenizerFast`` reads ``tokenizer.json`` with the
    same tokenizers library. Webui venvs pin transformers 4.x, so there those folders get the fast
    class; a folder with the vocabulary files is left to diffusers as it is.

    Args:
        folder: The pipeline folder.
        names: Its tokenizer subfolders ("tokenizer", and SDXL's "tokenizer_2").

    Returns:
        ``from_pretrained`` keyword arguments: subfolder name -> loaded tokenizer, for the folders that
        need it; {} under transformers 5 or later.
    """
    import transformers

    if int(transformers.__version__.split(".")[0]) >= 5:
        return {}
    from transformers import CLIPTokenizerFast

    out = {}
    for name in names:
        sub = folder / name
        if (sub / "tokenizer.json").is_file() and not (sub / "vocab.json").is_file():
            out[name] = CLIPTokenizerFast.from_pretrained(str(sub), local_files_only=True)
    return out
